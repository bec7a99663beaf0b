"""InternLM2: Llama under other names, with q/k/v packed per KV head as ``[q * groups, k, v]`` in ``wqkv``."""
from __future__ import annotations

from typing import Iterable, Tuple

import torch

from .llama import LlamaForCausalLM

_RENAMES = {
    "model.tok_embeddings.": "model.embed_tokens.",
    "attention.wo.": "self_attn.o_proj.",
    "feed_forward.w1.": "mlp.gate_proj.",
    "feed_forward.w3.": "mlp.up_proj.",
    "feed_forward.w2.": "mlp.down_proj.",
    "attention_norm.": "input_layernorm.",
    "ffn_norm.": "post_attention_layernorm.",
}


class InternLM2ForCausalLM(LlamaForCausalLM):
    def load_weights(self, weights: Iterable[Tuple[str, torch.Tensor]]) -> None:
        super().load_weights(self._to_llama_names(weights))

    def _to_llama_names(self, weights):
        args = self.args
        groups = args.num_heads // args.num_kv_heads
        for name, tensor in weights:
            if name == "output.weight":
                yield "lm_head.weight", tensor
                continue
            if ".attention.wqkv." in name:
                tensor = tensor.materialize() if hasattr(tensor, "materialize") else tensor  # packed per KV head
                prefix, kind = name.split(".attention.wqkv.")
                packed = tensor.view(args.num_kv_heads, groups + 2, args.head_dim, *tensor.shape[1:])
                for proj, part in (("q_proj", packed[:, :groups]), ("k_proj", packed[:, groups]),
                                   ("v_proj", packed[:, groups + 1])):
                    yield f"{prefix}.self_attn.{proj}.{kind}", part.reshape(-1, *tensor.shape[1:])
                continue
            for old, new in _RENAMES.items():
                name = name.replace(old, new)
            yield name, tensor
