"""Per-request sampling and stopping settings, resolved to token ids once when the request arrives."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Iterable, List, Optional, Sequence, Tuple


@dataclass(frozen=True)
class SamplingParams:
    """What the sampler and the detokenizer need for one request (engine-internal).

    Greedy decoding (``do_sample=False``, ``temperature == 0`` or ``top_k == 1``, as in lmdeploy)
    takes the argmax, but unlike lmdeploy the repetition penalty, bad words, ``min_new_tokens`` and
    ``logits_processors`` still apply to it, as in transformers. ``top_k == 0`` means no top-k.
    """

    max_new_tokens: int
    min_new_tokens: int = 0
    greedy: bool = True
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    min_p: float = 0.0
    repetition_penalty: float = 1.0
    seed: int | None = None
    ignore_eos: bool = False
    # EOS ids (unless ignore_eos) + gen_config.stop_token_ids + stop words that are exactly one token.
    stop_token_ids: Tuple[int, ...] = ()
    # bad_token_ids + bad words that are one token.
    bad_token_ids: Tuple[int, ...] = ()
    # Multi-token bad words: the last token is banned right after the others were generated (vLLM).
    bad_words_ids: Tuple[Tuple[int, ...], ...] = ()
    # All stop words, matched on the decoded text.
    stop_strings: Tuple[str, ...] = ()
    include_stop_str_in_output: bool = False
    skip_special_tokens: bool = True
    spaces_between_special_tokens: bool = True
    logprobs: int | None = None
    logits_processors: tuple = ()
    # The compiled response_format (a lmwrap_engine.guided Grammar, shared and read-only), or None.
    grammar: Any = field(default=None, compare=False)

    @property
    def is_plain_greedy(self) -> bool:
        """Greedy with nothing that changes the logits: the sampler may just take the argmax."""
        return (self.greedy and self.repetition_penalty == 1.0 and not self.bad_token_ids
                and not self.bad_words_ids and not self.logits_processors and self.logprobs is None
                and self.grammar is None)

    @classmethod
    def from_generation_config(cls, gen_config, tokenizer, eos_token_ids: List[int],
                               max_new_tokens: int, vocab_size: Optional[int] = None) -> "SamplingParams":
        """Resolve a public ``GenerationConfig`` against ``tokenizer``.

        A ``response_format`` is compiled here (cached), for logits ``vocab_size`` wide (default:
        the tokenizer's size), so a schema that cannot be compiled raises ValueError before the
        request is queued.

        ``max_new_tokens`` is the engine's resolved budget (``gen_config.max_new_tokens`` may be None).
        Stop words that encode to a single token also become stop ids, since special tokens such as
        ``'<|im_end|>'`` vanish from the text when ``skip_special_tokens`` is set. Bad words are
        banned both as written and with a leading space (how they appear mid-text), as vLLM does.
        """
        stop_words = list(gen_config.stop_words or [])
        stop_ids = [] if gen_config.ignore_eos else list(eos_token_ids)
        stop_ids += gen_config.stop_token_ids or []
        for word in stop_words:
            ids = _encode(tokenizer, word)
            if len(ids) == 1:
                stop_ids.append(ids[0])

        bad_ids = list(gen_config.bad_token_ids or [])
        bad_words_ids = []
        for ids in _bad_word_encodings(tokenizer, gen_config.bad_words or []):
            if len(ids) == 1:
                bad_ids.append(ids[0])
            elif ids:
                bad_words_ids.append(tuple(ids))

        grammar = None
        if gen_config.response_format is not None:
            from ..guided import compile_response_format
            grammar = compile_response_format(tokenizer, vocab_size or len(tokenizer), gen_config.response_format)

        greedy = gen_config.is_greedy
        return cls(
            max_new_tokens=max_new_tokens,
            min_new_tokens=gen_config.min_new_tokens or 0,
            greedy=greedy,
            # Settings that greedy decoding ignores are reset so the params say what is applied.
            temperature=1.0 if greedy else float(gen_config.temperature),
            top_k=0 if greedy else gen_config.top_k,
            top_p=1.0 if greedy else float(gen_config.top_p),
            min_p=0.0 if greedy else float(gen_config.min_p),
            repetition_penalty=float(gen_config.repetition_penalty),
            seed=gen_config.random_seed,
            ignore_eos=gen_config.ignore_eos,
            stop_token_ids=_unique(stop_ids),
            bad_token_ids=_unique(bad_ids),
            bad_words_ids=_unique(bad_words_ids),
            stop_strings=_unique(stop_words),
            include_stop_str_in_output=gen_config.include_stop_str_in_output,
            skip_special_tokens=gen_config.skip_special_tokens,
            spaces_between_special_tokens=gen_config.spaces_between_special_tokens,
            logprobs=gen_config.logprobs,
            logits_processors=tuple(gen_config.logits_processors or ()),
            grammar=grammar,
        )


def _encode(tokenizer, text: str) -> List[int]:
    return list(tokenizer.encode(text, add_special_tokens=False))


def _bad_word_encodings(tokenizer, words: Sequence[str]) -> Iterable[List[int]]:
    for word in words:
        plain = _encode(tokenizer, word.lstrip())
        yield plain
        spaced = _encode(tokenizer, " " + word.lstrip())
        # Only when the space makes a different word token rather than an extra space token.
        if plain and spaced and spaced[0] != plain[0] and len(spaced) == len(plain):
            yield spaced


def _unique(items) -> tuple:
    return tuple(dict.fromkeys(items))
