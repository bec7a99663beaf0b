"""lmdeploy's own routes: ``/v1/chat/interactive`` (sessions kept in the engine), ``/v1/encode``,
``/v1/embeddings`` (unsupported, as lmdeploy's TurboMind says) and the token-level ``/generate``."""
from __future__ import annotations

import asyncio
import time
from http import HTTPStatus
from typing import List

from fastapi import APIRouter, Depends, Request

from .context import Choice, Job, ServerContext, server_context
from .errors import APIError
from .params import gen_config, sampling_kwargs, stop_words
from .protocol import EncodeRequest, GenerateRequest, InteractiveRequest, check_image_urls, flatten_messages
from .replies import reply

router = APIRouter()

def with_images(prompt, image_url):
    """lmdeploy's ``image_url`` of /v1/chat/interactive (a URL or a list of them) as image parts of the last
    user message."""
    if not image_url:
        return prompt
    urls = [image_url] if isinstance(image_url, str) else list(image_url)
    parts = [{"type": "image_url", "image_url": {"url": u}} for u in urls]
    if isinstance(prompt, str):
        return [{"role": "user", "content": [{"type": "text", "text": prompt}] + parts}]
    last = prompt[-1]
    content = last["content"] if isinstance(last["content"], list) else [{"type": "text", "text": last["content"]}]
    return prompt[:-1] + [{**last, "content": content + parts}]


NO_TURN = {"text": "", "tokens": 0, "input_tokens": 0, "history_tokens": 0, "finish_reason": "stop"}


@router.post("/v1/chat/interactive")
async def chat_interactive(body: InteractiveRequest, request: Request, ctx: ServerContext = Depends(server_context)):
    """A turn of a session kept in the engine: ``interactive_mode`` keeps it, otherwise it ends after
    the turn; ``prompt=''`` with ``request_output_len=0`` only ends it; ``cancel`` stops its turn."""
    arrival = time.perf_counter()
    ctx.check_open()
    engine = ctx.engine
    if body.cancel:
        if body.session_id is None or body.session_id == -1:
            raise APIError(HTTPStatus.BAD_REQUEST, "please set a session_id to cancel a request", "session_id")
        await engine.stop_session(body.session_id)
        return dict(NO_TURN)
    if body.image_url:
        check_image_urls(body.image_url, "image_url")
        try:
            await asyncio.to_thread(engine.vision_processor)
        except ValueError as exc:
            raise APIError(HTTPStatus.BAD_REQUEST, f"image_url: {exc}", "image_url") from None
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
            return dict(NO_TURN)
        gen = gen_config({"max_new_tokens": "request_output_len"}, max_new_tokens=body.request_output_len,
                         stop_words=stop_words(body, engine.chat_template.stop_words), **sampling_kwargs(body, 0.8))
        start = await engine.session_tokens(sid) == 0
        ids = await ctx.encode(with_images(flatten_messages(body.prompt), body.image_url), "prompt",
                               do_preprocess=True, sequence_start=start,
                               close_turn=not start and sid in ctx.cut_turns)
        job = Job(sid, ids, gen, sequence_start=start, sequence_end=sequence_end)
    except BaseException:
        release()
        raise

    def turn_over(choices: List[Choice]) -> None:
        release()
        if not sequence_end and choices[0].finish_reason != "stop":
            ctx.cut_turns.add(sid)
        else:
            ctx.cut_turns.discard(sid)

    def item(c: Choice, text: str) -> dict:
        return {"text": text, "tokens": c.generated_tokens, "input_tokens": c.input_tokens,
                "history_tokens": c.history_tokens, "finish_reason": c.finish_reason}
    return await reply(ctx, [job], "interactive", arrival, request, stream=bool(body.stream),
                       chunk=lambda i, out, c: item(c, out.response), final=lambda cs: item(cs[0], cs[0].text),
                       on_done=turn_over, ndjson=True)


@router.post("/v1/encode")
async def encode(body: EncodeRequest, ctx: ServerContext = Depends(server_context)) -> dict:
    """Token ids of ``input`` (a str or a list of them); ``do_preprocess`` applies the chat template."""
    def one(text: str) -> List[int]:
        return ctx.engine.encode_prompt(text, sequence_start=bool(body.add_bos), do_preprocess=bool(body.do_preprocess))
    try:
        if isinstance(body.input, str):
            ids = await asyncio.to_thread(one, body.input)
            return {"input_ids": ids, "length": len(ids)}
        ids = await asyncio.to_thread(lambda: [one(t) for t in body.input])
    except (ValueError, TypeError, KeyError) as exc:
        raise APIError(HTTPStatus.BAD_REQUEST, f"Invalid input: {exc}", "input") from None
    return {"input_ids": ids, "length": [len(i) for i in ids]}


@router.post("/v1/embeddings")
async def embeddings():
    raise APIError(HTTPStatus.BAD_REQUEST, "Unsupported by turbomind.")


@router.post("/generate")
async def generate(body: GenerateRequest, request: Request, ctx: ServerContext = Depends(server_context)):
    """Token-level generation (lmdeploy's later ``/generate``): ``prompt`` (no template) or ``input_ids``."""
    arrival = time.perf_counter()
    ctx.check_open()
    if (body.prompt is None) == (body.input_ids is None):
        raise APIError(HTTPStatus.BAD_REQUEST, "Give exactly one of prompt and input_ids.", "prompt")
    gen = gen_config(None, max_new_tokens=body.max_tokens if body.max_tokens is not None else 128,
                     stop_words=stop_words(body, ctx.engine.chat_template.stop_words),
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

    def result(c: Choice, text: str, token_ids: List[int], logprobs: List[dict]) -> dict:
        meta = {"prompt_tokens": c.input_tokens, "completion_tokens": c.generated_tokens,
                "finish_reason": {"type": c.finish_reason} if c.finish_reason else None}
        if body.return_logprob:
            meta["output_token_logprobs"] = [[lp.get(t, float("-inf")), t] for t, lp in zip(token_ids, logprobs)]
        return {"text": text, "output_ids": token_ids, "meta_info": meta}
    return await reply(ctx, [job], "generate", arrival, request, stream=bool(body.stream),
                       chunk=lambda i, out, c: result(c, out.response, out.token_ids, out.logprobs or []),
                       final=lambda cs: result(cs[0], cs[0].text, cs[0].token_ids, cs[0].logprobs),
                       on_done=lambda _: release())
