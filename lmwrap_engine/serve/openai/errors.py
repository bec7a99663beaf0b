"""OpenAI-style error bodies, the handlers that turn every bad input into a 4xx (never a 5xx), and the
middleware that refuses over-large bodies before they are parsed."""
from __future__ import annotations

from http import HTTPStatus
from typing import Optional

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException

INVALID_API_KEY = {"error": {"message": "Please request with valid api key!", "type": "invalid_request_error",
                             "param": None, "code": "invalid_api_key"}}


class APIError(Exception):
    """A request the server refuses; becomes ``{"object": "error", ...}`` with ``status``."""

    def __init__(self, status: int, message: str, param: Optional[str] = None):
        super().__init__(message)
        self.status = int(status)
        self.message = message
        self.param = param


def error_body(status: int, message: str, param: Optional[str] = None) -> dict:
    return {"object": "error", "message": message, "type": "invalid_request_error", "param": param,
            "code": int(status)}


def error_response(status: int, message: str, param: Optional[str] = None) -> JSONResponse:
    return JSONResponse(error_body(status, message, param), status_code=int(status))


def _validation_message(exc: RequestValidationError) -> tuple:
    errors = exc.errors()
    if not errors:
        return "Invalid request.", None
    first = errors[0]
    if first.get("type") == "json_invalid":
        return f"Malformed JSON in the request body: {first.get('ctx', {}).get('error', first.get('msg'))}", None
    loc = [str(p) for p in first.get("loc", ()) if p != "body"]
    # Inside unions pydantic appends member type names and indexes: the first element is the field.
    param = loc[0] if loc else None
    where = ".".join(loc) if loc else "body"
    if not loc and first.get("type") == "missing":
        return "The request body is empty; send a JSON object.", None
    if first.get("type") == "model_attributes_type" or (not loc and first.get("type") in ("dict_type", "model_type")):
        return "The request body must be a JSON object (with Content-Type: application/json).", None
    return f"{where}: {first.get('msg')}", param


def install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(APIError)
    async def _api_error(request: Request, exc: APIError):
        return error_response(exc.status, exc.message, exc.param)

    @app.exception_handler(RequestValidationError)
    async def _validation(request: Request, exc: RequestValidationError):
        message, param = _validation_message(exc)
        return error_response(HTTPStatus.BAD_REQUEST, message, param)

    @app.exception_handler(HTTPException)
    async def _http(request: Request, exc: HTTPException):
        if isinstance(exc.detail, dict):  # the 401 body, kept as lmdeploy writes it
            return JSONResponse({"detail": exc.detail}, status_code=exc.status_code, headers=exc.headers)
        return error_response(exc.status_code, str(exc.detail))


class HTTPGuard:
    """ASGI middleware: bodies over ``max_bytes`` get 413 before anything parses them; every response's
    status is counted in the metrics."""

    def __init__(self, app, max_bytes: int, metrics):
        self.app = app
        self.max_bytes = max_bytes
        self.metrics = metrics

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)

        async def counting_send(message: dict) -> None:
            if message["type"] == "http.response.start":
                self.metrics.responses.labels(str(message["status"])).inc()
            await send(message)
        headers = dict(scope.get("headers") or [])
        length = headers.get(b"content-length")
        if length is not None and (not length.isdigit() or int(length) > self.max_bytes):
            response = JSONResponse(error_body(413, f"The request body is over {self.max_bytes} bytes."),
                                    status_code=413)
            return await response(scope, receive, counting_send)
        received = 0

        async def limited() -> dict:
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.max_bytes:  # chunked bodies carry no length up front
                    raise HTTPException(413, f"The request body is over {self.max_bytes} bytes.")
            return message
        await self.app(scope, limited, counting_send)
