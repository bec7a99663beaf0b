"""Incremental detokenization: whole characters only, special tokens as configured, stop strings cut."""
from __future__ import annotations

from typing import List, Tuple

from .sampling_params import SamplingParams

REPLACEMENT_CHAR = "\ufffd"
NUM_CONTEXT_TOKENS = 5  # prompt tokens decoded ahead of the output, so its first token decodes in context


class IncrementalDetokenizer:
    """Turns one request's generated ids into text deltas, token by token.

    Each token is decoded with a few tokens before it (vLLM/TGI prefix and read offsets), never the
    whole output again; text ending in a partial UTF-8 character is held until the character is
    complete. Special tokens follow HF's slow-tokenizer rules: skipped with
    ``skip_special_tokens``, and with ``spaces_between_special_tokens`` the kept added tokens and the
    text between them are joined with ``' '``. ``clean_up_tokenization_spaces`` is not applied.

    Stop strings are matched on the text, across token boundaries; the text is cut before the first
    one (after it with ``include_stop_str_in_output``). With ``stream_holdback`` the text that could
    still become a stop string is held back, so no part of a stop string is ever emitted; without
    it text is emitted at once and the start of a stop string may already be out when it completes.
    """

    def __init__(self, tokenizer, prompt_ids: List[int], params: SamplingParams, stream_holdback: bool = True):
        backend = getattr(tokenizer, "backend_tokenizer", None)
        self._decode = backend.decode if backend is not None else tokenizer.decode
        added = tokenizer.added_tokens_decoder
        self._skipped = {i for i, t in added.items() if t.special} if params.skip_special_tokens else set()
        self._added = {i: t.content for i, t in added.items() if i not in self._skipped}
        self._spaces_between = params.spaces_between_special_tokens
        self._stops = tuple(s for s in params.stop_strings if s)
        self._include_stop = params.include_stop_str_in_output
        self._holdback = stream_holdback
        self._max_stop_len = max(map(len, self._stops), default=0)

        # The current run of ordinary tokens: text of run[prefix_offset:read_offset] is already out.
        self._run: List[int] = []
        self._prefix_offset = 0
        self._read_offset = 0
        self._prefix_text = ""
        self._start_run(self._prompt_context(prompt_ids))

        self._has_text = False        # some text came out of the tokens so far
        self._separator_due = False   # a ' ' goes before the next text (spaces_between_special_tokens)
        self._pending = ""            # decoded but held back (a possible stop string start)
        self._tail = ""               # emitted text a stop string may still start in (no holdback)
        self._stopped = False
        self.output_text = ""

    def step(self, token_id: int) -> Tuple[str, bool]:
        """Add one generated token; returns (text newly safe to emit, whether a stop string was hit)."""
        if self._stopped:
            return "", True
        if token_id in self._skipped:
            return "", False
        if token_id in self._added:
            text = self._piece(self._flush_run())
            self._end_subtext()
            text += self._piece(self._added[token_id])
            self._end_subtext()
        else:
            text = self._piece(self._decode_next(token_id))
        return self._accept(text)

    def finish(self) -> str:
        """The text still held back, once generation has ended for another reason than a stop string."""
        if self._stopped:
            return ""
        text, hit = self._accept(self._piece(self._flush_run()))
        if not hit:
            text += self._pending
            self.output_text += self._pending
            self._pending = ""
        return text

    # -- tokens to text -----------------------------------------------------------------------

    def _prompt_context(self, prompt_ids: List[int]) -> List[int]:
        context = []
        for token_id in reversed(prompt_ids):
            if token_id in self._skipped:
                continue
            if token_id in self._added or len(context) == NUM_CONTEXT_TOKENS:
                break
            context.append(token_id)
        context.reverse()
        # A prompt ending inside a character would shift every later offset.
        return [] if self._decode(context).endswith(REPLACEMENT_CHAR) else context

    def _start_run(self, context: List[int]) -> None:
        self._run = list(context)
        self._prefix_offset = 0
        self._read_offset = len(context)
        self._prefix_text = self._decode(context) if context else ""

    def _decode_next(self, token_id: int) -> str:
        self._run.append(token_id)
        new_text = self._decode(self._run[self._prefix_offset:])
        if len(new_text) <= len(self._prefix_text) or new_text.endswith(REPLACEMENT_CHAR):
            return ""   # nothing new yet, or a character still incomplete
        delta = new_text[len(self._prefix_text):]
        del self._run[:self._read_offset]
        self._prefix_offset, self._read_offset = 0, len(self._run)
        self._prefix_text = self._decode(self._run)
        return delta

    def _flush_run(self) -> str:
        """What the current run has not emitted, incomplete characters included; starts a new run."""
        new_text = self._decode(self._run[self._prefix_offset:]) if self._read_offset < len(self._run) else ""
        delta = new_text[len(self._prefix_text):]
        self._start_run([])
        return delta

    def _piece(self, text: str) -> str:
        if not text:
            return text
        self._has_text = True
        if self._separator_due:
            self._separator_due = False
            return " " + text
        return text

    def _end_subtext(self) -> None:
        # HF joins the non-empty runs and added tokens with ' '.
        self._separator_due = self._spaces_between and self._has_text

    # -- stop strings and holdback ------------------------------------------------------------

    def _accept(self, text: str) -> Tuple[str, bool]:
        if not text:
            return "", False
        window = self._tail + self._pending + text
        hit = self._find_stop(window)
        if hit is not None:
            start, stop = hit
            cut = start + len(stop) if self._include_stop else start
            out = window[len(self._tail):cut] if cut > len(self._tail) else ""
            self._stopped = True
            self._pending = ""
            self.output_text += out
            return out, True
        keep = self._partial_stop_len(window) if self._holdback else 0
        out = window[len(self._tail):len(window) - keep]
        self._pending = window[len(window) - keep:]
        if not self._holdback and self._stops:
            self._tail = window[-(self._max_stop_len - 1):] if self._max_stop_len > 1 else ""
        self.output_text += out
        return out, False

    def _find_stop(self, text: str):
        """(start, stop string) of the earliest stop string in text, the shortest on a tie; else None."""
        best = None
        for stop in self._stops:
            start = text.find(stop)
            if start >= 0 and (best is None or (start, len(stop)) < (best[0], len(best[1]))):
                best = (start, stop)
        return best

    def _partial_stop_len(self, text: str) -> int:
        """Length of the longest end of text that a stop string starts with."""
        longest = 0
        for stop in self._stops:
            for n in range(min(len(stop) - 1, len(text)), longest, -1):
                if text.endswith(stop[:n]):
                    longest = n
                    break
        return longest
