"""Test helper: a real ``lmwrap serve api_server`` process on 127.0.0.1."""
from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from typing import Iterator, Optional, Tuple

import requests

STARTUP_TIMEOUT_S = 180
STOP_TIMEOUT_S = 30


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def server_command(model_dir: str, port: int, *extra_args: str) -> list:
    return [sys.executable, "-m", "lmwrap_engine.cli", "serve", "api_server", model_dir,
            "--server-port", str(port), *extra_args]


class ServerProcess(subprocess.Popen):
    """The server's Popen; ``log()`` is what it printed so far (stdout and stderr)."""

    log_path: str

    def log(self) -> str:
        with open(self.log_path, errors="replace") as f:
            return f.read()


def wait_healthy(url: str, proc: ServerProcess, timeout_s: float = STARTUP_TIMEOUT_S) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"the server exited with {proc.returncode} before it was ready:\n{proc.log()[-4000:]}")
        try:
            if requests.get(url + "/health", timeout=2).status_code == 200:
                return
        except requests.RequestException:
            pass
        time.sleep(0.2)
    raise TimeoutError(f"the server did not answer /health within {timeout_s} s:\n{proc.log()[-4000:]}")


def stop_server(proc: subprocess.Popen, timeout_s: float = STOP_TIMEOUT_S) -> Optional[int]:
    """SIGTERM, then SIGKILL if it does not exit in time; returns the exit code."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout_s)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    return proc.returncode


@contextlib.contextmanager
def running_server(model_dir: str, *extra_args: str, env: Optional[dict] = None,
                   timeout_s: float = STARTUP_TIMEOUT_S) -> Iterator[Tuple[str, ServerProcess]]:
    """Starts ``lmwrap serve api_server model_dir --server-port <free port> *extra_args`` and yields
    ``(base_url, proc)`` once ``GET /health`` answers 200; stops it (SIGTERM, then kill) at exit."""
    port = free_port()
    log = tempfile.NamedTemporaryFile("w+b", prefix="lmwrap-server-", suffix=".log", delete=False)
    full_env = {**os.environ, "TOKENIZERS_PARALLELISM": "false", "HF_HUB_OFFLINE": "1", **(env or {})}
    proc = ServerProcess(server_command(model_dir, port, *extra_args), stdout=log, stderr=subprocess.STDOUT,
                         env=full_env)
    proc.log_path = log.name
    url = f"http://127.0.0.1:{port}"
    try:
        wait_healthy(url, proc, timeout_s)
        yield url, proc
    finally:
        stop_server(proc)
        log.close()
        with contextlib.suppress(OSError):
            os.unlink(log.name)


def scrape(url: str) -> dict:
    """``/metrics`` as ``{sample name: value}`` for samples without labels."""
    from prometheus_client.parser import text_string_to_metric_families

    text = requests.get(url + "/metrics", timeout=10).text
    return {s.name: s.value for fam in text_string_to_metric_families(text) for s in fam.samples if not s.labels}


def finished_requests(url: str, finish_reason: str) -> float:
    """Requests the server finished with ``finish_reason`` (all routes)."""
    from prometheus_client.parser import text_string_to_metric_families

    text = requests.get(url + "/metrics", timeout=10).text
    return sum(s.value for fam in text_string_to_metric_families(text) for s in fam.samples
               if s.name == "lmwrap_requests_total" and s.labels.get("finish_reason") == finish_reason)


def wait_blocks_free(url: str, timeout_s: float = 30) -> dict:
    """Polls ``/metrics`` until no KV block is in use and nothing runs; returns the last scrape."""
    deadline = time.monotonic() + timeout_s
    while True:
        m = scrape(url)
        idle = m["lmwrap_kv_cache_blocks_used"] == 0 and m["lmwrap_num_requests_running"] == 0 \
            and m["lmwrap_num_requests_waiting"] == 0
        if idle or time.monotonic() > deadline:
            return m
        time.sleep(0.1)
