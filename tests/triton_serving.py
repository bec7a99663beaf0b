"""Test helper: a real ``lmwrap serve triton`` (a Triton Inference Server hosting our engine) on 127.0.0.1."""
from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
import tempfile
import time
from typing import Iterator, Optional

from serving import ServerProcess, free_port, stop_server

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
STARTUP_TIMEOUT_S = 300


def triton_host_python() -> str:
    """The host venv's python (scripts/triton_host_venv.sh: built once, ~70 s with a warm pip cache)."""
    out = subprocess.run(['bash', os.path.join(REPO, 'scripts', 'triton_host_venv.sh')], capture_output=True,
                         text=True, timeout=1800)
    assert out.returncode == 0, out.stderr[-4000:]
    python = out.stdout.strip().splitlines()[-1]
    assert os.access(python, os.X_OK), python
    return python


@contextlib.contextmanager
def running_triton(host_python: str, *extra_args: str) -> Iterator[tuple]:
    """Starts ``lmwrap serve triton`` (through the CLI, in this python; it re-runs itself in the host venv)
    on free ports; yields ``(grpc_address, proc)`` once it serves (``proc.http_port``: its HTTP port);
    SIGTERM (then kill) at exit."""
    import tritonclient.grpc as grpcclient

    grpc_port, http_port = free_port(), free_port()
    log = tempfile.NamedTemporaryFile('w+b', prefix='lmwrap-triton-', suffix='.log', delete=False)
    env = {**os.environ, 'LMWRAP_TRITON_PYTHON': host_python, 'TOKENIZERS_PARALLELISM': 'false',
           'HF_HUB_OFFLINE': '1', 'PYTHONPATH': REPO}
    cmd = [sys.executable, '-m', 'lmwrap_engine.cli', 'serve', 'triton', '--grpc-port', str(grpc_port),
           '--http-port', str(http_port), *extra_args]
    proc = ServerProcess(cmd, stdout=log, stderr=subprocess.STDOUT, env=env)
    proc.log_path = log.name
    address = f'127.0.0.1:{grpc_port}'
    try:
        deadline = time.monotonic() + STARTUP_TIMEOUT_S
        while 'lmwrap serve triton: serving' not in proc.log():
            if proc.poll() is not None:
                raise RuntimeError(f'lmwrap serve triton exited with {proc.returncode}:\n{proc.log()[-4000:]}')
            if time.monotonic() > deadline:
                raise TimeoutError(f'lmwrap serve triton did not start:\n{proc.log()[-4000:]}')
            time.sleep(0.5)
        with grpcclient.InferenceServerClient(address) as client:
            assert client.is_server_live() and client.is_server_ready()
        proc.http_port = http_port
        yield address, proc
    finally:
        stop_server(proc)


def engine_stats(address: str) -> dict:
    """The engine's counters, from the server's ``lmwrap_stats`` model."""
    import tritonclient.grpc as grpcclient
    with grpcclient.InferenceServerClient(address) as client:
        return json.loads(client.infer('lmwrap_stats', []).as_numpy('STATS_JSON')[0])


def wait_all_blocks_free(address: str, timeout_s: float = 60.0) -> dict:
    deadline = time.monotonic() + timeout_s
    while True:
        stats = engine_stats(address)
        if stats['num_free_blocks'] == stats['num_blocks'] and not stats['num_running'] and not stats['num_waiting']:
            return stats
        if time.monotonic() > deadline:
            raise AssertionError(f'KV blocks still in use: {stats}')
        time.sleep(0.2)


def run_script(python: str, script: str, *args: str, env: Optional[dict] = None) -> dict:
    """Runs ``script`` in another venv's python (outside the repo); its last stdout line is JSON."""
    full_env = {k: v for k, v in os.environ.items() if k not in ('PYTHONPATH', 'VIRTUAL_ENV')}
    full_env.update(env or {})
    out = subprocess.run([python, '-c', script, *args], capture_output=True, text=True, timeout=300, env=full_env,
                         cwd='/')
    assert out.returncode == 0, out.stderr[-4000:]
    return json.loads(out.stdout.strip().splitlines()[-1])
