"""lmdeploy v0.6.2's OpenAI-compatible api_server over lmwrap's ``AsyncEngine``.

``create_app(engine, ...)`` builds the FastAPI app; ``serve(model_path, ...)`` loads the model and runs
it under uvicorn (``lmwrap serve api_server``). Routes: ``/health``, ``/v1/models``,
``/v1/chat/completions``, ``/v1/completions``, ``/v1/chat/interactive``, ``/v1/encode``, ``/generate``,
``/metrics``, ``/v1/embeddings`` (unsupported, as lmdeploy's TurboMind says).
"""
from __future__ import annotations

import asyncio
import hmac
import itertools
import json
import logging
import socket
import time
from dataclasses import dataclass, field, replace
from http import HTTPStatus
from typing import AsyncIterator, Callable, Dict, List, Optional, Sequence, Tuple

import anyio
from fastapi import Depends, FastAPI, Request
from fastapi.middleware.cors import CORSMiddleware
from fastapi.responses import Response, StreamingResponse
from starlette.exceptions import HTTPException

from ...config import GenerationConfig, GenOut
from .errors import INVALID_API_KEY, APIError, HTTPGuard, error_body, install_error_handlers
from .metrics import ServerMetrics
from .protocol import (ChatCompletionRequest, CompletionRequest, EncodeRequest, GenerateRequest, InteractiveRequest,
                       chat_logprobs, completion_logprobs, flatten_messages, sse, usage)

logger = logging.getLogger("lmwrap_engine.serve")

DEFAULT_MAX_REQUEST_BYTES = 8 << 20
# Ids the server picks (session_id -1, extra choices of n>1) start far above those clients pick.
SERVER_SESSION_BASE = 1 << 36
# GenerationConfig field -> the request field a client set it with
PARAM_NAMES = {"max_new_tokens": "max_tokens", "random_seed": "seed", "stop_words": "stop",
               "stop_token_ids": "stop_token_ids", "min_new_tokens": "min_new_tokens"}
MAX_N = 16


@dataclass
class Job:
    """One engine request of an HTTP request (a prompt times one of its ``n`` choices)."""

    session_id: int
    input_ids: List[int]
    gen_config: GenerationConfig
    sequence_start: bool = True
    sequence_end: bool = True


@dataclass
class Choice:
    """What one job produced, accumulated."""

    text: str = ""
    token_ids: List[int] = field(default_factory=list)
    logprobs: List[dict] = field(default_factory=list)
    finish_reason: Optional[str] = None
    input_tokens: int = 0
    history_tokens: int = 0
    generated_tokens: int = 0

    def add(self, out: GenOut) -> None:
        self.text += out.response if out.finish_reason != "error" else ""
        self.token_ids += out.token_ids
        self.logprobs += out.logprobs or []
        self.finish_reason = out.finish_reason
        self.input_tokens, self.history_tokens = out.input_token_len, out.history_token_len
        self.generated_tokens = out.generate_token_len


class ServerContext:
    """Per-app state: the engine, the names it is served under, the sessions busy on this server."""

    def __init__(self, engine, model_names: Sequence[str], metrics: ServerMetrics):
        self.engine = engine
        self.model_names = list(model_names)
        self.metrics = metrics
        self.created = int(time.time())
        self.busy: set = set()
        # kept sessions whose last reply was cut before its stop word (the next turn writes it first)
        self.cut_turns: set = set()
        self.draining = False
        self._ids = itertools.count(SERVER_SESSION_BASE)

    # -- checks -------------------------------------------------------------------------------

    def check_model(self, model: str) -> None:
        if model not in self.model_names:
            raise APIError(HTTPStatus.NOT_FOUND, f"The model `{model}` does not exist.", "model")

    def check_open(self) -> None:
        if self.draining:
            raise APIError(HTTPStatus.SERVICE_UNAVAILABLE, "The server is shutting down.")

    def session_ids(self, requested: Optional[int], count: int) -> List[int]:
        """``count`` session ids: the requested one first (-1/None: one of the server's), then the server's."""
        if requested is None or requested == -1:
            return [next(self._ids) for _ in range(count)]
        if requested < 0:
            raise APIError(HTTPStatus.BAD_REQUEST, f"The session_id `{requested}` must be -1 or >= 0.",
                           "session_id")
        return [requested] + [next(self._ids) for _ in range(count - 1)]

    def acquire(self, session_ids: Sequence[int]) -> Callable[[], None]:
        """Marks sessions busy (400 if one already is); returns the idempotent release."""
        busy = next((s for s in session_ids if s in self.busy), None)
        if busy is not None:
            raise APIError(HTTPStatus.BAD_REQUEST, f"The session_id `{busy}` is occupied.", "session_id")
        held = set(session_ids)
        self.busy |= held

        def release() -> None:
            self.busy -= held
            held.clear()
        return release

    async def check_not_kept(self, session_id: int) -> None:
        """A one-shot request must not wipe a session an interactive client keeps in the engine."""
        if session_id < SERVER_SESSION_BASE and await self.engine.session_tokens(session_id) > 0:
            raise APIError(HTTPStatus.BAD_REQUEST, f"The session_id `{session_id}` is occupied.", "session_id")

    # -- engine -------------------------------------------------------------------------------

    def gen_config(self, param_names: Optional[Dict[str, str]] = None, **kwargs) -> GenerationConfig:
        names = {**PARAM_NAMES, **(param_names or {})}
        try:
            return GenerationConfig(**kwargs)
        except ValueError as exc:
            field_name, _, rest = str(exc).partition(" ")
            param = names.get(field_name, field_name)
            raise APIError(HTTPStatus.BAD_REQUEST, f"{param} {rest}", param) from None
        except NotImplementedError as exc:
            raise APIError(HTTPStatus.BAD_REQUEST, str(exc)) from None

    def stop_words(self, stop, ignore_eos: bool) -> Optional[List[str]]:
        """The client's stop strings plus the template's (which the engine drops once any are given)."""
        if stop is None or stop == []:
            return None
        words = [stop] if isinstance(stop, str) else list(stop)
        if any(not w for w in words):
            raise APIError(HTTPStatus.BAD_REQUEST, "stop must not contain empty strings.", "stop")
        if not ignore_eos:
            words += [w for w in (self.engine.chat_template.stop_words or []) if w not in words]
        return words

    async def encode(self, prompt, param: str, do_preprocess: bool, sequence_start: bool = True,
                     tools=None, close_turn: bool = False) -> List[int]:
        """Token ids of a prompt (off the event loop); 400 if it is malformed, empty or too long."""
        kw = {"close_turn": True} if close_turn else {}
        try:
            ids = await asyncio.to_thread(self.engine.encode_prompt, prompt, sequence_start=sequence_start,
                                          do_preprocess=do_preprocess, tools=tools, **kw)
        except (ValueError, TypeError, KeyError) as exc:
            raise APIError(HTTPStatus.BAD_REQUEST, f"Invalid {param}: {exc}", param) from None
        return self.check_ids(ids, param)

    def check_ids(self, ids: List[int], param: str) -> List[int]:
        if not ids:
            raise APIError(HTTPStatus.BAD_REQUEST, f"The prompt (`{param}`) is empty.", param)
        if len(ids) >= self.engine.session_len:
            raise APIError(HTTPStatus.BAD_REQUEST,
                           f"The prompt (`{param}`) has {len(ids)} tokens, which reaches the session length "
                           f"({self.engine.session_len}); shorten it.", param)
        vocab = self.engine.vocab_size
        bad = next((t for t in ids if not 0 <= t < vocab), None)
        if bad is not None:
            raise APIError(HTTPStatus.BAD_REQUEST, f"Token id {bad} is outside the vocabulary [0, {vocab}).", param)
        return ids

    async def run(self, job: Job, route: str, arrival: float) -> AsyncIterator[GenOut]:
        """The engine's deltas for one job, with latency metrics; closing it stops the request."""
        gen = self.engine.generate(None, job.session_id, gen_config=job.gen_config,
                                   sequence_start=job.sequence_start, sequence_end=job.sequence_end,
                                   do_preprocess=False, input_ids=job.input_ids)
        last, generated, finished = None, 0, False
        try:
            async for out in gen:
                now = time.perf_counter()
                generated = out.generate_token_len
                if out.token_ids:
                    if last is None:
                        self.metrics.ttft.observe(now - arrival)
                    else:
                        self.metrics.itl.observe(now - last)
                    last = now
                if out.finish_reason is not None:
                    finished = True
                    self.metrics.observe_finished(route, out.finish_reason, out.input_token_len,
                                                  out.generate_token_len, now - arrival)
                yield out
        except RuntimeError as exc:  # the engine closed under us (shutdown)
            finished = True
            self.metrics.observe_finished(route, "error", len(job.input_ids), generated,
                                          time.perf_counter() - arrival)
            yield GenOut(str(exc), 0, len(job.input_ids), 0, "error")
        finally:
            if not finished:  # the client went away: closing ``gen`` stops the request
                self.metrics.observe_finished(route, "abort", len(job.input_ids), generated,
                                              time.perf_counter() - arrival)
            with anyio.CancelScope(shield=True):
                await gen.aclose()

    async def run_all(self, jobs: List[Job], route: str, arrival: float) -> AsyncIterator[Tuple[int, GenOut]]:
        """``(job index, delta)`` of several jobs running at once, in arrival order."""
        if len(jobs) == 1:
            stream = self.run(jobs[0], route, arrival)
            try:
                async for out in stream:
                    yield 0, out
            finally:
                with anyio.CancelScope(shield=True):
                    await stream.aclose()
            return
        queue: asyncio.Queue = asyncio.Queue()

        async def pump(i: int, job: Job) -> None:
            try:
                async for out in self.run(job, route, arrival):
                    queue.put_nowait((i, out))
            except Exception as exc:  # reported like an engine failure of this choice
                queue.put_nowait((i, GenOut(f"{type(exc).__name__}: {exc}", 0, len(job.input_ids), 0, "error")))
            finally:
                queue.put_nowait((i, None))
        tasks = [asyncio.ensure_future(pump(i, job)) for i, job in enumerate(jobs)]
        try:
            remaining = len(jobs)
            while remaining:
                i, out = await queue.get()
                if out is None:
                    remaining -= 1
                else:
                    yield i, out
        finally:
            for task in tasks:
                task.cancel()
            with anyio.CancelScope(shield=True):
                await asyncio.gather(*tasks, return_exceptions=True)

    async def collect(self, jobs: List[Job], route: str, arrival: float, request: Request) -> List[Choice]:
        """Runs jobs to the end (non-streaming); stops them if the client goes away."""
        choices = [Choice() for _ in jobs]

        async def consume() -> None:
            async for i, out in self.run_all(jobs, route, arrival):
                choices[i].add(out)
                if out.finish_reason == "error":
                    raise_engine_error(out, self.draining)
        task = asyncio.ensure_future(consume())
        try:
            while True:
                done, _ = await asyncio.wait({task}, timeout=0.5)
                if done:
                    task.result()
                    return choices
                if await request.is_disconnected():
                    raise APIError(HTTPStatus.BAD_REQUEST, "Client disconnected")
        finally:
            if not task.done():
                task.cancel()
                with anyio.CancelScope(shield=True):
                    await asyncio.gather(task, return_exceptions=True)


def raise_engine_error(out: GenOut, draining: bool) -> None:
    if draining:
        raise APIError(HTTPStatus.SERVICE_UNAVAILABLE, "The server is shutting down.")
    if out.generate_token_len == 0:  # the engine refused the request before running it: its input
        raise APIError(HTTPStatus.BAD_REQUEST, out.response or "The engine rejected the request.")
    logger.error("a request failed in the engine: %s", out.response)
    raise APIError(HTTPStatus.INTERNAL_SERVER_ERROR, out.response or "internal error happened")


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


def check_n(n: Optional[int]) -> int:
    n = 1 if n is None else n
    if not 1 <= n <= MAX_N:
        raise APIError(HTTPStatus.BAD_REQUEST, f"The n `{n}` must be a positive int at most {MAX_N}.", "n")
    return n


def sampling_kwargs(body, default_temperature: float) -> dict:
    """GenerationConfig fields common to the OpenAI routes (which always sample; temperature 0 = greedy)."""
    def value(name, default):
        v = getattr(body, name, None)
        return default if v is None else v
    return dict(do_sample=True, temperature=value("temperature", default_temperature), top_p=value("top_p", 1.0),
                top_k=value("top_k", 40), min_p=value("min_p", 0.0),
                repetition_penalty=value("repetition_penalty", 1.0), ignore_eos=value("ignore_eos", False),
                skip_special_tokens=value("skip_special_tokens", True), random_seed=body.seed)


def seeded(gen: GenerationConfig, i: int) -> GenerationConfig:
    """Choice ``i`` of ``n`` samples with its own seed (choice 0 keeps the request's)."""
    return gen if i == 0 or gen.random_seed is None else replace(gen, random_seed=gen.random_seed + i)


def sse_error(exc: Exception, draining: bool) -> str:
    if isinstance(exc, APIError):
        return sse({"error": error_body(exc.status, exc.message, exc.param)})
    status = HTTPStatus.SERVICE_UNAVAILABLE if draining else HTTPStatus.INTERNAL_SERVER_ERROR
    return sse({"error": error_body(status, str(exc) or type(exc).__name__)})


# -- the app --------------------------------------------------------------------------------------

def create_app(engine, model_names: Optional[Sequence[str]] = None, api_keys: Optional[Sequence[str]] = None,
               allow_origins: Sequence[str] = ("*",), allow_credentials: bool = True,
               allow_methods: Sequence[str] = ("*",), allow_headers: Sequence[str] = ("*",),
               disable_fastapi_docs: bool = False, max_request_bytes: int = DEFAULT_MAX_REQUEST_BYTES) -> FastAPI:
    """The api_server app over ``engine`` (an ``AsyncEngine``), serving it as ``model_names``
    (default: ``engine.model_name``). ``api_keys``: Bearer keys every route but ``/health`` and
    ``/metrics`` requires. ``begin_shutdown(app.state.ctx)`` aborts the in-flight requests."""
    app = FastAPI(title="lmwrap api_server", docs_url=None if disable_fastapi_docs else "/docs",
                  redoc_url=None, openapi_url=None if disable_fastapi_docs else "/openapi.json")
    metrics = ServerMetrics()
    ctx = ServerContext(engine, model_names or [engine.model_name], metrics)
    app.state.ctx = ctx
    install_error_handlers(app)
    app.add_middleware(CORSMiddleware, allow_origins=list(allow_origins), allow_credentials=allow_credentials,
                       allow_methods=list(allow_methods), allow_headers=list(allow_headers))
    app.add_middleware(HTTPGuard, max_bytes=max_request_bytes, metrics=metrics)
    keys = {k for k in (api_keys or []) if k}

    async def check_api_key(request: Request) -> None:
        if not keys:
            return
        scheme, _, token = request.headers.get("authorization", "").partition(" ")
        token = token.strip()
        if scheme.lower() != "bearer" or not any(hmac.compare_digest(token, k) for k in keys):
            raise HTTPException(401, detail=INVALID_API_KEY, headers={"WWW-Authenticate": "Bearer"})
    auth = [Depends(check_api_key)]
    tokenizer = engine.tokenizer

    @app.get("/health")
    async def health() -> Response:
        """Liveness: 200 while the server runs (no API key needed)."""
        return Response(status_code=200)

    @app.get("/metrics")
    async def metrics_route() -> Response:
        """Prometheus metrics; engine gauges are read at scrape time."""
        from prometheus_client import CONTENT_TYPE_LATEST
        try:
            stats = await engine.astats()
        except RuntimeError:  # closed while shutting down
            stats = {}
        return Response(metrics.render(stats), media_type=CONTENT_TYPE_LATEST)

    @app.get("/v1/models", dependencies=auth)
    async def models() -> dict:
        """The model names this server answers to."""
        data = []
        for name in ctx.model_names:
            permission = {"id": f"modelperm-{name}", "object": "model_permission", "created": ctx.created,
                          "allow_create_engine": False, "allow_sampling": True, "allow_logprobs": True,
                          "allow_search_indices": True, "allow_view": True, "allow_fine_tuning": False,
                          "organization": "*", "group": None, "is_blocking": False}
            data.append({"id": name, "object": "model", "created": ctx.created, "owned_by": "lmwrap",
                         "root": name, "parent": None, "permission": [permission]})
        return {"object": "list", "data": data}

    @app.post("/v1/chat/completions", dependencies=auth)
    async def chat_completions(body: ChatCompletionRequest, request: Request):
        """OpenAI chat completions (lmdeploy's extra fields: top_k, repetition_penalty, ignore_eos,
        skip_special_tokens, session_id, min_p, min_new_tokens)."""
        arrival = time.perf_counter()
        ctx.check_open()
        ctx.check_model(body.model)
        n = check_n(body.n)
        if body.response_format is not None and body.response_format.get("type", "text") != "text":
            raise APIError(HTTPStatus.BAD_REQUEST, "response_format is not supported yet.", "response_format")
        top = body.top_logprobs or 0
        if not 0 <= top <= 20:
            raise APIError(HTTPStatus.BAD_REQUEST, "top_logprobs must be in [0, 20].", "top_logprobs")
        max_tokens = body.max_completion_tokens if body.max_completion_tokens is not None else body.max_tokens
        names = {"max_new_tokens": "max_completion_tokens" if body.max_completion_tokens is not None
                 else "max_tokens", "logprobs": "top_logprobs"}
        gen = ctx.gen_config(names, max_new_tokens=max_tokens, min_new_tokens=body.min_new_tokens,
                             stop_words=ctx.stop_words(body.stop, bool(body.ignore_eos)),
                             logprobs=top if body.logprobs else None, **sampling_kwargs(body, 0.7))
        messages = flatten_messages(body.messages)
        sids = ctx.session_ids(body.session_id, n)
        release = ctx.acquire(sids)
        try:
            await ctx.check_not_kept(sids[0])
            ids = await ctx.encode(messages, "messages", do_preprocess=not isinstance(messages, str),
                                   tools=body.tools)
            jobs = [Job(sid, ids, seeded(gen, i)) for i, sid in enumerate(sids)]
        except BaseException:
            release()
            raise
        rid, created = str(sids[0]), int(time.time())  # lmdeploy: the session id
        if body.stream:
            include_usage = bool(body.stream_options and body.stream_options.include_usage)

            async def stream():
                choices = [Choice() for _ in jobs]
                try:
                    async for i, out in ctx.run_all(jobs, "chat", arrival):
                        choices[i].add(out)
                        if out.finish_reason == "error":
                            raise_engine_error(out, ctx.draining)
                        lp = (chat_logprobs(tokenizer, out.token_ids, out.logprobs or [], top)
                              if body.logprobs else None)
                        chunk = {"id": rid, "object": "chat.completion.chunk", "created": created, "model": body.model,
                                 "choices": [{"index": i, "delta": {"role": "assistant", "content": out.response},
                                              "logprobs": lp, "finish_reason": out.finish_reason}]}
                        if include_usage:
                            chunk["usage"] = None
                        yield sse(chunk)
                    if include_usage:
                        yield sse({"id": rid, "object": "chat.completion.chunk", "created": created,
                                   "model": body.model, "choices": [],
                                   "usage": usage(choices[0].input_tokens,
                                                  sum(c.generated_tokens for c in choices))})
                except Exception as exc:
                    yield sse_error(exc, ctx.draining)
                yield "data: [DONE]\n\n"
            return ClosingStream(stream(), release)
        try:
            choices = await ctx.collect(jobs, "chat", arrival, request)
        finally:
            release()
        return {"id": rid, "object": "chat.completion", "created": created, "model": body.model,
                "choices": [{"index": i, "message": {"role": "assistant", "content": c.text, "tool_calls": None},
                             "logprobs": (chat_logprobs(tokenizer, c.token_ids, c.logprobs, top)
                                          if body.logprobs else None),
                             "finish_reason": c.finish_reason} for i, c in enumerate(choices)],
                "usage": usage(choices[0].input_tokens, sum(c.generated_tokens for c in choices))}

    @app.post("/v1/completions", dependencies=auth)
    async def completions(body: CompletionRequest, request: Request):
        """OpenAI completions over raw prompts (no chat template); prompt i of a list uses session_id + i."""
        arrival = time.perf_counter()
        ctx.check_open()
        ctx.check_model(body.model)
        n = check_n(body.n)
        top = body.logprobs
        if top is not None and not 0 <= top <= 20:
            raise APIError(HTTPStatus.BAD_REQUEST, "logprobs must be in [0, 20].", "logprobs")
        max_tokens = body.max_completion_tokens if body.max_completion_tokens is not None else (body.max_tokens or 512)
        gen = ctx.gen_config({"logprobs": "logprobs"}, max_new_tokens=max_tokens, logprobs=top,
                             stop_words=ctx.stop_words(body.stop, bool(body.ignore_eos)),
                             **sampling_kwargs(body, 0.7))
        prompts = body.prompt
        if isinstance(prompts, str) or (prompts and isinstance(prompts[0], int)):
            prompts = [prompts]
        if not prompts:
            raise APIError(HTTPStatus.BAD_REQUEST, "The prompt is empty.", "prompt")
        base = ctx.session_ids(body.session_id, 1)[0]
        sids = []
        for p in range(len(prompts)):
            sids += ([base + p] if base < SERVER_SESSION_BASE else ctx.session_ids(-1, 1)) + ctx.session_ids(-1, n - 1)
        release = ctx.acquire(sids)
        try:
            for sid in sids:
                await ctx.check_not_kept(sid)
            jobs, echoes = [], []
            for p, prompt in enumerate(prompts):
                if isinstance(prompt, str):
                    ids = await ctx.encode(prompt, "prompt", do_preprocess=False)
                else:
                    ids = ctx.check_ids(list(prompt), "prompt")
                text = prompt if isinstance(prompt, str) else tokenizer.decode(ids)
                for j in range(n):
                    jobs.append(Job(sids[p * n + j], ids, seeded(gen, j)))
                    echoes.append(text if body.echo else "")
        except BaseException:
            release()
            raise
        rid, created = str(sids[0]), int(time.time())

        def logprobs_of(i: int, token_ids, logprobs, offset: int):
            if top is None:
                return None
            return completion_logprobs(tokenizer, token_ids, logprobs, top, offset)
        if body.stream:
            include_usage = bool(body.stream_options and body.stream_options.include_usage)

            async def stream():
                choices = [Choice() for _ in jobs]
                try:
                    async for i, out in ctx.run_all(jobs, "completions", arrival):
                        offset = len(echoes[i]) + len(choices[i].text)
                        first = not choices[i].token_ids and not choices[i].text
                        choices[i].add(out)
                        if out.finish_reason == "error":
                            raise_engine_error(out, ctx.draining)
                        text = (echoes[i] if first else "") + out.response
                        chunk = {"id": rid, "object": "text_completion", "created": created, "model": body.model,
                                 "choices": [{"index": i, "text": text, "finish_reason": out.finish_reason,
                                              "logprobs": logprobs_of(i, out.token_ids, out.logprobs or [],
                                                                      offset)}]}
                        if include_usage:
                            chunk["usage"] = None
                        yield sse(chunk)
                    if include_usage:
                        yield sse({"id": rid, "object": "text_completion", "created": created, "model": body.model,
                                   "choices": [], "usage": usage(sum(c.input_tokens for c in choices[::n]),
                                                                 sum(c.generated_tokens for c in choices))})
                except Exception as exc:
                    yield sse_error(exc, ctx.draining)
                yield "data: [DONE]\n\n"
            return ClosingStream(stream(), release)
        try:
            choices = await ctx.collect(jobs, "completions", arrival, request)
        finally:
            release()
        return {"id": rid, "object": "text_completion", "created": created, "model": body.model,
                "choices": [{"index": i, "text": echoes[i] + c.text, "finish_reason": c.finish_reason,
                             "logprobs": logprobs_of(i, c.token_ids, c.logprobs, len(echoes[i]))}
                            for i, c in enumerate(choices)],
                "usage": usage(sum(c.input_tokens for c in choices[::n]), sum(c.generated_tokens for c in choices))}

    @app.post("/v1/chat/interactive", dependencies=auth)
    async def chat_interactive(body: InteractiveRequest, request: Request):
        """A turn of a session kept in the engine: ``interactive_mode`` keeps it, otherwise it ends after
        the turn; ``prompt=''`` with ``request_output_len=0`` only ends it; ``cancel`` stops its turn."""
        arrival = time.perf_counter()
        ctx.check_open()
        if body.cancel:
            if body.session_id is None or body.session_id == -1:
                raise APIError(HTTPStatus.BAD_REQUEST, "please set a session_id to cancel a request",
                               "session_id")
            await engine.stop_session(body.session_id)
            return {"text": "", "tokens": 0, "input_tokens": 0, "history_tokens": 0, "finish_reason": "stop"}
        if body.image_url:
            raise APIError(HTTPStatus.BAD_REQUEST, "image_url is not supported.", "image_url")
        if body.adapter_name:
            raise APIError(HTTPStatus.BAD_REQUEST, "LoRA adapters are not supported.", "adapter_name")
        sid = ctx.session_ids(body.session_id, 1)[0]
        sequence_end = not body.interactive_mode
        release = ctx.acquire([sid])
        try:
            if sequence_end and body.prompt == "" and body.request_output_len == 0:
                await engine.end_session(sid)
                ctx.cut_turns.discard(sid)
                release()
                return {"text": "", "tokens": 0, "input_tokens": 0, "history_tokens": 0, "finish_reason": "stop"}
            gen = ctx.gen_config({"max_new_tokens": "request_output_len"}, max_new_tokens=body.request_output_len,
                                 stop_words=ctx.stop_words(body.stop, bool(body.ignore_eos)),
                                 **sampling_kwargs(body, 0.8))
            start = await engine.session_tokens(sid) == 0
            prompt = flatten_messages(body.prompt)
            ids = await ctx.encode(prompt, "prompt", do_preprocess=True, sequence_start=start,
                                   close_turn=not start and sid in ctx.cut_turns)
            job = Job(sid, ids, gen, sequence_start=start, sequence_end=sequence_end)
        except BaseException:
            release()
            raise

        def turn_over(c: Choice) -> None:
            release()
            if not sequence_end and c.finish_reason != "stop":
                ctx.cut_turns.add(sid)
            else:
                ctx.cut_turns.discard(sid)

        def item(c: Choice, text: str) -> dict:
            return {"text": text, "tokens": c.generated_tokens, "input_tokens": c.input_tokens,
                    "history_tokens": c.history_tokens, "finish_reason": c.finish_reason}
        if body.stream:
            streamed = Choice()

            async def stream():
                choice = streamed
                try:
                    async for _, out in ctx.run_all([job], "interactive", arrival):
                        choice.add(out)
                        if out.finish_reason == "error":
                            raise_engine_error(out, ctx.draining)
                        yield json.dumps(item(choice, out.response), ensure_ascii=False) + "\n"
                except Exception as exc:
                    status = exc.status if isinstance(exc, APIError) else HTTPStatus.INTERNAL_SERVER_ERROR
                    yield json.dumps({"error": error_body(status, getattr(exc, "message", str(exc)))}) + "\n"
            return ClosingStream(stream(), lambda: turn_over(streamed), media_type="application/x-ndjson")
        choice = Choice()
        try:
            (choice,) = await ctx.collect([job], "interactive", arrival, request)
        finally:
            turn_over(choice)
        return item(choice, choice.text)

    @app.post("/v1/encode", dependencies=auth)
    async def encode(body: EncodeRequest) -> dict:
        """Token ids of ``input`` (a str or a list of them); ``do_preprocess`` applies the chat template."""
        def one(text: str) -> List[int]:
            return engine.encode_prompt(text, sequence_start=bool(body.add_bos), do_preprocess=bool(body.do_preprocess))
        try:
            if isinstance(body.input, str):
                ids = await asyncio.to_thread(one, body.input)
                return {"input_ids": ids, "length": len(ids)}
            ids = await asyncio.to_thread(lambda: [one(t) for t in body.input])
        except (ValueError, TypeError, KeyError) as exc:
            raise APIError(HTTPStatus.BAD_REQUEST, f"Invalid input: {exc}", "input") from None
        return {"input_ids": ids, "length": [len(i) for i in ids]}

    @app.post("/v1/embeddings", dependencies=auth)
    async def embeddings():
        raise APIError(HTTPStatus.BAD_REQUEST, "Unsupported by turbomind.")

    @app.post("/generate", dependencies=auth)
    async def generate(body: GenerateRequest, request: Request):
        """Token-level generation (lmdeploy's later ``/generate``): ``prompt`` (no template) or ``input_ids``."""
        arrival = time.perf_counter()
        ctx.check_open()
        if (body.prompt is None) == (body.input_ids is None):
            raise APIError(HTTPStatus.BAD_REQUEST, "Give exactly one of prompt and input_ids.", "prompt")
        gen = ctx.gen_config(None, max_new_tokens=body.max_tokens if body.max_tokens is not None else 128,
                             stop_words=ctx.stop_words(body.stop, bool(body.ignore_eos)),
                             stop_token_ids=body.stop_token_ids, logprobs=1 if body.return_logprob else None,
                             spaces_between_special_tokens=bool(body.spaces_between_special_tokens),
                             include_stop_str_in_output=bool(body.include_stop_str_in_output),
                             **{**sampling_kwargs(body, 1.0), "top_k": body.top_k if body.top_k is not None else 0})
        sid = ctx.session_ids(body.session_id, 1)[0]
        release = ctx.acquire([sid])
        try:
            await ctx.check_not_kept(sid)
            if body.prompt is not None:
                ids = await ctx.encode(body.prompt, "prompt", do_preprocess=False)
            else:
                ids = ctx.check_ids(list(body.input_ids), "input_ids")
            job = Job(sid, ids, gen)
        except BaseException:
            release()
            raise

        def reply(c: Choice, text: str, token_ids: List[int], logprobs: List[dict]) -> dict:
            meta = {"prompt_tokens": c.input_tokens, "completion_tokens": c.generated_tokens,
                    "finish_reason": {"type": c.finish_reason} if c.finish_reason else None}
            if body.return_logprob:
                meta["output_token_logprobs"] = [[lp.get(t, float("-inf")), t] for t, lp in zip(token_ids, logprobs)]
            return {"text": text, "output_ids": token_ids, "meta_info": meta}
        if body.stream:
            async def stream():
                choice = Choice()
                try:
                    async for _, out in ctx.run_all([job], "generate", arrival):
                        choice.add(out)
                        if out.finish_reason == "error":
                            raise_engine_error(out, ctx.draining)
                        yield sse(reply(choice, out.response, out.token_ids, out.logprobs or []))
                except Exception as exc:
                    yield sse_error(exc, ctx.draining)
                yield "data: [DONE]\n\n"
            return ClosingStream(stream(), release)
        try:
            (choice,) = await ctx.collect([job], "generate", arrival, request)
        finally:
            release()
        return reply(choice, choice.text, choice.token_ids, choice.logprobs)

    return app


# -- running it -----------------------------------------------------------------------------------

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
          graceful_timeout_s: float = 10.0) -> None:
    """Loads the model and serves it until SIGTERM/SIGINT (then in-flight requests are aborted, the
    engine closed, and this returns). ``api_keys``: a str (comma-separated) or a list of keys."""
    import uvicorn

    from ...async_engine import AsyncEngine

    if isinstance(api_keys, str):
        api_keys = api_keys.split(",")
    api_keys = [k.strip() for k in api_keys or [] if k and k.strip()]
    logging.basicConfig(level=log_level.upper(), format="%(levelname)s %(name)s: %(message)s")
    logging.getLogger("lmwrap_engine").setLevel(log_level.upper())
    sock = bind_socket(server_name, server_port)
    try:
        engine = AsyncEngine(model_path, model_name=model_name, backend=backend, backend_config=backend_config,
                             chat_template_config=chat_template_config, max_log_len=max_log_len)
    except BaseException:
        sock.close()
        raise
    app = create_app(engine, [engine.model_name], api_keys, allow_origins, allow_credentials, allow_methods,
                     allow_headers, disable_fastapi_docs, max_request_bytes)
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
