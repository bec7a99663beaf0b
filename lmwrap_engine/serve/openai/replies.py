"""A request's engine jobs as an HTTP reply: streamed delta by delta (SSE or NDJSON) or collected into one
JSON body. However the reply ends, the engine requests stop and ``on_done`` releases the sessions."""
from __future__ import annotations

import json
from http import HTTPStatus
from typing import Callable, List, Optional

import anyio
from fastapi import Request
from fastapi.responses import StreamingResponse

from ...config import GenOut
from .context import Choice, Job, ServerContext, raise_engine_error
from .errors import APIError, error_body
from .protocol import sse


class ClosingStream(StreamingResponse):
    """Closes its generator (stopping the engine request) and runs ``on_close`` however the stream ends."""

    def __init__(self, content, on_close: Callable[[], None], media_type: str = "text/event-stream"):
        super().__init__(content, media_type=media_type)
        self._on_close = on_close

    async def __call__(self, scope, receive, send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            with anyio.CancelScope(shield=True):
                await self.body_iterator.aclose()
            self._on_close()


def sse_error(exc: Exception, draining: bool) -> str:
    """The SSE line that ends a failed stream."""
    if isinstance(exc, APIError):
        return sse({"error": error_body(exc.status, exc.message, exc.param)})
    status = HTTPStatus.SERVICE_UNAVAILABLE if draining else HTTPStatus.INTERNAL_SERVER_ERROR
    return sse({"error": error_body(status, str(exc) or type(exc).__name__)})


def ndjson_error(exc: Exception) -> str:
    """The NDJSON line that ends a failed ``/v1/chat/interactive`` stream."""
    status = exc.status if isinstance(exc, APIError) else HTTPStatus.INTERNAL_SERVER_ERROR
    return json.dumps({"error": error_body(status, getattr(exc, "message", str(exc)))}) + "\n"


async def reply(ctx: ServerContext, jobs: List[Job], route: str, arrival: float, request: Request, *,
                stream: bool, chunk: Callable[[int, GenOut, Choice], object], final: Callable[[List[Choice]], dict],
                on_done: Callable[[List[Choice]], None], last: Optional[Callable[[List[Choice]], dict]] = None,
                ndjson: bool = False):
    """``final(choices)`` once every job finished or, with ``stream``, a stream of ``chunk(i, delta, choice)``
    (a dict, or a list of them) per delta (``choice``: job ``i``'s output so far, the delta included), then
    ``last(choices)``. SSE streams end with ``[DONE]``, NDJSON ones (``ndjson``) without.
    ``on_done(choices)`` runs once it ends."""
    choices = [Choice() for _ in jobs]
    if not stream:
        try:
            choices = await ctx.collect(jobs, route, arrival, request)
        finally:
            on_done(choices)
        return final(choices)

    def line(data: dict) -> str:
        return json.dumps(data, ensure_ascii=False) + "\n" if ndjson else sse(data)

    async def lines():
        try:
            async for i, out in ctx.run_all(jobs, route, arrival):
                choices[i].add(out)
                if out.finish_reason == "error":
                    raise_engine_error(out, ctx.draining, getattr(ctx.engine, "failure", None))
                data = chunk(i, out, choices[i])
                for item in data if isinstance(data, list) else [data]:
                    yield line(item)
            if last is not None:
                yield line(last(choices))
        except Exception as exc:
            yield ndjson_error(exc) if ndjson else sse_error(exc, ctx.draining)
        if not ndjson:
            yield "data: [DONE]\n\n"
    return ClosingStream(lines(), lambda: on_done(choices),
                         media_type="application/x-ndjson" if ndjson else "text/event-stream")
