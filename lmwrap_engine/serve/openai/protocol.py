"""The api_server's wire shapes: request bodies (lmdeploy v0.6.2's fields and defaults, plus later
additions) and the pieces of its replies (SSE lines, usage, logprobs in OpenAI's shapes).

Unknown request fields are ignored (lmdeploy's own APIClient sends a nested ``kwargs`` object); ``null``
for an optional field means its default. Replies are plain dicts serialised as compact one-line JSON.
"""
from __future__ import annotations

import json
from http import HTTPStatus
from typing import Any, Dict, List, Optional, Union

from pydantic import BaseModel, Field

from .errors import APIError

Stop = Optional[Union[str, List[str]]]


class StreamOptions(BaseModel):
    include_usage: Optional[bool] = False


class _OpenAIRequest(BaseModel):
    """The fields /v1/chat/completions and /v1/completions share: OpenAI's, then lmdeploy's extras."""

    model: str
    temperature: Optional[float] = 0.7
    top_p: Optional[float] = 1.0
    n: Optional[int] = 1
    max_completion_tokens: Optional[int] = Field(default=None, description="OpenAI's newer name of max_tokens")
    stop: Stop = None
    stream: Optional[bool] = False
    stream_options: Optional[StreamOptions] = None
    presence_penalty: Optional[float] = 0.0  # accepted and ignored, as lmdeploy does
    frequency_penalty: Optional[float] = 0.0
    user: Optional[str] = None
    # lmdeploy's extras
    repetition_penalty: Optional[float] = 1.0
    session_id: Optional[int] = -1
    ignore_eos: Optional[bool] = False
    skip_special_tokens: Optional[bool] = True
    top_k: Optional[int] = 40
    min_p: Optional[float] = 0.0
    seed: Optional[int] = None
    # {"type": "json_schema", "json_schema": {"name", "schema"}} | {"type": "json_object"} |
    # {"type": "regex_schema", "regex_schema": "..."} | {"type": "text"}
    response_format: Optional[Dict[str, Any]] = None


class ChatCompletionRequest(_OpenAIRequest):
    """``POST /v1/chat/completions``. ``messages`` as a str is sent without the chat template."""

    messages: Union[str, List[Dict[str, Any]]]
    tools: Optional[List[Dict[str, Any]]] = None
    tool_choice: Optional[Union[str, Dict[str, Any]]] = "auto"
    parallel_tool_calls: Optional[bool] = None
    logprobs: Optional[bool] = False
    top_logprobs: Optional[int] = None
    logit_bias: Optional[Dict[str, float]] = None
    max_tokens: Optional[int] = Field(default=None, description="None: what session_len leaves")
    min_new_tokens: Optional[int] = None


class CompletionRequest(_OpenAIRequest):
    """``POST /v1/completions``: raw prompts (str, list of str, token ids or lists of them), no template."""

    prompt: Union[str, List[str], List[int], List[List[int]]]
    suffix: Optional[str] = None
    logprobs: Optional[int] = None
    max_tokens: Optional[int] = Field(default=16, description="0 or null: 512")
    echo: Optional[bool] = False
    # lmwrap extension (lmwrap.LMDeployClient): a raw-prompt turn of a session kept in the engine. Either set:
    # one prompt, session_id >= 0; sequence_start=False continues the session's KV cache (400 if it holds
    # none), sequence_end=False keeps it for the next call. Unset: a one-off request, as lmdeploy.
    sequence_start: Optional[bool] = None
    sequence_end: Optional[bool] = None
    # lmwrap extension (lmwrap.LMDeployClient): images of one str prompt that places each with <IMAGE_TOKEN>.
    image_url: Optional[Union[str, List[str]]] = None


class InteractiveRequest(BaseModel):
    """``POST /v1/chat/interactive``: a turn of a session whose KV cache stays in the engine.

    ``interactive_mode=True`` keeps the session after the turn; a call without it ends the session
    after its turn (``prompt=''`` with ``request_output_len=0`` just ends it). ``cancel`` stops the
    session's running turn.
    """

    prompt: Union[str, List[Dict[str, Any]]]
    image_url: Optional[Union[str, List[str]]] = None
    session_id: Optional[int] = -1
    interactive_mode: Optional[bool] = False
    stream: Optional[bool] = False
    stop: Stop = None
    request_output_len: Optional[int] = None
    top_p: Optional[float] = 0.8
    top_k: Optional[int] = 40
    temperature: Optional[float] = 0.8
    repetition_penalty: Optional[float] = 1.0
    ignore_eos: Optional[bool] = False
    skip_special_tokens: Optional[bool] = True
    cancel: Optional[bool] = False
    adapter_name: Optional[str] = None
    seed: Optional[int] = None


class EncodeRequest(BaseModel):
    """``POST /v1/encode``: token ids of a text (or of each text of a list)."""

    input: Union[str, List[str]]
    do_preprocess: Optional[bool] = False
    add_bos: Optional[bool] = True


class GenerateRequest(BaseModel):
    """``POST /generate`` (lmdeploy's later token-level route): ``prompt`` or ``input_ids``, no template."""

    prompt: Optional[str] = None
    input_ids: Optional[List[int]] = None
    session_id: Optional[int] = -1
    max_tokens: Optional[int] = 128
    stop: Stop = None
    stop_token_ids: Optional[List[int]] = None
    stream: Optional[bool] = False
    return_logprob: Optional[bool] = False
    temperature: Optional[float] = 1.0
    repetition_penalty: Optional[float] = 1.0
    ignore_eos: Optional[bool] = False
    top_p: Optional[float] = 1.0
    top_k: Optional[int] = 0
    min_p: Optional[float] = 0.0
    seed: Optional[int] = None
    skip_special_tokens: Optional[bool] = True
    spaces_between_special_tokens: Optional[bool] = True
    include_stop_str_in_output: Optional[bool] = False


# -- reply pieces ---------------------------------------------------------------------------------

def sse(data) -> str:
    return f"data: {json.dumps(data, ensure_ascii=False, separators=(',', ':'))}\n\n"


def usage(prompt_tokens: int, completion_tokens: int, history_tokens: int = 0) -> dict:
    """OpenAI's usage; ``total_tokens`` also counts a kept session's history, as lmdeploy's does."""
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": history_tokens + prompt_tokens + completion_tokens}


# -- logprobs in OpenAI's shapes ------------------------------------------------------------------

def token_text(tokenizer, token_id: int) -> str:
    return tokenizer.decode([token_id], skip_special_tokens=False)


def chat_logprobs(tokenizer, token_ids: List[int], logprobs: List[dict], top: int) -> Optional[dict]:
    content = []
    for tid, lp in zip(token_ids, logprobs):
        text = token_text(tokenizer, tid)
        tops = sorted(lp.items(), key=lambda kv: -kv[1])[:top]
        content.append({"token": text, "logprob": lp.get(tid, float("-inf")), "bytes": list(text.encode()),
                        "top_logprobs": [{"token": token_text(tokenizer, t), "logprob": v,
                                          "bytes": list(token_text(tokenizer, t).encode())} for t, v in tops]})
    return {"content": content}


def completion_logprobs(tokenizer, token_ids: List[int], logprobs: List[dict], top: int, offset: int) -> dict:
    tokens, token_lps, tops, offsets = [], [], [], []
    for tid, lp in zip(token_ids, logprobs):
        text = token_text(tokenizer, tid)
        tokens.append(text)
        token_lps.append(lp.get(tid, float("-inf")))
        tops.append({token_text(tokenizer, t): v for t, v in sorted(lp.items(), key=lambda kv: -kv[1])[:top]})
        offsets.append(offset)
        offset += len(text)
    return {"tokens": tokens, "token_logprobs": token_lps, "top_logprobs": tops, "text_offset": offsets}


def check_image_urls(urls, param: str) -> list:
    """A request's image URLs; only http(s) and data URLs (a client must not make the server read its files)."""
    urls = [urls] if isinstance(urls, str) else list(urls or [])
    for url in urls:
        if not isinstance(url, str) or not url.startswith(("http://", "https://", "data:")):
            raise APIError(HTTPStatus.BAD_REQUEST, f"{param}: an image URL must be an http(s) or data: URL, "
                           f"got {str(url)[:80]!r}.", param)
    return urls


def flatten_messages(messages) -> object:
    """OpenAI messages with text parts joined into a string content; a content with ``image_url`` parts is kept
    as parts (the engine loads the images; a text-only model refuses them with a 400)."""
    if isinstance(messages, str):
        return messages
    if not messages:
        raise APIError(HTTPStatus.BAD_REQUEST, "messages must not be empty.", "messages")
    out = []
    for i, message in enumerate(messages):
        if not isinstance(message.get("role"), str):
            raise APIError(HTTPStatus.BAD_REQUEST, f"messages[{i}] needs a string 'role'.", "messages")
        content = message.get("content")
        if isinstance(content, list):
            texts, has_image = [], False
            for part in content:
                if isinstance(part, dict) and part.get("type") == "image_url":
                    url = part.get("image_url")
                    url = url.get("url") if isinstance(url, dict) else None
                    if not isinstance(url, str):
                        raise APIError(HTTPStatus.BAD_REQUEST, f"messages[{i}].content: an image_url part needs "
                                       "{'url': string}.", "messages")
                    check_image_urls(url, "messages")
                    has_image = True
                    continue
                if not isinstance(part, dict) or part.get("type") != "text" or not isinstance(part.get("text"), str):
                    raise APIError(HTTPStatus.BAD_REQUEST, f"messages[{i}].content: only text and image_url parts "
                                   "are supported.", "messages")
                texts.append(part["text"])
            if not has_image:
                content = "".join(texts)
        elif content is None:
            content = ""
        elif not isinstance(content, str):
            raise APIError(HTTPStatus.BAD_REQUEST, f"messages[{i}].content must be a string or a list of "
                           "text parts.", "messages")
        out.append({**message, "content": content})
    return out
