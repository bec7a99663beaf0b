"""GenerationConfig: lmdeploy's fields and defaults, validation naming the field, and how the engine applies it."""
import dataclasses
import math

import pytest

from lmwrap_engine import GenerationConfig

# lmdeploy v0.6.2's GenerationConfig, field by field, in its order (compat.md section 4).
LMDEPLOY_V062_DEFAULTS = dict(
    n=1, max_new_tokens=512, do_sample=False, top_p=1.0, top_k=50, min_p=0.0, temperature=0.8,
    repetition_penalty=1.0, ignore_eos=False, random_seed=None, stop_words=None, bad_words=None,
    stop_token_ids=None, bad_token_ids=None, min_new_tokens=None, skip_special_tokens=True, logprobs=None,
    response_format=None, logits_processors=None)
# Added by later lmdeploy versions (v0.7, v0.10).
LATER_DEFAULTS = dict(spaces_between_special_tokens=True, include_stop_str_in_output=False)


def test_defaults_equal_lmdeploy():
    config = GenerationConfig()
    names = [f.name for f in dataclasses.fields(GenerationConfig)]
    assert {name: getattr(config, name) for name in names} == {**LMDEPLOY_V062_DEFAULTS, **LATER_DEFAULTS}
    # v0.6.2's fields keep their relative order, so its keyword and positional uses both still mean the same.
    assert [n for n in names if n in LMDEPLOY_V062_DEFAULTS] == list(LMDEPLOY_V062_DEFAULTS)
    assert names[:10] == list(LMDEPLOY_V062_DEFAULTS)[:10]


@pytest.mark.parametrize("field, value", [
    ("top_p", 0), ("top_p", 1.5), ("top_p", -0.1), ("top_p", math.nan),
    ("temperature", -1), ("temperature", 3), ("temperature", math.nan),
    ("top_k", -1), ("top_k", 1.5),
    ("min_p", 2), ("min_p", -0.5),
    ("n", 0), ("n", -2),
    ("max_new_tokens", -1), ("max_new_tokens", 2.5),
    ("min_new_tokens", -1),
    ("repetition_penalty", 0), ("repetition_penalty", -1.0),
    ("logprobs", -1), ("logprobs", 1025),
    # bad types
    ("top_p", "0.5"), ("top_p", None), ("temperature", "hot"), ("temperature", None), ("top_k", "5"),
    ("top_k", True), ("min_p", None), ("repetition_penalty", "1"), ("n", "1"), ("n", 1.0),
    ("max_new_tokens", "64"), ("max_new_tokens", True), ("logprobs", 1.0), ("random_seed", "42"),
    ("random_seed", 4.2), ("do_sample", "yes"), ("do_sample", None), ("ignore_eos", "false"),
    ("skip_special_tokens", None), ("spaces_between_special_tokens", 1.5), ("include_stop_str_in_output", "no"),
    ("stop_words", 5), ("stop_words", [1]), ("stop_words", [""]), ("stop_words", {"a": 1}),
    ("bad_words", [None]), ("stop_token_ids", 2.0), ("stop_token_ids", ["2"]), ("stop_token_ids", [-1]),
    ("stop_token_ids", -3), ("bad_token_ids", [1.5]), ("logits_processors", 5), ("logits_processors", [5]),
])
def test_invalid_value_raises_value_error_naming_the_field(field, value):
    with pytest.raises(ValueError, match=field):
        GenerationConfig(**{field: value})


@pytest.mark.parametrize("kwargs", [
    dict(top_p=1), dict(top_p=0.01), dict(temperature=0), dict(temperature=2), dict(top_k=0), dict(min_p=1),
    dict(max_new_tokens=0), dict(max_new_tokens=None), dict(logprobs=0), dict(random_seed=0),
    dict(stop_token_ids=(1, 2)), dict(logits_processors=[lambda ids, scores: scores]),
])
def test_boundary_values_are_accepted(kwargs):
    GenerationConfig(**kwargs)


def test_n_above_one_is_not_implemented():
    with pytest.raises(NotImplementedError, match="n > 1"):
        GenerationConfig(n=2)


@pytest.mark.parametrize("fmt", [
    {"type": "json_object"}, {"type": "text"}, {"type": "regex_schema", "regex_schema": r"\d+"},
    {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "object"}}},
    {"type": "json_schema", "json_schema": {"schema": '{"type": "integer"}'}},
])
def test_response_format_accepted(fmt):
    assert GenerationConfig(response_format=fmt).response_format == fmt


@pytest.mark.parametrize("fmt", [
    "json", {"type": "yaml"}, {}, {"type": "json_schema"}, {"type": "json_schema", "json_schema": {"name": "x"}},
    {"type": "json_schema", "json_schema": {"schema": "{not json"}},
    {"type": "json_schema", "json_schema": {"name": 3, "schema": {}}},
    {"type": "regex_schema"}, {"type": "regex_schema", "regex_schema": ""},
])
def test_malformed_response_format_raises_value_error(fmt):
    with pytest.raises(ValueError, match="response_format"):
        GenerationConfig(response_format=fmt)


def test_single_stop_word_and_id_become_lists():
    config = GenerationConfig(stop_words="<|im_end|>", bad_words="bad", stop_token_ids=2, bad_token_ids=7)
    assert config.stop_words == ["<|im_end|>"]
    assert config.bad_words == ["bad"]
    assert config.stop_token_ids == [2]
    assert config.bad_token_ids == [7]


# -- applied by the engine --------------------------------------------------------------------

def test_ignore_eos_ignores_the_template_stop_words_too(pipe):
    """The tiny model's template stop word is its EOS token: with ignore_eos it must not end the reply."""
    prompt = [{"role": "user", "content": "hi"}]
    eos = pipe.tokenizer.convert_tokens_to_ids("<|im_end|>")
    natural = pipe(prompt, gen_config=GenerationConfig(max_new_tokens=48))
    assert natural.finish_reason == "stop" and natural.generate_token_len < 48  # greedy reaches EOS here
    ignored = pipe(prompt, gen_config=GenerationConfig(max_new_tokens=48, ignore_eos=True))
    assert ignored.finish_reason == "length"
    assert ignored.generate_token_len == len(ignored.token_ids) == 48
    assert ignored.token_ids[:natural.generate_token_len] == natural.token_ids
    assert eos in ignored.token_ids  # it went past the EOS it would have stopped on


def test_stop_token_ids_stop_without_emitting_the_stop_token(pipe):
    free_run = pipe("hello", gen_config=GenerationConfig(max_new_tokens=16, ignore_eos=True)).token_ids
    k = next(i for i in range(2, 16) if free_run[i] not in free_run[:i])
    res = pipe("hello", gen_config=GenerationConfig(max_new_tokens=16, ignore_eos=True, stop_token_ids=[free_run[k]]))
    assert res.finish_reason == "stop"
    assert res.token_ids == free_run[:k]
    assert res.text == pipe.tokenizer.decode(free_run[:k], skip_special_tokens=True)


def test_logprobs_per_generated_token(pipe):
    res = pipe("hello", gen_config=GenerationConfig(max_new_tokens=6, ignore_eos=True, logprobs=3))
    assert len(res.logprobs) == res.generate_token_len == 6
    for token_id, entry in zip(res.token_ids, res.logprobs):
        assert token_id in entry and 3 <= len(entry) <= 4
        assert all(lp <= 0 for lp in entry.values())
        assert entry[token_id] == max(entry.values())  # greedy picks the most likely token
    assert pipe("hello", gen_config=GenerationConfig(max_new_tokens=2)).logprobs is None


def test_gen_config_of_the_wrong_type_is_a_type_error(pipe):
    with pytest.raises(TypeError, match="GenerationConfig"):
        pipe("hello", gen_config=dict(max_new_tokens=4))
    stats = pipe.stats()
    assert stats["num_free_blocks"] == stats["num_blocks"]
