"""Structured output: ``response_format`` (lmdeploy's types) enforced with xgrammar token masks.

``check_response_format`` validates the shape (no heavy imports); ``compile_response_format``
compiles it once per (tokenizer, vocab size, format) into a grammar; each request gets its own
``GrammarMatcher`` (``new_matcher``); the sampler masks the logits of the rows that have one
(``apply_grammar_masks``).
"""
from .response_format import check_response_format
from .grammar import apply_grammar_masks, compile_response_format, new_matcher

__all__ = ["check_response_format", "compile_response_format", "new_matcher", "apply_grammar_masks"]
