"""``tools`` / ``tool_choice`` of a chat request: checked (400 naming the problem), the prompt's tools and
messages prepared for the chat template, and the grammar of an enforced call."""
from __future__ import annotations

import json
import re
from dataclasses import dataclass
from http import HTTPStatus
from typing import List, Optional

from .errors import APIError
from .tool_parsers import ToolParser, template_source

_NAME = re.compile(r"^[a-zA-Z0-9_.-]{1,64}$")


@dataclass
class ToolPlan:
    """How a request uses tools: the prompt's ``tools`` and ``messages``, the parser of the reply, and
    (``enforced``) the ``response_format`` that makes the reply one of ``functions``' calls."""

    parser: ToolParser
    functions: List[dict]
    tools: Optional[list]
    messages: object
    enforced: bool
    parallel: bool
    response_format: Optional[dict] = None


def _bad(message: str, param: str) -> APIError:
    return APIError(HTTPStatus.BAD_REQUEST, message, param)


def check_tools(tools) -> List[dict]:
    """The function dicts of OpenAI ``tools`` (400 on a malformed one)."""
    functions, seen = [], set()
    for i, tool in enumerate(tools):
        where = f"tools[{i}]"
        if not isinstance(tool, dict) or tool.get("type", "function") != "function":
            raise _bad(f"{where} must be {{\"type\": \"function\", \"function\": {{...}}}}.", "tools")
        fn = tool.get("function")
        if not isinstance(fn, dict):
            raise _bad(f"{where}.function must be an object with a name.", "tools")
        name = fn.get("name")
        if not isinstance(name, str) or not _NAME.match(name):
            raise _bad(f"{where}.function.name must be 1-64 letters, digits, '_', '.' or '-', got {name!r}.",
                       "tools")
        if name in seen:
            raise _bad(f"{where}.function.name {name!r} is used by another tool.", "tools")
        seen.add(name)
        if fn.get("description") is not None and not isinstance(fn["description"], str):
            raise _bad(f"{where}.function.description must be a string.", "tools")
        params = fn.get("parameters")
        if params is not None:
            if not isinstance(params, dict):
                raise _bad(f"{where}.function.parameters must be a JSON schema object.", "tools")
            _check_schema(params, f"{where}.function.parameters")
        functions.append(fn)
    return functions


def _check_schema(schema: dict, where: str) -> None:
    try:
        import jsonschema
    except ImportError:  # the grammar compiler still refuses what it cannot compile
        return
    try:
        jsonschema.validators.validator_for(schema).check_schema(schema)
    except jsonschema.SchemaError as exc:
        raise _bad(f"{where} is not a valid JSON schema: {exc.message}", "tools") from None


def plan_tools(body, messages, chat_template, parser: ToolParser) -> Optional[ToolPlan]:
    """The request's ``ToolPlan``, or None when it uses no tools (no ``tools``, or ``tool_choice='none'``
    with none in the history to render)."""
    choice = body.tool_choice if body.tool_choice is not None else "auto"
    named = None
    if isinstance(choice, dict):
        fn = choice.get("function")
        if choice.get("type", "function") != "function" or not isinstance(fn, dict) \
                or not isinstance(fn.get("name"), str):
            raise _bad("tool_choice must be 'none', 'auto', 'required' or "
                       "{\"type\": \"function\", \"function\": {\"name\": ...}}.", "tool_choice")
        named = fn["name"]
    elif choice not in ("none", "auto", "required"):
        raise _bad(f"tool_choice {choice!r} must be 'none', 'auto', 'required' or a named function.",
                   "tool_choice")
    if not body.tools:
        if named is not None or choice == "required":
            raise _bad("tool_choice needs tools.", "tool_choice")
        return None
    functions = check_tools(body.tools)
    if named is not None and named not in {f["name"] for f in functions}:
        raise _bad(f"tool_choice names the function {named!r}, which is not in tools "
                   f"({[f['name'] for f in functions]}).", "tool_choice")
    if choice == "none" or not functions:
        return None
    if isinstance(messages, str):
        raise _bad("tools need messages as a list of messages (a string is sent without the chat template).",
                   "messages")
    parallel = body.parallel_tool_calls is not False
    plan = ToolPlan(parser, functions, None, messages, enforced=choice == "required" or named is not None,
                    parallel=parallel)
    plan.tools, plan.messages = prompt_tools(body.tools, functions, messages, chat_template, parser)
    if plan.enforced:
        chosen = [f for f in functions if f["name"] == named] if named is not None else functions
        schema = parser.call_schema(chosen, parallel=parallel and named is None)
        plan.response_format = {"type": "json_schema", "json_schema": {"name": "tool_call", "schema": schema}}
    return plan


def prompt_tools(tools: list, functions: List[dict], messages: list, chat_template, parser: ToolParser):
    """``(tools for the template, messages)``. HF templates take OpenAI's tool dicts, built-ins the function
    dicts; a template that ignores tools gets them (and earlier calls) written in the parser's format."""
    from ...chat_template import HFChatTemplate, InternLM2ChatTemplate, Llama31ChatTemplate

    messages = normalized_history(messages)
    if isinstance(chat_template, HFChatTemplate):
        source = template_source(chat_template)
        renders_tools, renders_calls = "tools" in source, "tool_calls" in source
        template_tools = tools
    else:
        renders_tools = renders_calls = isinstance(chat_template, (InternLM2ChatTemplate, Llama31ChatTemplate))
        template_tools = functions
    if not renders_calls:
        messages = [_calls_as_text(m, parser) for m in messages]
    if not isinstance(chat_template, HFChatTemplate) and not renders_tools:  # built-ins without a tool role
        messages = [{**m, "role": "user", "content": f"Result of a tool call:\n{m['content']}"}
                    if m.get("role") == "tool" else m for m in messages]
    if not renders_tools:
        note = parser.instructions(functions)
        if messages and messages[0].get("role") == "system":
            messages = [{**messages[0], "content": f"{messages[0]['content']}\n\n{note}"}] + messages[1:]
        else:
            messages = [{"role": "system", "content": note}] + messages
        template_tools = None
    return template_tools, messages


def normalized_history(messages: list) -> list:
    """Messages with assistant ``tool_calls`` checked and their ``arguments`` decoded to objects (the form
    HF templates render)."""
    out = []
    for i, message in enumerate(messages):
        calls = message.get("tool_calls")
        if message.get("role") == "assistant" and calls:
            if not isinstance(calls, list):
                raise _bad(f"messages[{i}].tool_calls must be a list.", "messages")
            fixed = []
            for j, call in enumerate(calls):
                fn = call.get("function") if isinstance(call, dict) else None
                if not isinstance(fn, dict) or not isinstance(fn.get("name"), str):
                    raise _bad(f"messages[{i}].tool_calls[{j}] must have a function with a name.", "messages")
                args = fn.get("arguments", {})
                if isinstance(args, str):
                    try:
                        args = json.loads(args) if args.strip() else {}
                    except ValueError:
                        raise _bad(f"messages[{i}].tool_calls[{j}].function.arguments is not valid JSON.",
                                   "messages") from None
                fixed.append({**call, "type": call.get("type", "function"), "function": {**fn, "arguments": args}})
            message = {**message, "tool_calls": fixed}
        out.append(message)
    return out


def _calls_as_text(message: dict, parser: ToolParser) -> dict:
    if message.get("role") == "assistant" and message.get("tool_calls"):
        text = parser.render(message["tool_calls"])
        content = f"{message['content']}\n{text}" if message.get("content") else text
        return {k: v for k, v in message.items() if k != "tool_calls"} | {"content": content}
    return message
