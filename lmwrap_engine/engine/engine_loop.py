"""Runs an LLMEngine on one background thread; other threads talk to it through ``call``."""
from __future__ import annotations

import logging
import queue
import threading
from typing import Callable

from .llm_engine import LLMEngine

logger = logging.getLogger("lmwrap_engine")
_STOP = object()


class EngineLoop:
    def __init__(self, engine: LLMEngine):
        self.engine = engine
        self._inbox: "queue.SimpleQueue" = queue.SimpleQueue()
        self._thread = threading.Thread(target=self._run, name="lmwrap-engine", daemon=True)
        self._thread.start()

    def call(self, fn: Callable[[LLMEngine], None]) -> None:
        """Runs ``fn(engine)`` on the engine thread, between two steps."""
        self._inbox.put(fn)

    def close(self) -> None:
        if self._thread.is_alive():
            self._inbox.put(_STOP)
            self._thread.join()

    def _run(self) -> None:
        import torch
        torch.set_grad_enabled(False)
        while True:
            # Block only when idle; otherwise drain whatever arrived and take one step.
            commands = [] if self.engine.has_work() else [self._inbox.get()]
            while True:
                try:
                    commands.append(self._inbox.get_nowait())
                except queue.Empty:
                    break
            for fn in commands:
                if fn is _STOP:
                    return
                try:
                    fn(self.engine)
                except Exception:
                    logger.exception("engine command failed")
            if self.engine.has_work():
                try:
                    self.engine.step()
                except Exception as exc:  # a bug in scheduling or bookkeeping: fail what runs, keep serving
                    logger.exception("engine step failed")
                    self.engine.abort_all(f"{type(exc).__name__}: {exc}")
