"""``create_app``: the FastAPI app of the api_server (middleware, API keys, error handlers, ``/health``,
``/metrics`` and the OpenAI and lmdeploy routers)."""
from __future__ import annotations

import hmac
from typing import Optional, Sequence

from fastapi import APIRouter, Depends, FastAPI, Request
from fastapi.middleware.cors import CORSMiddleware
from fastapi.responses import Response
from starlette.exceptions import HTTPException

from . import routes_lmdeploy, routes_openai
from .context import ServerContext, server_context
from .errors import INVALID_API_KEY, HTTPGuard, install_error_handlers
from .metrics import ServerMetrics
from .tool_parsers import get_tool_parser

DEFAULT_MAX_REQUEST_BYTES = 8 << 20

router = APIRouter()  # the routes that need no API key


async def check_api_key(request: Request) -> None:
    """401 (lmdeploy's body) unless the request carries one of the app's Bearer keys (if it has any)."""
    keys = request.app.state.api_keys
    if not keys:
        return
    scheme, _, token = request.headers.get("authorization", "").partition(" ")
    token = token.strip()
    if scheme.lower() != "bearer" or not any(hmac.compare_digest(token, k) for k in keys):
        raise HTTPException(401, detail=INVALID_API_KEY, headers={"WWW-Authenticate": "Bearer"})


@router.get("/health")
async def health(ctx: ServerContext = Depends(server_context)) -> Response:
    """Liveness: 200 while the server runs (no API key needed); 503 with the reason once its engine
    can run no more (a tensor-parallel worker died): restart the server."""
    failure = getattr(ctx.engine, "failure", None)
    if failure:
        return Response(failure, status_code=503, media_type="text/plain")
    return Response(status_code=200)


@router.get("/metrics")
async def metrics_route(ctx: ServerContext = Depends(server_context)) -> Response:
    """Prometheus metrics; engine gauges are read at scrape time."""
    from prometheus_client import CONTENT_TYPE_LATEST
    try:
        stats = await ctx.engine.astats()
    except RuntimeError:  # closed while shutting down
        stats = {}
    return Response(ctx.metrics.render(stats), media_type=CONTENT_TYPE_LATEST)


def create_app(engine, model_names: Optional[Sequence[str]] = None, api_keys: Optional[Sequence[str]] = None,
               allow_origins: Sequence[str] = ("*",), allow_credentials: bool = True,
               allow_methods: Sequence[str] = ("*",), allow_headers: Sequence[str] = ("*",),
               disable_fastapi_docs: bool = False, max_request_bytes: int = DEFAULT_MAX_REQUEST_BYTES,
               tool_call_parser: Optional[str] = "auto") -> FastAPI:
    """The api_server app over ``engine`` (an ``AsyncEngine``), serving it as ``model_names``
    (default: ``engine.model_name``). ``api_keys``: Bearer keys every route but ``/health`` and
    ``/metrics`` requires. ``tool_call_parser``: the tool-call format of replies (``'auto'``: the chat
    template's; see ``tool_parsers.py``). ``begin_shutdown(app.state.ctx)`` aborts the in-flight requests."""
    app = FastAPI(title="lmwrap api_server", docs_url=None if disable_fastapi_docs else "/docs",
                  redoc_url=None, openapi_url=None if disable_fastapi_docs else "/openapi.json")
    metrics = ServerMetrics()
    app.state.ctx = ServerContext(engine, model_names or [engine.model_name], metrics)
    app.state.ctx.tool_parser = get_tool_parser(tool_call_parser, engine.chat_template)
    app.state.api_keys = {k for k in (api_keys or []) if k}
    install_error_handlers(app)
    app.add_middleware(CORSMiddleware, allow_origins=list(allow_origins), allow_credentials=allow_credentials,
                       allow_methods=list(allow_methods), allow_headers=list(allow_headers))
    app.add_middleware(HTTPGuard, max_bytes=max_request_bytes, metrics=metrics)
    app.include_router(router)
    auth = [Depends(check_api_key)]
    app.include_router(routes_openai.router, dependencies=auth)
    app.include_router(routes_lmdeploy.router, dependencies=auth)
    return app
