"""IncrementalDetokenizer: streamed text equals a full decode; whole characters; stop strings and holdback."""
import random

import pytest
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

from lmwrap_engine.engine.detokenizer import IncrementalDetokenizer
from lmwrap_engine.engine.sampling_params import SamplingParams

CORPUS = [
    "Hello world! This is a small test of the tokenizer.",
    "你好，世界！这是一个中文测试。今天天气很好。",
    "emoji 😀🎉👍🏽 and café, naïve, Ünïcödé, Ελληνικά, русский",
    "Thought: I should look it up.\nAction: search\nObservation: done\n",
] * 20
SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
ADDED_TOKEN = "<tool>"   # an added token that is not special: never skipped


def build_tokenizer() -> PreTrainedTokenizerFast:
    """A byte-level BPE trained in memory: some characters are one token, others split into bytes."""
    model = Tokenizer(models.BPE())
    model.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    model.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=SPECIAL_TOKENS,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    model.train_from_iterator(CORPUS, trainer)
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=model, eos_token="<|endoftext|>",
                                        additional_special_tokens=SPECIAL_TOKENS[1:],
                                        clean_up_tokenization_spaces=False)
    tokenizer.add_tokens([ADDED_TOKEN])
    return tokenizer


def byte_ids(tokenizer, text: str) -> list:
    """One token per UTF-8 byte, so every multi-byte character is split across tokens."""
    mapped = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False).pre_tokenize_str(text)[0][0]
    return tokenizer.convert_tokens_to_ids(list(mapped))


@pytest.fixture(scope="module")
def tok():
    return build_tokenizer()


def params(**overrides) -> SamplingParams:
    return SamplingParams(max_new_tokens=1000, **overrides)


def stream(tokenizer, ids, prompt_ids=(), stream_holdback=True, **overrides):
    """(list of step outputs, index of the step that hit a stop string or None, finish() text, detokenizer)."""
    detok = IncrementalDetokenizer(tokenizer, list(prompt_ids), params(**overrides), stream_holdback)
    chunks, hit_at = [], None
    for n, token_id in enumerate(ids):
        text, hit = detok.step(token_id)
        chunks.append(text)
        if hit:
            hit_at = n
            break
    return chunks, hit_at, ("" if hit_at is not None else detok.finish()), detok


def slow_decode(tokenizer, ids, skip_special_tokens, spaces_between_special_tokens) -> str:
    """HF slow-tokenizer semantics: runs between added tokens decoded apart, then joined."""
    added = tokenizer.added_tokens_decoder
    parts, run = [], []
    for token_id in ids:
        token = added.get(token_id)
        if token is not None and token.special and skip_special_tokens:
            continue
        if token is not None:
            parts += [tokenizer.decode(run)] if run else []
            parts.append(token.content)
            run = []
        else:
            run.append(token_id)
    parts += [tokenizer.decode(run)] if run else []
    return (" " if spaces_between_special_tokens else "").join(p for p in parts if p)


def random_ids(tokenizer, rng, n):
    ids = [rng.randrange(len(tokenizer)) for _ in range(n)]
    # Plenty of split multi-byte characters: CJK and emoji spelt byte by byte.
    for _ in range(3):
        at = rng.randrange(len(ids) + 1)
        ids[at:at] = byte_ids(tokenizer, rng.choice(["中文", "😀", "👍🏽", "é", "。"]))
    return ids


# -- the invariant: streamed text == full decode -------------------------------------------------

@pytest.mark.parametrize("skip", [True, False])
def test_stream_equals_decode_on_random_ids(tok, skip):
    rng = random.Random(skip)
    for _ in range(150):
        ids = random_ids(tok, rng, rng.randrange(1, 40))
        chunks, hit_at, rest, detok = stream(tok, ids, skip_special_tokens=skip, spaces_between_special_tokens=False)
        assert hit_at is None
        assert "".join(chunks) + rest == tok.decode(ids, skip_special_tokens=skip)
        assert detok.output_text == "".join(chunks) + rest


def test_stream_equals_decode_with_prompt_context(tok):
    rng = random.Random(1)
    prompts = [tok.encode("<|im_start|>user\nHi 你好<|im_end|>\n<|im_start|>assistant\n"),
               tok.encode("Thought: 😀 emoji ") + [0],
               byte_ids(tok, "😀")[:2],   # a prompt that ends inside a character
               []]
    for prompt in prompts:
        for _ in range(40):
            ids = random_ids(tok, rng, rng.randrange(1, 30))
            chunks, _, rest, _ = stream(tok, ids, prompt_ids=prompt)   # the defaults
            assert "".join(chunks) + rest == slow_decode(tok, ids, True, True)


def test_prompt_context_keeps_a_sentencepiece_leading_space():
    model = Tokenizer(models.BPE(unk_token="<unk>"))
    model.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first")
    model.decoder = decoders.Metaspace(replacement="▁", prepend_scheme="first")
    model.train_from_iterator(CORPUS, trainers.BpeTrainer(vocab_size=300, special_tokens=["<unk>", "</s>"],
                                                          show_progress=False))
    sp = PreTrainedTokenizerFast(tokenizer_object=model, eos_token="</s>", clean_up_tokenization_spaces=False)
    prompt, reply = sp.encode("Hello world!"), sp.encode("Hello world! This is")[len(sp.encode("Hello world!")):]
    assert sp.convert_ids_to_tokens(reply[0]).startswith("▁")
    chunks, _, rest, _ = stream(sp, reply, prompt_ids=prompt)
    assert "".join(chunks) + rest == " This is"   # continues the prompt's text
    chunks, _, rest, _ = stream(sp, reply)
    assert "".join(chunks) + rest == sp.decode(reply) == "This is"   # a decode of its own strips the space


@pytest.mark.parametrize("skip", [True, False])
def test_spaces_between_special_tokens_follow_slow_tokenizer(tok, skip):
    ids = tok.encode("<|im_start|>hi 你好<tool>x<|im_end|>")
    chunks, _, rest, _ = stream(tok, ids, skip_special_tokens=skip, spaces_between_special_tokens=True)
    assert "".join(chunks) + rest == ("hi 你好 <tool> x" if skip else "<|im_start|> hi 你好 <tool> x <|im_end|>")
    chunks, _, rest, _ = stream(tok, ids, skip_special_tokens=skip, spaces_between_special_tokens=False)
    assert "".join(chunks) + rest == ("hi 你好<tool>x" if skip else "<|im_start|>hi 你好<tool>x<|im_end|>")

    rng = random.Random(7)
    for _ in range(100):
        ids = random_ids(tok, rng, rng.randrange(1, 40))
        chunks, _, rest, _ = stream(tok, ids, skip_special_tokens=skip, spaces_between_special_tokens=True)
        assert "".join(chunks) + rest == slow_decode(tok, ids, skip, True)


def test_never_emits_a_partial_character(tok):
    text = "中文😀👍🏽é。ok"
    ids = byte_ids(tok, text)
    chunks, _, rest, _ = stream(tok, ids)
    assert "".join(chunks) + rest == text
    assert rest == ""
    assert all("\ufffd" not in c for c in chunks)
    assert chunks[:3] == ["", "", "中"]   # held until the third byte completes the character
    assert chunks.count("") > len(text)   # most bytes wait


# -- stop strings --------------------------------------------------------------------------------

def test_stop_string_split_across_tokens_is_cut(tok):
    ids = byte_ids(tok, "Hello Observation: done")
    chunks, hit_at, _, detok = stream(tok, ids, stop_strings=("Observation:",))
    assert hit_at == len(byte_ids(tok, "Hello Observation:")) - 1   # the token that completes it
    assert "".join(chunks) == detok.output_text == "Hello "
    assert detok.step(ids[0]) == ("", True) and detok.finish() == ""


def test_include_stop_str_in_output(tok):
    ids = tok.encode("Thought: x\nObservation: done")
    chunks, hit_at, _, _ = stream(tok, ids, stop_strings=("Observation:",), include_stop_str_in_output=True)
    assert hit_at is not None
    assert "".join(chunks) == "Thought: x\nObservation:"


def test_holdback_never_emits_a_partial_stop_string(tok):
    stop = "Observation:"
    steps = [byte_ids(tok, s) for s in ["abc ", "Obs", "erva", "r", "x"]]
    detok = IncrementalDetokenizer(tok, [], params(stop_strings=(stop,)))
    emitted = ["".join(detok.step(t)[0] for t in group) for group in steps]
    # "Obs" and "Observa" could still become the stop string; "Observar" cannot.
    assert emitted == ["abc ", "", "", "Observar", "x"]
    assert detok.finish() == ""

    detok = IncrementalDetokenizer(tok, [], params(stop_strings=(stop,)))
    out = "".join(detok.step(t)[0] for t in byte_ids(tok, "so Observ"))
    assert out == "so " and detok.finish() == "Observ"   # released when generation ends otherwise


def test_without_holdback_text_goes_out_at_once_and_the_stop_is_still_found(tok):
    for include in (False, True):
        settings = params(stop_strings=("Observation:",), include_stop_str_in_output=include)
        detok = IncrementalDetokenizer(tok, [], settings, stream_holdback=False)
        out = [detok.step(t) for t in byte_ids(tok, "so Observation: x")]
        assert [text for text, _ in out[:4]] == ["s", "o", " ", "O"]
        assert [hit for _, hit in out].index(True) == len("so Observation:") - 1
        want = "so Observation:" if include else "so Observation"
        assert "".join(text for text, _ in out) == detok.output_text == want


def test_earliest_stop_wins_and_a_stop_inside_one_token_cuts_it(tok):
    chunks, _, _, _ = stream(tok, tok.encode("abc done; stop here"), stop_strings=("here", "done", "one;"))
    assert "".join(chunks) == "abc "
    hello = tok.encode("Hello")
    assert len(hello) == 1
    chunks, hit_at, _, _ = stream(tok, tok.encode("xy ") + hello + tok.encode(" world"), stop_strings=("ell",))
    assert "".join(chunks) == "xy H" and hit_at == len(tok.encode("xy "))


def test_unicode_stop_string_split_into_bytes(tok):
    ids = byte_ids(tok, "好的。然后")
    chunks, hit_at, _, _ = stream(tok, ids, stop_strings=("。",))
    assert "".join(chunks) == "好的"
    assert hit_at == len(byte_ids(tok, "好的。")) - 1


def test_stream_equals_decode_cut_at_first_stop_on_random_ids(tok):
    rng = random.Random(3)
    stops = ("Obs", "中文", "😀x", "e", "ll")
    for include in (False, True):
        for _ in range(150):
            ids = random_ids(tok, rng, rng.randrange(1, 40))
            chosen = tuple(rng.sample(stops, 2))
            chunks, hit_at, rest, _ = stream(tok, ids, stop_strings=chosen, include_stop_str_in_output=include)
            full = slow_decode(tok, ids, True, True)
            found = [(full.find(s), s) for s in chosen if s in full]
            if found:
                at, s = min(found, key=lambda f: (f[0], len(f[1])))
                assert hit_at is not None
                # text is append-only: with holdback, no emitted piece went past the cut
                assert "".join(chunks) == full[:at + (len(s) if include else 0)]
            else:
                assert hit_at is None and "".join(chunks) + rest == full


# -- the default model's real tokenizer ----------------------------------------------------------

def test_real_tokenizer_stream_equals_decode():
    try:
        from lmwrap_engine.model_path import resolve_model_path
        from transformers import AutoTokenizer
        tokenizer = AutoTokenizer.from_pretrained(resolve_model_path(None))
    except Exception as exc:  # the default model is optional on a dev machine
        pytest.skip(f"default model not available: {exc}")
    text = "<|im_start|>assistant\nSure! 你好，世界 😀👍🏽 café\nObservation: done<|im_end|>"
    ids = tokenizer.encode(text, add_special_tokens=False)
    rng = random.Random(0)
    for skip in (True, False):
        for sample in [ids] + [[rng.randrange(len(tokenizer)) for _ in range(30)] for _ in range(30)]:
            chunks, _, rest, _ = stream(tokenizer, sample, skip_special_tokens=skip,
                                        spaces_between_special_tokens=False)
            assert "".join(chunks) + rest == tokenizer.decode(sample, skip_special_tokens=skip)
    chunks, hit_at, _, _ = stream(tokenizer, ids, stop_strings=("Observation:",))
    assert "".join(chunks) == "assistant\nSure! 你好，世界 😀👍🏽 café\n"
