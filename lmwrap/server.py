"""LMDeployServer: the model runs in an api_server child process this adapter starts and owns."""
import ctypes
import dataclasses
import logging
import os
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import weakref
from typing import Any, Dict, List, Optional

import requests

from .base import AsyncBaseLLM, auto_meta_template
from .client import LMDeployClient

logger = logging.getLogger('lmwrap')

# serve_cfg key -> kind. Keys are lmdeploy's ``serve()`` / engine-config names; each becomes the
# ``lmwrap serve api_server`` flag ``--key-with-dashes``. Kinds: 'value' (one value), 'list'
# (several values after one flag), 'flag' (a bool: the flag alone when true), 'bool' (a bool whose
# default is true: ``--key`` or ``--no-key``).
SERVE_OPTIONS: Dict[str, str] = {
    # the server
    'api_keys': 'list', 'backend': 'value', 'chat_template': 'value', 'max_log_len': 'value',
    'disable_fastapi_docs': 'flag', 'allow_origins': 'list', 'allow_credentials': 'flag', 'allow_methods': 'list',
    'allow_headers': 'list', 'max_request_bytes': 'value',
    # the engine (TurbomindEngineConfig / PytorchEngineConfig fields)
    'dtype': 'value', 'session_len': 'value', 'max_batch_size': 'value', 'cache_max_entry_count': 'value',
    'cache_block_seq_len': 'value', 'num_gpu_blocks': 'value', 'max_prefill_token_num': 'value',
    'enable_prefix_caching': 'bool', 'device': 'value', 'max_sessions': 'value', 'session_idle_timeout': 'value',
}
# Engine-config field names that lmdeploy's CLI spells differently.
_CONFIG_ALIASES = {'device_type': 'device', 'block_size': 'cache_block_seq_len'}
_START_POLL_S = 0.2


class LMDeployServer(LMDeployClient):
    """lagent 0.2.4's ``LMDeployServer``: starts ``lmwrap serve api_server`` as a child process and
    talks to it over HTTP (as ``LMDeployClient``).

    Args:
        path: the model: a HF folder, a ``.gguf`` file, a model alias or HF id on disk; None is the
            engine's default model.
        model_name: the name the server serves the model under (and, with ``meta_template='auto'``,
            a hint for the template); default: ``path`` as given.
        server_name: the address to listen on (lagent's default ``'0.0.0.0'`` exposes the model to the
            network; ours is ``'127.0.0.1'``).
        server_port: the port; None picks a free one.
        tp: tensor parallelism (the engine supports 1; other values are an error).
        log_level: the server's log level.
        serve_cfg: server and engine options (keys of ``SERVE_OPTIONS``: ``session_len``,
            ``max_batch_size``, ``cache_max_entry_count``, ``dtype``, ``api_keys``, ...; also
            ``backend_config`` (an engine config or dict of its fields) and ``chat_template_config``).
            Unknown keys are an error (lagent hands them to ``lmdeploy.serve``).
        start_timeout: seconds to wait for the server to answer ``/health``.
        **kwargs: ``LMDeployClient``'s (``meta_template`` -- ``'auto'`` picks it from ``model_name``
            or ``path`` --, ``timeout``, ``max_new_tokens``, ``top_k``, ``stop_words``, ...).

    The child stops on ``close()``, at the end of a ``with`` block, at interpreter exit (a
    ``weakref.finalize``, which also runs when the adapter is garbage collected), and when
    this process dies, even by SIGKILL (Linux). If it fails to start, the error shows the end of its
    output. Its output goes to ``self.log_path`` (a temp file, removed on close).
    """

    def __init__(self, path: Optional[str] = None, model_name: Optional[str] = None,
                 server_name: str = '127.0.0.1', server_port: Optional[int] = None, tp: int = 1,
                 log_level: str = 'WARNING', serve_cfg: Optional[Dict[str, Any]] = None,
                 start_timeout: float = 600.0, **kwargs):
        if kwargs.get('meta_template') == 'auto':
            from lmwrap_engine.model_path import DEFAULT_MODEL
            kwargs['meta_template'] = auto_meta_template(model_name, path or DEFAULT_MODEL)
        if tp != 1:
            raise ValueError(f'tp={tp}: the engine runs a model on one device (tp=1)')
        flags = serve_flags(serve_cfg or {})
        host = server_name if server_name not in ('0.0.0.0', '::', '') else '127.0.0.1'
        port = server_port or _free_port(server_name)
        command = [sys.executable, '-m', 'lmwrap_engine.cli', 'serve', 'api_server']
        if path is not None:
            command.append(str(path))
        command += ['--server-name', server_name, '--server-port', str(port), '--log-level', log_level.upper()]
        if model_name is not None:
            command += ['--model-name', model_name]
        command += flags
        self.command = command
        self.process: Optional[subprocess.Popen] = None
        self._watchdog: Optional[subprocess.Popen] = None
        self.log_path = None
        url = f'http://{_url_host(host)}:{port}'
        self._start(command, url, start_timeout)
        try:
            kwargs.setdefault('api_key', _first_key(serve_cfg))
            super().__init__(url, model_name=model_name, **kwargs)
            if self.model_name is None:
                self.model_name = self._served_model()
        except BaseException:
            self.close()
            raise
        self.path = path

    # -- the child process ------------------------------------------------------------------------

    def _start(self, command: List[str], url: str, timeout: float) -> None:
        log = tempfile.NamedTemporaryFile(prefix='lmwrap-server-', suffix='.log', delete=False)
        self.log_path = log.name
        on_main_thread = threading.current_thread() is threading.main_thread()
        parent_pid = os.getpid()
        logger.info('starting %s', ' '.join(command))
        with log:
            self.process = subprocess.Popen(
                command, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT, close_fds=True,
                # PR_SET_PDEATHSIG fires when the *thread* that forked exits: only safe from the main thread.
                preexec_fn=(lambda: _die_with_parent(parent_pid)) if on_main_thread and _HAS_PRCTL else None)
        if not (on_main_thread and _HAS_PRCTL):
            self._watchdog = _start_watchdog(self.process.pid)
        self._finalizer = weakref.finalize(self, _stop, self.process, self._watchdog, self.log_path)
        self._wait_ready(url, timeout)

    def _wait_ready(self, url: str, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        with requests.Session() as http:
            while True:
                if self.process.poll() is not None:
                    tail = self.log_tail()
                    self.close()
                    raise RuntimeError(f'the api_server exited with code {self.process.returncode} while starting; '
                                       f'command: {" ".join(self.command)}\n--- its output (last lines) ---\n{tail}')
                try:
                    if http.get(url + '/health', timeout=5).status_code == 200:
                        return
                except requests.RequestException:
                    pass
                if time.monotonic() >= deadline:
                    tail = self.log_tail()
                    self.close()
                    raise TimeoutError(f'the api_server did not become healthy within {timeout} s; '
                                       f'command: {" ".join(self.command)}\n--- its output (last lines) ---\n{tail}')
                time.sleep(_START_POLL_S)

    def log_tail(self, max_lines: int = 40) -> str:
        """The last lines the server wrote (stdout and stderr)."""
        if not self.log_path or not os.path.exists(self.log_path):
            return ''
        with open(self.log_path, 'rb') as log:
            log.seek(0, os.SEEK_END)
            log.seek(max(0, log.tell() - 64 * 1024))
            lines = log.read().decode('utf-8', 'replace').splitlines()
        return '\n'.join(lines[-max_lines:])

    @property
    def is_running(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def close(self) -> None:
        """Stops the server (SIGTERM, then SIGKILL after a grace period) and closes the connections."""
        if hasattr(self, 'http'):
            super().close()
        if getattr(self, '_finalizer', None) is not None:
            self._finalizer()  # runs _stop once


class AsyncLMDeployServer(AsyncBaseLLM, LMDeployServer):
    """``LMDeployServer`` with lagent 0.5's async interface (see ``AsyncLMDeployClient``)."""


def serve_flags(serve_cfg: Dict[str, Any]) -> List[str]:
    """The ``lmwrap serve api_server`` flags for lagent's ``serve_cfg`` (unknown keys raise ``ValueError``)."""
    if not isinstance(serve_cfg, dict):
        raise TypeError(f'serve_cfg must be a dict, got {type(serve_cfg).__name__}')
    options = dict(serve_cfg)
    backend_config = options.pop('backend_config', None)
    if backend_config is not None:
        for key, value in _config_fields(backend_config).items():
            options.setdefault(_CONFIG_ALIASES.get(key, key), value)
    chat_template_config = options.pop('chat_template_config', None)
    if chat_template_config is not None:
        name = chat_template_config.get('model_name') if isinstance(chat_template_config, dict) \
            else getattr(chat_template_config, 'model_name', None)
        if name:
            options.setdefault('chat_template', name)
    unknown = sorted(set(options) - set(SERVE_OPTIONS))
    if unknown:
        raise ValueError(f'unknown serve_cfg option(s) {unknown}; known: '
                         f'{sorted(SERVE_OPTIONS) + ["backend_config", "chat_template_config"]}')
    flags: List[str] = []
    for key, value in options.items():
        kind, flag = SERVE_OPTIONS[key], '--' + key.replace('_', '-')
        if value is None:
            continue
        if kind in ('flag', 'bool'):
            if not isinstance(value, bool):
                raise TypeError(f'serve_cfg[{key!r}] must be a bool, got {value!r}')
            if kind == 'bool' and not value:
                flags.append('--no-' + key.replace('_', '-'))
            elif value:
                flags.append(flag)
        elif kind == 'list':
            values = value.split(',') if isinstance(value, str) else list(value)
            flags += [flag, *[str(v).strip() for v in values]]
        else:
            flags += [flag, str(value)]
    return flags


def _config_fields(config) -> Dict[str, Any]:
    """The fields of an engine config (or dict) that differ from their defaults."""
    if isinstance(config, dict):
        return dict(config)
    if not dataclasses.is_dataclass(config):
        raise TypeError(f'serve_cfg["backend_config"] must be an engine config or a dict, got {type(config).__name__}')
    fields = {}
    for field in dataclasses.fields(config):
        value = getattr(config, field.name)
        default = field.default if field.default is not dataclasses.MISSING else object()
        if field.name != 'tp' and value != default:
            fields[field.name] = value
    return fields


def _first_key(serve_cfg) -> Optional[str]:
    keys = (serve_cfg or {}).get('api_keys')
    if not keys:
        return None
    return keys.split(',')[0].strip() if isinstance(keys, str) else str(list(keys)[0])


def _free_port(host: str) -> int:
    with socket.socket(socket.AF_INET6 if ':' in host else socket.AF_INET) as sock:
        sock.bind((host if host not in ('', '0.0.0.0') else '127.0.0.1', 0))
        return sock.getsockname()[1]


def _url_host(host: str) -> str:
    return f'[{host}]' if ':' in host else host


# -- keeping the child from outliving us --------------------------------------------------------

_PR_SET_PDEATHSIG = 1
_HAS_PRCTL = sys.platform.startswith('linux')


def _die_with_parent(parent_pid: int) -> None:
    """Runs in the child before exec: SIGTERM when the parent dies (survives exec)."""
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(_PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0)
    if os.getppid() != parent_pid:  # the parent died before prctl took effect
        os._exit(1)


# A watchdog process for when PR_SET_PDEATHSIG cannot be used: it outlives us (it is not killed
# with us), notices we are gone (it is re-parented) and stops the server.
_WATCHDOG = '''
import os, signal, sys, time
parent, child = os.getppid(), int(sys.argv[1])
def alive(pid):
    try:
        os.kill(pid, 0)
        return True
    except OSError:
        return False
while alive(child):
    if os.getppid() != parent:
        os.kill(child, signal.SIGTERM)
        for _ in range(100):
            if not alive(child):
                break
            time.sleep(0.1)
        else:
            os.kill(child, signal.SIGKILL)
        break
    time.sleep(0.5)
'''


def _start_watchdog(child_pid: int) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, '-c', _WATCHDOG, str(child_pid)], stdin=subprocess.DEVNULL,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, close_fds=True)


def _stop(process: subprocess.Popen, watchdog: Optional[subprocess.Popen], log_path: Optional[str],
          grace_s: float = 10.0) -> None:
    """Stops the server: SIGTERM, then SIGKILL after ``grace_s``. Runs at most once (weakref.finalize)."""
    if process.poll() is None:
        process.terminate()
        try:
            process.wait(grace_s)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
    if watchdog is not None and watchdog.poll() is None:
        watchdog.kill()
        watchdog.wait()
    if log_path:
        try:
            os.unlink(log_path)
        except OSError:
            pass
