"""xgrammar grammars (compiled once, cached), per-request matchers, and the batched logits mask."""
from __future__ import annotations

import re
import threading
import weakref
from collections import OrderedDict
from typing import List, Sequence

import torch

from .response_format import check_response_format, grammar_key

NEG_INF = float("-inf")
_MAX_GRAMMARS = 256  # compiled grammars kept per compiler (least recently used dropped)

_lock = threading.Lock()
# tokenizer -> {model vocab size: _Compiler}; weak so a dropped engine's tokenizer is not kept alive.
_compilers: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()


class Grammar:
    """A compiled response_format: xgrammar's grammar, plus the tokens it must never allow.

    ``keep_words`` (uint32 words, a bit per token, or None) clears tokens with raw control
    characters for JSON: xgrammar 0.2.8's rule for strings with ``minLength``/``maxLength``
    admits them, and JSON forbids them (compact JSON has no whitespace besides spaces).
    """

    __slots__ = ("compiled", "keep_words")

    def __init__(self, compiled, keep_words=None):
        self.compiled = compiled
        self.keep_words = keep_words


class Matcher:
    """One request's position in its grammar. It advances only on the tokens it is given."""

    __slots__ = ("_matcher", "_keep_words")

    def __init__(self, grammar: Grammar, stop_token_ids: Sequence[int]):
        import xgrammar as xgr
        info = grammar.compiled.tokenizer_info
        stops = [t for t in stop_token_ids if t < info.vocab_size] or list(info.stop_token_ids)
        if stops:
            self._matcher = xgr.GrammarMatcher(grammar.compiled, override_stop_tokens=stops)
        else:
            self._matcher = xgr.GrammarMatcher(grammar.compiled, terminate_without_stop_token=True)
        self._keep_words = grammar.keep_words

    def accept_token(self, token_id: int) -> bool:
        return self._matcher.accept_token(token_id)

    def is_terminated(self) -> bool:
        return self._matcher.is_terminated()

    def fill_bitmask(self, bitmask: torch.Tensor, words, row: int) -> None:
        """Row ``row`` of the int32 ``bitmask`` (``words``: its uint32 numpy view) = the tokens allowed next."""
        self._matcher.fill_next_token_bitmask(bitmask, row)
        if self._keep_words is not None:
            words[row] &= self._keep_words


class _Compiler:
    """An xgrammar ``GrammarCompiler`` for one tokenizer and logits width, with a bounded grammar cache."""

    def __init__(self, tokenizer, vocab_size: int):
        import xgrammar as xgr
        # The model's logits may be wider than the tokenizer (padded lm_head): the masks cover them all.
        info = xgr.TokenizerInfo.from_huggingface(tokenizer, vocab_size=vocab_size)
        self.compiler = xgr.GrammarCompiler(info, max_threads=1)
        self.json_keep_words = _without_control_tokens(info, vocab_size)
        self.grammars: "OrderedDict[tuple, object]" = OrderedDict()
        self.num_compiled = 0
        self.lock = threading.Lock()

    def get(self, key: tuple):
        with self.lock:
            grammar = self.grammars.get(key)
            if grammar is not None:
                self.grammars.move_to_end(key)
                return grammar
        kind = key[0]
        grammar = Grammar(self._compile(*key), self.json_keep_words if kind != "regex_schema" else None)
        with self.lock:
            self.num_compiled += 1
            self.grammars[key] = grammar
            while len(self.grammars) > _MAX_GRAMMARS:
                self.grammars.popitem(last=False)
        return grammar

    def _compile(self, kind: str, source: str):
        try:
            if kind == "json_object":  # OpenAI's: an object, with any properties
                return self.compiler.compile_json_schema('{"type": "object"}', any_whitespace=False,
                                                         strict_mode=False)
            if kind == "json_schema":
                # Compact JSON (no free whitespace): small models otherwise wander in whitespace.
                return self.compiler.compile_json_schema(source, any_whitespace=False)
            return self.compiler.compile_regex(source)
        except RuntimeError as exc:
            what = "regex_schema" if kind == "regex_schema" else "json_schema.schema"
            raise ValueError(f"response_format {what} cannot be compiled: {_clean(str(exc))}") from None


def _without_control_tokens(info, vocab_size: int):
    """uint32 words with every bit set except those of tokens whose text has a byte < 0x20."""
    import numpy as np
    bits = np.ones(((vocab_size + 31) // 32) * 32, dtype=bool)
    texts = info.decoded_vocab[:vocab_size]
    data = np.frombuffer(b"".join(texts), dtype=np.uint8)
    ends = np.cumsum([len(t) for t in texts])
    # The token each control byte belongs to: the first whose end lies past the byte.
    bits[np.searchsorted(ends, np.flatnonzero(data < 0x20), side="right")] = False
    return np.packbits(bits.reshape(-1, 32)[:, ::-1], axis=1).view(">u4").astype(np.uint32).ravel()


def _clean(message: str) -> str:
    """xgrammar's C++ message without its log prefix ('[time] file.cc:123: Check failed: ... : ')."""
    message = re.sub(r"^\[[\d:]+\]\s+\S+:\d+:\s*", "", message.strip())
    message = re.sub(r"^Check failed: \(.*?\) is false:\s*", "", message)
    return message.splitlines()[0] if message else "unknown error"


def _compiler(tokenizer, vocab_size: int) -> _Compiler:
    with _lock:
        by_vocab = _compilers.setdefault(tokenizer, {})
        compiler = by_vocab.get(vocab_size)
        if compiler is None:
            compiler = by_vocab[vocab_size] = _Compiler(tokenizer, vocab_size)
        return compiler


def compile_response_format(tokenizer, vocab_size: int, response_format: dict):
    """The compiled grammar of ``response_format`` (None for ``{'type': 'text'}``), cached per
    (tokenizer, ``vocab_size`` = the model's logits width, format). Raises ValueError naming the
    problem for a malformed format or a schema/regex xgrammar cannot compile."""
    response_format = check_response_format(response_format)
    if response_format is None:
        return None
    return _compiler(tokenizer, vocab_size).get(grammar_key(response_format))


def new_matcher(grammar: Grammar, stop_token_ids: Sequence[int]) -> Matcher:
    """A matcher for one request's turn. The grammar may end only with one of ``stop_token_ids``
    (the request's stop ids; the tokenizer's EOS when it has none, e.g. with ``ignore_eos``)."""
    return Matcher(grammar, stop_token_ids)


def apply_grammar_masks(scores: torch.Tensor, matchers: List[Matcher], idx: List[int],
                        conflicts: Sequence[int] = ()) -> torch.Tensor:
    """``scores`` where row ``idx[j]`` keeps only the tokens ``matchers[j]`` allows next (others -inf).

    The bitmask is filled on the host (microseconds a row) and applied on ``scores``' device
    (xgrammar's kernel on CPU, in place; torch ops elsewhere, a new tensor): no host wait.
    ``conflicts``: rows whose earlier bans or logits processors may have excluded every token the
    grammar allows; such a row falls back to a uniform choice among the grammar's tokens (the
    grammar wins).
    """
    num_rows, vocab_size = scores.shape
    bitmask = torch.empty(num_rows, (vocab_size + 31) // 32, dtype=torch.int32)
    words = bitmask.numpy().view("uint32")
    for matcher, i in zip(matchers, idx):
        matcher.fill_bitmask(bitmask, words, i)
    device = scores.device
    if device.type == "cpu":
        import xgrammar as xgr
        with torch.inference_mode():  # the model's logits are inference tensors
            xgr.apply_token_bitmask_inplace(scores, bitmask, vocab_size=vocab_size, indices=list(idx), backend="cpu")
    else:
        scores = _apply_torch(scores, bitmask, idx)
    if conflicts:
        rows_t = _index(list(conflicts), device)
        allowed = _unpack(bitmask[list(conflicts)].to(device, non_blocking=True), vocab_size)
        rows = scores[rows_t]
        dead = rows.isneginf().all(dim=-1, keepdim=True)
        uniform = torch.zeros_like(rows).masked_fill_(~allowed, NEG_INF)
        scores = scores.index_put((rows_t,), torch.where(dead, uniform, rows))
    return scores


def _apply_torch(scores: torch.Tensor, bitmask: torch.Tensor, idx: List[int]) -> torch.Tensor:
    """The mask with torch ops on any device (rows ``idx`` of the host ``bitmask``), out of place."""
    idx_t = _index(idx, scores.device)
    allowed = _unpack(bitmask[idx].to(scores.device, non_blocking=True), scores.shape[-1])
    return scores.index_put((idx_t,), scores[idx_t].masked_fill(~allowed, NEG_INF))


def _unpack(bits: torch.Tensor, vocab_size: int) -> torch.Tensor:
    """int32 bitmask rows -> bool [rows, vocab_size] (bit j of word w is token 32 * w + j)."""
    shifts = torch.arange(32, dtype=torch.int32, device=bits.device)
    return ((bits.unsqueeze(-1) >> shifts) & 1).bool().flatten(1)[:, :vocab_size]


def _index(values, device) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.long).to(device, non_blocking=True)
