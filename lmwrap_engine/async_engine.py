"""AsyncEngine: lmdeploy v0.6.2's asyncio API over one background engine thread."""
from __future__ import annotations

import asyncio
import itertools
import json
import logging
import operator
import os
from dataclasses import replace
from typing import AsyncIterator, Callable, List, Optional, Union

from .chat_template import ChatTemplateConfig, get_chat_template
from .config import EngineConfig, GenerationConfig, GenOut, PytorchEngineConfig, TurbomindEngineConfig
from .engine.engine_loop import EngineClosedError, EngineLoop
from .engine.llm_engine import LLMEngine, Request, RequestOutput
from .engine.sampling_params import SamplingParams
from .model_path import DEFAULT_MODEL, resolve_model_path
from .output_stream import Accumulated, OutputStream, error_text
from .vl.items import PromptIds
from .vl.prompts import has_images

logger = logging.getLogger("lmwrap_engine")

Prompt = Union[str, List[dict]]


def to_engine_config(backend_config, backend: Optional[str] = None) -> EngineConfig:
    if backend not in (None, "pytorch", "turbomind"):
        raise ValueError(f"backend must be 'pytorch' or 'turbomind' (both select lmwrap's engine), got {backend!r}")
    if backend_config is None:
        return EngineConfig()
    if isinstance(backend_config, (PytorchEngineConfig, TurbomindEngineConfig)):
        return backend_config.to_engine_config()
    if isinstance(backend_config, EngineConfig):
        return backend_config
    raise TypeError("backend_config must be a PytorchEngineConfig or TurbomindEngineConfig, "
                    f"got {type(backend_config).__name__}")


# What tokenizer_config.json names the generic fast tokenizer (transformers 4, and 5's new name for it).
_GENERIC_FAST_TOKENIZERS = ("PreTrainedTokenizerFast", "TokenizersBackend")
# Model types for which AutoTokenizer keeps a generic class named there (transformers 4.45-5.24 read):
# for others (qwen2, phi3, llava, mistral, ...) transformers 5 may swap in the model's own class.
_GENERIC_TOKENIZER_MODEL_TYPES = ("llama",)


def load_tokenizer(model_dir: str):
    """The model's transformers tokenizer, as ``AutoTokenizer`` picks it. A llama folder whose
    ``tokenizer_config.json`` names the generic fast tokenizer (the converted default GGUF among them)
    gets that class directly: ``AutoTokenizer`` resolves the model's config class first, for the same
    object, which cost 1 s of a 10 s cold start on a 2-core Xeon."""
    if _read_json(model_dir, "config.json").get("model_type") in _GENERIC_TOKENIZER_MODEL_TYPES:
        tokenizer_config = _read_json(model_dir, "tokenizer_config.json")
        if (tokenizer_config.get("tokenizer_class") in _GENERIC_FAST_TOKENIZERS and "auto_map" not in tokenizer_config
                and os.path.exists(os.path.join(model_dir, "tokenizer.json"))):
            from transformers import PreTrainedTokenizerFast
            return PreTrainedTokenizerFast.from_pretrained(model_dir)
    from transformers import AutoTokenizer
    return AutoTokenizer.from_pretrained(model_dir)


def _read_json(model_dir: str, name: str) -> dict:
    path = os.path.join(model_dir, name)
    if not os.path.exists(path):
        return {}
    with open(path) as f:
        return json.load(f)


def eos_token_ids(model_dir: str, tokenizer) -> List[int]:
    ids = []
    for name in ("generation_config.json", "config.json"):
        eos = _read_json(model_dir, name).get("eos_token_id")
        ids += [eos] if isinstance(eos, int) else list(eos or [])
    if tokenizer.eos_token_id is not None:
        ids.append(tokenizer.eos_token_id)
    return sorted(set(ids))


class AsyncEngine:
    """The engine behind ``pipeline()``: owns the tokenizer, the chat template and the engine thread.

    Args (lmdeploy v0.6.2's order):
        model_path: HF folder, ``.gguf`` file, hub id already in the local cache, or None for the
            default model (SmolLM2-135M-Instruct).
        model_name: the name a server serves it under (default: ``model_path`` as given).
        backend: ``'turbomind'`` or ``'pytorch'``; both select lmwrap's engine.
        backend_config: ``TurbomindEngineConfig`` or ``PytorchEngineConfig``.
        chat_template_config: a ``ChatTemplateConfig``; default: the model's own template.
        max_log_len: log prompts (cut to this many characters) at INFO level.
        tp: tensor-parallel ranks (worker processes; overrides ``backend_config.tp`` when not 1).
            Any other keyword argument is an error.

    ``generate`` is an async generator of ``GenOut`` deltas; ``stop_session``, ``end_session``,
    ``session_tokens`` and ``astats`` are coroutines. Everything here is safe to call from any thread.
    """

    def __init__(self, model_path: Optional[str] = None, model_name: Optional[str] = None,
                 backend: Optional[str] = "turbomind", backend_config=None, chat_template_config=None,
                 max_log_len: Optional[int] = None, tp: int = 1, **kwargs):
        if kwargs:
            raise TypeError(f"unexpected arguments: {', '.join(sorted(kwargs))}")
        self.max_log_len = max_log_len
        self.engine_config = to_engine_config(backend_config, backend)
        if tp != 1:
            self.engine_config = replace(self.engine_config, tp=tp)
        self.model_path = model_path
        self.model_name = model_name or (os.fspath(model_path) if model_path is not None else DEFAULT_MODEL)
        self.model_dir = resolve_model_path(model_path, self.engine_config.download_dir, self.engine_config.revision)
        self.tokenizer = load_tokenizer(self.model_dir)
        if chat_template_config is not None and not isinstance(chat_template_config, ChatTemplateConfig):
            raise TypeError("chat_template_config must be a ChatTemplateConfig")
        self.chat_template = get_chat_template(model_path or self.model_dir, self.tokenizer, chat_template_config)
        self.eos_token_ids = eos_token_ids(self.model_dir, self.tokenizer)
        def build() -> LLMEngine:
            return LLMEngine(self.model_dir, self.engine_config, self.tokenizer)
        # Single-process engines load on their own thread (EngineLoop says why); tensor-parallel ones
        # start worker processes (and maybe Ray), which want the caller's thread.
        self._loop = EngineLoop(build if self.engine_config.tp == 1 else build())
        engine = self._loop.engine
        self.session_len = engine.session_len
        self.vocab_size = engine.runner.args.vocab_size
        self.model_args = engine.runner.args
        self._vision_processor = None
        #: Where and how the model runs (read-only facts for logs and benchmarks).
        self.device, self.dtype = engine.runner.device, engine.runner.dtype
        #: What linears compute in for calls of a few rows (decode): bf16 under ``dtype='auto'`` on a CPU
        #: without fast bf16, where the model itself is fp32 (``model_runner.small_batch_dtype``).
        self.small_batch_dtype = getattr(engine.runner, "small_batch_dtype", self.dtype)
        self.num_blocks, self.block_size = engine.runner.num_blocks, engine.runner.block_size
        # One-off requests take ids far above the ones callers pick for their own sessions.
        self._session_ids = itertools.count(1 << 32)

    # -- building requests --------------------------------------------------------------------

    def new_session_id(self) -> int:
        """A session id no caller-chosen id collides with (for one-off requests)."""
        return next(self._session_ids)

    def encode_prompt(self, prompt: Optional[Prompt], sequence_start: bool = True, do_preprocess: bool = True,
                      tools=None, close_turn: bool = False) -> List[int]:
        """Token ids of a prompt: with ``do_preprocess`` the chat template is applied (a str or a list of
        messages), otherwise the prompt must be a str. ``close_turn``: the session's last reply was cut
        before its stop word, so the continuation first writes it (a template's later turn assumes it).
        A prompt with images (``(text, image)``, ``(text, [images])``, messages with ``image_url`` parts)
        gives a ``PromptIds``: the ids with their images' ``mm_items`` (``submit`` takes them along)."""
        if has_images(prompt):
            from .vl.prompts import encode_with_images
            return PromptIds(*encode_with_images(self, prompt, sequence_start, do_preprocess, tools, close_turn))
        if do_preprocess:
            text = self.chat_template.messages2prompt(prompt, sequence_start, tools=tools)
            if close_turn and not sequence_start and self.chat_template.stop_words:
                text = self.chat_template.stop_words[0] + text
        elif isinstance(prompt, str):
            text = prompt
        else:
            raise TypeError("with do_preprocess=False the prompt must be a str, "
                            f"got {type(prompt).__name__}")
        if self.max_log_len is not None:
            logger.info("prompt: %r", text[: self.max_log_len])
        ids = self.tokenizer.encode(text, add_special_tokens=sequence_start)
        bos = self.tokenizer.bos_token_id
        if len(ids) > 1 and bos is not None and ids[0] == ids[1] == bos:
            ids = ids[1:]  # the template already wrote the BOS token
        return ids

    def vision_processor(self):
        """The prompt encoder for images of this model; a clear error when the model takes none."""
        from .vl.registry import build_processor, is_vision_model
        arch = self.model_args.architecture
        if not is_vision_model(arch):
            raise ValueError(f"the model {self.model_name!r} ({arch}) is a text-only model; it does not take images")
        if self.engine_config.disable_vision_encoder:
            raise ValueError(f"the model {self.model_name!r} runs without its vision encoder "
                             "(disable_vision_encoder=True); it does not take images")
        if self._vision_processor is None:
            self._vision_processor = build_processor(arch, self.model_dir, self.tokenizer, self.model_args.hf_config)
        return self._vision_processor

    def sampling_params(self, gen_config: Optional[GenerationConfig], num_tokens: int) -> SamplingParams:
        """The engine's sampling parameters for ``gen_config`` and a request reaching ``num_tokens`` tokens."""
        gen_config = gen_config or GenerationConfig()
        if not isinstance(gen_config, GenerationConfig):
            raise TypeError(f"gen_config must be a GenerationConfig, got {type(gen_config).__name__}")
        # With ignore_eos the template's stop words (usually the EOS token again) do not stop either.
        if gen_config.stop_words is None and gen_config.stop_token_ids is None and not gen_config.ignore_eos:
            gen_config = replace(gen_config, stop_words=list(self.chat_template.stop_words or []) or None)
        max_new = gen_config.max_new_tokens
        if max_new is None:  # the engine clips it to what session_len leaves
            max_new = max(0, self.session_len - num_tokens)
        return SamplingParams.from_generation_config(gen_config, self.tokenizer, self.eos_token_ids, max_new,
                                                     vocab_size=self.vocab_size)

    def submit(self, session_id: int, input_ids: List[int], params: SamplingParams,
               emit: Callable[[RequestOutput], None], sequence_start: bool = True, sequence_end: bool = True,
               step: int = 0) -> None:
        """Queues one request; the engine thread calls ``emit`` with each of its deltas."""
        mm_items = list(getattr(input_ids, "mm_items", None) or [])
        try:
            input_ids = [operator.index(t) for t in input_ids]
        except TypeError:
            raise TypeError("input_ids must be a sequence of int token ids") from None
        bad = next((t for t in input_ids if not 0 <= t < self.vocab_size), None)
        if bad is not None:  # an out-of-range id would fail the whole batch's step (a device assert on CUDA)
            raise ValueError(f"input_ids must be token ids in [0, {self.vocab_size}), got {bad}")
        for it in mm_items:
            if not 0 <= it.offset < it.offset + it.length <= len(input_ids):
                raise ValueError(f"an image's placeholder tokens {it.offset}:{it.offset + it.length} are outside "
                                 f"the {len(input_ids)} input ids")
        req = Request(session_id, input_ids, params, emit, sequence_start, sequence_end, step, mm_items)
        self._loop.call(lambda engine: engine.add_request(req))

    def _open_stream(self, aio_loop=None) -> OutputStream:
        if self._loop.is_closed:
            raise EngineClosedError()
        return OutputStream(self.stop_session_nowait, aio_loop)

    # -- lmdeploy's async API -----------------------------------------------------------------

    async def generate(self, messages: Optional[Prompt], session_id: Optional[int], gen_config=None, tools=None,
                       stream_response: bool = True, sequence_start: bool = True, sequence_end: bool = True,
                       step: int = 0, do_preprocess: bool = True, adapter_name: Optional[str] = None,
                       input_ids: Optional[List[int]] = None, **kwargs) -> AsyncIterator[GenOut]:
        """Streams ``GenOut`` deltas of one request; the last one carries ``finish_reason``.

        ``sequence_end=False`` keeps the session's KV cache; the next call on ``session_id`` with
        ``sequence_start=False`` sends only the new turn (``step=0`` continues after all the session
        holds). ``input_ids`` skips encoding. ``session_id=None`` runs a one-off request. Leaving the
        loop early (or cancelling its task) stops the request. With ``stream_response=False`` one
        ``GenOut`` holds the whole reply.
        """
        if kwargs:
            raise TypeError(f"unexpected arguments: {', '.join(sorted(kwargs))}")
        if adapter_name is not None:
            raise NotImplementedError("LoRA adapters are not supported")
        stream = self._open_stream(asyncio.get_running_loop())
        if session_id is None:
            session_id = self.new_session_id()
        # Templating, tokenising and compiling a response_format grammar are CPU work: off the event loop.
        if input_ids is None:
            input_ids = await asyncio.to_thread(self.encode_prompt, messages, sequence_start, do_preprocess, tools)
        if gen_config is not None and getattr(gen_config, "response_format", None):
            params = await asyncio.to_thread(self.sampling_params, gen_config, step + len(input_ids))
        else:
            params = self.sampling_params(gen_config, step + len(input_ids))
        self.submit(session_id, input_ids, params, stream.add(session_id), sequence_start, sequence_end, step)
        total = Accumulated()
        try:
            async for _, out in stream:
                if stream_response:
                    yield to_genout(out)
                else:
                    total.add(out)
        finally:
            stream.close()
        if not stream_response:
            yield to_genout(total.as_output())

    async def stop_session(self, session_id: int) -> None:
        """Cancels the session's running turn (``finish_reason='abort'``); its KV cache is kept."""
        self.stop_session_nowait(session_id)

    async def end_session(self, session_id: int) -> None:
        """Cancels whatever the session runs and frees its KV cache."""
        self.end_session_nowait(session_id)

    def stop_session_nowait(self, session_id: int) -> None:
        """``stop_session`` for synchronous code; returns at once (the engine thread does the work)."""
        if not self._loop.is_closed:
            self._loop.call(lambda engine: engine.stop_session(session_id))

    def end_session_nowait(self, session_id: int) -> None:
        """``end_session`` for synchronous code; returns at once (the engine thread does the work)."""
        if not self._loop.is_closed:
            self._loop.call(lambda engine: engine.end_session(session_id))

    async def session_tokens(self, session_id: int) -> int:
        """Tokens the session holds in the engine (0: no such session): its next turn continues after them."""
        return await asyncio.wrap_future(self._loop.ask(lambda engine: engine.session_tokens(session_id)))

    async def astats(self) -> dict:
        """``stats()`` without blocking the event loop."""
        return await asyncio.wrap_future(self._loop.ask(lambda engine: engine.snapshot_stats()))

    def stats(self) -> dict:
        """Engine counters: requests, tokens computed (prompt / generated), prefix-cache lookups and hits,
        preemptions, KV blocks (free / all), running and waiting requests, kept sessions."""
        return self._loop.ask(lambda engine: engine.snapshot_stats()).result()

    @property
    def is_closed(self) -> bool:
        return self._loop.is_closed

    @property
    def failure(self) -> Optional[str]:
        """Why the engine can run no more (a tensor-parallel worker died); None while it can."""
        failed = getattr(self._loop.engine.runner, "failed", None)
        return None if failed is None or self._loop.is_closed else failed

    def close(self) -> None:
        """Stops the engine: requests still queued or running end at once with ``finish_reason='error'``;
        later calls raise ``RuntimeError``. Tensor-parallel workers are stopped."""
        self._loop.close()
        close_workers = getattr(self._loop.engine.runner, "close", None)
        if close_workers is not None:
            close_workers()


def to_genout(out: RequestOutput) -> GenOut:
    return GenOut(error_text(out), out.num_history_tokens, out.num_input_tokens, out.num_output_tokens,
                  out.finish_reason, list(out.token_ids), out.logprobs)
