"""A .gguf file turned into a HF-format folder (config, float32 safetensors, tokenizer), once, and cached.

The cache key is the file's real path, size and mtime plus ``CONVERTER_VERSION``, so a cache hit costs one
``stat`` and never parses or hashes the file: that is what keeps cold start fast.
"""
from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import re
import shutil
import stat
import sys
import tempfile

logger = logging.getLogger(__name__)

CONVERTER_VERSION = 1  # bump whenever the folder this writes changes, so old caches are not reused
MAX_SHARD_BYTES = 4 << 30

ARCHITECTURES = {"llama": "LlamaForCausalLM", "qwen2": "Qwen2ForCausalLM", "qwen3": "Qwen3ForCausalLM"}

GLOBAL_TENSOR_NAMES = {
    "token_embd": "model.embed_tokens",
    "output_norm": "model.norm",
    "output": "lm_head",
}
LAYER_TENSOR_NAMES = {
    "attn_norm": "input_layernorm",
    "ffn_norm": "post_attention_layernorm",
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "attn_q_norm": "self_attn.q_norm",
    "attn_k_norm": "self_attn.k_norm",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
}
LAYER_TENSOR = re.compile(r"blk\.(\d+)\.(\w+)\.(weight|bias)")
# Llama 3.1-style per-dimension rope factors; transformers' GGUF loader drops them too.
IGNORED_TENSORS = {"rope_freqs.weight"}


class GGUFError(ValueError):
    """A file that is not a GGUF, is damaged, or holds a model this converter cannot turn into a HF folder."""


def gguf_cache_root() -> str:
    """Where converted folders live: ``$LMWRAP_CACHE`` if set, else ``~/.cache/lmwrap/gguf``."""
    return os.environ.get("LMWRAP_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "lmwrap", "gguf")


def gguf_to_hf_dir(gguf_path: str, cache_root: str | None = None) -> str:
    """Return a HF-format folder holding the model in ``gguf_path``, converting it on the first call.

    The folder has ``config.json``, ``model.safetensors`` (float32, dequantised with the ``gguf`` package and
    with llama.cpp's Q/K row permutation undone, so it equals what transformers' own GGUF loader produces),
    the tokenizer files with the file's chat template, and ``generation_config.json``. It is written to a
    temporary folder and renamed into place, so an interrupted conversion never leaves a half cache.
    """
    path = os.path.realpath(os.path.expanduser(os.fspath(gguf_path)))
    try:
        file_stat = os.stat(path)
    except FileNotFoundError:
        raise FileNotFoundError(f"GGUF file not found: {path}") from None
    if not stat.S_ISREG(file_stat.st_mode):
        raise GGUFError(f"{path} is not a file; pass the path of a .gguf file")
    root = os.path.abspath(os.path.expanduser(cache_root or gguf_cache_root()))
    out_dir = os.path.join(root, _cache_name(path, file_stat))
    if os.path.isfile(os.path.join(out_dir, "config.json")):
        return out_dir
    _check_magic(path)
    return _convert_atomically(path, out_dir)


def _cache_name(path: str, file_stat: os.stat_result) -> str:
    stem = re.sub(r"[^\w.\-]", "_", os.path.basename(path))
    if stem.lower().endswith(".gguf"):
        stem = stem[:-5]
    key = f"{CONVERTER_VERSION}\0{path}\0{file_stat.st_size}\0{file_stat.st_mtime_ns}"
    return f"{stem}-{hashlib.sha256(key.encode()).hexdigest()[:16]}"


def _check_magic(path: str) -> None:
    with open(path, "rb") as f:
        magic = f.read(4)
    if magic != b"GGUF":
        raise GGUFError(f"{path} is not a GGUF file: it starts with {magic!r}, not b'GGUF'")


def _convert_atomically(path: str, out_dir: str) -> str:
    root, name = os.path.split(out_dir)
    try:
        os.makedirs(root, exist_ok=True)
    except OSError as e:
        raise OSError(f"cannot create the GGUF cache folder {root} ({e}); set LMWRAP_CACHE to a writable "
                      f"folder") from e
    _remove_abandoned_partials(root, name)
    tmp_dir = tempfile.mkdtemp(prefix=f".{name}.partial-{os.getpid()}-", dir=root)
    try:
        _convert(path, tmp_dir)
        _make_readable(tmp_dir)
        if os.path.isdir(out_dir) and not os.path.isfile(os.path.join(out_dir, "config.json")):
            shutil.rmtree(out_dir, ignore_errors=True)  # not ours to keep: a complete folder always has a config
        try:
            os.rename(tmp_dir, out_dir)
        except OSError:
            if not os.path.isfile(os.path.join(out_dir, "config.json")):
                raise
            shutil.rmtree(tmp_dir, ignore_errors=True)  # another process finished the same conversion first
    except BaseException:
        shutil.rmtree(tmp_dir, ignore_errors=True)
        raise
    return out_dir


def _make_readable(folder: str) -> None:
    """mkdtemp (and safetensors) create owner-only modes; a cache is as readable as any other file."""
    os.chmod(folder, 0o755)
    for name in os.listdir(folder):
        os.chmod(os.path.join(folder, name), 0o644)


def _remove_abandoned_partials(root: str, name: str) -> None:
    """Delete partial folders for this cache entry whose converting process is gone (killed mid-write)."""
    prefix = f".{name}.partial-"
    for entry in os.listdir(root):
        if not entry.startswith(prefix):
            continue
        pid = entry[len(prefix):].split("-", 1)[0]
        if pid.isdigit() and not _process_alive(int(pid)):
            shutil.rmtree(os.path.join(root, entry), ignore_errors=True)


def _process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _convert(path: str, out_dir: str) -> None:
    reader = _open_reader(path)
    metadata = _Metadata(reader)
    arch = metadata.get("general.architecture")
    if arch not in ARCHITECTURES:
        raise GGUFError(f"{path}: GGUF architecture {arch!r} is not supported; supported: {sorted(ARCHITECTURES)}")
    if metadata.get(f"{arch}.expert_count", 0):
        raise GGUFError(f"{path}: mixture-of-experts GGUF files are not supported")
    tensors = {t.name: t for t in reader.tensors}
    config = _hf_config(metadata, arch, tensors)
    _write_weights(path, reader.tensors, arch, config, out_dir)
    _write_tokenizer(path, metadata, out_dir)
    _write_json(os.path.join(out_dir, "generation_config.json"), _generation_config(metadata))
    _write_json(os.path.join(out_dir, "config.json"), config)


def _open_reader(path: str):
    from gguf import GGUFReader

    try:
        return GGUFReader(path)
    except Exception as e:  # the reader fails in many ways on a damaged file; they all mean the same to the caller
        raise GGUFError(f"{path} is not a readable GGUF file (truncated or corrupt?): {type(e).__name__}: {e}") from e


class _Metadata:
    """GGUF key/value metadata, each value parsed only when asked for (the vocabulary is large)."""

    def __init__(self, reader):
        self.fields = reader.fields

    def get(self, key: str, default=None):
        from gguf import GGUFValueType

        field = self.fields.get(key)
        if field is None:
            return default
        is_string = field.types[-1] == GGUFValueType.STRING
        values = [bytes(field.parts[i]).decode("utf-8") if is_string else field.parts[i].tolist()[0]
                  for i in field.data]
        return values if field.types[0] == GGUFValueType.ARRAY else values[0]

    def require(self, key: str):
        value = self.get(key)
        if value is None:
            raise GGUFError(f"GGUF metadata lacks {key!r}")
        return value


def _hf_config(metadata: _Metadata, arch: str, tensors: dict) -> dict:
    hidden_size = metadata.require(f"{arch}.embedding_length")
    num_heads = metadata.require(f"{arch}.attention.head_count")
    num_kv_heads = metadata.get(f"{arch}.attention.head_count_kv", num_heads)
    if isinstance(num_kv_heads, list):  # per-layer counts; these architectures use one value for all
        num_kv_heads = max(num_kv_heads)
    head_dim = (metadata.get(f"{arch}.attention.key_length") or metadata.get(f"{arch}.rope.dimension_count")
                or hidden_size // num_heads)
    if "token_embd.weight" not in tensors:
        raise GGUFError("GGUF file has no token_embd.weight tensor")
    vocab_size = int(tensors["token_embd.weight"].shape[-1])  # ggml order: (hidden, vocab)
    config = {
        "architectures": [ARCHITECTURES[arch]],
        "model_type": arch,
        "vocab_size": vocab_size,
        "hidden_size": hidden_size,
        "intermediate_size": metadata.require(f"{arch}.feed_forward_length"),
        "num_hidden_layers": metadata.require(f"{arch}.block_count"),
        "num_attention_heads": num_heads,
        "num_key_value_heads": num_kv_heads,
        "head_dim": head_dim,
        "hidden_act": "silu",
        "max_position_embeddings": metadata.get(f"{arch}.context_length", 2048),
        "rms_norm_eps": metadata.get(f"{arch}.attention.layer_norm_rms_epsilon", 1e-6),
        "rope_theta": metadata.get(f"{arch}.rope.freq_base", 10000.0),
        "tie_word_embeddings": "output.weight" not in tensors,
        "bos_token_id": metadata.get("tokenizer.ggml.bos_token_id"),
        "eos_token_id": metadata.get("tokenizer.ggml.eos_token_id"),
        "pad_token_id": metadata.get("tokenizer.ggml.padding_token_id"),
        "torch_dtype": _model_dtype(tensors.values()),
    }
    if arch != "qwen2":  # Qwen2 always has q/k/v biases; the others say so in their config
        config["attention_bias"] = "blk.0.attn_q.bias" in tensors
    rope_scaling = _rope_scaling(metadata, arch)
    if rope_scaling:
        config["rope_scaling"] = rope_scaling
    return config


def _rope_scaling(metadata: _Metadata, arch: str) -> dict | None:
    kind = metadata.get(f"{arch}.rope.scaling.type")
    factor = metadata.get(f"{arch}.rope.scaling.factor")
    if kind in (None, "none") or not factor:
        return None
    if kind == "linear":
        return {"rope_type": "linear", "factor": factor}
    if kind == "yarn":
        original = metadata.get(f"{arch}.rope.scaling.original_context_length")
        return {"rope_type": "yarn", "factor": factor, "original_max_position_embeddings": original}
    raise GGUFError(f"GGUF rope scaling type {kind!r} is not supported")


def _model_dtype(tensors) -> str:
    """The float type the model was written in: float32 when any weight is quantised (as transformers does)."""
    from gguf import GGMLQuantizationType as T

    types = {t.tensor_type for t in tensors}
    if not types <= {T.F32, T.F16, T.BF16}:
        return "float32"
    return "bfloat16" if T.BF16 in types else "float16" if T.F16 in types else "float32"


def _hf_tensor_name(gguf_name: str) -> str | None:
    base, _, suffix = gguf_name.rpartition(".")
    if base in GLOBAL_TENSOR_NAMES and suffix == "weight":
        return f"{GLOBAL_TENSOR_NAMES[base]}.weight"
    match = LAYER_TENSOR.fullmatch(gguf_name)
    if match and match.group(2) in LAYER_TENSOR_NAMES:
        layer, part, suffix = match.groups()
        return f"model.layers.{layer}.{LAYER_TENSOR_NAMES[part]}.{suffix}"
    return None


def _unpermute_rows(weight, num_heads: int):
    """Undo llama.cpp's interleaving of each head's rotary halves (its ``LlamaModel.permute``)."""
    half = weight.shape[0] // num_heads // 2
    return weight.reshape(num_heads, half, 2, *weight.shape[1:]).swapaxes(1, 2).reshape(weight.shape)


def _dequantize(tensor, arch: str, config: dict):
    import numpy as np
    from gguf.quants import dequantize

    values = dequantize(tensor.data, tensor.tensor_type)
    values = values.reshape(tuple(int(d) for d in reversed(tensor.shape.tolist())))
    if arch == "llama" and ".attn_q." in tensor.name:
        values = _unpermute_rows(values, config["num_attention_heads"])
    elif arch == "llama" and ".attn_k." in tensor.name:
        values = _unpermute_rows(values, config["num_key_value_heads"])
    return np.ascontiguousarray(values, dtype=np.float32)


def _write_weights(path: str, tensors, arch: str, config: dict, out_dir: str) -> None:
    from safetensors.numpy import save_file
    from tqdm import tqdm

    named = []
    for tensor in tensors:
        hf_name = _hf_tensor_name(tensor.name)
        if hf_name is None:
            if tensor.name in IGNORED_TENSORS:
                logger.warning("%s: ignoring GGUF tensor %s", path, tensor.name)
                continue
            raise GGUFError(f"{path}: GGUF tensor {tensor.name!r} has no counterpart in a {arch} HF model")
        named.append((hf_name, tensor))

    shards, size = [[]], 0
    for hf_name, tensor in named:
        nbytes = 4 * math.prod(int(d) for d in tensor.shape.tolist())
        if shards[-1] and size + nbytes > MAX_SHARD_BYTES:
            shards.append([])
            size = 0
        shards[-1].append((hf_name, tensor))
        size += nbytes

    files = ["model.safetensors"] if len(shards) == 1 else [
        f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))]
    weight_map, total_size = {}, 0
    with tqdm(total=len(named), desc=f"Dequantising {os.path.basename(path)}", unit="tensor",
              file=sys.stderr) as progress:
        for file_name, shard in zip(files, shards):
            arrays = {}
            for hf_name, tensor in shard:
                arrays[hf_name] = _dequantize(tensor, arch, config)
                total_size += arrays[hf_name].nbytes
                weight_map[hf_name] = file_name
                progress.update()
            save_file(arrays, os.path.join(out_dir, file_name), metadata={"format": "pt"})
    if len(files) > 1:
        _write_json(os.path.join(out_dir, "model.safetensors.index.json"),
                    {"metadata": {"total_size": total_size}, "weight_map": weight_map})


def _write_tokenizer(path: str, metadata: _Metadata, out_dir: str) -> None:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(os.path.dirname(path), gguf_file=os.path.basename(path))
    tokenizer.save_pretrained(out_dir)
    config_path = os.path.join(out_dir, "tokenizer_config.json")
    with open(config_path) as f:
        tokenizer_config = json.load(f)
    # A class every transformers version knows (v5 names its own TokenizersBackend).
    tokenizer_config["tokenizer_class"] = "PreTrainedTokenizerFast"
    for key in ("is_local", "local_files_only"):  # how this copy was loaded, not a property of the tokenizer
        tokenizer_config.pop(key, None)
    chat_template = metadata.get("tokenizer.chat_template")
    if chat_template:
        tokenizer_config["chat_template"] = chat_template
    for key in ("add_bos_token", "add_eos_token"):
        value = metadata.get(f"tokenizer.ggml.{key}")
        if value is not None:
            tokenizer_config[key] = bool(value)
    _write_json(config_path, tokenizer_config)


def _generation_config(metadata: _Metadata) -> dict:
    eos = metadata.get("tokenizer.ggml.eos_token_id")
    eot = metadata.get("tokenizer.ggml.eot_token_id")
    eos_ids = [i for i in dict.fromkeys([eos, eot]) if i is not None]
    return {
        "bos_token_id": metadata.get("tokenizer.ggml.bos_token_id"),
        "eos_token_id": eos_ids[0] if len(eos_ids) == 1 else eos_ids or None,
        "pad_token_id": metadata.get("tokenizer.ggml.padding_token_id"),
    }


def _write_json(path: str, data: dict) -> None:
    with open(path, "w", encoding="utf-8") as f:
        json.dump(data, f, indent=2, ensure_ascii=False)
        f.write("\n")
