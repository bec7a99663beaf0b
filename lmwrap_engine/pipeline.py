"""``pipeline()``: an AsyncEngine that also has lmdeploy's synchronous calls (batch, stream, chat)."""
from __future__ import annotations

import itertools
import logging
from typing import Iterator, List, Optional, Sequence, Union

from .async_engine import AsyncEngine
from .config import GenerationConfig, Response
from .engine.llm_engine import RequestOutput
from .output_stream import Accumulated, OutputStream, error_text
from .vl.prompts import is_image_prompt

Prompt = Union[str, List[dict]]


def _is_messages(x) -> bool:
    return isinstance(x, list) and all(isinstance(m, dict) for m in x) and len(x) > 0


def normalize_prompts(prompts) -> tuple:
    """Returns ``(list_of_prompts, is_single)`` for str, messages, ``(text, image(s))``, or a list of those."""
    if isinstance(prompts, str) or _is_messages(prompts) or is_image_prompt(prompts):
        return [prompts], True
    if isinstance(prompts, (list, tuple)):
        for i, p in enumerate(prompts):
            if not (isinstance(p, str) or _is_messages(p) or is_image_prompt(p)):
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
        self._pipeline.end_session_nowait(self._id)
        self._step = 0
        self.history = []

    def __repr__(self):
        return f"Session(id={self._id}, step={self._step}, turns={len(self.history)})"


class Pipeline(AsyncEngine):
    """lmdeploy's pipeline: the ``AsyncEngine`` API (async ``generate``, ``stop_session``, ``end_session``)
    plus synchronous offline calls: ``pipe(prompts)`` / ``batch_infer``, ``stream_infer``, ``chat``
    sessions, ``stream_generate`` (one request on a session), ``close`` / ``with``.

    One engine thread serves every call, so calls from several threads batch together.
    """

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
        totals = [Accumulated() for _ in items]
        session_ids = []
        bar = None
        if use_tqdm:
            from tqdm import tqdm
            bar = tqdm(total=len(items), desc="Processed prompts", unit="req")
        stream = self._stream_prompts(items, gen_config, do_preprocess, adapter_name, session_ids, **kwargs)
        try:
            for index, out in stream:
                totals[index].add(out)
                if out.finish_reason is not None and bar is not None:
                    bar.update(1)
        finally:
            stream.close()  # on Ctrl-C: stop what still runs
            if bar is not None:
                bar.close()
        results = [to_response(t.as_output(), sid, i) for i, (t, sid) in enumerate(zip(totals, session_ids))]
        return results[0] if single else results

    def stream_infer(self, prompts, gen_config=None, do_preprocess: bool = True, adapter_name=None,
                     **kwargs) -> Iterator[Response]:
        """Yields ``Response`` deltas (``text`` is the new piece, ``index`` the prompt's position)."""
        items, _ = normalize_prompts(prompts)
        session_ids: List[int] = []
        yield from _responses(self._stream_prompts(items, gen_config, do_preprocess, adapter_name, session_ids,
                                                   **kwargs), session_ids)

    def _stream_prompts(self, items: list, gen_config, do_preprocess: bool, adapter_name, session_ids: list,
                        **kwargs):
        if adapter_name is not None:
            raise NotImplementedError("LoRA adapters are not supported")
        if kwargs:
            raise TypeError(f"unexpected arguments: {', '.join(sorted(kwargs))}")
        configs = self._per_prompt_configs(gen_config, len(items))
        # Encode everything before submitting, so a bad prompt fails the call before any work starts.
        requests = []
        for prompt, cfg in zip(items, configs):
            ids = self.encode_prompt(prompt, True, do_preprocess)
            requests.append((ids, self.sampling_params(cfg, len(ids))))
        stream = self._open_stream()
        for ids, params in requests:
            session_id = self.new_session_id()
            session_ids.append(session_id)
            self.submit(session_id, ids, params, stream.add(session_id))
        return stream

    @staticmethod
    def _per_prompt_configs(gen_config, n: int) -> list:
        if isinstance(gen_config, (list, tuple)):
            if len(gen_config) != n:
                raise ValueError(f"gen_config has {len(gen_config)} entries for {n} prompts")
            return list(gen_config)
        return [gen_config] * n

    # -- one request on a session -------------------------------------------------------------

    def stream_generate(self, prompt: Optional[Prompt] = None, session_id: Optional[int] = None,
                        gen_config: Optional[GenerationConfig] = None, sequence_start: bool = True,
                        sequence_end: bool = True, step: int = 0, do_preprocess: bool = True,
                        input_ids: Optional[Sequence[int]] = None) -> Iterator[Response]:
        """The synchronous form of ``generate``: yields ``Response`` deltas of one request.

        ``sequence_end=False`` keeps the session's KV cache for the next call with the same
        ``session_id`` and ``sequence_start=False``. Closing the iterator early stops the request.
        """
        session_id = self.new_session_id() if session_id is None else session_id
        if input_ids is None:
            if prompt is None:
                raise ValueError("pass a prompt or input_ids")
            input_ids = self.encode_prompt(prompt, sequence_start, do_preprocess)
        params = self.sampling_params(gen_config, step + len(input_ids))
        stream = self._open_stream()
        self.submit(session_id, input_ids, params, stream.add(session_id), sequence_start, sequence_end, step)
        return _responses(stream, [session_id])

    def chat(self, prompt: Prompt, session: Optional[Session] = None, gen_config=None,
             do_preprocess: bool = True, stream_response: bool = False):
        """One turn of a conversation; returns the ``Session`` (its KV cache is kept for the next turn).

        With ``stream_response=True`` returns an iterator of ``Response`` deltas instead; the session
        is updated when it is exhausted.
        """
        session = session or Session(self)
        start = session._step == 0
        cut = session.response is not None and session.response.finish_reason != "stop"
        input_ids = self.encode_prompt(prompt, start, do_preprocess, close_turn=cut and not start)
        deltas = self.stream_generate(session_id=session._id, gen_config=gen_config, sequence_start=start,
                                      sequence_end=False, step=session._step, input_ids=input_ids)

        def run():
            total = Accumulated()
            for delta in deltas:
                total.add(delta_output(delta))
                yield delta
            session.response = to_response(total.as_output(), session._id, 0)
            session.history.append((prompt, session.response.text))
            session._step = self._loop.ask(lambda engine: engine.session_tokens(session._id)).result()

        if stream_response:
            return run()
        for _ in run():
            pass
        if session.response.finish_reason == "error":
            raise RuntimeError(session.response.text)
        return session

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def __del__(self):
        try:
            self.close()
        except Exception:
            pass


def _responses(stream: OutputStream, session_ids: List[int]) -> Iterator[Response]:
    try:
        for index, out in stream:
            yield to_response(out, session_ids[index], index)
    finally:
        stream.close()


def to_response(out: RequestOutput, session_id: int, index: int) -> Response:
    return Response(error_text(out), out.num_output_tokens, out.num_input_tokens, session_id, out.finish_reason,
                    list(out.token_ids), out.logprobs, index)


def delta_output(delta: Response) -> RequestOutput:
    return RequestOutput(delta.text, delta.token_ids, 0, delta.input_token_len, delta.generate_token_len,
                         delta.finish_reason, delta.logprobs)


def pipeline(model_path: Optional[str] = None, backend_config=None, chat_template_config=None,
             log_level: str = "WARNING", max_log_len: Optional[int] = None, **kwargs) -> Pipeline:
    """Builds a ``Pipeline`` (an ``AsyncEngine``, as lmdeploy's ``pipeline`` returns).

    ``model_path``: HF folder, ``.gguf`` file, hub id already in the local cache, or ``None`` for the
    default model (SmolLM2-135M-Instruct). Both backend names and both config classes select lmwrap's
    engine. ``kwargs``: ``AsyncEngine``'s (``model_name``, ``backend``, ``tp``); anything else is an error.
    """
    logging.getLogger("lmwrap_engine").setLevel(log_level)
    return Pipeline(model_path, backend_config=backend_config, chat_template_config=chat_template_config,
                    max_log_len=max_log_len, **kwargs)
