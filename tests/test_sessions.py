"""Sessions keep their KV cache between turns: Pipeline.chat / Session, generate(session_id, sequence_start,
sequence_end, step), and idle sessions giving way when the cache is full."""
import threading

import pytest

from lmwrap_engine import GenerationConfig, Session, pipeline
from tiny_models import assert_all_blocks_free, tiny_config

GREEDY = GenerationConfig(max_new_tokens=8, ignore_eos=True)
SID = 10**9  # our session ids, far from the ones the pipeline numbers its own requests with


def prompt_tokens_computed(pipe):
    return pipe.stats()["num_prompt_tokens_computed"]


def fresh_ids(pipe, input_ids, gen_config=GREEDY):
    """Output token ids of one new request over ``input_ids``."""
    return [t for d in pipe.stream_generate(input_ids=input_ids, gen_config=gen_config) for t in d.token_ids]


def turn(pipe, session_id, input_ids, gen_config=GREEDY, **kwargs):
    deltas = list(pipe.stream_generate(session_id=session_id, input_ids=input_ids, gen_config=gen_config, **kwargs))
    return deltas[-1], [t for d in deltas for t in d.token_ids], "".join(d.text for d in deltas)


@pytest.fixture
def encode(pipe):
    return lambda prompt, start: pipe.encode_prompt(prompt, start, True)


def test_chat_keeps_history_in_kv(pipe, encode):
    before = prompt_tokens_computed(pipe)
    session = pipe.chat("My name is Ada.", gen_config=GREEDY)
    assert isinstance(session, Session)
    ids1, out1 = encode("My name is Ada.", True), session.response.token_ids
    assert len(out1) == 8 and session._step == len(ids1) + 8
    assert prompt_tokens_computed(pipe) - before == len(ids1)

    before = prompt_tokens_computed(pipe)
    same = pipe.chat("What is my name?", session=session, gen_config=GREEDY)
    assert same is session
    assert session.response.finish_reason == "length"
    # turn 1 was cut before its stop word, so turn 2 first closes it
    ids2 = pipe.encode_prompt("What is my name?", False, True, close_turn=True)
    assert ids2[:len(encode("What is my name?", False))] != encode("What is my name?", False)
    # only the new turn is computed (plus turn 1's last sampled token, which had no KV yet)
    assert prompt_tokens_computed(pipe) - before == len(ids2) + 1
    assert session.response.input_token_len == len(ids2)
    assert session._step == len(ids1) + 8 + len(ids2) + 8
    assert [prompt for prompt, _ in session.history] == ["My name is Ada.", "What is my name?"]
    assert session.history[1][1] == session.response.text
    # the same as one request over the whole conversation
    assert session.response.token_ids == fresh_ids(pipe, ids1 + out1 + ids2)
    stats = pipe.stats()
    assert stats["num_free_blocks"] < stats["num_blocks"]
    session.close()
    assert_all_blocks_free(pipe)
    assert session._step == 0 and session.history == []


def test_chat_continuation_renders_the_whole_conversation(pipe, encode):
    """With a natural stop, turn 1's stop token stays in the KV: history + turn 2 is the template's render."""
    gen = GenerationConfig(max_new_tokens=48)
    first = [{"role": "user", "content": "hi"}]
    session = pipe.chat(first, gen_config=gen)
    assert session.response.finish_reason == "stop"  # this tiny model reaches <|im_end|> on "hi"
    reply, out1 = session.response.text, session.response.token_ids
    stop = pipe.tokenizer.convert_tokens_to_ids("<|im_end|>")
    ids1 = encode(first, True)
    assert session._step == len(ids1) + len(out1) + 1
    session = pipe.chat("And then?", session=session, gen_config=gen)
    ids2 = encode("And then?", False)
    conversation = first + [{"role": "assistant", "content": reply}, {"role": "user", "content": "And then?"}]
    whole = pipe.tokenizer.apply_chat_template(conversation, add_generation_prompt=True, tokenize=False)
    assert pipe.tokenizer.decode(ids1 + out1 + [stop] + ids2) == whole
    assert session.response.token_ids == fresh_ids(pipe, ids1 + out1 + [stop] + ids2, gen)
    session.close()
    assert_all_blocks_free(pipe)


def test_chat_stream_response(pipe):
    session = Session(pipe)
    deltas = list(pipe.chat("hello", session=session, gen_config=GREEDY, stream_response=True))
    assert deltas[-1].finish_reason == "length"
    assert session.response.text == "".join(d.text for d in deltas)
    assert session.history == [("hello", session.response.text)]
    session.close()
    assert_all_blocks_free(pipe)


def test_generate_turns_with_step_rewind(pipe):
    a = pipe.tokenizer.encode("The capital of France is")
    b = pipe.tokenizer.encode(" Rome.")
    last, out_a, _ = turn(pipe, SID + 11, a, sequence_end=False)
    assert last.finish_reason == "length" and out_a == fresh_ids(pipe, a)

    # continue at the end (step = all tokens so far)
    before = prompt_tokens_computed(pipe)
    last, out_ab, _ = turn(pipe, SID + 11, b, sequence_start=False, sequence_end=False, step=len(a) + 8)
    assert prompt_tokens_computed(pipe) - before == len(b) + 1
    assert out_ab == fresh_ids(pipe, a + out_a + b)

    # rewind to just after `a`: the reply and turn 2 are dropped from the KV, `a`'s KV is reused
    before = prompt_tokens_computed(pipe)
    last, out_rewound, _ = turn(pipe, SID + 11, b, sequence_start=False, sequence_end=False, step=len(a))
    assert prompt_tokens_computed(pipe) - before == len(b)
    assert out_rewound == fresh_ids(pipe, a + b)

    # a step past what the session holds is an error, and the session survives it
    last, ids, text = turn(pipe, SID + 11, b, sequence_start=False, sequence_end=False, step=10_000)
    assert last.finish_reason == "error" and ids == [] and "step 10000" in text
    last, ids, text = turn(pipe, SID + 11, b, sequence_start=False, sequence_end=False, step=-1)
    assert last.finish_reason == "error"

    # sequence_end=True ends the session and frees its KV
    last, out_end, _ = turn(pipe, SID + 11, b, sequence_start=False, sequence_end=True, step=len(a))
    assert out_end == out_rewound
    assert_all_blocks_free(pipe)
    last, _, text = turn(pipe, SID + 11, b, sequence_start=False)
    assert last.finish_reason == "error" and "no history" in text
    assert_all_blocks_free(pipe)


def test_sequence_start_restarts_a_session(pipe):
    a = pipe.tokenizer.encode("hello world")
    turn(pipe, SID + 12, pipe.tokenizer.encode("def add(a, b):"), sequence_end=False)
    last, out, _ = turn(pipe, SID + 12, a, sequence_start=True, sequence_end=False)
    assert out == fresh_ids(pipe, a)  # the old history is gone
    pipe.end_session_nowait(SID + 12)
    assert_all_blocks_free(pipe)


def test_continuing_an_unknown_session_is_an_error(pipe):
    last, ids, text = turn(pipe, SID + 99, [5, 6, 7], sequence_start=False)
    assert (last.finish_reason, ids, last.generate_token_len) == ("error", [], 0)
    assert str(SID + 99) in text
    assert_all_blocks_free(pipe)
    assert pipe("hello", gen_config=GREEDY).finish_reason == "length"


def test_idle_sessions_are_evicted_when_the_cache_fills_up(model_dir, encode):
    # 6 blocks of 16 tokens; each chat session holds 3 of them between turns. Without the prefix
    # cache, so that an evicted session's history is recomputed in full.
    with pipeline(model_dir, tiny_config(num_gpu_blocks=6, enable_prefix_caching=False)) as pipe:
        first = pipe.chat("My name is Ada.", gen_config=GREEDY)
        second = pipe.chat("My name is Bob.", gen_config=GREEDY)
        assert pipe.stats()["num_free_blocks"] == 0
        history1 = encode("My name is Ada.", True) + first.response.token_ids

        # a new request needs 3 blocks: it must not wait forever for sessions that may never come back
        done = []
        worker = threading.Thread(target=lambda: done.append(pipe(["hello", "The capital of France is"],
                                                                  gen_config=GREEDY)))
        worker.start()
        worker.join(timeout=60)
        assert not worker.is_alive(), "the request waited on idle sessions' KV"
        assert [r.finish_reason for r in done[0]] == ["length", "length"]

        # the least recently used session lost its KV: its next turn recomputes the history, same answer
        before = prompt_tokens_computed(pipe)
        first = pipe.chat("What is my name?", session=first, gen_config=GREEDY)
        new = pipe.encode_prompt("What is my name?", False, True, close_turn=True)  # turn 1 hit length
        assert prompt_tokens_computed(pipe) - before == len(history1) + len(new)
        assert first.response.token_ids == fresh_ids(pipe, history1 + new)
        assert second.response.finish_reason == "length"
        first.close()
        second.close()
        assert_all_blocks_free(pipe)
