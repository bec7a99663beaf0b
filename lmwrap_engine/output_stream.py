"""The API layer's one request-streaming loop and one response accumulator.

Every public call (``pipe(...)``, ``stream_infer``, ``stream_generate``, ``chat``, async
``generate``) submits its requests with an ``OutputStream`` and reads their deltas from it.
"""
from __future__ import annotations

import asyncio
import queue
from dataclasses import dataclass, field
from typing import AsyncIterator, Callable, Iterator, List, Optional, Tuple

from .engine.llm_engine import RequestOutput


class OutputStream:
    """The deltas of requests submitted together, as ``(index, RequestOutput)`` in arrival order.

    Read it once: with ``for`` from any thread, or with ``async for`` on the event loop given as
    ``aio_loop``. A reader that stops early (break, close, cancellation) must ``close()`` it, which
    stops every request of the stream that has not finished; a finished one is never touched again,
    so a kept session's next turn is safe. (An abandoned async generator is only finalized later by
    its event loop, so ``close`` is not left to the iterator's own cleanup.)
    """

    def __init__(self, stop_session: Callable[[int], None], aio_loop: Optional[asyncio.AbstractEventLoop] = None):
        self._stop_session = stop_session
        self._aio_loop = aio_loop
        self._queue = asyncio.Queue() if aio_loop is not None else queue.SimpleQueue()
        self._session_ids: List[int] = []
        self._unfinished: set = set()

    def add(self, session_id: int) -> Callable[[RequestOutput], None]:
        """Registers one more request; returns the callback the engine emits its deltas to."""
        index = len(self._session_ids)
        self._session_ids.append(session_id)
        self._unfinished.add(index)
        if self._aio_loop is None:
            return lambda out: self._queue.put((index, out))

        def emit(out: RequestOutput) -> None:
            try:
                self._aio_loop.call_soon_threadsafe(self._queue.put_nowait, (index, out))
            except RuntimeError:  # the reader's event loop is closed: nobody reads the rest
                if out.finish_reason is None:
                    self._stop_session(session_id)
        return emit

    def _record(self, item: Tuple[int, RequestOutput]) -> Tuple[int, RequestOutput]:
        index, out = item
        if out.finish_reason is not None:
            self._unfinished.discard(index)
        return item

    def close(self) -> None:
        """Stops the requests that have not finished (idempotent)."""
        for index in sorted(self._unfinished):
            self._stop_session(self._session_ids[index])
        self._unfinished.clear()

    def __iter__(self) -> Iterator[Tuple[int, RequestOutput]]:
        try:
            while self._unfinished:
                yield self._record(self._queue.get())
        finally:
            self.close()

    async def __aiter__(self) -> AsyncIterator[Tuple[int, RequestOutput]]:
        try:
            while self._unfinished:
                yield self._record(await self._queue.get())
        finally:
            self.close()


@dataclass
class Accumulated:
    """A request's deltas added up: text and ids joined, counters and finish reason from the last."""

    text: str = ""
    token_ids: List[int] = field(default_factory=list)
    logprobs: Optional[List[dict]] = None
    num_history_tokens: int = 0
    num_input_tokens: int = 0
    num_output_tokens: int = 0
    finish_reason: Optional[str] = None

    def add(self, out: RequestOutput) -> None:
        self.text += error_text(out)
        self.token_ids += out.token_ids
        if out.logprobs:
            self.logprobs = (self.logprobs or []) + out.logprobs
        self.num_history_tokens = out.num_history_tokens
        self.num_input_tokens = out.num_input_tokens
        self.num_output_tokens = out.num_output_tokens
        self.finish_reason = out.finish_reason

    def as_output(self) -> RequestOutput:
        return RequestOutput(self.text, self.token_ids, self.num_history_tokens, self.num_input_tokens,
                             self.num_output_tokens, self.finish_reason, self.logprobs)


def error_text(out: RequestOutput) -> str:
    """A delta's text; a failed request's last delta carries its error message instead (as lmdeploy's)."""
    if out.finish_reason == "error" and out.error and not out.text:
        return out.error
    return out.text
