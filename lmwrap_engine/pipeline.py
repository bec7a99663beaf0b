"""The synchronous pipeline API (lmdeploy's ``pipeline`` / ``Pipeline``) over the AsyncEngine."""
from __future__ import annotations

import itertools
import queue
from typing import Iterator, List, Optional, Sequence, Union

from .async_engine import AsyncEngine
from .config import GenerationConfig, Response
from .engine.llm_engine import RequestOutput

Prompt = Union[str, List[dict]]


def _is_messages(x) -> bool:
    return isinstance(x, list) and all(isinstance(m, dict) for m in x) and len(x) > 0


def normalize_prompts(prompts) -> tuple:
    """Returns ``(list_of_prompts, is_single)`` for str, messages, list of str or list of messages."""
    if isinstance(prompts, str) or _is_messages(prompts):
        return [prompts], True
    if isinstance(prompts, (list, tuple)):
        for i, p in enumerate(prompts):
            if not (isinstance(p, str) or _is_messages(p)):
                raise TypeError(f"prompt {i} must be a str or a non-empty list of message dicts, "
                                f"got {type(p).__name__}")
        return list(prompts), False
    raise TypeError("prompts must be a str, a list of message dicts, or a list of either; "
                    f"got {type(prompts).__name__}")


class Session:
    """A multi-turn conversation whose KV cache stays in the engine between ``Pipeline.chat`` calls."""

    _ids = itertools.count(1 << 40)  # far from the ids batch requests use

    def __init__(self, pipeline: "Pipeline"):
        self._id = next(Session._ids)
        self._step = 0
        self._pipeline = pipeline
        self.history: List[tuple] = []
        self.response: Optional[Response] = None

    def close(self) -> None:
        """Frees the session's KV cache."""
        self._pipeline.end_session(self._id)
        self._step = 0
        self.history = []

    def __repr__(self):
        return f"Session(id={self._id}, step={self._step}, turns={len(self.history)})"


class Pipeline:
    """Offline inference: ``pipe(prompts)``, ``stream_infer``, ``chat`` sessions, ``close``.

    One engine thread serves every call, so calls from several threads batch together.
    """

    def __init__(self, model_path: Optional[str] = None, backend_config=None, chat_template_config=None,
                 log_level: str = "WARNING", max_log_len: Optional[int] = None, backend: Optional[str] = None,
                 **kwargs):
        self.async_engine = AsyncEngine(model_path, backend_config, chat_template_config, log_level,
                                        max_log_len, backend, **kwargs)
        self.tokenizer = self.async_engine.tokenizer
        self.chat_template = self.async_engine.chat_template
        self.session_len = self.async_engine.session_len
        self._closed = False

    # -- batch --------------------------------------------------------------------------------

    def __call__(self, prompts, gen_config=None, do_preprocess: bool = True, adapter_name=None,
                 use_tqdm: bool = False, **kwargs):
        return self.batch_infer(prompts, gen_config, do_preprocess, adapter_name, use_tqdm, **kwargs)

    def infer(self, prompts, gen_config=None, do_preprocess: bool = True, adapter_name=None,
              use_tqdm: bool = False, **kwargs):
        return self.batch_infer(prompts, gen_config, do_preprocess, adapter_name, use_tqdm, **kwargs)

    def batch_infer(self, prompts, gen_config=None, do_preprocess: bool = True, adapter_name=None,
                    use_tqdm: bool = False, **kwargs):
        """Runs all prompts batched; returns one ``Response`` for one prompt, else a list in input order."""
        items, single = normalize_prompts(prompts)
        results = [Response("", 0, 0, index=i) for i in range(len(items))]
        bar = None
        if use_tqdm:
            from tqdm import tqdm
            bar = tqdm(total=len(items), desc="Processed prompts", unit="req")
        for delta in self._stream(items, gen_config, do_preprocess, adapter_name, **kwargs):
            res = results[delta.index]
            res.text += delta.text
            res.token_ids += delta.token_ids
            if delta.logprobs:
                res.logprobs = (res.logprobs or []) + delta.logprobs
            res.generate_token_len = delta.generate_token_len
            res.input_token_len = delta.input_token_len
            res.session_id = delta.session_id
            res.finish_reason = delta.finish_reason
            if delta.finish_reason is not None and bar is not None:
                bar.update(1)
        if bar is not None:
            bar.close()
        return results[0] if single else results

    def stream_infer(self, prompts, gen_config=None, do_preprocess: bool = True, adapter_name=None,
                     **kwargs) -> Iterator[Response]:
        """Yields ``Response`` deltas (``text`` is the new piece, ``index`` the prompt's position)."""
        items, _ = normalize_prompts(prompts)
        return self._stream(items, gen_config, do_preprocess, adapter_name, **kwargs)

    def _stream(self, items: list, gen_config, do_preprocess: bool, adapter_name, **kwargs) -> Iterator[Response]:
        if adapter_name is not None:
            raise NotImplementedError("LoRA adapters are not supported")
        if kwargs:
            raise TypeError(f"unexpected arguments: {', '.join(sorted(kwargs))}")
        configs = self._per_prompt_configs(gen_config, len(items))
        engine = self.async_engine
        outbox: "queue.SimpleQueue" = queue.SimpleQueue()
        session_ids = []
        # Encode everything before submitting, so a bad prompt fails the call before any work starts.
        requests = []
        for i, (prompt, cfg) in enumerate(zip(items, configs)):
            ids = engine.encode_prompt(prompt, True, do_preprocess)
            requests.append((ids, engine.sampling_params(cfg, len(ids))))
        for i, (ids, params) in enumerate(requests):
            sid = engine.new_session_id()
            session_ids.append(sid)
            engine.submit(sid, ids, params, lambda out, i=i: outbox.put((i, out)))
        remaining = len(items)
        try:
            while remaining:
                i, out = outbox.get()
                if out.finish_reason is not None:
                    remaining -= 1
                yield to_response(out, session_ids[i], i)
        finally:
            if remaining:  # the caller stopped early: cancel what still runs
                for sid in session_ids:
                    engine.loop.call(lambda e, sid=sid: e.end_session(sid))

    @staticmethod
    def _per_prompt_configs(gen_config, n: int) -> list:
        if isinstance(gen_config, (list, tuple)):
            if len(gen_config) != n:
                raise ValueError(f"gen_config has {len(gen_config)} entries for {n} prompts")
            return list(gen_config)
        return [gen_config] * n

    # -- one request on a session -------------------------------------------------------------

    def generate(self, prompt: Optional[Prompt] = None, session_id: Optional[int] = None,
                 gen_config: Optional[GenerationConfig] = None, sequence_start: bool = True,
                 sequence_end: bool = True, step: int = 0, do_preprocess: bool = True,
                 input_ids: Optional[Sequence[int]] = None) -> Iterator[Response]:
        """Streams ``Response`` deltas of one request. ``sequence_end=False`` keeps the session's KV cache
        for the next call with the same ``session_id`` and ``sequence_start=False``."""
        engine = self.async_engine
        session_id = engine.new_session_id() if session_id is None else session_id
        if input_ids is None:
            if prompt is None:
                raise ValueError("pass a prompt or input_ids")
            input_ids = engine.encode_prompt(prompt, sequence_start, do_preprocess)
        params = engine.sampling_params(gen_config, step + len(input_ids))
        outbox: "queue.SimpleQueue" = queue.SimpleQueue()
        engine.submit(session_id, list(input_ids), params, outbox.put, sequence_start, sequence_end, step)
        finished = False
        try:
            while not finished:
                out: RequestOutput = outbox.get()
                finished = out.finish_reason is not None
                yield to_response(out, session_id, 0)
        finally:
            if not finished:
                self.stop_session(session_id)

    def chat(self, prompt: Prompt, session: Optional[Session] = None, gen_config=None,
             do_preprocess: bool = True, stream_response: bool = False):
        """One turn of a conversation; returns the ``Session`` (its KV cache is kept for the next turn).

        With ``stream_response=True`` returns an iterator of ``Response`` deltas instead; the session
        is updated when it is exhausted.
        """
        session = session or Session(self)
        start = session._step == 0
        cut = session.response is not None and session.response.finish_reason != "stop"
        input_ids = self.async_engine.encode_prompt(prompt, start, do_preprocess, close_turn=cut and not start)
        deltas = self.generate(session_id=session._id, gen_config=gen_config, sequence_start=start,
                               sequence_end=False, step=session._step, input_ids=input_ids)

        def run():
            result = Response("", 0, 0, session._id)
            for d in deltas:
                result.text += d.text
                result.token_ids += d.token_ids
                result.generate_token_len, result.input_token_len = d.generate_token_len, d.input_token_len
                result.finish_reason = d.finish_reason
                yield d
            session.response = result
            session.history.append((prompt, result.text))
            session._step = self._session_tokens(session._id)

        if stream_response:
            return run()
        for _ in run():
            pass
        if session.response.finish_reason == "error":
            raise RuntimeError(session.response.text)
        return session

    def _session_tokens(self, session_id: int) -> int:
        box: "queue.SimpleQueue" = queue.SimpleQueue()

        def read(engine):
            s = engine.sessions.get(session_id)
            box.put(s.seq.num_tokens if s else 0)
        self.async_engine.loop.call(read)
        return box.get()

    def stop_session(self, session_id: int) -> None:
        self.async_engine.loop.call(lambda e: e.stop_session(session_id))

    def end_session(self, session_id: int) -> None:
        self.async_engine.loop.call(lambda e: e.end_session(session_id))

    def stats(self) -> dict:
        """Engine counters: tokens computed (prompt / generated), prefix-cache hits, preemptions, blocks."""
        return self.async_engine.stats()

    def close(self) -> None:
        if not self._closed:
            self._closed = True
            self.async_engine.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def __del__(self):
        try:
            self.close()
        except Exception:
            pass


def to_response(out: RequestOutput, session_id: int, index: int) -> Response:
    text = out.text
    if out.finish_reason == "error" and out.error and not text:
        text = out.error
    return Response(text, out.num_output_tokens, out.num_input_tokens, session_id, out.finish_reason,
                    list(out.token_ids), out.logprobs, index)


def pipeline(model_path: Optional[str] = None, backend_config=None, chat_template_config=None,
             log_level: str = "WARNING", max_log_len: Optional[int] = None, backend: Optional[str] = None,
             **kwargs) -> Pipeline:
    """Builds a ``Pipeline``. ``model_path``: HF folder, ``.gguf`` file, hub id already in the local cache,
    or ``None`` for the default model (SmolLM2-135M-Instruct). Both backend names and both config classes
    select lmwrap's engine."""
    return Pipeline(model_path, backend_config, chat_template_config, log_level, max_log_len, backend, **kwargs)
