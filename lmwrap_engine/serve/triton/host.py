"""``lmwrap serve triton``: a real Triton Inference Server (nvidia-pytriton's bundled tritonserver)
serving our engine, which runs in this process (pytriton calls the infer functions here).

nvidia-pytriton pins numpy<2, so it usually lives in its own virtualenv (``scripts/triton_host_venv.sh``);
``launch`` re-runs this module with that venv's python when this interpreter lacks pytriton.
"""
from __future__ import annotations

import argparse
import logging
import os
import signal
import sys
import sysconfig
from typing import Optional

from . import protocol as P

#: Where scripts/triton_host_venv.sh puts the host's virtualenv.
DEFAULT_VENV = os.path.join(os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "lmwrap",
                            "triton-host-venv")
INSTALL_HINT = ("`lmwrap serve triton` needs nvidia-pytriton (which pins numpy<2), in this python or in a separate "
                "virtualenv: run scripts/triton_host_venv.sh from the lmwrap source tree (it builds "
                f"{DEFAULT_VENV}), or set LMWRAP_TRITON_PYTHON to a python that has "
                "nvidia-pytriton==0.7.0, 'numpy<2' and lmwrap's engine requirements")


def host_python() -> Optional[str]:
    """The python that hosts the server: this one if it has pytriton, else LMWRAP_TRITON_PYTHON or the
    cached venv's; None when there is none."""
    import importlib.util
    if importlib.util.find_spec("pytriton") is not None:
        return sys.executable
    for candidate in (os.environ.get("LMWRAP_TRITON_PYTHON"), os.path.join(DEFAULT_VENV, "bin", "python")):
        if candidate and os.access(candidate, os.X_OK):
            return candidate
    return None


def launch(argv) -> int:
    """Runs the host with ``argv`` (this module's arguments) in the right python; returns its exit code."""
    python = host_python()
    if python is None:
        print(f"error: {INSTALL_HINT}", file=sys.stderr)
        return 2
    if python == sys.executable:
        main(argv)
        return 0
    import subprocess
    source_root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([source_root] + [p for p in [env.get("PYTHONPATH")] if p])
    proc = subprocess.Popen([python, "-m", "lmwrap_engine.serve.triton.host", *argv], env=env,
                            preexec_fn=_die_with_parent)
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda signum, _frame: proc.send_signal(signum))
    return proc.wait()


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("model", nargs="?", default=None, help="model path (default: SmolLM2-135M-Instruct)")
    p.add_argument("--address", default="127.0.0.1", help="address to bind gRPC, HTTP and metrics to")
    p.add_argument("--grpc-port", type=int, default=33337)
    p.add_argument("--http-port", type=int, default=33338)
    p.add_argument("--metrics-port", type=int, default=0, help="Triton's Prometheus metrics port (0: off)")
    p.add_argument("--chat-template-name", default="base",
                   help="the lmdeploy chat template name the turbomind model's config names "
                        "(Chatbot(model_name='') reads it; default 'base')")
    p.add_argument("--text-model-name", default=P.TEXT_MODEL,
                   help=f"name of the Triton-LLM-convention text model (default {P.TEXT_MODEL!r})")
    p.add_argument("--dtype", default=None, choices=["auto", "float32", "float16", "bfloat16"],
                   help="weights and KV cache dtype (default auto: on CPU bf16 where the CPU has AVX-512 BF16 "
                        "or AMX, else float32; on CUDA the model's own)")
    p.add_argument("--session-len", type=int, default=None)
    p.add_argument("--cache-max-entry-count", type=float, default=None)
    p.add_argument("--log-level", default="WARNING")


def _die_with_parent() -> None:
    """In the host child: SIGTERM when the launching process dies (even by SIGKILL), so no server is orphaned."""
    try:
        import ctypes
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="lmwrap serve triton", description=serve.__doc__)
    add_arguments(p)
    return p


def cmd_triton(args) -> None:
    """``lmwrap serve triton``: the host, in this python or in the one that has nvidia-pytriton."""
    argv = [] if args.model is None else [args.model]
    defaults = vars(build_parser().parse_args([]))
    for name, value in vars(args).items():
        if name in defaults and name != "model" and value != defaults[name]:
            argv += [f"--{name.replace('_', '-')}", str(value)]
    sys.exit(launch(argv))


def main(argv=None) -> None:
    args = build_parser().parse_args(argv)
    try:
        _main(args)
    except (OSError, ValueError) as exc:
        if os.environ.get("LMWRAP_DEBUG"):
            raise
        print(f"lmwrap serve triton: error: {exc}", file=sys.stderr)
        sys.exit(1)


def _main(args) -> None:
    from ...config import TurbomindEngineConfig
    config = {k: v for k, v in dict(dtype=args.dtype, session_len=args.session_len,
                                     cache_max_entry_count=args.cache_max_entry_count).items() if v is not None}
    serve(args.model, grpc_port=args.grpc_port, http_port=args.http_port, metrics_port=args.metrics_port,
          address=args.address, chat_template_name=args.chat_template_name, text_model_name=args.text_model_name,
          backend_config=TurbomindEngineConfig(**config) if config else None, log_level=args.log_level)


def serve(model_path: Optional[str] = None, grpc_port: int = 33337, http_port: int = 33338, metrics_port: int = 0,
          address: str = "127.0.0.1", chat_template_name: str = "base", text_model_name: str = P.TEXT_MODEL,
          backend_config=None, log_level: str = "WARNING") -> None:
    """Serves the model on a Triton Inference Server until SIGTERM/SIGINT: lmdeploy's ``preprocessing``,
    ``turbomind`` (decoupled, sessions) and ``postprocessing`` models, a text model in Triton's LLM
    convention, and ``lmwrap_stats``."""
    # The Python backend's stub must load this interpreter's libpython, not the system's.
    libdir = sysconfig.get_config_var("LIBDIR")
    os.environ["LD_LIBRARY_PATH"] = os.pathsep.join([libdir] + [p for p in [os.environ.get("LD_LIBRARY_PATH")] if p])
    logging.basicConfig(level=log_level.upper(), format="%(levelname)s %(name)s: %(message)s")
    logging.getLogger("lmwrap_engine").setLevel(log_level.upper())
    for flag, port in (("--grpc-port", grpc_port), ("--http-port", http_port), ("--metrics-port", metrics_port)):
        if port:  # before the model loads (Triton itself would only time out after minutes)
            _check_port(address, port, flag)
    from pytriton.triton import Triton, TritonConfig

    from ...async_engine import AsyncEngine
    from . import cancellation
    from .models import TritonModels

    engine = AsyncEngine(model_path, backend_config=backend_config)
    cancellations = cancellation.Cancellations(engine)
    os.environ[cancellation.SOCKET_ENV] = cancellations.path  # the Python backend stubs inherit it
    models = TritonModels(engine, cancellations)
    config = TritonConfig(http_address=address, http_port=http_port, grpc_address=address, grpc_port=grpc_port,
                          allow_metrics=bool(metrics_port), metrics_address=address if metrics_port else None,
                          metrics_port=metrics_port or None, exit_on_error=True, exit_timeout_secs=5,
                          log_verbose=1 if log_level.upper() == "DEBUG" else None)
    # pytriton's serve() stops Triton itself on KeyboardInterrupt, so running streams end first, here:
    # Triton only unloads a decoupled model once its streams end (else its exit timeout runs out).
    interrupt = lambda signum, frame: _raise_interrupt(signum, frame, before=cancellations.stop_all)  # noqa: E731
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, interrupt)
    triton = Triton(config=config)  # not `with`: that starts the server, which then loads each model as bound
    try:
        _bind(triton, P.PREPROCESSING, models.preprocessing, P.PREPROCESSING_INPUTS, P.PREPROCESSING_OUTPUTS)
        _bind(triton, P.TURBOMIND, models.turbomind, P.TURBOMIND_INPUTS, P.TURBOMIND_OUTPUTS, decoupled=True,
              parameters={P.MODEL_NAME_PARAMETER: chat_template_name})
        _bind(triton, P.POSTPROCESSING, models.postprocessing, P.POSTPROCESSING_INPUTS, P.POSTPROCESSING_OUTPUTS)
        _bind(triton, text_model_name, models.text, P.TEXT_INPUTS, P.TEXT_OUTPUTS, decoupled=True)
        _bind(triton, P.STATS, models.stats, P.STATS_INPUTS, P.STATS_OUTPUTS)
        triton.run()
        print(f"lmwrap serve triton: serving {engine.model_name} on grpc://{address}:{grpc_port} "
              f"and http://{address}:{http_port} (models {P.PREPROCESSING}, {P.TURBOMIND}, {P.POSTPROCESSING}, "
              f"{text_model_name}, {P.STATS})", flush=True)
        triton.serve()
    except KeyboardInterrupt:
        pass
    finally:
        cancellations.stop_all()
        triton.stop()
        cancellations.close()
        engine.close()


def _check_port(address: str, port: int, flag: str) -> None:
    import socket
    with socket.socket(socket.AF_INET6 if ":" in address else socket.AF_INET) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((address, port))
        except OSError as exc:
            raise OSError(exc.errno, f"cannot listen on {address}:{port}: {exc.strerror} "
                                     f"(is another server using it? pick another {flag})") from None


def _raise_interrupt(signum, frame, before=None):
    # Once: a second signal (a terminal's SIGINT also forwarded by `launch`) must not break the shutdown.
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, signal.SIG_IGN)
    if before is not None:
        before()
    raise KeyboardInterrupt


def _bind(triton, name, infer_func, inputs, outputs, decoupled: bool = False, parameters=None) -> None:
    import numpy as np
    from pytriton.model_config import ModelConfig, Tensor

    dtypes = {"BYTES": np.bytes_, "BOOL": np.bool_, "UINT32": np.uint32, "UINT64": np.uint64, "INT32": np.int32,
              "INT64": np.int64, "FP32": np.float32}

    def tensors(specs):
        return [Tensor(name=s.name, dtype=dtypes[s.datatype], shape=s.shape, optional=s.optional)
                for s in specs.values()]

    triton.bind(model_name=name, infer_func=infer_func, inputs=tensors(inputs), outputs=tensors(outputs),
                config=ModelConfig(batching=False, decoupled=decoupled), strict=True)
    if decoupled:  # a client that drops the stream stops the engine request (cancellation.py)
        from . import cancellation
        cancellation.install(next(m for m in triton._model_manager.models if m.model_name == name))
    if parameters:  # pytriton has no API for config parameters: add them to the config it generates
        for model in triton._model_manager.models:
            if model.model_name == name:
                model._get_triton_model_config().backend_parameters.update(parameters)


if __name__ == "__main__":
    main()
