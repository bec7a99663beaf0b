"""The OpenAI routes: ``/v1/models``, ``/v1/chat/completions`` and ``/v1/completions`` (lmdeploy's
extra fields included)."""
from __future__ import annotations

import time
from http import HTTPStatus
from typing import Callable, List, Tuple

from fastapi import APIRouter, Depends, Request

from ...config import GenOut
from .context import SERVER_SESSION_BASE, Choice, Job, ServerContext, server_context
from .errors import APIError
from .params import check_n, gen_config, response_format, sampling_kwargs, seeded, stop_words
from .protocol import ChatCompletionRequest, CompletionRequest, chat_logprobs, completion_logprobs, \
    check_image_urls, flatten_messages, usage
from .replies import reply
from .tool_parsers import ToolCallStream
from .tools import plan_tools

SPECIAL_TOKEN_PARSERS = ("internlm2", "llama3")

router = APIRouter()


@router.get("/v1/models")
async def models(ctx: ServerContext = Depends(server_context)) -> dict:
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


@router.post("/v1/chat/completions")
async def chat_completions(body: ChatCompletionRequest, request: Request,
                           ctx: ServerContext = Depends(server_context)):
    """OpenAI chat completions (lmdeploy's extra fields: top_k, repetition_penalty, ignore_eos,
    skip_special_tokens, session_id, min_p, min_new_tokens)."""
    arrival = time.perf_counter()
    ctx.check_open()
    ctx.check_model(body.model)
    n = check_n(body.n)
    rf = response_format(body)
    top = body.top_logprobs or 0
    if not 0 <= top <= 20:
        raise APIError(HTTPStatus.BAD_REQUEST, "top_logprobs must be in [0, 20].", "top_logprobs")
    messages = flatten_messages(body.messages)
    plan = plan_tools(body, messages, ctx.engine.chat_template, ctx.tool_parser)
    if plan is not None and plan.enforced and rf is not None:
        raise APIError(HTTPStatus.BAD_REQUEST, "response_format cannot be combined with a tool_choice that "
                       "forces a call ('required' or a named function).", "response_format")
    max_tokens = body.max_completion_tokens if body.max_completion_tokens is not None else body.max_tokens
    names = {"max_new_tokens": "max_completion_tokens" if body.max_completion_tokens is not None
             else "max_tokens", "logprobs": "top_logprobs"}
    sampling = sampling_kwargs(body, 0.7)
    if plan is not None and plan.parser.name in SPECIAL_TOKEN_PARSERS:
        sampling["skip_special_tokens"] = False  # their call markers are special tokens
    gen = gen_config(names, max_new_tokens=max_tokens, min_new_tokens=body.min_new_tokens,
                     stop_words=stop_words(body, ctx.engine.chat_template.stop_words),
                     logprobs=top if body.logprobs else None,
                     response_format=plan.response_format if plan is not None else rf, **sampling)
    await ctx.check_grammar(gen, "tools" if plan is not None and plan.enforced else "response_format")
    sids = ctx.session_ids(body.session_id, n)
    release = ctx.acquire(sids)
    try:
        await ctx.check_not_kept(sids[0])
        if plan is not None:
            ids = await ctx.encode(plan.messages, "messages", do_preprocess=True, tools=plan.tools)
        else:
            ids = await ctx.encode(messages, "messages", do_preprocess=not isinstance(messages, str))
        jobs = [Job(sid, ids, seeded(gen, i)) for i, sid in enumerate(sids)]
    except BaseException:
        release()
        raise
    tokenizer = ctx.engine.tokenizer
    streams = [ToolCallStream(plan.parser, plan.enforced) for _ in jobs] if plan is not None else None

    def logprobs(token_ids, lps):
        return chat_logprobs(tokenizer, token_ids, lps, top) if body.logprobs else None

    def delta(i: int, out: GenOut, c: Choice):
        lps = logprobs(out.token_ids, out.logprobs or [])
        if streams is None:
            return {"index": i, "delta": {"role": "assistant", "content": out.response}, "logprobs": lps,
                    "finish_reason": out.finish_reason}
        content = streams[i].feed(out.response)
        if out.finish_reason is None:
            return {"index": i, "delta": {"role": "assistant", "content": content}, "logprobs": lps,
                    "finish_reason": None}
        tail, calls = streams[i].finish()
        calls = calls if plan.parallel else calls[:1]
        pieces = [{"index": i, "delta": {"role": "assistant", "content": content + tail}, "logprobs": lps,
                   "finish_reason": None}]
        for k, call in enumerate(calls):
            whole_call = call.to_openai()
            pieces.append({"index": i, "delta": {"tool_calls": [
                {"index": k, "id": whole_call["id"], "type": "function",
                 "function": {"name": call.name, "arguments": ""}}]}, "logprobs": None, "finish_reason": None})
            pieces.append({"index": i, "delta": {"tool_calls": [
                {"index": k, "function": {"arguments": whole_call["function"]["arguments"]}}]},
                "logprobs": None, "finish_reason": None})
        pieces.append({"index": i, "delta": {}, "logprobs": None,
                       "finish_reason": finish_reason(out.finish_reason, calls)})
        return pieces

    def whole(i: int, c: Choice) -> dict:
        message = {"role": "assistant", "content": c.text, "tool_calls": None}
        reason = c.finish_reason
        if plan is not None:
            content, calls = (plan.parser.parse_payload if plan.enforced else plan.parser.parse)(c.text)
            calls = calls if plan.parallel else calls[:1]
            if calls:
                message = {"role": "assistant", "content": content or None,
                           "tool_calls": [call.to_openai() for call in calls]}
                reason = finish_reason(reason, calls)
        return {"index": i, "message": message, "logprobs": logprobs(c.token_ids, c.logprobs),
                "finish_reason": reason}
    return await respond(ctx, body, request, "chat", jobs, n, arrival, release,
                         ("chat.completion", "chat.completion.chunk"), delta, whole)


@router.post("/v1/completions")
async def completions(body: CompletionRequest, request: Request, ctx: ServerContext = Depends(server_context)):
    """OpenAI completions over raw prompts (no chat template); prompt i of a list uses session_id + i."""
    arrival = time.perf_counter()
    ctx.check_open()
    ctx.check_model(body.model)
    n = check_n(body.n)
    top = body.logprobs
    if top is not None and not 0 <= top <= 20:
        raise APIError(HTTPStatus.BAD_REQUEST, "logprobs must be in [0, 20].", "logprobs")
    max_tokens = body.max_completion_tokens if body.max_completion_tokens is not None else (body.max_tokens or 512)
    gen = gen_config({"logprobs": "logprobs"}, max_new_tokens=max_tokens, logprobs=top,
                     response_format=response_format(body),
                     stop_words=stop_words(body, ctx.engine.chat_template.stop_words), **sampling_kwargs(body, 0.7))
    await ctx.check_grammar(gen)
    prompts = body.prompt
    if isinstance(prompts, str) or (prompts and isinstance(prompts[0], int)):
        prompts = [prompts]
    if not prompts:
        raise APIError(HTTPStatus.BAD_REQUEST, "The prompt is empty.", "prompt")
    if body.image_url and not (len(prompts) == 1 and isinstance(prompts[0], str)):
        raise APIError(HTTPStatus.BAD_REQUEST, "image_url needs one str prompt.", "image_url")
    kept = body.sequence_start is not None or body.sequence_end is not None
    start, end = body.sequence_start is not False, body.sequence_end is not False
    if kept and (body.session_id is None or body.session_id < 0 or len(prompts) != 1 or n != 1):
        raise APIError(HTTPStatus.BAD_REQUEST, "sequence_start / sequence_end need a session_id >= 0, one prompt "
                       "and n=1.", "session_id")
    base = ctx.session_ids(body.session_id, 1)[0]
    sids = []
    for p in range(len(prompts)):
        sids += ([base + p] if base < SERVER_SESSION_BASE else ctx.session_ids(-1, 1)) + ctx.session_ids(-1, n - 1)
    tokenizer = ctx.engine.tokenizer
    release = ctx.acquire(sids)
    try:
        if not kept:
            for sid in sids:
                await ctx.check_not_kept(sid)
        elif not start and await ctx.engine.session_tokens(base) == 0:
            raise APIError(HTTPStatus.BAD_REQUEST, f"The session_id `{base}` holds no history to continue "
                           "(sequence_start=false).", "sequence_start")
        elif start:
            await ctx.engine.end_session(base)  # a new conversation replaces what the session held
        jobs, echoes = [], []
        for p, prompt in enumerate(prompts):
            if body.image_url:
                urls = check_image_urls(body.image_url, "image_url")
                ids = await ctx.encode((prompt, urls), "prompt", do_preprocess=False, sequence_start=start)
            elif isinstance(prompt, str):
                ids = await ctx.encode(prompt, "prompt", do_preprocess=False, sequence_start=start)
            else:
                ids = ctx.check_ids(list(prompt), "prompt")
            text = prompt if isinstance(prompt, str) else tokenizer.decode(ids)
            for j in range(n):
                jobs.append(Job(sids[p * n + j], ids, seeded(gen, j), sequence_start=start, sequence_end=end))
                echoes.append(text if body.echo else "")
    except BaseException:
        release()
        raise

    def logprobs(token_ids, lps, offset: int):
        return None if top is None else completion_logprobs(tokenizer, token_ids, lps, top, offset)

    def delta(i: int, out: GenOut, c: Choice) -> dict:
        before = len(c.text) - len(out.response)  # the text choice i had before this delta
        first = before == 0 and len(c.token_ids) == len(out.token_ids)  # the echo leads the first output
        return {"index": i, "text": (echoes[i] if first else "") + out.response, "finish_reason": out.finish_reason,
                "logprobs": logprobs(out.token_ids, out.logprobs or [], len(echoes[i]) + before)}

    def whole(i: int, c: Choice) -> dict:
        return {"index": i, "text": echoes[i] + c.text, "finish_reason": c.finish_reason,
                "logprobs": logprobs(c.token_ids, c.logprobs, len(echoes[i]))}
    return await respond(ctx, body, request, "completions", jobs, n, arrival, release,
                         ("text_completion", "text_completion"), delta, whole)


def finish_reason(reason, calls) -> str:
    """``tool_calls`` when the reply parsed into calls and ended normally."""
    return "tool_calls" if calls and reason in ("stop", "length") else reason


async def respond(ctx: ServerContext, body, request: Request, route: str, jobs: List[Job], n: int, arrival: float,
                  release: Callable[[], None], objects: Tuple[str, str],
                  delta: Callable[[int, GenOut, Choice], object], whole: Callable[[int, Choice], dict]):
    """An OpenAI reply: ``objects[0]`` with ``whole(i, choice)`` per job, or (``body.stream``) ``objects[1]``
    chunks of one ``delta(i, out, choice)`` each, then the usage chunk if ``stream_options`` ask for it."""
    rid, created = str(jobs[0].session_id), int(time.time())  # lmdeploy: the id is the session id
    include_usage = bool(body.stream_options and body.stream_options.include_usage)

    def envelope(obj: str, choices: list, **extra) -> dict:
        return {"id": rid, "object": obj, "created": created, "model": body.model, "choices": choices, **extra}

    def total(choices: List[Choice]) -> dict:  # the n choices of a prompt share its input tokens
        return usage(sum(c.input_tokens for c in choices[::n]), sum(c.generated_tokens for c in choices),
                     sum(c.history_tokens for c in choices[::n]))

    def chunk(i: int, out: GenOut, c: Choice):
        pieces = delta(i, out, c)  # a choice delta, or a list of them (a tool call's deltas)
        extra = {"usage": None} if include_usage else {}
        if isinstance(pieces, list):
            return [envelope(objects[1], [p], **extra) for p in pieces]
        return envelope(objects[1], [pieces], **extra)

    def usage_chunk(choices: List[Choice]) -> dict:
        return envelope(objects[1], [], usage=total(choices))

    def final(choices: List[Choice]) -> dict:
        return envelope(objects[0], [whole(i, c) for i, c in enumerate(choices)], usage=total(choices))
    return await reply(ctx, jobs, route, arrival, request, stream=bool(body.stream), chunk=chunk, final=final,
                       on_done=lambda _: release(), last=usage_chunk if include_usage else None)
