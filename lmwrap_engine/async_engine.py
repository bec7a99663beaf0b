"""AsyncEngine: lmdeploy's asyncio API over one background engine thread."""
from __future__ import annotations

import asyncio
import itertools
import json
import logging
import operator
import os
from typing import AsyncIterator, Callable, List, Optional, Union

from .chat_template import ChatTemplateConfig, get_chat_template
from .config import EngineConfig, GenerationConfig, GenOut, PytorchEngineConfig, TurbomindEngineConfig
from .engine.engine_loop import EngineLoop
from .engine.llm_engine import LLMEngine, Request, RequestOutput
from .engine.sampling_params import SamplingParams
from .model_path import resolve_model_path

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


def load_tokenizer(model_dir: str):
    from transformers import AutoTokenizer
    return AutoTokenizer.from_pretrained(model_dir)


def eos_token_ids(model_dir: str, tokenizer) -> List[int]:
    ids = []
    for name in ("generation_config.json", "config.json"):
        path = os.path.join(model_dir, name)
        if os.path.exists(path):
            with open(path) as f:
                eos = json.load(f).get("eos_token_id")
            ids += [eos] if isinstance(eos, int) else list(eos or [])
    if tokenizer.eos_token_id is not None:
        ids.append(tokenizer.eos_token_id)
    return sorted(set(ids))


class AsyncEngine:
    """Owns the tokenizer, the chat template and the engine thread; ``generate`` streams ``GenOut`` deltas."""

    def __init__(self, model_path: Optional[str] = None, backend_config=None, chat_template_config=None,
                 log_level: str = "WARNING", max_log_len: Optional[int] = None, backend: Optional[str] = None,
                 **kwargs):
        if kwargs:
            raise TypeError(f"unexpected arguments: {', '.join(sorted(kwargs))}")
        logging.getLogger("lmwrap_engine").setLevel(log_level)
        self.max_log_len = max_log_len
        self.engine_config = to_engine_config(backend_config, backend)
        self.model_path = model_path
        self.model_dir = resolve_model_path(model_path, self.engine_config.download_dir)
        self.tokenizer = load_tokenizer(self.model_dir)
        if chat_template_config is not None and not isinstance(chat_template_config, ChatTemplateConfig):
            raise TypeError("chat_template_config must be a ChatTemplateConfig")
        self.chat_template = get_chat_template(model_path or self.model_dir, self.tokenizer, chat_template_config)
        self.eos_token_ids = eos_token_ids(self.model_dir, self.tokenizer)
        self.engine = LLMEngine(self.model_dir, self.engine_config, self.tokenizer)
        self.session_len = self.engine.session_len
        self.loop = EngineLoop(self.engine)
        # One-off requests take ids far above the ones callers pick for their own sessions.
        self._session_ids = itertools.count(1 << 32)
        self._closed = False

    # -- request building (shared with the sync Pipeline) --------------------------------------

    def new_session_id(self) -> int:
        return next(self._session_ids)

    def encode_prompt(self, prompt: Optional[Prompt], sequence_start: bool, do_preprocess: bool,
                      tools=None, close_turn: bool = False) -> List[int]:
        """Token ids of a prompt. ``close_turn``: the session's last reply was cut before its stop
        word, so the continuation first writes it (a template's later turn assumes it is there)."""
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

    def sampling_params(self, gen_config: Optional[GenerationConfig], num_tokens: int) -> SamplingParams:
        gen_config = gen_config or GenerationConfig()
        if not isinstance(gen_config, GenerationConfig):
            raise TypeError(f"gen_config must be a GenerationConfig, got {type(gen_config).__name__}")
        # With ignore_eos the template's stop words (usually the EOS token again) do not stop either.
        if gen_config.stop_words is None and gen_config.stop_token_ids is None and not gen_config.ignore_eos:
            from dataclasses import replace
            gen_config = replace(gen_config, stop_words=list(self.chat_template.stop_words or []) or None)
        max_new = gen_config.max_new_tokens
        if max_new is None:  # the engine clips it to what session_len leaves
            max_new = max(0, self.session_len - num_tokens)
        return SamplingParams.from_generation_config(gen_config, self.tokenizer, self.eos_token_ids, max_new)

    def submit(self, session_id: int, input_ids: List[int], params: SamplingParams,
               emit: Callable[[RequestOutput], None], sequence_start: bool = True, sequence_end: bool = True,
               step: int = 0) -> None:
        if self._closed:
            raise RuntimeError("the engine is closed")
        try:
            input_ids = [operator.index(t) for t in input_ids]
        except TypeError:
            raise TypeError("input_ids must be a sequence of int token ids") from None
        vocab_size = self.engine.runner.args.vocab_size
        bad = next((t for t in input_ids if not 0 <= t < vocab_size), None)
        if bad is not None:  # an out-of-range id would fail the whole batch's step (a device assert on CUDA)
            raise ValueError(f"input_ids must be token ids in [0, {vocab_size}), got {bad}")
        req = Request(session_id, input_ids, params, emit, sequence_start, sequence_end, step)
        self.loop.call(lambda engine: engine.add_request(req))

    # -- lmdeploy's async API -----------------------------------------------------------------

    async def generate(self, messages: Optional[Prompt], session_id: int, gen_config=None, tools=None,
                       stream_response: bool = True, sequence_start: bool = True, sequence_end: bool = True,
                       step: int = 0, do_preprocess: bool = True, adapter_name: Optional[str] = None,
                       input_ids: Optional[List[int]] = None, **kwargs) -> AsyncIterator[GenOut]:
        """Streams ``GenOut`` deltas for one request; the last one carries ``finish_reason``."""
        if adapter_name is not None:
            raise NotImplementedError("LoRA adapters are not supported")
        if input_ids is None:
            input_ids = self.encode_prompt(messages, sequence_start, do_preprocess, tools)
        params = self.sampling_params(gen_config, step + len(input_ids))
        aio_loop = asyncio.get_running_loop()
        queue: asyncio.Queue = asyncio.Queue()

        def emit(out: RequestOutput) -> None:
            try:
                aio_loop.call_soon_threadsafe(queue.put_nowait, out)
            except RuntimeError:  # the caller's event loop is closed: nobody reads the rest
                if out.finish_reason is None:
                    self.loop.call(lambda engine: engine.stop_session(session_id))

        self.submit(session_id, list(input_ids), params, emit, sequence_start, sequence_end, step)
        pending: List[RequestOutput] = []
        finished = False
        try:
            while not finished:
                out: RequestOutput = await queue.get()
                finished = out.finish_reason is not None
                if stream_response:
                    yield to_genout(out)
                else:
                    pending.append(out)
        except (asyncio.CancelledError, GeneratorExit):
            # Only a request still running is stopped: a caller that drops the generator after the last
            # delta must not abort the session's next turn.
            if not finished:
                await self.stop_session(session_id)
            raise
        if pending:
            yield merge_genouts([to_genout(o) for o in pending])

    async def stop_session(self, session_id: int) -> None:
        self.loop.call(lambda engine: engine.stop_session(session_id))

    async def end_session(self, session_id: int) -> None:
        self.loop.call(lambda engine: engine.end_session(session_id))

    def stats(self) -> dict:
        """Engine counters, read on the engine thread."""
        import queue as sync_queue
        if self._closed:
            raise RuntimeError("the engine is closed")
        box: sync_queue.Queue = sync_queue.Queue()
        self.loop.call(lambda engine: box.put(engine.snapshot_stats()))
        return box.get()

    def close(self) -> None:
        self._closed = True
        self.loop.close()


def to_genout(out: RequestOutput) -> GenOut:
    response = out.text
    if out.finish_reason == "error" and out.error and not response:
        response = out.error
    return GenOut(response, out.num_history_tokens, out.num_input_tokens, out.num_output_tokens,
                  out.finish_reason, list(out.token_ids), out.logprobs)


def merge_genouts(outs: List[GenOut]) -> GenOut:
    last = outs[-1]
    logprobs = None
    if any(o.logprobs for o in outs):
        logprobs = [lp for o in outs for lp in (o.logprobs or [])]
    return GenOut("".join(o.response for o in outs), last.history_token_len, last.input_token_len,
                  last.generate_token_len, last.finish_reason, [t for o in outs for t in o.token_ids], logprobs)
