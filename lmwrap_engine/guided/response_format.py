"""The shape of a ``response_format`` (lmdeploy's and OpenAI's names), checked without compiling it."""
from __future__ import annotations

import json
from typing import Optional

TYPES = ("text", "json_object", "json_schema", "regex_schema")


def _fail(msg: str) -> None:
    raise ValueError(f"response_format {msg}")


def check_response_format(response_format) -> Optional[dict]:
    """Validates ``response_format`` and returns it, or None when it constrains nothing.

    Accepted: ``{"type": "text"}`` (no constraint), ``{"type": "json_object"}`` (any JSON object),
    ``{"type": "json_schema", "json_schema": {"name": ..., "schema": {...}}}`` (the schema may also
    be a JSON string) and ``{"type": "regex_schema", "regex_schema": "..."}``.
    Raises ValueError naming ``response_format`` and the problem.
    """
    if response_format is None:
        return None
    if not isinstance(response_format, dict):
        _fail(f"must be a dict with a 'type', got {type(response_format).__name__}")
    kind = response_format.get("type")
    if kind not in TYPES:
        _fail(f"type must be one of {TYPES}, got {kind!r}")
    if kind == "text":
        return None
    if kind == "json_schema":
        spec = response_format.get("json_schema")
        if not isinstance(spec, dict):
            _fail("of type 'json_schema' needs a 'json_schema' dict: {'name': ..., 'schema': {...}}")
        name = spec.get("name")
        if name is not None and not isinstance(name, str):
            _fail(f"json_schema.name must be a str, got {name!r}")
        schema = spec.get("schema")
        if isinstance(schema, str):
            try:
                schema = json.loads(schema)
            except ValueError as exc:
                _fail(f"json_schema.schema is not valid JSON: {exc}")
        if not isinstance(schema, dict):
            _fail(f"json_schema.schema must be a JSON schema (a dict), got {type(schema).__name__}")
    elif kind == "regex_schema":
        regex = response_format.get("regex_schema")
        if not isinstance(regex, str) or not regex:
            _fail(f"of type 'regex_schema' needs a non-empty 'regex_schema' string, got {regex!r}")
    return response_format


def grammar_key(response_format: dict) -> tuple:
    """(kind, source text) of a checked, constraining format: what a compiled grammar is cached under."""
    kind = response_format["type"]
    if kind == "json_schema":
        schema = response_format["json_schema"]["schema"]
        if isinstance(schema, str):
            schema = json.loads(schema)
        return kind, json.dumps(schema, sort_keys=True)
    if kind == "regex_schema":
        return kind, response_format["regex_schema"]
    return kind, ""
