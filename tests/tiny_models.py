"""Tiny random models in HF format, built on the spot (never downloaded), and their transformers twins."""
from __future__ import annotations

import hashlib
import json
import os
from functools import lru_cache

import torch

CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
CORPUS = [
    "The capital of France is Paris. The capital of Italy is Rome.",
    "hello world, this is a test of a tiny tokenizer for tiny models.",
    "Name three rivers: the Nile, the Amazon and the Yangtze.",
    "def add(a, b):\n    return a + b\n# numbers 0 1 2 3 4 5 6 7 8 9",
    "Unicode: café, naïve, 你好世界, こんにちは, 🙂🚀 and more.",
]
ARCHS = ("llama", "qwen2", "qwen3", "internlm2")


@lru_cache(maxsize=None)
def tiny_tokenizer_dir(root: str) -> str:
    """A byte-level BPE tokenizer (~400 tokens) with ChatML specials and template."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    path = os.path.join(root, "tokenizer")
    if os.path.exists(os.path.join(path, "tokenizer.json")):
        return path
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=SPECIAL_TOKENS,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(CORPUS * 4, trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<|endoftext|>", eos_token="<|im_end|>",
                                   pad_token="<|endoftext|>", unk_token="<|endoftext|>")
    fast.chat_template = CHATML_TEMPLATE
    fast.save_pretrained(path)
    return path


def _hf_config(arch: str, vocab_size: int, **overrides):
    from transformers import LlamaConfig, Qwen2Config, Qwen3Config

    common = dict(vocab_size=vocab_size, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024,
                  rms_norm_eps=1e-5, bos_token_id=0, eos_token_id=2, pad_token_id=0, torch_dtype="float32")
    common.update(overrides)
    if arch in ("llama", "internlm2"):
        return LlamaConfig(**common)
    if arch == "qwen2":
        return Qwen2Config(**common)
    if arch == "qwen3":
        common.setdefault("head_dim", 32)
        return Qwen3Config(**common)
    raise ValueError(arch)


def build_tiny_model(root: str, arch: str = "llama", seed: int = 0, **overrides) -> str:
    """Writes a tiny random model of ``arch`` under ``root`` and returns its folder."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tag = hashlib.md5(repr(sorted(overrides.items())).encode()).hexdigest()[:8] if overrides else "base"
    path = os.path.join(root, f"{arch}-{tag}-s{seed}")
    if os.path.exists(os.path.join(path, "config.json")):
        return path
    tok_dir = tiny_tokenizer_dir(root)
    tokenizer = AutoTokenizer.from_pretrained(tok_dir)
    torch.manual_seed(seed)
    config = _hf_config(arch, len(tokenizer), **overrides)
    model = AutoModelForCausalLM.from_config(config, torch_dtype=torch.float32)
    with torch.no_grad():  # HF's init is small; widen it so logits are not all near-ties
        for pname, p in model.named_parameters():
            if "norm" in pname:
                p.normal_(1.0, 0.05)
            elif p.dim() > 1:
                p.normal_(0, 0.08)
            else:
                p.normal_(0, 0.02)
    tokenizer.save_pretrained(path)
    if arch == "internlm2":
        _save_as_internlm2(model, path)
    else:
        model.save_pretrained(path, safe_serialization=True)
    return path


def load_reference(path: str):
    """The transformers model holding the same weights (InternLM2 folders load as the Llama they came from)."""
    from transformers import AutoModelForCausalLM

    ref = path + "-llama-ref" if os.path.exists(path + "-llama-ref") else path
    return AutoModelForCausalLM.from_pretrained(ref, torch_dtype=torch.float32).eval()


def reference_greedy(model, ids, n: int) -> list:
    """``ids`` followed by transformers' ``n`` greedy tokens (full recompute each step: no cache to trust)."""
    ids = torch.tensor([ids], device=model.device)
    with torch.no_grad():
        for _ in range(n):
            ids = torch.cat([ids, model(ids).logits[0, -1].argmax().view(1, 1)], 1)
    return ids[0].tolist()


def _save_as_internlm2(model, path: str) -> None:
    """InternLM2 layout: packed ``wqkv`` grouped per KV head as [q * groups, k, v]."""
    from safetensors.torch import save_file

    cfg = model.config
    model.save_pretrained(path + "-llama-ref", safe_serialization=True)
    head_dim = cfg.hidden_size // cfg.num_attention_heads
    groups = cfg.num_attention_heads // cfg.num_key_value_heads
    sd = model.state_dict()
    out = {"model.tok_embeddings.weight": sd["model.embed_tokens.weight"],
           "model.norm.weight": sd["model.norm.weight"], "output.weight": sd["lm_head.weight"]}
    for i in range(cfg.num_hidden_layers):
        p = f"model.layers.{i}."
        q = sd[p + "self_attn.q_proj.weight"].view(cfg.num_key_value_heads, groups, head_dim, -1)
        k = sd[p + "self_attn.k_proj.weight"].view(cfg.num_key_value_heads, 1, head_dim, -1)
        v = sd[p + "self_attn.v_proj.weight"].view(cfg.num_key_value_heads, 1, head_dim, -1)
        out[p + "attention.wqkv.weight"] = torch.cat([q, k, v], 1).reshape(-1, cfg.hidden_size).contiguous()
        out[p + "attention.wo.weight"] = sd[p + "self_attn.o_proj.weight"]
        out[p + "feed_forward.w1.weight"] = sd[p + "mlp.gate_proj.weight"]
        out[p + "feed_forward.w3.weight"] = sd[p + "mlp.up_proj.weight"]
        out[p + "feed_forward.w2.weight"] = sd[p + "mlp.down_proj.weight"]
        out[p + "attention_norm.weight"] = sd[p + "input_layernorm.weight"]
        out[p + "ffn_norm.weight"] = sd[p + "post_attention_layernorm.weight"]
    save_file({k: v.contiguous() for k, v in out.items()}, os.path.join(path, "model.safetensors"))
    config = dict(architectures=["InternLM2ForCausalLM"], model_type="internlm2", vocab_size=cfg.vocab_size,
                  hidden_size=cfg.hidden_size, intermediate_size=cfg.intermediate_size,
                  num_hidden_layers=cfg.num_hidden_layers, num_attention_heads=cfg.num_attention_heads,
                  num_key_value_heads=cfg.num_key_value_heads, max_position_embeddings=cfg.max_position_embeddings,
                  rms_norm_eps=cfg.rms_norm_eps, rope_theta=getattr(cfg, "rope_theta", 10000.0), bias=False,
                  tie_word_embeddings=False, bos_token_id=0, eos_token_id=2, pad_token_id=0, torch_dtype="float32")
    with open(os.path.join(path, "config.json"), "w") as f:
        json.dump(config, f, indent=2)


def tiny_config(**kwargs):
    """Engine options for tiny models: fp32 (parity) and a small, fixed cache."""
    from lmwrap_engine import PytorchEngineConfig
    return PytorchEngineConfig(**{"dtype": "float32", "num_gpu_blocks": 32, "block_size": 16, **kwargs})


def assert_all_blocks_free(pipe):
    stats = pipe.stats()
    assert stats["num_free_blocks"] == stats["num_blocks"], stats


def assert_compiled_decode_matches_eager(runner, atol: float = 1e-4) -> None:
    """A compiled decode step (batch 3, then batch 1) gives the eager step's logits over a random KV
    cache: three sequences of 10, 4 and 7 tokens (block size 4), each step writing each one's last token."""
    from lmwrap_engine.engine.cuda_graph import DecodeGraphs
    compiled = runner.decode_graphs
    eager = DecodeGraphs(runner.model, runner.step_context, 8, 16, runner.args.hidden_size, runner.dtype,
                         runner.device, capture=False)
    torch.manual_seed(0)
    runner.k_cache.normal_()
    runner.v_cache.normal_()
    step = dict(input_ids=[5, 7, 11], positions=[9, 3, 6], slots=[2 * 4 + 1, 5 * 4 + 3, 8 * 4 + 2],
                kv_lens=[10, 4, 7], block_tables=[[0, 1, 2], [5], [7, 8]])
    with torch.inference_mode():
        want = runner.model.compute_logits(eager.run(**step))
        got = compiled.run(**step)
        one = compiled.run(**{key: value[:1] for key, value in step.items()})
    torch.testing.assert_close(got, want, atol=atol, rtol=atol)
    torch.testing.assert_close(one, want[:1], atol=atol, rtol=atol)
    assert not compiled.failed
