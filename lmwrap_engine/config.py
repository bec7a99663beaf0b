"""Public configuration and result types, with lmdeploy's names, fields and defaults."""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any, Callable, List, Optional

LogitsProcessor = Callable[[Any, Any], Any]  # (token_ids: LongTensor[L], scores: Tensor[V]) -> scores

DTYPES = ("auto", "float32", "float16", "bfloat16")
DEVICE_TYPES = ("auto", "cuda", "cpu")
WEIGHT_QUANTS = (None, "int8")


def _check(cond: bool, name: str, msg: str) -> None:
    if not cond:
        raise ValueError(f"{name} {msg}")


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


@dataclass
class GenerationConfig:
    """Sampling and stopping for one request (lmdeploy's ``GenerationConfig``).

    ``stop_words`` are matched on the decoded text, so a stop word may span several tokens;
    the text is cut before it unless ``include_stop_str_in_output``. ``do_sample=False`` is
    greedy decoding (lmdeploy resets top_k/top_p/temperature/repetition_penalty then).
    ``random_seed`` gives each request its own generator, so its samples do not depend on what
    else is in the batch.

    ``response_format`` constrains the output with a grammar (lmdeploy's types):
    ``{"type": "json_object"}``, ``{"type": "json_schema", "json_schema": {"name": ..., "schema": {...}}}``
    or ``{"type": "regex_schema", "regex_schema": "..."}`` (``{"type": "text"}``: no constraint). The
    turn ends with finish_reason 'stop' once the grammar is complete (JSON schemas give compact JSON).
    Bad words and ``min_new_tokens`` yield to the grammar where they would leave it no token; stop
    words still apply (one met inside the JSON cuts it). A malformed format raises ValueError here;
    a schema that cannot be compiled, when the request is made.
    """

    n: int = 1
    max_new_tokens: Optional[int] = 512
    do_sample: bool = False
    top_p: float = 1.0
    top_k: int = 50
    min_p: float = 0.0
    temperature: float = 0.8
    repetition_penalty: float = 1.0
    ignore_eos: bool = False
    random_seed: Optional[int] = None
    stop_words: Optional[List[str]] = None
    bad_words: Optional[List[str]] = None
    stop_token_ids: Optional[List[int]] = None
    bad_token_ids: Optional[List[int]] = None
    min_new_tokens: Optional[int] = None
    skip_special_tokens: bool = True
    spaces_between_special_tokens: bool = True
    logprobs: Optional[int] = None
    response_format: Optional[dict] = None
    logits_processors: Optional[List[LogitsProcessor]] = None
    include_stop_str_in_output: bool = False

    def __post_init__(self):
        _check(_is_int(self.n) and self.n > 0, "n", f"must be a positive int, got {self.n!r}")
        if self.n != 1:
            raise NotImplementedError("GenerationConfig.n > 1 is not supported yet; send the prompt n times")
        if self.response_format is not None:
            from .guided.response_format import check_response_format
            check_response_format(self.response_format)
        if self.max_new_tokens is not None:
            _check(_is_int(self.max_new_tokens) and self.max_new_tokens >= 0, "max_new_tokens",
                   f"must be an int >= 0 or None, got {self.max_new_tokens!r}")
        _check(_is_number(self.top_p) and 0 < self.top_p <= 1, "top_p", f"must be in (0, 1], got {self.top_p!r}")
        _check(_is_int(self.top_k) and self.top_k >= 0, "top_k", f"must be an int >= 0, got {self.top_k!r}")
        _check(_is_number(self.min_p) and 0 <= self.min_p <= 1, "min_p", f"must be in [0, 1], got {self.min_p!r}")
        _check(_is_number(self.temperature) and 0 <= self.temperature <= 2, "temperature",
               f"must be in [0, 2], got {self.temperature!r}")
        _check(_is_number(self.repetition_penalty) and self.repetition_penalty > 0, "repetition_penalty",
               f"must be > 0, got {self.repetition_penalty!r}")
        for name in ("do_sample", "ignore_eos", "skip_special_tokens", "spaces_between_special_tokens",
                     "include_stop_str_in_output"):
            _check(isinstance(getattr(self, name), bool), name, f"must be a bool, got {getattr(self, name)!r}")
        if self.min_new_tokens is not None:
            _check(_is_int(self.min_new_tokens) and self.min_new_tokens >= 0, "min_new_tokens",
                   f"must be an int >= 0 or None, got {self.min_new_tokens!r}")
        if self.logprobs is not None:
            _check(_is_int(self.logprobs) and 0 <= self.logprobs <= 1024, "logprobs",
                   f"must be an int in [0, 1024] or None, got {self.logprobs!r}")
        if self.random_seed is not None:
            _check(_is_int(self.random_seed), "random_seed", f"must be an int or None, got {self.random_seed!r}")
        for name in ("stop_words", "bad_words"):
            value = getattr(self, name)
            if isinstance(value, str):
                setattr(self, name, [value])
            elif value is not None:
                _check(isinstance(value, (list, tuple)) and all(isinstance(w, str) and w for w in value), name,
                       f"must be a list of non-empty strings, got {value!r}")
        for name in ("stop_token_ids", "bad_token_ids"):
            value = getattr(self, name)
            if _is_int(value) and value >= 0:
                setattr(self, name, [value])
            elif value is not None:
                _check(isinstance(value, (list, tuple)) and all(_is_int(t) and t >= 0 for t in value), name,
                       f"must be a list of token ids >= 0, got {value!r}")
        if self.logits_processors is not None:
            processors = self.logits_processors
            _check(isinstance(processors, (list, tuple)) and all(callable(p) for p in processors),
                   "logits_processors", f"must be a list of callables, got {processors!r}")

    @property
    def is_greedy(self) -> bool:
        return not self.do_sample or self.temperature == 0 or self.top_k == 1


@dataclass
class EngineConfig:
    """What the engine needs, whichever public config class the user gave.

    ``enable_prefix_caching`` is on by default (lmdeploy's is off): agents re-send their whole
    history every turn, and the cache makes each turn compute only its new tokens.
    """

    dtype: str = "auto"
    session_len: Optional[int] = None
    max_batch_size: int = 128
    cache_max_entry_count: float = 0.8
    block_size: int = 64
    num_gpu_blocks: int = 0
    max_prefill_token_num: int = 4096
    enable_prefix_caching: bool = True
    quant_policy: int = 0
    device_type: str = "auto"
    eager_mode: bool = False
    download_dir: Optional[str] = None
    revision: Optional[str] = None
    load_format: str = "auto"  # "dummy": random weights of the folder's config (benchmarks), no weight files read
    max_sessions: int = 1024                       # kept (idle) sessions; past it the longest idle is ended
    session_idle_timeout: Optional[float] = None   # seconds an idle kept session lives; None: no limit
    disable_vision_encoder: bool = False           # a vision-language model runs as its text model only
    tp: int = 1                                    # tensor-parallel ranks (worker processes when > 1)
    distributed_executor_backend: str = "mp"       # "mp": torch.multiprocessing workers; "ray": Ray actors
    weight_quant: Optional[str] = None             # "int8": weight-only int8 linears (CPU)

    def __post_init__(self):
        _check(_is_int(self.tp) and self.tp >= 1, "tp", f"must be an int >= 1, got {self.tp!r}")
        _check(self.distributed_executor_backend in ("mp", "ray"), "distributed_executor_backend",
               f"must be 'mp' or 'ray', got {self.distributed_executor_backend!r}")
        _check(self.load_format in ("auto", "dummy"), "load_format",
               f"must be 'auto' or 'dummy', got {self.load_format!r}")
        _check(self.dtype in DTYPES, "dtype", f"must be one of {DTYPES}, got {self.dtype!r}")
        _check(self.device_type in DEVICE_TYPES, "device_type", f"must be one of {DEVICE_TYPES}, got {self.device_type!r}")
        _check(self.max_batch_size >= 1, "max_batch_size", f"must be >= 1, got {self.max_batch_size}")
        _check(0 < self.cache_max_entry_count <= 1, "cache_max_entry_count",
               f"must be in (0, 1] (a fraction of free memory), got {self.cache_max_entry_count}")
        _check(self.block_size >= 1 and self.block_size & (self.block_size - 1) == 0, "block_size",
               f"must be a power of two, got {self.block_size}")
        _check(self.num_gpu_blocks >= 0, "num_gpu_blocks", f"must be >= 0, got {self.num_gpu_blocks}")
        _check(self.max_prefill_token_num >= 1, "max_prefill_token_num", f"must be >= 1, got {self.max_prefill_token_num}")
        _check(self.quant_policy in (0, 8), "quant_policy", f"must be 0 or 8 (int8 KV), got {self.quant_policy}")
        _check(self.weight_quant in WEIGHT_QUANTS, "weight_quant",
               f"must be None or 'int8' (weight-only int8 linears, CPU), got {self.weight_quant!r}")
        if self.session_len is not None:
            _check(self.session_len >= 1, "session_len", f"must be >= 1, got {self.session_len}")
        _check(_is_int(self.max_sessions) and self.max_sessions >= 0, "max_sessions",
               f"must be an int >= 0, got {self.max_sessions!r}")
        if self.session_idle_timeout is not None:
            _check(_is_number(self.session_idle_timeout) and self.session_idle_timeout > 0, "session_idle_timeout",
                   f"must be a number of seconds > 0 or None, got {self.session_idle_timeout!r}")


@dataclass
class PytorchEngineConfig:
    """lmdeploy's PyTorch-engine config; selects lmwrap's engine. ``device_type='auto'`` picks CUDA when present.

    A field set to a value the engine does not honour raises when the engine is built. The engine
    is always thread-safe, so ``thread_safe`` may be either. Added by lmwrap: ``max_sessions`` and
    ``session_idle_timeout`` bound the sessions kept between turns (the longest idle is ended first).
    ``tp > 1`` splits the model over ``tp`` worker processes; ``distributed_executor_backend`` is
    ``'mp'`` (torch.multiprocessing, this machine) or ``'ray'`` (actors on a running Ray cluster).
    ``weight_quant='int8'`` stores the linear weights (LM head included) as per-channel int8 for small
    batches (CPU only; larger batches use a dense copy of the dequantised weights); None keeps them as loaded.
    Deviation from lmdeploy: ``enable_prefix_caching`` defaults to True (agents re-send their whole
    history each turn; the cache serves it); ``enable_prefix_caching=False`` turns it off.
    """

    dtype: str = "auto"
    tp: int = 1
    session_len: Optional[int] = None
    max_batch_size: Optional[int] = None
    cache_max_entry_count: float = 0.8
    prefill_interval: int = 16
    block_size: int = 64
    num_cpu_blocks: int = 0
    num_gpu_blocks: int = 0
    adapters: Optional[dict] = None
    max_prefill_token_num: int = 4096
    thread_safe: bool = False
    enable_prefix_caching: bool = True
    device_type: str = "auto"
    eager_mode: bool = False
    custom_module_map: Optional[dict] = None
    download_dir: Optional[str] = None
    revision: Optional[str] = None
    quant_policy: int = 0
    max_sessions: int = 1024
    session_idle_timeout: Optional[float] = None
    disable_vision_encoder: bool = False
    distributed_executor_backend: str = "mp"
    weight_quant: Optional[str] = None

    def to_engine_config(self) -> EngineConfig:
        _reject_unsupported(self, adapters=None, custom_module_map=None, prefill_interval=16,
                            num_cpu_blocks=0)
        return EngineConfig(tp=self.tp, dtype=self.dtype, session_len=self.session_len,
                            max_batch_size=self.max_batch_size or 128,
                            cache_max_entry_count=self.cache_max_entry_count, block_size=self.block_size,
                            num_gpu_blocks=self.num_gpu_blocks, max_prefill_token_num=self.max_prefill_token_num,
                            enable_prefix_caching=self.enable_prefix_caching, quant_policy=self.quant_policy,
                            device_type=self.device_type, eager_mode=self.eager_mode,
                            download_dir=self.download_dir, revision=self.revision,
                            max_sessions=self.max_sessions, session_idle_timeout=self.session_idle_timeout,
                            disable_vision_encoder=self.disable_vision_encoder,
                            distributed_executor_backend=self.distributed_executor_backend,
                            weight_quant=self.weight_quant)


@dataclass
class TurbomindEngineConfig:
    """lmdeploy's TurboMind config; selects the same lmwrap engine (``cache_block_seq_len`` is the block size).

    A field set to a value the engine does not honour raises when the engine is built. Added by
    lmwrap: ``max_sessions``, ``session_idle_timeout``, ``eager_mode``, ``distributed_executor_backend``,
    ``weight_quant`` (as ``PytorchEngineConfig``'s).
    Deviation from lmdeploy: ``enable_prefix_caching`` defaults to True (as ``PytorchEngineConfig``'s);
    ``enable_prefix_caching=False`` turns it off.
    """

    dtype: str = "auto"
    model_format: Optional[str] = None
    tp: int = 1
    session_len: Optional[int] = None
    max_batch_size: int = 128
    cache_max_entry_count: float = 0.8
    cache_chunk_size: int = -1
    cache_block_seq_len: int = 64
    enable_prefix_caching: bool = True
    quant_policy: int = 0
    rope_scaling_factor: float = 0.0
    use_logn_attn: bool = False
    download_dir: Optional[str] = None
    revision: Optional[str] = None
    max_prefill_token_num: int = 8192
    num_tokens_per_iter: int = 0
    max_prefill_iters: int = 1
    num_gpu_blocks: int = 0
    device_type: str = "auto"
    eager_mode: bool = False
    max_sessions: int = 1024
    session_idle_timeout: Optional[float] = None
    disable_vision_encoder: bool = False
    distributed_executor_backend: str = "mp"
    weight_quant: Optional[str] = None

    def to_engine_config(self) -> EngineConfig:
        _reject_unsupported(self, rope_scaling_factor=0.0, use_logn_attn=False, cache_chunk_size=-1,
                            num_tokens_per_iter=0, max_prefill_iters=1)
        if self.model_format not in (None, "hf", "gguf"):
            raise NotImplementedError(f"TurbomindEngineConfig.model_format={self.model_format!r} is not supported "
                                      "(use None, 'hf' or 'gguf')")
        return EngineConfig(tp=self.tp, dtype=self.dtype, session_len=self.session_len,
                            max_batch_size=self.max_batch_size,
                            cache_max_entry_count=self.cache_max_entry_count, block_size=self.cache_block_seq_len,
                            num_gpu_blocks=self.num_gpu_blocks, max_prefill_token_num=self.max_prefill_token_num,
                            enable_prefix_caching=self.enable_prefix_caching, quant_policy=self.quant_policy,
                            device_type=self.device_type, eager_mode=self.eager_mode,
                            download_dir=self.download_dir, revision=self.revision,
                            max_sessions=self.max_sessions, session_idle_timeout=self.session_idle_timeout,
                            disable_vision_encoder=self.disable_vision_encoder,
                            distributed_executor_backend=self.distributed_executor_backend,
                            weight_quant=self.weight_quant)


def _reject_unsupported(config, **defaults) -> None:
    for name, default in defaults.items():
        if getattr(config, name) != default:
            raise NotImplementedError(f"{type(config).__name__}.{name}={getattr(config, name)!r} is not supported "
                                      f"by lmwrap's engine (leave it at {default!r})")


@dataclass
class Response:
    """One result (or, from ``stream_infer``, one delta) of a pipeline request."""

    text: str
    generate_token_len: int
    input_token_len: int
    session_id: int = 0
    finish_reason: Optional[str] = None  # 'stop' | 'length' | 'abort' | 'error'
    token_ids: List[int] = field(default_factory=list)
    logprobs: Optional[List[dict]] = None
    index: int = 0

    def __repr__(self):
        return (f"Response(text={self.text!r}, generate_token_len={self.generate_token_len}, "
                f"input_token_len={self.input_token_len}, finish_reason={self.finish_reason!r}, index={self.index})")


@dataclass
class GenOut:
    """One delta of ``AsyncEngine.generate`` (lmdeploy's GenOut)."""

    response: str
    history_token_len: int
    input_token_len: int
    generate_token_len: int
    finish_reason: Optional[str] = None
    token_ids: List[int] = field(default_factory=list)
    logprobs: Optional[List[dict]] = None


def cache_root() -> str:
    """lmwrap's cache folder: ``$LMWRAP_CACHE`` if set, else ``~/.cache/lmwrap``."""
    return os.environ.get("LMWRAP_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "lmwrap")
