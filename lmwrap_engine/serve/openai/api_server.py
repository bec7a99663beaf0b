"""lmdeploy v0.6.2's OpenAI-compatible api_server over lmwrap's ``AsyncEngine``: ``serve(model_path, ...)``
loads the model and runs the app of ``create_app`` (see ``app.py``) under uvicorn until SIGTERM/SIGINT
(``lmwrap serve api_server``).

Routes: ``/health``, ``/metrics``, ``/v1/models``, ``/v1/chat/completions``, ``/v1/completions``
(``routes_openai.py``), ``/v1/chat/interactive``, ``/v1/encode``, ``/v1/embeddings`` (unsupported, as
lmdeploy's TurboMind says), ``/generate`` (``routes_lmdeploy.py``).
"""
from __future__ import annotations

import asyncio
import logging
import socket
from typing import Optional

from .app import DEFAULT_MAX_REQUEST_BYTES, create_app
from .context import ServerContext

__all__ = ["begin_shutdown", "bind_socket", "create_app", "make_server", "serve"]


def bind_socket(host: str, port: int) -> socket.socket:
    """Binds (without listening) so a port in use fails before the model loads."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as exc:
        sock.close()
        raise OSError(exc.errno, f"cannot listen on {host}:{port}: {exc.strerror} "
                                 "(is another server using it? pick another --server-port)") from None
    sock.set_inheritable(True)
    return sock


def serve(model_path: Optional[str] = None, model_name: Optional[str] = None, backend: str = "turbomind",
          backend_config=None, chat_template_config=None, server_name: str = "127.0.0.1",
          server_port: int = 23333, allow_origins=("*",), allow_credentials: bool = True, allow_methods=("*",),
          allow_headers=("*",), log_level: str = "WARNING", api_keys=None, max_log_len: Optional[int] = None,
          disable_fastapi_docs: bool = False, max_request_bytes: int = DEFAULT_MAX_REQUEST_BYTES,
          graceful_timeout_s: float = 10.0, tool_call_parser: Optional[str] = "auto", dp: int = 1) -> None:
    """Loads the model and serves it until SIGTERM/SIGINT (then in-flight requests are aborted, the
    engine closed, and this returns). ``api_keys``: a str (comma-separated) or a list of keys.
    ``tool_call_parser``: ``'auto'`` (from the chat template), ``'internlm2'``, ``'hermes'`` or ``'llama3'``.
    ``dp > 1``: that many engine replicas behind this one endpoint (see ``lmwrap_engine.replicas``)."""
    import uvicorn

    from ...async_engine import AsyncEngine

    if isinstance(api_keys, str):
        api_keys = api_keys.split(",")
    api_keys = [k.strip() for k in api_keys or [] if k and k.strip()]
    logging.basicConfig(level=log_level.upper(), format="%(levelname)s %(name)s: %(message)s")
    logging.getLogger("lmwrap_engine").setLevel(log_level.upper())
    sock = bind_socket(server_name, server_port)
    try:
        kwargs = dict(model_name=model_name, backend=backend, backend_config=backend_config,
                      chat_template_config=chat_template_config, max_log_len=max_log_len)
        if dp > 1:
            from ...replicas import ReplicaSet
            engine = ReplicaSet(model_path, dp=dp, **kwargs)
        else:
            engine = AsyncEngine(model_path, **kwargs)
    except BaseException:
        sock.close()
        raise
    app = create_app(engine, [engine.model_name], api_keys, allow_origins, allow_credentials, allow_methods,
                     allow_headers, disable_fastapi_docs, max_request_bytes, tool_call_parser)
    host, port = sock.getsockname()[:2]
    config = uvicorn.Config(app, log_level=log_level.lower(), timeout_graceful_shutdown=graceful_timeout_s,
                            access_log=log_level.upper() in ("DEBUG", "INFO"))
    url_host = f"[{host}]" if ":" in host else host
    server = make_server(config, app.state.ctx, f"lmwrap api_server: serving {engine.model_name} on "
                                                f"http://{url_host}:{port}")
    try:
        server.run(sockets=[sock])
    finally:
        engine.close()
        sock.close()


def make_server(config, ctx: ServerContext, ready_line: str):
    """uvicorn's Server, printing ``ready_line`` once listening and draining on SIGTERM/SIGINT (exit code 0)."""
    import uvicorn

    class Server(uvicorn.Server):
        async def startup(self, sockets=None):
            self.aio_loop = asyncio.get_running_loop()
            await super().startup(sockets)
            if not self.should_exit:
                print(ready_line, flush=True)

        def handle_exit(self, sig, frame):
            # Not recorded: uvicorn would re-raise it after shutdown and the exit code would say "killed".
            if self.should_exit:
                self.force_exit = True
            self.should_exit = True
            loop = getattr(self, "aio_loop", None)
            if loop is not None:
                loop.call_soon_threadsafe(lambda: asyncio.ensure_future(begin_shutdown(ctx)))
    return Server(config)


async def begin_shutdown(ctx: ServerContext) -> None:
    """Stop taking requests and fail the in-flight ones (their streams end with an error chunk)."""
    if ctx.draining:
        return
    ctx.draining = True
    await asyncio.to_thread(ctx.engine.close)
