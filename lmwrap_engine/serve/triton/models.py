"""The infer functions of the Triton models (``protocol.py``) over one ``AsyncEngine``.

Each takes pytriton's list of requests (dicts of numpy arrays) and returns, or for the decoupled
models yields, one dict of outputs per request. A request the engine refuses raises ``ValueError``,
which Triton sends to the client as the request's error; the server keeps serving.
"""
from __future__ import annotations

import json
import logging
from typing import Dict, List, Optional

import numpy as np

from ...config import GenerationConfig
from . import protocol as P

logger = logging.getLogger("lmwrap_engine")

_MAX_HISTORIES = 256  # past this many kept sessions, forget those the engine has ended


class TritonModels:
    """lmdeploy's ``preprocessing`` / ``turbomind`` / ``postprocessing`` and the text model, on ``engine``."""

    def __init__(self, engine, cancellations=None):
        self.engine = engine
        self.cancellations = cancellations  # a ``cancellation.Cancellations``: stops dropped streams
        self.tokenizer = engine.tokenizer
        self.eos_id = engine.eos_token_ids[0] if engine.eos_token_ids else self.tokenizer.eos_token_id
        self.bos_id = self._bos_id()
        # The ids of each kept session (output_ids are cumulative over the whole session).
        self._histories: Dict[int, List[int]] = {}

    def _bos_id(self) -> int:
        """The id the tokenizer puts before a prompt; without one, an id outside the vocabulary (so
        lmdeploy's client, which drops a leading BOS on later turns, never drops a real token)."""
        ids = self.tokenizer.encode("a", add_special_tokens=True)
        plain = self.tokenizer.encode("a", add_special_tokens=False)
        if len(ids) > len(plain) and ids[0] == self.tokenizer.bos_token_id:
            return int(ids[0])
        return int(self.engine.vocab_size)

    # -- preprocessing / postprocessing (unary) ------------------------------------------------

    def preprocessing(self, requests) -> List[dict]:
        outputs = []
        for request in requests:
            queries = [_text(q) for q in np.asarray(request["QUERY"]).reshape(-1)]
            rows = [self._encode(query) for query in queries]
            width = max(1, max(len(row) for row in rows))  # an empty text: one pad id, length 0
            ids = np.zeros((len(rows), width), dtype=np.uint32)
            for i, row in enumerate(rows):
                ids[i, :len(row)] = row
            lengths = np.array([[len(row)] for row in rows], dtype=np.uint32)
            outputs.append({"INPUT_ID": ids, "REQUEST_INPUT_LEN": lengths})
        return outputs

    def _encode(self, query: str) -> List[int]:
        if query == P.BOS_QUERY:
            return [self.bos_id]
        if query == P.EOS_QUERY:
            return [self.eos_id]
        return self.engine.encode_prompt(query, sequence_start=True, do_preprocess=False)

    def postprocessing(self, requests) -> List[dict]:
        outputs = []
        for request in map(dict, (r.items() for r in requests)):
            tokens = np.asarray(request["TOKENS_BATCH"])
            offsets = np.asarray(request["sequence_length"]).reshape(-1)
            skip = request.get("skip_special_tokens")
            skip = bool(np.asarray(skip).reshape(-1)[0]) if skip is not None else True
            if tokens.ndim == 0:
                raise ValueError("TOKENS_BATCH must be [batch, beam, tokens], got a scalar")
            rows = tokens.reshape(int(np.prod(tokens.shape[:-1])), tokens.shape[-1])
            if len(offsets) not in (1, len(rows)):
                raise ValueError(f"sequence_length has {len(offsets)} values for {len(rows)} token rows")
            texts = [self._decode([int(t) for t in row], int(offsets[min(i, len(offsets) - 1)]), skip)
                     for i, row in enumerate(rows)]
            outputs.append({"OUTPUT": np.array([t.encode("utf-8") for t in texts], dtype=np.bytes_)})
        return outputs

    def _decode(self, ids: List[int], offset: int, skip_special_tokens: bool) -> str:
        """The text ``ids[offset:]`` adds to ``ids[:offset]`` (decoded in context, so leading spaces survive)."""
        if not 0 <= offset <= len(ids):
            raise ValueError(f"sequence_length {offset} is outside the {len(ids)} tokens sent")
        bad = next((t for t in ids if t >= self.engine.vocab_size), None)
        if bad is not None:
            raise ValueError(f"TOKENS_BATCH holds {bad}, not a token id (vocabulary size {self.engine.vocab_size})")
        whole = self.tokenizer.decode(ids, skip_special_tokens=skip_special_tokens)
        head = self.tokenizer.decode(ids[:offset], skip_special_tokens=skip_special_tokens) if offset else ""
        if whole.startswith(head) and not head.endswith("\ufffd"):
            return whole[len(head):]
        return self.tokenizer.decode(ids[offset:], skip_special_tokens=skip_special_tokens)

    # -- turbomind (decoupled) -----------------------------------------------------------------

    async def turbomind(self, requests):
        if len(requests) != 1:
            raise ValueError(f"the turbomind model takes one request at a time, got {len(requests)}")
        request = dict(requests[0].items())
        get = _getter(request)
        session_id = get("CORRID", None)
        start, end, stop = bool(get("START", 1)), bool(get("END", 1)), bool(get("STOP", 0))
        output_len = get("request_output_len", 512)
        if session_id is None:
            if not (start and end) or stop:
                raise ValueError("START=0, END=0 or STOP=1 need a session id (CORRID)")
            session_id = self.engine.new_session_id()
        if stop:  # cancel the session's running turn; its KV cache is kept
            await self.engine.stop_session(session_id)
            return
        if end and not start and output_len == 0:  # end the session (lmdeploy's Chatbot.end)
            await self.engine.end_session(session_id)
            self._histories.pop(session_id, None)
            return
        input_ids = _ids(request["input_ids"], get("input_lengths", None))
        step = get("step", 0)
        history = [] if start else self._histories.get(session_id, [])
        held = 0 if start else await self.engine.session_tokens(session_id)
        if not start and held == 0:
            raise ValueError(f"session {session_id} has no history (ended, or never started): "
                             "start it with START=1")
        if not start and not 0 <= step <= held:
            raise ValueError(f"step {step} is outside the {held} tokens session {session_id} holds")
        step = step if (step or start) else held
        history = history[:step] + [0] * max(0, step - len(history))
        session_len = get("session_len", None)
        if session_len:
            output_len = max(0, min(output_len, session_len - step - len(input_ids)))
        gen_config = self._turbomind_config(request, get, output_len)
        prompt_tokens = step + len(input_ids)
        if prompt_tokens >= self.engine.session_len:
            raise ValueError(f"{prompt_tokens} tokens (history {step} + input {len(input_ids)}) reach the "
                             f"server's session_len {self.engine.session_len}")
        generated: List[int] = []
        key = self._register(requests[0], session_id)
        try:
            async for out in self.engine.generate(None, session_id, gen_config, sequence_start=start,
                                                  sequence_end=end, step=step, input_ids=input_ids,
                                                  do_preprocess=False):
                if out.finish_reason == "error":
                    raise ValueError(out.response or "the engine failed the request")
                if out.finish_reason == "length" and not generated and not out.token_ids and output_len \
                        and out.generate_token_len == 0:
                    raise ValueError(f"{prompt_tokens} tokens leave no room to generate in session_len")
                generated += out.token_ids
                if out.token_ids or out.finish_reason:
                    ids = history + input_ids + generated
                    yield [{"output_ids": np.array(ids, dtype=np.uint32).reshape(1, 1, -1),
                            "sequence_length": np.array([[len(ids)]], dtype=np.uint32)}]
        finally:
            self._unregister(key)
        if end:
            self._histories.pop(session_id, None)
        else:
            self._histories[session_id] = history + input_ids + generated
            if len(self._histories) > _MAX_HISTORIES:
                await self._forget_ended_sessions()

    def _register(self, request, session_id: int):
        return self.cancellations.register(request, session_id) if self.cancellations else None

    def _unregister(self, key) -> None:
        if self.cancellations:
            self.cancellations.unregister(key)

    async def _forget_ended_sessions(self) -> None:
        """Drops the ids of sessions the engine no longer holds (ended by its session cap or idle timeout)."""
        for session_id in list(self._histories):
            if not await self.engine.session_tokens(session_id):
                self._histories.pop(session_id, None)

    def _turbomind_config(self, request, get, output_len: int) -> GenerationConfig:
        top_k = get("runtime_top_k", 0)
        temperature = float(get("temperature", 0.8))
        stop_ids = _word_ids(request.get("stop_words_list"))
        bad_ids = _word_ids(request.get("bad_words_list"))
        ignore_eos = self.eos_id in bad_ids
        seed = get("random_seed", None)
        return GenerationConfig(
            max_new_tokens=output_len, do_sample=not (top_k == 1 or temperature == 0), top_k=top_k,
            top_p=float(get("runtime_top_p", 1.0)), temperature=temperature,
            repetition_penalty=float(get("repetition_penalty", 1.0)), ignore_eos=ignore_eos,
            random_seed=None if seed is None else seed % (1 << 63), stop_token_ids=stop_ids,
            bad_token_ids=[t for t in bad_ids if t != self.eos_id] or None, skip_special_tokens=False,
            include_stop_str_in_output=True)  # TurboMind's output_ids end with the stop id

    # -- the text model (Triton's LLM convention, decoupled) -------------------------------------

    async def text(self, requests):
        if len(requests) != 1:
            raise ValueError(f"the text model takes one request at a time, got {len(requests)}")
        request = dict(requests[0].items())
        prompt = _text(np.asarray(request["text_input"]).reshape(-1)[0])
        stream = _flag(request.get("stream"), False)
        exclude_input = _flag(request.get("exclude_input_in_output"), False)
        raw = request.get("sampling_parameters")
        gen_config = text_generation_config(_text(np.asarray(raw).reshape(-1)[0]) if raw is not None else "")
        prefix = "" if exclude_input else prompt
        whole = ""
        session_id = self.engine.new_session_id()
        key = self._register(requests[0], session_id)
        try:
            async for out in self.engine.generate(prompt, session_id, gen_config, do_preprocess=False):
                if out.finish_reason == "error":
                    raise ValueError(out.response or "the engine failed the request")
                if out.finish_reason == "length" and out.generate_token_len == 0 and gen_config.max_new_tokens:
                    raise ValueError(f"the prompt ({out.input_token_len} tokens) leaves no room to generate "
                                     f"in session_len {self.engine.session_len}")
                if stream:  # one response per engine step, as vLLM's backend (a token may add no text yet)
                    if out.response or out.token_ids or prefix:
                        yield [{"text_output": np.array([(prefix + out.response).encode("utf-8")],
                                                        dtype=np.bytes_)}]
                        prefix = ""
                else:
                    whole += out.response
        finally:
            self._unregister(key)
        if not stream:
            yield [{"text_output": np.array([(prefix + whole).encode("utf-8")], dtype=np.bytes_)}]

    # -- engine counters -------------------------------------------------------------------------

    async def stats(self, requests):
        stats = await self.engine.astats()
        blob = json.dumps(dict(stats, sessions_with_history=len(self._histories))).encode()
        return [{"STATS_JSON": np.array([blob], dtype=np.bytes_)} for _ in requests]


def text_generation_config(sampling_parameters: str) -> GenerationConfig:
    """The ``GenerationConfig`` of the text model's ``sampling_parameters`` JSON (vLLM's keys and defaults)."""
    params = dict(P.TEXT_SAMPLING_DEFAULTS)
    if sampling_parameters.strip():
        try:
            given = json.loads(sampling_parameters)
        except ValueError as error:
            raise ValueError(f"sampling_parameters is not JSON: {error}") from None
        if not isinstance(given, dict):
            raise ValueError(f"sampling_parameters must be a JSON object, got {type(given).__name__}")
        unknown = sorted(set(given) - set(params))
        if unknown:
            raise ValueError(f"unknown sampling_parameters {unknown}; known: {sorted(params)}")
        params.update({k: v for k, v in given.items() if v is not None})
    stop = params["stop"]
    stop = [stop] if isinstance(stop, str) else stop
    temperature, top_k = float(params["temperature"]), int(params["top_k"])
    return GenerationConfig(
        max_new_tokens=int(params["max_tokens"]), do_sample=temperature > 0 and top_k != 1,
        temperature=temperature if temperature > 0 else 1.0, top_p=float(params["top_p"]),
        top_k=max(0, top_k), repetition_penalty=float(params["repetition_penalty"]), stop_words=stop or None,
        random_seed=params["seed"], min_new_tokens=int(params["min_tokens"]) or None,
        ignore_eos=bool(params["ignore_eos"]), skip_special_tokens=bool(params["skip_special_tokens"]),
        include_stop_str_in_output=bool(params["include_stop_str_in_output"]))


def _text(value) -> str:
    return value.decode("utf-8") if isinstance(value, (bytes, np.bytes_)) else str(value)


def _flag(value, default: bool) -> bool:
    return bool(np.asarray(value).reshape(-1)[0]) if value is not None else default


def _getter(request):
    def get(name: str, default):
        if name not in request:
            return default
        values = np.asarray(request[name]).reshape(-1)
        if values.size != 1:
            raise ValueError(f"{name} must hold one value, got shape {list(np.shape(request[name]))}")
        return values[0].item()
    return get


def _ids(input_ids, input_lengths: Optional[int]) -> List[int]:
    ids = np.asarray(input_ids)
    if ids.ndim != 2 or ids.shape[0] != 1:
        raise ValueError(f"input_ids must have shape [1, L], got {list(ids.shape)}")
    row = [int(t) for t in ids[0]]
    if input_lengths is not None:
        if not 0 <= input_lengths <= len(row):
            raise ValueError(f"input_lengths {input_lengths} is outside the {len(row)} input_ids sent")
        row = row[:input_lengths]
    return row


def _word_ids(words) -> List[int]:
    """Ids of a ``[1, 2, K]`` stop/bad words list (ids, then end offsets; padding -1); one id per word."""
    if words is None:
        return []
    words = np.asarray(words)
    if words.ndim != 3 or words.shape[1] != 2:
        raise ValueError(f"stop_words_list / bad_words_list must have shape [1, 2, K], got {list(words.shape)}")
    ids, offsets = words[0, 0], words[0, 1]
    ends = [int(o) for o in offsets if o > 0]
    starts = [0] + ends[:-1]
    return [int(ids[end - 1]) for start, end in zip(starts, ends) if end - 1 < len(ids) and ids[end - 1] >= 0]
