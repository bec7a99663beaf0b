"""Llama family (Llama 2/3, SmolLM2, Mistral); the base the other architectures extend."""
from __future__ import annotations

from typing import Iterable, Tuple

import torch
from torch import nn

from .config import ModelArgs
from .layers.activation import SiluAndMul
from .layers.attention import PagedAttention
from .layers.linear import (MergedColumnParallelLinear, ParallelLMHead, QKVParallelLinear, RowParallelLinear,
                            VocabParallelEmbedding)
from .layers.norm import RMSNorm
from .layers.rotary import RotaryEmbedding

import kernels


class LlamaAttention(nn.Module):
    def __init__(self, args: ModelArgs, qkv_bias: bool, qk_norm: bool = False):
        super().__init__()
        tp = dict(tp_rank=args.tp_rank, tp_size=args.tp_size)
        self.qkv_proj = QKVParallelLinear(args.hidden_size, args.head_dim, args.num_heads, args.num_kv_heads,
                                          qkv_bias, **tp)
        self.num_heads = self.qkv_proj.num_heads  # this rank's heads
        self.num_kv_heads = self.qkv_proj.num_kv_heads
        self.head_dim = args.head_dim
        self.q_size = self.num_heads * self.head_dim
        self.kv_size = self.num_kv_heads * self.head_dim
        self.o_proj = RowParallelLinear(args.num_heads * self.head_dim, args.hidden_size, bias=False, **tp)
        self.attn = PagedAttention(self.num_heads, self.num_kv_heads, self.head_dim, self.head_dim ** -0.5)
        if qk_norm:
            self.q_norm = RMSNorm(self.head_dim, args.rms_norm_eps)
            self.k_norm = RMSNorm(self.head_dim, args.rms_norm_eps)
        else:
            self.q_norm = self.k_norm = None

    def forward(self, hidden: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        num_tokens = hidden.shape[0]
        q, k, v = self.qkv_proj(hidden).split([self.q_size, self.kv_size, self.kv_size], dim=-1)
        q = q.view(num_tokens, self.num_heads, self.head_dim)
        k = k.view(num_tokens, self.num_kv_heads, self.head_dim)
        v = v.view(num_tokens, self.num_kv_heads, self.head_dim)
        if self.q_norm is not None:
            q = self.q_norm(q)
            k = self.k_norm(k)
        q, k = kernels.apply_rotary(q, k, cos, sin)
        out = self.attn(q, k, v)
        return self.o_proj(out.reshape(num_tokens, self.q_size))


class LlamaMLP(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        tp = dict(tp_rank=args.tp_rank, tp_size=args.tp_size)
        self.gate_up_proj = MergedColumnParallelLinear(args.hidden_size, [args.intermediate_size] * 2, False, **tp)
        self.down_proj = RowParallelLinear(args.intermediate_size, args.hidden_size, bias=False, **tp)
        self.act_fn = SiluAndMul()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(self.act_fn(self.gate_up_proj(x)))


class LlamaDecoderLayer(nn.Module):
    def __init__(self, args: ModelArgs, qkv_bias: bool, qk_norm: bool):
        super().__init__()
        self.input_layernorm = RMSNorm(args.hidden_size, args.rms_norm_eps)
        self.self_attn = LlamaAttention(args, qkv_bias, qk_norm)
        self.post_attention_layernorm = RMSNorm(args.hidden_size, args.rms_norm_eps)
        self.mlp = LlamaMLP(args)

    def forward(self, hidden, residual, cos, sin):
        if residual is None:
            residual = hidden
            hidden = self.input_layernorm(hidden)
        else:
            hidden, residual = self.input_layernorm(hidden, residual)
        hidden = self.self_attn(hidden, cos, sin)
        hidden, residual = self.post_attention_layernorm(hidden, residual)
        return self.mlp(hidden), residual


class LlamaModel(nn.Module):
    def __init__(self, args: ModelArgs, qkv_bias: bool, qk_norm: bool):
        super().__init__()
        self.embed_tokens = VocabParallelEmbedding(args.vocab_size, args.hidden_size, args.tp_rank, args.tp_size)
        self.layers = nn.ModuleList(LlamaDecoderLayer(args, qkv_bias, qk_norm) for _ in range(args.num_layers))
        self.norm = RMSNorm(args.hidden_size, args.rms_norm_eps)
        self.rotary = RotaryEmbedding(args.head_dim, args.max_position_embeddings, args.rope_theta,
                                      args.rope_scaling)

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, input_embeds=None) -> torch.Tensor:
        hidden = self.embed_tokens(input_ids) if input_embeds is None else input_embeds
        cos, sin = self.rotary.cos_sin(positions, torch.float32)
        residual = None
        for layer in self.layers:
            hidden, residual = layer(hidden, residual, cos, sin)
        hidden, _ = self.norm(hidden, residual)
        return hidden


class LlamaForCausalLM(nn.Module):
    qkv_bias = False
    qk_norm = False
    # HF checkpoint name -> (our fused parameter, shard) for weights we store concatenated.
    packed_modules = {"q_proj": ("qkv_proj", "q"), "k_proj": ("qkv_proj", "k"), "v_proj": ("qkv_proj", "v"),
                      "gate_proj": ("gate_up_proj", 0), "up_proj": ("gate_up_proj", 1)}

    def __init__(self, args: ModelArgs):
        super().__init__()
        self.args = args
        self.model = LlamaModel(args, self.qkv_bias or args.attention_bias, self.qk_norm)
        self.lm_head = ParallelLMHead(args.hidden_size, args.vocab_size, args.tp_rank, args.tp_size)
        self.tie_weights()

    def tie_weights(self) -> None:
        if self.args.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, input_embeds=None) -> torch.Tensor:
        return self.model(input_ids, positions, input_embeds)

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.lm_head(hidden).float()

    def _shard_slice(self, shard) -> slice:
        args = self.args
        if shard == "q":
            return slice(0, args.num_heads * args.head_dim)
        if shard == "k":
            start = args.num_heads * args.head_dim
            return slice(start, start + args.num_kv_heads * args.head_dim)
        if shard == "v":
            start = (args.num_heads + args.num_kv_heads) * args.head_dim
            return slice(start, start + args.num_kv_heads * args.head_dim)
        return slice(shard * args.intermediate_size, (shard + 1) * args.intermediate_size)

    def load_weights(self, weights: Iterable[Tuple[str, torch.Tensor]]) -> None:
        """Copy HF-named checkpoint tensors in; fails on unknown names, bad shapes and missing tensors."""
        params = dict(self.named_parameters())
        modules = dict(self.named_modules())
        loaded = set()
        for name, tensor in weights:
            if "rotary_emb.inv_freq" in name or (name == "lm_head.weight" and self.args.tie_word_embeddings):
                continue
            target, shard = name, None
            for hf_name, (fused, fused_shard) in self.packed_modules.items():
                if f".{hf_name}." in name:
                    target, shard = name.replace(f".{hf_name}.", f".{fused}."), fused_shard
                    break
            if target not in params:
                raise ValueError(f"checkpoint tensor {name!r} has no place in {type(self).__name__}")
            dest = params[target].data
            owner, _, pname = target.rpartition(".")
            if hasattr(modules[owner], "shard_view"):  # a tensor-parallel layer: this rank's part only
                dest, tensor = modules[owner].shard_view(pname, dest, tensor, shard)
            elif shard is not None:
                dest = dest[self._shard_slice(shard)]
            if hasattr(tensor, "materialize"):  # a lazy checkpoint slice (loader/safetensors.py) still unread
                tensor = tensor.materialize()
            if dest.shape != tensor.shape:
                raise ValueError(f"checkpoint tensor {name!r} has shape {tuple(tensor.shape)}, "
                                 f"expected {tuple(dest.shape)}")
            dest.copy_(tensor)
            loaded.add((target, shard))
        shards_of = {}
        for fused, shard in self.packed_modules.values():
            shards_of.setdefault(fused, []).append(shard)
        expected = {(pname, shard) for pname in params
                    for shard in shards_of.get(pname.split(".")[-2], [None])}
        missing = sorted(str(m) for m in expected - loaded)
        if missing:
            raise ValueError(f"checkpoint is missing {len(missing)} tensors, e.g. {missing[:3]}")
