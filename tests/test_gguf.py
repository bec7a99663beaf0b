"""GGUF -> HF folder conversion: weights, config and tokenizer equal transformers' own GGUF reading."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

from lmwrap_engine.loader.gguf import GGUFError, gguf_to_hf_dir
from tiny_models import CHATML_TEMPLATE, CORPUS, SPECIAL_TOKENS

gguf = pytest.importorskip("gguf")


# ---------------------------------------------------------------- writing a GGUF the way llama.cpp does


def _llama_cpp_permute(weights: np.ndarray, num_heads: int) -> np.ndarray:
    # llama.cpp's convert_hf_to_gguf.py LlamaModel.permute
    return (weights.reshape(num_heads, 2, weights.shape[0] // num_heads // 2, *weights.shape[1:])
            .swapaxes(1, 2).reshape(weights.shape))


def _tokenizer_metadata(hf_dir: str) -> tuple[list[str], list[int], list[str]]:
    with open(os.path.join(hf_dir, "tokenizer.json"), encoding="utf-8") as f:
        model = json.load(f)["model"]
    tokens = [token for token, _ in sorted(model["vocab"].items(), key=lambda item: item[1])]
    assert len(tokens) == max(model["vocab"].values()) + 1
    types = [3 if token in SPECIAL_TOKENS else 1 for token in tokens]  # 3: control, 1: normal
    merges = [m if isinstance(m, str) else " ".join(m) for m in model["merges"]]
    return tokens, types, merges


def write_gguf(hf_dir: str, out_path: str, qtype=None) -> str:
    """Write the HF model in ``hf_dir`` as a GGUF file; 2-D weights in ``qtype`` (F32 when None)."""
    from safetensors.numpy import load_file

    with open(os.path.join(hf_dir, "config.json")) as f:
        cfg = json.load(f)
    arch = cfg["model_type"]
    head_dim = cfg.get("head_dim") or cfg["hidden_size"] // cfg["num_attention_heads"]
    name_map = gguf.get_tensor_name_map({"llama": gguf.MODEL_ARCH.LLAMA, "qwen2": gguf.MODEL_ARCH.QWEN2,
                                         "qwen3": gguf.MODEL_ARCH.QWEN3}[arch], cfg["num_hidden_layers"])
    writer = gguf.GGUFWriter(out_path, arch)
    writer.add_name("tiny test model")
    writer.add_context_length(cfg["max_position_embeddings"])
    writer.add_embedding_length(cfg["hidden_size"])
    writer.add_feed_forward_length(cfg["intermediate_size"])
    writer.add_block_count(cfg["num_hidden_layers"])
    writer.add_head_count(cfg["num_attention_heads"])
    writer.add_head_count_kv(cfg["num_key_value_heads"])
    writer.add_layer_norm_rms_eps(cfg["rms_norm_eps"])
    writer.add_rope_freq_base(cfg.get("rope_theta") or cfg["rope_parameters"]["rope_theta"])
    writer.add_vocab_size(cfg["vocab_size"])
    if arch == "llama":
        writer.add_rope_dimension_count(head_dim)
    if head_dim != cfg["hidden_size"] // cfg["num_attention_heads"]:
        writer.add_key_length(head_dim)
        writer.add_value_length(head_dim)
    tokens, types, merges = _tokenizer_metadata(hf_dir)
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("default")
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    writer.add_token_merges(merges)
    writer.add_bos_token_id(cfg["bos_token_id"])
    writer.add_eos_token_id(cfg["eos_token_id"])
    writer.add_pad_token_id(cfg["pad_token_id"])
    writer.add_add_bos_token(False)
    writer.add_chat_template(CHATML_TEMPLATE)

    state = load_file(os.path.join(hf_dir, "model.safetensors"))
    for hf_name, array in state.items():
        base, suffix = hf_name.rsplit(".", 1)
        if cfg.get("tie_word_embeddings") and base == "lm_head":
            continue
        if arch == "llama" and base.endswith("q_proj"):
            array = _llama_cpp_permute(array, cfg["num_attention_heads"])
        elif arch == "llama" and base.endswith("k_proj"):
            array = _llama_cpp_permute(array, cfg["num_key_value_heads"])
        gguf_name = f"{name_map.get_name(base)}.{suffix}"
        if qtype is not None and array.ndim == 2:  # llama.cpp keeps norms and biases in F32
            writer.add_tensor(gguf_name, gguf.quants.quantize(array, qtype), raw_dtype=qtype)
        else:
            writer.add_tensor(gguf_name, np.ascontiguousarray(array, dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return out_path


# ---------------------------------------------------------------- references


def transformers_gguf_model(gguf_path: str):
    """The model transformers builds from the file: its config reading and its own GGUF tensor loader
    (what ``from_pretrained(dir, gguf_file=...)`` runs for these architectures, minus its accelerate check)."""
    from transformers import AutoConfig, AutoModelForCausalLM
    from transformers.modeling_gguf_pytorch_utils import load_gguf_checkpoint

    folder, name = os.path.split(gguf_path)
    config = AutoConfig.from_pretrained(folder, gguf_file=name)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval()
    tensors = load_gguf_checkpoint(gguf_path, return_tensors=True, model_to_load=model)["tensors"]
    result = model.load_state_dict(tensors, strict=False)
    assert not result.unexpected_keys
    assert set(result.missing_keys) <= {"lm_head.weight"} and (not result.missing_keys or config.tie_word_embeddings)
    model.tie_weights()
    return model, tensors


def load_folder_weights(folder: str) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(os.path.join(folder, "model.safetensors"))


def hf_model(folder: str):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()


def logits(model, ids: list[int]) -> torch.Tensor:
    with torch.no_grad():
        return model(torch.tensor([ids])).logits[0]


PROMPT_IDS = [5, 17, 42, 99, 3, 250, 7, 64, 1, 2]


@pytest.fixture(scope="module")
def tiny_llama(tiny_model_dir):
    return tiny_model_dir("llama", seed=1)


# ---------------------------------------------------------------- tiny models


def test_f32_llama_equals_source_and_transformers(tiny_llama, tmp_path):
    path = write_gguf(tiny_llama, str(tmp_path / "tiny-f32.gguf"))
    folder = gguf_to_hf_dir(path, cache_root=str(tmp_path / "cache"))

    with open(os.path.join(folder, "config.json")) as f:
        config = json.load(f)
    with open(os.path.join(tiny_llama, "config.json")) as f:
        source_config = json.load(f)
    assert config["architectures"] == ["LlamaForCausalLM"] and config["model_type"] == "llama"
    for key in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                "num_key_value_heads", "max_position_embeddings", "bos_token_id", "eos_token_id"):
        assert config[key] == source_config[key], key
    assert config["tie_word_embeddings"] is False
    assert config["head_dim"] == 16 and config["torch_dtype"] == "float32"
    assert config["rms_norm_eps"] == pytest.approx(1e-5, rel=1e-6)

    # F32 round trip: the source weights come back bit for bit, so the Q/K permutation is undone exactly.
    converted = load_folder_weights(folder)
    source = hf_model(tiny_llama)
    assert set(converted) == set(source.state_dict())
    for name, tensor in source.state_dict().items():
        assert converted[name].dtype == torch.float32
        assert torch.equal(converted[name], tensor), name

    reference, reference_tensors = transformers_gguf_model(path)
    for name, tensor in reference_tensors.items():
        assert torch.equal(converted[name], tensor), name
    model = hf_model(folder)
    assert torch.equal(logits(model, PROMPT_IDS), logits(reference, PROMPT_IDS))
    assert torch.equal(logits(model, PROMPT_IDS), logits(source, PROMPT_IDS))


def test_q8_0_tied_llama_equals_transformers_dequant(tiny_model_dir, tmp_path):
    source_dir = tiny_model_dir("llama", seed=2, tie_word_embeddings=True)
    path = write_gguf(source_dir, str(tmp_path / "tiny-q8_0.gguf"), qtype=gguf.GGMLQuantizationType.Q8_0)
    reader = gguf.GGUFReader(path)
    assert {t.tensor_type.name for t in reader.tensors} == {"Q8_0", "F32"}
    folder = gguf_to_hf_dir(path, cache_root=str(tmp_path / "cache"))

    with open(os.path.join(folder, "config.json")) as f:
        assert json.load(f)["tie_word_embeddings"] is True
    converted = load_folder_weights(folder)
    assert "lm_head.weight" not in converted

    reference, reference_tensors = transformers_gguf_model(path)
    assert set(converted) == set(reference_tensors)
    for name, tensor in reference_tensors.items():
        assert converted[name].dtype == torch.float32
        assert torch.equal(converted[name], tensor), name
    # and the dequantised weights are the source's, up to Q8_0's rounding
    source = hf_model(source_dir).state_dict()
    q_proj = "model.layers.1.self_attn.q_proj.weight"
    assert not torch.equal(converted[q_proj], source[q_proj])
    torch.testing.assert_close(converted[q_proj], source[q_proj], rtol=0, atol=0.01)

    model = hf_model(folder)
    assert torch.equal(model.lm_head.weight, model.model.embed_tokens.weight)
    assert torch.equal(logits(model, PROMPT_IDS), logits(reference, PROMPT_IDS))


@pytest.mark.parametrize("arch", ["qwen2", "qwen3"])
def test_qwen_f32_equals_source(arch, tiny_model_dir, tmp_path):
    source_dir = tiny_model_dir(arch, seed=3)
    path = write_gguf(source_dir, str(tmp_path / f"tiny-{arch}.gguf"))
    folder = gguf_to_hf_dir(path, cache_root=str(tmp_path / "cache"))
    with open(os.path.join(folder, "config.json")) as f:
        config = json.load(f)
    assert config["model_type"] == arch
    assert config["head_dim"] == (32 if arch == "qwen3" else 16)
    converted = load_folder_weights(folder)
    source = hf_model(source_dir)
    assert set(converted) == set(source.state_dict())
    for name, tensor in source.state_dict().items():
        assert torch.equal(converted[name], tensor), name
    if arch == "qwen2":
        assert "model.layers.0.self_attn.q_proj.bias" in converted
    else:
        assert "model.layers.0.self_attn.q_norm.weight" in converted
    assert torch.equal(logits(hf_model(folder), PROMPT_IDS), logits(source, PROMPT_IDS))


def test_tokenizer_matches_source_and_carries_chat_template(tiny_llama, tmp_path):
    from transformers import AutoTokenizer

    path = write_gguf(tiny_llama, str(tmp_path / "tiny.gguf"))
    folder = gguf_to_hf_dir(path, cache_root=str(tmp_path / "cache"))
    with open(os.path.join(folder, "tokenizer_config.json")) as f:
        tokenizer_config = json.load(f)
    assert tokenizer_config["chat_template"] == CHATML_TEMPLATE
    assert tokenizer_config["add_bos_token"] is False
    with open(os.path.join(folder, "generation_config.json")) as f:
        assert json.load(f) == {"bos_token_id": 0, "eos_token_id": 2, "pad_token_id": 0}

    converted = AutoTokenizer.from_pretrained(folder)
    source = AutoTokenizer.from_pretrained(tiny_llama)
    from_gguf = AutoTokenizer.from_pretrained(str(tmp_path), gguf_file="tiny.gguf")
    assert converted.eos_token == "<|im_end|>" and converted.eos_token_id == 2
    for text in CORPUS + ["<|im_start|>user\nhi there<|im_end|>\n", "  leading spaces and 12345"]:
        ids = source(text, add_special_tokens=True).input_ids
        assert converted(text).input_ids == ids == from_gguf(text).input_ids, text
        assert converted.decode(ids) == source.decode(ids)
    messages = [{"role": "user", "content": "The capital of France?"}]
    prompt = converted.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    assert prompt == "<|im_start|>user\nThe capital of France?<|im_end|>\n<|im_start|>assistant\n"


def test_second_call_is_a_cache_hit_keyed_on_path_size_mtime(tiny_llama, tmp_path):
    path = write_gguf(tiny_llama, str(tmp_path / "tiny.gguf"))
    cache = tmp_path / "cache"
    folder = gguf_to_hf_dir(path, cache_root=str(cache))
    assert gguf_to_hf_dir(path, cache_root=str(cache)) == folder
    assert sorted(os.listdir(cache)) == [os.path.basename(folder)]  # no partial folder left behind

    # A hit only stats the file: same size and mtime with garbage inside still returns the folder.
    stat = os.stat(path)
    with open(path, "r+b") as f:
        f.write(b"\0" * stat.st_size)
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    assert gguf_to_hf_dir(path, cache_root=str(cache)) == folder
    # A new mtime is a new file: it is read again (and this one is garbage now).
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))
    with pytest.raises(GGUFError, match="not a GGUF file"):
        gguf_to_hf_dir(path, cache_root=str(cache))
    assert sorted(os.listdir(cache)) == [os.path.basename(folder)]


def test_cache_root_defaults_to_lmwrap_cache_env(tiny_llama, tmp_path, monkeypatch):
    path = write_gguf(tiny_llama, str(tmp_path / "tiny.gguf"))
    monkeypatch.setenv("LMWRAP_CACHE", str(tmp_path / "env-cache"))
    folder = gguf_to_hf_dir(path)
    assert os.path.dirname(folder) == str(tmp_path / "env-cache")
    assert os.path.basename(folder).startswith("tiny-")


def test_abandoned_partial_folder_is_removed(tiny_llama, tmp_path):
    path = write_gguf(tiny_llama, str(tmp_path / "tiny.gguf"))
    cache = tmp_path / "cache"
    folder = gguf_to_hf_dir(path, cache_root=str(cache))
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    name = os.path.basename(folder)
    partial = cache / f".{name}.partial-{dead.pid}-abc"
    partial.mkdir()
    (partial / "model.safetensors").write_bytes(b"half written")
    import shutil
    shutil.rmtree(folder)  # forces a conversion, which clears the dead process's leftovers
    assert gguf_to_hf_dir(path, cache_root=str(cache)) == folder
    assert sorted(os.listdir(cache)) == [name]


def test_bad_files_give_clear_errors(tiny_llama, tmp_path):
    cache = tmp_path / "cache"
    text = tmp_path / "notes.gguf"
    text.write_text("this is not a model\n" * 10)
    with pytest.raises(GGUFError, match=r"notes\.gguf is not a GGUF file"):
        gguf_to_hf_dir(str(text), cache_root=str(cache))

    good = write_gguf(tiny_llama, str(tmp_path / "tiny.gguf"))
    truncated = tmp_path / "truncated.gguf"
    with open(good, "rb") as f:
        truncated.write_bytes(f.read(os.path.getsize(good) // 2))
    with pytest.raises(GGUFError, match=r"truncated\.gguf is not a readable GGUF file"):
        gguf_to_hf_dir(str(truncated), cache_root=str(cache))

    with pytest.raises(FileNotFoundError, match="GGUF file not found"):
        gguf_to_hf_dir(str(tmp_path / "missing.gguf"), cache_root=str(cache))
    with pytest.raises(GGUFError, match="not a file"):
        gguf_to_hf_dir(str(tmp_path), cache_root=str(cache))

    unsupported = tmp_path / "mamba.gguf"
    writer = gguf.GGUFWriter(str(unsupported), "mamba")
    writer.add_tensor("token_embd.weight", np.zeros((8, 32), dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    with pytest.raises(GGUFError, match="architecture 'mamba' is not supported"):
        gguf_to_hf_dir(str(unsupported), cache_root=str(cache))
    assert not cache.exists() or os.listdir(cache) == []  # failures leave nothing in the cache


# ---------------------------------------------------------------- the default model (on disk, no download)


@pytest.fixture(scope="module")
def default_folder():
    from lmwrap_engine.model_path import resolve_model_path

    return resolve_model_path(None)


def test_default_model_folder(default_folder):
    from transformers import AutoConfig, AutoTokenizer

    config = AutoConfig.from_pretrained(default_folder)
    assert config.model_type == "llama" and config.architectures == ["LlamaForCausalLM"]
    assert (config.hidden_size, config.num_hidden_layers, config.num_attention_heads,
            config.num_key_value_heads, config.vocab_size) == (576, 30, 9, 3, 49152)
    assert config.tie_word_embeddings is True
    tokenizer = AutoTokenizer.from_pretrained(default_folder)
    assert tokenizer.chat_template
    prompt = tokenizer.apply_chat_template([{"role": "user", "content": "hi"}], add_generation_prompt=True,
                                           tokenize=False)
    assert prompt.endswith("<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n")
    assert tokenizer.eos_token == "<|im_end|>" and tokenizer.eos_token_id == 2


def test_default_model_q_k_proj_equal_transformers_dequant(default_folder):
    from safetensors import safe_open
    from transformers.modeling_gguf_pytorch_utils import LlamaTensorProcessor

    from lmwrap_engine.model_path import default_gguf_path

    processor = LlamaTensorProcessor(config={"num_attention_heads": 9, "num_key_value_heads": 3})
    tensors = {t.name: t for t in gguf.GGUFReader(default_gguf_path()).tensors}
    with safe_open(os.path.join(default_folder, "model.safetensors"), "pt") as f:
        for layer in (0, 29):
            for part, hf_part in (("attn_q", "q_proj"), ("attn_k", "k_proj")):
                tensor = tensors[f"blk.{layer}.{part}.weight"]
                assert tensor.tensor_type.name == "Q4_1"
                values = gguf.quants.dequantize(tensor.data, tensor.tensor_type)
                expected = torch.from_numpy(np.copy(processor.process(values, tensor.name).weights))
                ours = f.get_tensor(f"model.layers.{layer}.self_attn.{hf_part}.weight")
                assert ours.dtype == torch.float32 and torch.equal(ours, expected)


@pytest.mark.slow
def test_default_model_equals_transformers_gguf_loader(default_folder):
    from lmwrap_engine.model_path import default_gguf_path

    reference, reference_tensors = transformers_gguf_model(default_gguf_path())
    converted = load_folder_weights(default_folder)
    assert set(converted) == set(reference_tensors)
    for name, tensor in reference_tensors.items():
        assert torch.equal(converted[name], tensor), name
    ids = [1, 4093, 198, 1780, 314, 216, 34, 27, 34, 47, 2, 198, 1, 520, 9531, 198]
    assert torch.equal(logits(hf_model(default_folder), ids), logits(reference, ids))
