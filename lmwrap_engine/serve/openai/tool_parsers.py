"""Tool calls in model output: one parser per call format (InternLM2 plugin, Hermes/Qwen2.5 ``<tool_call>``,
Llama 3.1 JSON), a registry, the grammar that enforces a call, and the streamer that holds a call back
until it parses.

A parser turns a reply into ``(content, calls)``; output that does not parse is plain content, never an
error. An enforced call (``tool_choice='required'`` or a named function) is decoded under a JSON schema
that admits exactly the parser's JSON payload (``{"name": ..., <args key>: {...}}``, or a list of them),
so the reply is that payload alone and ``parse_payload`` reads it.
"""
from __future__ import annotations

import json
import re
import uuid
from dataclasses import dataclass
from typing import Dict, List, Optional, Tuple, Type


MAX_PARALLEL_CALLS = 4


@dataclass
class ToolCall:
    """One parsed call: the function's name and its arguments (a JSON object)."""

    name: str
    arguments: dict

    def to_openai(self, call_id: Optional[str] = None) -> dict:
        return {"id": call_id or new_call_id(), "type": "function",
                "function": {"name": self.name, "arguments": json.dumps(self.arguments, ensure_ascii=False)}}


def new_call_id() -> str:
    return "call_" + uuid.uuid4().hex[:24]


def _call_of(obj) -> Optional[ToolCall]:
    """A ``ToolCall`` from a decoded payload object, or None if it is not one."""
    if not isinstance(obj, dict) or not isinstance(obj.get("name"), str) or not obj["name"]:
        return None
    args = obj.get("arguments", obj.get("parameters", {}))
    if isinstance(args, str):  # some models write the arguments as a JSON string
        try:
            args = json.loads(args)
        except ValueError:
            return None
    return ToolCall(obj["name"], args) if isinstance(args, dict) else None


def _calls_of_json(text: str) -> Optional[List[ToolCall]]:
    """The calls of a JSON payload (one call object or a list of them), or None if it is not one."""
    try:
        obj = json.loads(text)
    except ValueError:
        return None
    items = obj if isinstance(obj, list) else [obj]
    calls = [_call_of(item) for item in items]
    return calls if calls and all(calls) else None


class ToolParser:
    """A call format. ``markers``: strings that open a call in free text (streaming holds text back from
    the first one on); ``json_start``: a reply that opens with ``{`` is a call too."""

    name = ""
    markers: Tuple[str, ...] = ()
    json_start = False
    args_key = "arguments"

    def parse(self, text: str) -> Tuple[str, List[ToolCall]]:
        """``(content, calls)`` of a whole reply; text that does not parse is all content."""
        raise NotImplementedError

    def parse_payload(self, text: str) -> Tuple[str, List[ToolCall]]:
        """A reply decoded under ``call_schema``: the bare JSON payload (else parsed as free text)."""
        calls = _calls_of_json(text.strip())
        return ("", calls) if calls else self.parse(text)

    def render(self, calls: List[dict]) -> str:
        """OpenAI ``tool_calls`` of an earlier assistant message as this format's text (for chat templates
        that do not render ``tool_calls`` themselves)."""
        raise NotImplementedError

    def instructions(self, tools: List[dict]) -> str:
        """A system prompt describing the tools and this call format (for templates that ignore ``tools``)."""
        listing = "\n".join(json.dumps(t, ensure_ascii=False) for t in tools)
        example = self.render([{"function": {"name": "<function-name>", "arguments": {"<arg>": "<value>"}}}])
        return (f"You may call functions. They are:\n{listing}\n"
                f"To call one, reply with exactly:\n{example}")

    def call_schema(self, tools: List[dict], parallel: bool) -> dict:
        """The JSON schema of an enforced call to one of ``tools`` (function dicts): one call object, or
        with ``parallel`` a list of 1 to ``MAX_PARALLEL_CALLS`` of them; arguments follow each tool's
        ``parameters``."""
        options = [{"type": "object",
                    "properties": {"name": {"const": t["name"]},
                                   self.args_key: t.get("parameters") or {"type": "object"}},
                    "required": ["name", self.args_key], "additionalProperties": False} for t in tools]
        one = options[0] if len(options) == 1 else {"anyOf": options}
        # The cap keeps a model that never closes the list (small ones do) from running to max_tokens.
        return {"type": "array", "items": one, "minItems": 1, "maxItems": MAX_PARALLEL_CALLS} if parallel else one


def _payload(call: dict, args_key: str) -> str:
    """An OpenAI tool call as the JSON payload of a call format."""
    return json.dumps({"name": call["function"]["name"], args_key: _arguments(call)}, ensure_ascii=False)


def _arguments(call: dict):
    spec = call.get("function") or {}
    args = spec.get("arguments", spec.get("parameters", {}))
    if isinstance(args, str):
        try:
            return json.loads(args)
        except ValueError:
            return args
    return args


class _BlockToolParser(ToolParser):
    """Calls as JSON blocks between markers (``_BLOCK`` captures each block's JSON); any block that is
    not a call makes the whole reply plain text."""

    _BLOCK: "re.Pattern"

    def parse(self, text):
        if self.markers[0] not in text:
            return text, []
        calls = []
        for block in self._BLOCK.findall(text):
            found = _calls_of_json(block)
            if not found:
                return text, []
            calls += found
        if not calls:
            return text, []
        return self._BLOCK.sub("", text).strip(), calls


class HermesToolParser(_BlockToolParser):
    """Hermes / Qwen2.5: ``<tool_call>\\n{"name": ..., "arguments": {...}}\\n</tool_call>`` (one block per call)."""

    name = "hermes"
    markers = ("<tool_call>",)
    _BLOCK = re.compile(r"<tool_call>\s*(.*?)\s*(?:</tool_call>|$)", re.DOTALL)

    def render(self, calls):
        return "\n".join(f"<tool_call>\n{_payload(c, 'arguments')}\n</tool_call>" for c in calls)


class InternLM2ToolParser(_BlockToolParser):
    """InternLM2 plugin calls: ``<|action_start|><|plugin|>\\n{"name": ..., "parameters": {...}}<|action_end|>``."""

    name = "internlm2"
    markers = ("<|action_start|>",)
    args_key = "parameters"  # lmdeploy reads InternLM2's calls as {"name", "parameters"}
    _BLOCK = re.compile(r"<\|action_start\|>\s*<\|plugin\|>\s*(.*?)\s*(?:<\|action_end\|>|$)", re.DOTALL)

    def render(self, calls):
        return "".join(f"<|action_start|><|plugin|>\n{_payload(c, 'parameters')}<|action_end|>" for c in calls)


class Llama3ToolParser(ToolParser):
    """Llama 3.1 JSON calls: a reply that is ``{"name": ..., "parameters": {...}}`` (optionally after
    ``<|python_tag|>``, several separated by ``;``), or ``<function=name>{...}</function>``."""

    name = "llama3"
    markers = ("<|python_tag|>", "<function=")
    json_start = True
    args_key = "parameters"
    _FUNCTION = re.compile(r"<function=([^>]+)>\s*(\{.*?\})\s*(?:</function>|$)", re.DOTALL)

    def parse(self, text):
        body = text.strip()
        if body.startswith("<|python_tag|>"):
            body = body[len("<|python_tag|>"):].strip()
        if body.startswith("{"):
            calls = _calls_of_json(body) or self._semicolon_separated(body)
            return ("", calls) if calls else (text, [])
        if "<function=" in text:
            calls = []
            for name, args in self._FUNCTION.findall(text):
                call = _call_of({"name": name.strip(), "arguments": args})
                if call is None:
                    return text, []
                calls.append(call)
            if calls:
                return self._FUNCTION.sub("", text).strip(), calls
        return text, []

    @staticmethod
    def _semicolon_separated(body: str) -> Optional[List[ToolCall]]:
        decoder, calls, at = json.JSONDecoder(), [], 0
        while at < len(body):
            try:
                obj, end = decoder.raw_decode(body, at)
            except ValueError:
                return None
            call = _call_of(obj)
            if call is None:
                return None
            calls.append(call)
            at = end
            while at < len(body) and body[at] in " \t\r\n;":
                at += 1
        return calls or None

    def render(self, calls):
        return "; ".join(_payload(c, "parameters") for c in calls)


TOOL_PARSERS: Dict[str, Type[ToolParser]] = {p.name: p for p in (InternLM2ToolParser, HermesToolParser,
                                                                  Llama3ToolParser)}
TOOL_PARSER_CHOICES = ("auto", *TOOL_PARSERS)


def get_tool_parser(name: Optional[str], chat_template=None) -> ToolParser:
    """The parser named ``name`` (``'auto'``/None: the one the chat template's format implies, Hermes
    when it implies none)."""
    if name and name != "auto":
        if name not in TOOL_PARSERS:
            raise ValueError(f"unknown tool-call parser {name!r}; choose one of {list(TOOL_PARSER_CHOICES)}")
        return TOOL_PARSERS[name]()
    return TOOL_PARSERS[_implied_parser(chat_template)]()


def _implied_parser(chat_template) -> str:
    from ...chat_template import InternLM2ChatTemplate, Llama31ChatTemplate

    if isinstance(chat_template, InternLM2ChatTemplate):
        return "internlm2"
    if isinstance(chat_template, Llama31ChatTemplate):
        return "llama3"
    source = template_source(chat_template)
    if "<|plugin|>" in source or "<|action_start|>" in source:
        return "internlm2"
    if "<tool_call>" in source:
        return "hermes"
    if "<|python_tag|>" in source or "ipython" in source:
        return "llama3"
    return "hermes"


def template_source(chat_template) -> str:
    """The Jinja source of an HF chat template ('' for a built-in)."""
    source = getattr(getattr(chat_template, "tokenizer", None), "chat_template", None) or ""
    return source if isinstance(source, str) else json.dumps(source)


class ToolCallStream:
    """Splits a streamed reply into content to send now and calls held back until the end.

    ``feed(text)`` returns the content that can go out (never the start of a call, nor a suffix that
    could begin a marker); ``finish()`` returns ``(content, calls)`` of what was held back. With
    ``enforced`` the whole reply is the call payload and nothing streams as content.
    """

    def __init__(self, parser: ToolParser, enforced: bool = False):
        self.parser = parser
        self.enforced = enforced
        self.text = ""
        self.sent = 0
        self.holding = enforced

    def feed(self, text: str) -> str:
        self.text += text
        if self.holding:
            return ""
        pending = self.text[self.sent:]
        if self.parser.json_start and not self.text[:self.sent].strip():
            lead = pending.lstrip()
            if not lead:
                return ""  # only whitespace so far: a JSON call may still follow
            if lead.startswith("{"):
                self.holding = True
                return ""
        hits = [i for i in (pending.find(m) for m in self.parser.markers) if i >= 0]
        if hits:
            self.holding = True
            out = pending[:min(hits)]
        else:
            keep = max((k for m in self.parser.markers for k in range(1, len(m)) if pending.endswith(m[:k])),
                       default=0)
            out = pending[:len(pending) - keep]
        self.sent += len(out)
        return out

    def finish(self) -> Tuple[str, List[ToolCall]]:
        parse = self.parser.parse_payload if self.enforced else self.parser.parse
        content, calls = parse(self.text)
        if not calls:
            return self.text[self.sent:], []
        sent = self.text[:self.sent]
        return (content[len(sent):] if content.startswith(sent) else ""), calls
