"""Per-app server state: the engine and the names it is served under, the sessions busy on this server,
draining on shutdown, and running a request's engine jobs (streamed delta by delta or collected)."""
from __future__ import annotations

import asyncio
import itertools
import logging
import time
from dataclasses import dataclass, field
from http import HTTPStatus
from typing import AsyncIterator, Callable, List, Optional, Sequence, Tuple

import anyio
from fastapi import Request

from ...config import GenerationConfig, GenOut
from .errors import APIError
from .metrics import ServerMetrics

logger = logging.getLogger("lmwrap_engine.serve")

# Ids the server picks (session_id -1, extra choices of n>1) start far above those clients pick.
SERVER_SESSION_BASE = 1 << 36


@dataclass
class Job:
    """One engine request of an HTTP request (a prompt times one of its ``n`` choices)."""

    session_id: int
    input_ids: List[int]
    gen_config: GenerationConfig
    sequence_start: bool = True
    sequence_end: bool = True


@dataclass
class Choice:
    """What one job produced, accumulated."""

    text: str = ""
    token_ids: List[int] = field(default_factory=list)
    logprobs: List[dict] = field(default_factory=list)
    finish_reason: Optional[str] = None
    input_tokens: int = 0
    history_tokens: int = 0
    generated_tokens: int = 0

    def add(self, out: GenOut) -> None:
        self.text += out.response if out.finish_reason != "error" else ""
        self.token_ids += out.token_ids
        self.logprobs += out.logprobs or []
        self.finish_reason = out.finish_reason
        self.input_tokens, self.history_tokens = out.input_token_len, out.history_token_len
        self.generated_tokens = out.generate_token_len


class ServerContext:
    """Per-app state: the engine, the names it is served under, the sessions busy on this server."""

    def __init__(self, engine, model_names: Sequence[str], metrics: ServerMetrics):
        self.engine = engine
        self.model_names = list(model_names)
        self.metrics = metrics
        self.created = int(time.time())
        self.busy: set = set()
        # kept sessions whose last reply was cut before its stop word (the next turn writes it first)
        self.cut_turns: set = set()
        self.draining = False
        self.tool_parser = None  # the ToolParser of replies to requests with tools (set by create_app)
        self._ids = itertools.count(SERVER_SESSION_BASE)

    # -- checks -------------------------------------------------------------------------------

    def check_model(self, model: str) -> None:
        if model not in self.model_names:
            raise APIError(HTTPStatus.NOT_FOUND, f"The model `{model}` does not exist.", "model")

    def check_open(self) -> None:
        if self.draining:
            raise APIError(HTTPStatus.SERVICE_UNAVAILABLE, "The server is shutting down.")

    def session_ids(self, requested: Optional[int], count: int) -> List[int]:
        """``count`` session ids: the requested one first (-1/None: one of the server's), then the server's."""
        if requested is None or requested == -1:
            return [next(self._ids) for _ in range(count)]
        if requested < 0:
            raise APIError(HTTPStatus.BAD_REQUEST, f"The session_id `{requested}` must be -1 or >= 0.",
                           "session_id")
        return [requested] + [next(self._ids) for _ in range(count - 1)]

    def acquire(self, session_ids: Sequence[int]) -> Callable[[], None]:
        """Marks sessions busy (400 if one already is); returns the idempotent release."""
        busy = next((s for s in session_ids if s in self.busy), None)
        if busy is not None:
            raise APIError(HTTPStatus.BAD_REQUEST, f"The session_id `{busy}` is occupied.", "session_id")
        held = set(session_ids)
        self.busy |= held

        def release() -> None:
            self.busy -= held
            held.clear()
        return release

    async def check_not_kept(self, session_id: int) -> None:
        """A one-shot request must not wipe a session an interactive client keeps in the engine."""
        if session_id < SERVER_SESSION_BASE and await self.engine.session_tokens(session_id) > 0:
            raise APIError(HTTPStatus.BAD_REQUEST, f"The session_id `{session_id}` is occupied.", "session_id")

    async def encode(self, prompt, param: str, do_preprocess: bool, sequence_start: bool = True,
                     tools=None, close_turn: bool = False) -> List[int]:
        """Token ids of a prompt (off the event loop); 400 if it is malformed, empty or too long."""
        kw = {"close_turn": True} if close_turn else {}
        try:
            ids = await asyncio.to_thread(self.engine.encode_prompt, prompt, sequence_start=sequence_start,
                                          do_preprocess=do_preprocess, tools=tools, **kw)
        except (ValueError, TypeError, KeyError) as exc:
            raise APIError(HTTPStatus.BAD_REQUEST, f"Invalid {param}: {exc}", param) from None
        return self.check_ids(ids, param)

    async def check_grammar(self, gen: GenerationConfig, param: str = "response_format") -> None:
        """Compiles (and caches, for the engine) the grammar of ``gen.response_format`` off the event loop;
        a format the grammar compiler refuses is a 400 naming the problem."""
        if gen.response_format is None:
            return
        from ...guided import compile_response_format
        try:
            await asyncio.to_thread(compile_response_format, self.engine.tokenizer, self.engine.vocab_size,
                                    gen.response_format)
        except ValueError as exc:
            message = f"a function's parameters cannot be enforced: {exc}" if param == "tools" else str(exc)
            raise APIError(HTTPStatus.BAD_REQUEST, message, param) from None

    def check_ids(self, ids: List[int], param: str) -> List[int]:
        if not ids:
            raise APIError(HTTPStatus.BAD_REQUEST, f"The prompt (`{param}`) is empty.", param)
        if len(ids) >= self.engine.session_len:
            raise APIError(HTTPStatus.BAD_REQUEST,
                           f"The prompt (`{param}`) has {len(ids)} tokens, which reaches the session length "
                           f"({self.engine.session_len}); shorten it.", param)
        vocab = self.engine.vocab_size
        bad = next((t for t in ids if not 0 <= t < vocab), None)
        if bad is not None:
            raise APIError(HTTPStatus.BAD_REQUEST, f"Token id {bad} is outside the vocabulary [0, {vocab}).", param)
        return ids

    # -- engine -------------------------------------------------------------------------------

    async def run(self, job: Job, route: str, arrival: float) -> AsyncIterator[GenOut]:
        """The engine's deltas for one job, with latency metrics; closing it stops the request."""
        gen = self.engine.generate(None, job.session_id, gen_config=job.gen_config,
                                   sequence_start=job.sequence_start, sequence_end=job.sequence_end,
                                   do_preprocess=False, input_ids=job.input_ids)
        last, generated, finished = None, 0, False
        try:
            async for out in gen:
                now = time.perf_counter()
                generated = out.generate_token_len
                if out.token_ids:
                    if last is None:
                        self.metrics.ttft.observe(now - arrival)
                    else:
                        self.metrics.itl.observe(now - last)
                    last = now
                if out.finish_reason is not None:
                    finished = True
                    self.metrics.observe_finished(route, out.finish_reason, out.input_token_len,
                                                  out.generate_token_len, now - arrival)
                yield out
        except ValueError as exc:  # the engine refused the request's settings before running it
            finished = True
            self.metrics.observe_finished(route, "error", len(job.input_ids), 0, time.perf_counter() - arrival)
            yield GenOut(str(exc), 0, len(job.input_ids), 0, "error")
        except RuntimeError as exc:  # the engine closed under us (shutdown)
            finished = True
            self.metrics.observe_finished(route, "error", len(job.input_ids), generated,
                                          time.perf_counter() - arrival)
            yield GenOut(str(exc), 0, len(job.input_ids), 0, "error")
        finally:
            if not finished:  # the client went away: closing ``gen`` stops the request
                self.metrics.observe_finished(route, "abort", len(job.input_ids), generated,
                                              time.perf_counter() - arrival)
            with anyio.CancelScope(shield=True):
                await gen.aclose()

    async def run_all(self, jobs: List[Job], route: str, arrival: float) -> AsyncIterator[Tuple[int, GenOut]]:
        """``(job index, delta)`` of several jobs running at once, in arrival order."""
        if len(jobs) == 1:
            stream = self.run(jobs[0], route, arrival)
            try:
                async for out in stream:
                    yield 0, out
            finally:
                with anyio.CancelScope(shield=True):
                    await stream.aclose()
            return
        queue: asyncio.Queue = asyncio.Queue()

        async def pump(i: int, job: Job) -> None:
            try:
                async for out in self.run(job, route, arrival):
                    queue.put_nowait((i, out))
            except Exception as exc:  # reported like an engine failure of this choice
                queue.put_nowait((i, GenOut(f"{type(exc).__name__}: {exc}", 0, len(job.input_ids), 0, "error")))
            finally:
                queue.put_nowait((i, None))
        tasks = [asyncio.ensure_future(pump(i, job)) for i, job in enumerate(jobs)]
        try:
            remaining = len(jobs)
            while remaining:
                i, out = await queue.get()
                if out is None:
                    remaining -= 1
                else:
                    yield i, out
        finally:
            for task in tasks:
                task.cancel()
            with anyio.CancelScope(shield=True):
                await asyncio.gather(*tasks, return_exceptions=True)

    async def collect(self, jobs: List[Job], route: str, arrival: float, request: Request) -> List[Choice]:
        """Runs jobs to the end (non-streaming); stops them if the client goes away."""
        choices = [Choice() for _ in jobs]

        async def consume() -> None:
            async for i, out in self.run_all(jobs, route, arrival):
                choices[i].add(out)
                if out.finish_reason == "error":
                    raise_engine_error(out, self.draining, getattr(self.engine, "failure", None))
        task = asyncio.ensure_future(consume())
        try:
            while True:
                done, _ = await asyncio.wait({task}, timeout=0.5)
                if done:
                    task.result()
                    return choices
                if await request.is_disconnected():
                    raise APIError(HTTPStatus.BAD_REQUEST, "Client disconnected")
        finally:
            if not task.done():
                task.cancel()
                with anyio.CancelScope(shield=True):
                    await asyncio.gather(task, return_exceptions=True)


def raise_engine_error(out: GenOut, draining: bool, engine_failure: Optional[str] = None) -> None:
    """The ``APIError`` of an engine delta that finished with ``error``."""
    if draining:
        raise APIError(HTTPStatus.SERVICE_UNAVAILABLE, "The server is shutting down.")
    if engine_failure:  # the engine can run no more (a dead tensor-parallel worker): not the request's fault
        raise APIError(HTTPStatus.SERVICE_UNAVAILABLE, out.response or engine_failure)
    if out.generate_token_len == 0:  # the engine refused the request before running it: its input
        raise APIError(HTTPStatus.BAD_REQUEST, out.response or "The engine rejected the request.")
    logger.error("a request failed in the engine: %s", out.response)
    raise APIError(HTTPStatus.INTERNAL_SERVER_ERROR, out.response or "internal error happened")


def server_context(request: Request) -> ServerContext:
    """The app's ``ServerContext`` (a route dependency)."""
    return request.app.state.ctx
