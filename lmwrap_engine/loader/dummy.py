"""Random weights and weightless model folders, for benchmarks at real model shapes.

A dummy folder holds a real ``config.json`` and a tokenizer whose vocabulary is exactly the
model's, so every id decodes: bos/eos at the config's ids, 256 byte tokens (any text encodes),
and id ``i`` decoding to ``" t{i}"`` for the rest. No weight files: open it with
``EngineConfig(load_format="dummy")``.
"""
from __future__ import annotations

import json
import os
import shutil
import tempfile

import torch

from ..config import cache_root

_LLAMA_3_1_8B = {
    "architectures": ["LlamaForCausalLM"],
    "model_type": "llama",
    "attention_bias": False,
    "attention_dropout": 0.0,
    "bos_token_id": 128000,
    "eos_token_id": 128001,
    "hidden_act": "silu",
    "hidden_size": 4096,
    "initializer_range": 0.02,
    "intermediate_size": 14336,
    "max_position_embeddings": 131072,
    "mlp_bias": False,
    "num_attention_heads": 32,
    "num_hidden_layers": 32,
    "num_key_value_heads": 8,
    "pretraining_tp": 1,
    "rms_norm_eps": 1e-05,
    "rope_scaling": {"factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                     "original_max_position_embeddings": 8192, "rope_type": "llama3"},
    "rope_theta": 500000.0,
    "tie_word_embeddings": False,
    "torch_dtype": "bfloat16",
    "use_cache": True,
    "vocab_size": 128256,
}

_QWEN2_5_7B = {  # Qwen/Qwen2.5-7B-Instruct
    "architectures": ["Qwen2ForCausalLM"],
    "model_type": "qwen2",
    "attention_dropout": 0.0,
    "bos_token_id": 151643,
    "eos_token_id": 151645,
    "hidden_act": "silu",
    "hidden_size": 3584,
    "initializer_range": 0.02,
    "intermediate_size": 18944,
    "max_position_embeddings": 32768,
    "max_window_layers": 28,
    "num_attention_heads": 28,
    "num_hidden_layers": 28,
    "num_key_value_heads": 4,
    "rms_norm_eps": 1e-06,
    "rope_theta": 1000000.0,
    "sliding_window": 131072,
    "tie_word_embeddings": False,
    "torch_dtype": "bfloat16",
    "use_cache": True,
    "use_sliding_window": False,
    "vocab_size": 152064,
}

_SMOLLM2_135M = {
    "architectures": ["LlamaForCausalLM"],
    "model_type": "llama",
    "attention_bias": False,
    "bos_token_id": 1,
    "eos_token_id": 2,
    "pad_token_id": 2,
    "head_dim": 64,
    "hidden_act": "silu",
    "hidden_size": 576,
    "initializer_range": 0.041666666666666664,
    "intermediate_size": 1536,
    "max_position_embeddings": 8192,
    "num_attention_heads": 9,
    "num_hidden_layers": 30,
    "num_key_value_heads": 3,
    "rms_norm_eps": 1e-05,
    "rope_theta": 100000.0,
    "tie_word_embeddings": True,
    "torch_dtype": "bfloat16",
    "vocab_size": 49152,
}

_TINY_LLAMA = {  # for tests and smoke runs
    "architectures": ["LlamaForCausalLM"],
    "model_type": "llama",
    "bos_token_id": 1,
    "eos_token_id": 2,
    "hidden_act": "silu",
    "hidden_size": 64,
    "intermediate_size": 128,
    "max_position_embeddings": 4096,
    "num_attention_heads": 4,
    "num_hidden_layers": 2,
    "num_key_value_heads": 2,
    "rms_norm_eps": 1e-05,
    "rope_theta": 10000.0,
    "tie_word_embeddings": False,
    "torch_dtype": "float32",
    "vocab_size": 512,
}

SHAPES = {
    "llama-3.1-8b": _LLAMA_3_1_8B,
    "qwen2.5-7b": _QWEN2_5_7B,
    "smollm2-135m": _SMOLLM2_135M,
    "tiny-llama": _TINY_LLAMA,
}

WEIGHT_STD = 0.02
BIAS_STD = 0.01


@torch.no_grad()
def init_dummy_weights(model: torch.nn.Module, seed: int = 0) -> None:
    """Fill every parameter in place, on its own device: norm weights ~ 1, others ~ N(0, 0.02²).

    Deterministic for a seed (and device). Tied parameters are filled once.
    """
    generators = {}
    for name, param in model.named_parameters():
        if param.device not in generators:
            generators[param.device] = torch.Generator(device=param.device).manual_seed(seed)
        gen = generators[param.device]
        if "norm" in name:
            param.uniform_(0.9, 1.1, generator=gen)
        else:
            param.normal_(0.0, BIAS_STD if name.endswith("bias") else WEIGHT_STD, generator=gen)


def _special_ids(config: dict):
    """(bos, eos) ids of a dummy folder, from its config (bos falls back to eos)."""
    first = lambda value: value[0] if isinstance(value, list) else value  # noqa: E731
    eos = first(config.get("eos_token_id"))
    eos = 0 if eos is None else eos
    bos = first(config.get("bos_token_id"))
    return (eos if bos is None else bos), eos


def _write_tokenizer(path: str, config: dict) -> None:
    # Byte-level BPE without merges: any text encodes (a token per byte) and every id decodes. It is
    # the shape transformers forces on some model types (qwen2 gets Qwen2Tokenizer whatever the
    # folder says), so the folder behaves the same whichever class AutoTokenizer picks.
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    bos, eos = _special_ids(config)
    names = {bos: "<|bos|>", eos: "<|eos|>"}  # bos == eos: one token, named eos
    free = (i for i in range(config["vocab_size"]) if i not in names)
    vocab = {name: i for i, name in names.items()}
    vocab.update(zip(sorted(pre_tokenizers.ByteLevel.alphabet()), free))
    vocab.update((f"\u0120t{i}", i) for i in free)  # decodes to " t{i}"; only reachable by id
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=names[bos], eos_token=names[eos],
                                   pad_token=names[eos], unk_token=names[eos])
    # ChatML's shape, with bos/eos as the turn markers.
    fast.chat_template = (
        "{% for message in messages %}"
        "{{ '" + names[bos] + "' + message['role'] + '\\n' + message['content'] + '" + names[eos] + "\\n' }}"
        "{% endfor %}"
        "{% if add_generation_prompt %}{{ '" + names[bos] + "assistant\\n' }}{% endif %}"
    )
    fast.save_pretrained(path)


def dummy_cache_dir() -> str:
    """Where benchmarks keep dummy folders: ``$LMWRAP_CACHE/dummy`` if set, else ``~/.cache/lmwrap/dummy``."""
    return os.path.join(cache_root(), "dummy")


def write_dummy_model_dir(shape: str, root: str) -> str:
    """Writes ``root/<shape>/`` (config.json and tokenizer, no weights) and returns it; reused when current."""
    if shape not in SHAPES:
        raise ValueError(f"unknown dummy model shape {shape!r}; known: {', '.join(SHAPES)}")
    config = SHAPES[shape]
    path = os.path.join(root, shape)
    config_path = os.path.join(path, "config.json")
    if os.path.exists(os.path.join(path, "tokenizer.json")) and os.path.exists(config_path):
        with open(config_path) as f:
            if json.load(f) == config:
                return path
    os.makedirs(root, exist_ok=True)
    # Built aside and renamed into place, so a concurrent or interrupted run never sees half a folder.
    tmp = tempfile.mkdtemp(prefix=f".{shape}-", dir=root)
    try:
        with open(os.path.join(tmp, "config.json"), "w") as f:
            json.dump(config, f, indent=2)
        _write_tokenizer(tmp, config)
        shutil.rmtree(path, ignore_errors=True)
        os.replace(tmp, path)
    except OSError:
        if not os.path.exists(config_path):
            raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return path
