"""Request fields -> ``GenerationConfig``: the sampling defaults the routes share, stop words, ``n``, and
the engine's ``ValueError`` re-worded with the field name the client used."""
from __future__ import annotations

from dataclasses import replace
from http import HTTPStatus
from typing import Dict, List, Optional, Sequence

from ...config import GenerationConfig
from .errors import APIError

# GenerationConfig field -> the request field a client set it with
PARAM_NAMES = {"max_new_tokens": "max_tokens", "random_seed": "seed", "stop_words": "stop",
               "stop_token_ids": "stop_token_ids", "min_new_tokens": "min_new_tokens"}
MAX_N = 16


def gen_config(param_names: Optional[Dict[str, str]] = None, **kwargs) -> GenerationConfig:
    """``GenerationConfig(**kwargs)``; an invalid value is a 400 naming the request field
    (``param_names`` maps config fields to the route's own field names)."""
    names = {**PARAM_NAMES, **(param_names or {})}
    try:
        return GenerationConfig(**kwargs)
    except ValueError as exc:
        field_name, _, rest = str(exc).partition(" ")
        param = names.get(field_name, field_name)
        raise APIError(HTTPStatus.BAD_REQUEST, f"{param} {rest}", param) from None
    except NotImplementedError as exc:
        raise APIError(HTTPStatus.BAD_REQUEST, str(exc)) from None


def stop_words(body, template_stop_words: Optional[Sequence[str]]) -> Optional[List[str]]:
    """The client's ``body.stop`` strings plus the template's (which the engine drops once any are given)."""
    stop = body.stop
    if stop is None or stop == []:
        return None
    words = [stop] if isinstance(stop, str) else list(stop)
    if any(not w for w in words):
        raise APIError(HTTPStatus.BAD_REQUEST, "stop must not contain empty strings.", "stop")
    if not body.ignore_eos:
        words += [w for w in (template_stop_words or []) if w not in words]
    return words


def sampling_kwargs(body, default_temperature: float) -> dict:
    """GenerationConfig fields common to the OpenAI routes (which always sample; temperature 0 = greedy)."""
    def value(name, default):
        v = getattr(body, name, None)
        return default if v is None else v
    return dict(do_sample=True, temperature=value("temperature", default_temperature), top_p=value("top_p", 1.0),
                top_k=value("top_k", 40), min_p=value("min_p", 0.0),
                repetition_penalty=value("repetition_penalty", 1.0), ignore_eos=value("ignore_eos", False),
                skip_special_tokens=value("skip_special_tokens", True), random_seed=body.seed)


def check_n(n: Optional[int]) -> int:
    """The number of choices a request asks for (400 unless in [1, MAX_N])."""
    n = 1 if n is None else n
    if not 1 <= n <= MAX_N:
        raise APIError(HTTPStatus.BAD_REQUEST, f"The n `{n}` must be a positive int at most {MAX_N}.", "n")
    return n


def seeded(gen: GenerationConfig, i: int) -> GenerationConfig:
    """Choice ``i`` of ``n`` samples with its own seed (choice 0 keeps the request's)."""
    return gen if i == 0 or gen.random_seed is None else replace(gen, random_seed=gen.random_seed + i)


RESPONSE_FORMATS = ("text", "json_object", "json_schema", "regex_schema")


def response_format(body) -> Optional[dict]:
    """The request's ``response_format`` for ``GenerationConfig`` (None for none or ``text``); a malformed
    one is a 400 (a schema the grammar compiler refuses is refused by the engine, also as a 400)."""
    rf = body.response_format
    if rf is None:
        return None
    kind = rf.get("type")
    if kind not in RESPONSE_FORMATS:
        raise APIError(HTTPStatus.BAD_REQUEST, f"response_format.type must be one of {list(RESPONSE_FORMATS)}, "
                       f"got {kind!r}.", "response_format")
    if kind == "json_schema":
        spec = rf.get("json_schema")
        if not isinstance(spec, dict) or not isinstance(spec.get("schema", {}), (dict, bool)):
            raise APIError(HTTPStatus.BAD_REQUEST, "response_format.json_schema must be an object with a "
                           "'schema' (a JSON schema object).", "response_format")
    if kind == "regex_schema" and (not isinstance(rf.get("regex_schema"), str) or not rf["regex_schema"]):
        raise APIError(HTTPStatus.BAD_REQUEST, "response_format.regex_schema must be a non-empty string "
                       "(a regular expression).", "response_format")
    return None if kind == "text" else dict(rf)
