"""Stops the engine request of a client that dropped its decoupled stream.

pytriton 0.7.0 does not pass Triton's request cancellation to infer functions, so ``install`` appends
``proxy_cancel.py`` to the proxy ``model.py`` pytriton writes for each decoupled model: in Triton's Python
backend stub it polls ``is_cancelled()`` and sends a cancelled request's key to ``Cancellations``'s socket,
which stops the engine session registered under that key (its KV blocks go back to the pool).
"""
from __future__ import annotations

import logging
import os
import socket
import tempfile
import threading
from typing import Dict, Optional

logger = logging.getLogger("lmwrap_engine")

PARAMETER = "lmwrap_cancel_key"
SOCKET_ENV = "LMWRAP_TRITON_CANCEL_SOCKET"


class Cancellations:
    """The keys of running decoupled requests and their engine sessions; a thread stops cancelled ones."""

    def __init__(self, engine):
        self.engine = engine
        self._lock = threading.Lock()
        self._sessions: Dict[str, int] = {}
        self._early: Dict[str, None] = {}  # keys cancelled before their request registered (bounded)
        self._dir = tempfile.mkdtemp(prefix="lmwrap-triton-")
        self.path = os.path.join(self._dir, "cancel.sock")
        self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self._sock.bind(self.path)
        self._closed = False
        self._thread = threading.Thread(target=self._run, name="lmwrap-triton-cancel", daemon=True)
        self._thread.start()

    def register(self, request, session_id: int) -> Optional[str]:
        """Registers ``request``'s key for ``session_id``; stops it at once if already cancelled."""
        key = (getattr(request, "parameters", None) or {}).get(PARAMETER)
        if not key:
            return None
        with self._lock:
            if self._early.pop(key, False) is None:
                self.engine.stop_session_nowait(session_id)
            self._sessions[key] = session_id
        return key

    def unregister(self, key: Optional[str]) -> None:
        if key:
            with self._lock:
                self._sessions.pop(key, None)

    def stop_all(self, timeout_s: float = 3.0) -> int:
        """Stops every registered request (at shutdown: Triton only unloads a decoupled model once its
        streams end) and waits up to ``timeout_s`` for their infer functions to return; returns how many
        were running."""
        import time
        with self._lock:
            sessions = list(self._sessions.values())
        for session_id in sessions:
            self.engine.stop_session_nowait(session_id)
        deadline = time.monotonic() + timeout_s
        while self._sessions and time.monotonic() < deadline:
            time.sleep(0.02)
        return len(sessions)

    def _run(self) -> None:
        while not self._closed:
            try:
                key = self._sock.recv(256).decode("ascii", "replace")
            except OSError:
                return
            with self._lock:
                session_id = self._sessions.get(key)
                if session_id is None:
                    self._early[key] = None
                    while len(self._early) > 1024:
                        self._early.pop(next(iter(self._early)))
            if session_id is not None:
                logger.info("triton: client dropped request %s, stopping session %s", key, session_id)
                self.engine.stop_session_nowait(session_id)

    def close(self) -> None:
        self._closed = True
        try:
            with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
                sock.sendto(b"", self.path)  # wakes the thread
        except OSError:
            pass
        self._thread.join(timeout=2)
        self._sock.close()
        for path in (self.path, self._dir):
            try:
                os.remove(path) if path == self.path else os.rmdir(path)
            except OSError:
                pass


def install(model) -> None:
    """Makes pytriton write the proxy ``model.py`` of ``model`` (a pytriton ``Model``) with the watcher appended."""
    import pathlib
    patch = pathlib.Path(__file__).with_name("proxy_cancel.py").read_text()
    generate, files = model.generate_model, model.get_proxy_model_files

    def generate_model(model_repository):  # a model repository on disk
        generate(model_repository)
        target = pathlib.Path(model_repository) / model.model_name / str(model.model_version) / "model.py"
        target.write_text(target.read_text() + "\n\n" + patch)

    def get_proxy_model_files():  # the files pytriton sends with Triton's load request
        proxy = files()
        name = f"file:{model.model_version}/model.py"
        proxy[name] = proxy[name] + b"\n\n" + patch.encode()
        return proxy

    model.generate_model, model.get_proxy_model_files = generate_model, get_proxy_model_files
