"""Runs an LLMEngine on one background thread; other threads talk to it through ``call`` and ``ask``."""
from __future__ import annotations

import logging
import queue
import threading
from concurrent.futures import Future
from typing import Any, Callable, Union

from .llm_engine import LLMEngine

logger = logging.getLogger("lmwrap_engine")
_STOP = object()


class EngineClosedError(RuntimeError):
    """The engine was closed: it takes no more requests."""

    def __init__(self):
        super().__init__("the engine is closed")


class EngineLoop:
    """Drives an engine on its own thread. Given a callable instead of an engine, it builds the engine
    on that thread (and waits for it; what building raises is raised here). Loading on the caller's
    thread leaves that thread an idle OpenMP team, and with it the engine thread's CPU forwards
    measured 1.6x slower (small ops ~2x; libgomp throttles its spin-wait when it manages more
    threads than cores), so the thread that steps the engine is the one that loads it."""

    def __init__(self, engine: Union[LLMEngine, Callable[[], LLMEngine]]):
        self._inbox: "queue.SimpleQueue" = queue.SimpleQueue()
        # Guards "closed?" + put, so nothing lands in the inbox after the stop marker.
        self._lock = threading.Lock()
        self._closed = False
        built: Future = Future()
        if isinstance(engine, LLMEngine):
            built.set_result(engine)
        self._thread = threading.Thread(target=self._run, args=(engine, built), name="lmwrap-engine", daemon=True)
        self._thread.start()
        self.engine = built.result()

    @property
    def is_closed(self) -> bool:
        return self._closed

    def call(self, fn: Callable[[LLMEngine], Any]) -> None:
        """Runs ``fn(engine)`` on the engine thread, between two steps."""
        with self._lock:
            if self._closed:
                raise EngineClosedError()
            self._inbox.put(fn)

    def ask(self, fn: Callable[[LLMEngine], Any]) -> Future:
        """Like ``call``, with ``fn``'s result (or exception) in a Future."""
        future: Future = Future()

        def run(engine: LLMEngine) -> None:
            try:
                future.set_result(fn(engine))
            except BaseException as exc:
                future.set_exception(exc)
        self.call(run)
        return future

    def close(self) -> None:
        """Fails every request still queued or running (``finish_reason='error'``) and stops the thread."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
            self._inbox.put(_STOP)
        if threading.current_thread() is not self._thread:
            self._thread.join()

    def _run(self, build, built: Future) -> None:
        import torch
        torch.set_grad_enabled(False)
        if not built.done():
            try:
                built.set_result(build())
            except BaseException as exc:
                built.set_exception(exc)
                return
        self.engine = built.result()
        while True:
            # Block only when idle (waking for idle-session expiry); otherwise drain what arrived and step.
            commands = []
            if not self.engine.has_work():
                try:
                    commands.append(self._inbox.get(timeout=self.engine.idle_wakeup_s()))
                except queue.Empty:
                    pass
            while True:
                try:
                    commands.append(self._inbox.get_nowait())
                except queue.Empty:
                    break
            for fn in commands:
                if fn is _STOP:  # the last item ever queued: everything before it has run
                    self.engine.abort_all(str(EngineClosedError()))
                    return
                try:
                    fn(self.engine)
                except Exception:
                    logger.exception("engine command failed")
            self.engine.expire_idle_sessions()
            if self.engine.has_work():
                try:
                    self.engine.step()
                except Exception as exc:  # a bug in scheduling or bookkeeping: fail what runs, keep serving
                    logger.exception("engine step failed")
                    self.engine.abort_all(f"{type(exc).__name__}: {exc}")
