"""Output work overlapped with the next step (the CUDA default), checked on CPU: every delta, text,
finish reason and session state must equal the step-by-step order's, and a turn ended by a stop
string (known one step late there) computes exactly one extra token, which is dropped."""
import asyncio
import queue

import pytest

from lmwrap_engine import GenerationConfig, pipeline
from tiny_models import assert_all_blocks_free, tiny_config

PROMPTS = [[5 + i, 17, 33 + 2 * i, 9] * (1 + i % 3) for i in range(8)]
SID = 10**9


def open_pipe(model_dir, overlap: bool, **config):
    pipe = pipeline(model_dir, tiny_config(**config))
    pipe._loop.engine.overlap_outputs = overlap  # set before any request reaches the engine thread
    return pipe


@pytest.fixture(scope="module")
def pipes(model_dir):
    plain, overlapped = open_pipe(model_dir, False), open_pipe(model_dir, True)
    yield plain, overlapped
    plain.close()
    overlapped.close()


def stream(pipe, prompts, configs):
    """Every delta of every request, per request: (text, token ids, finish reason, output length)."""
    deltas = {i: [] for i in range(len(prompts))}
    engine = pipe
    outbox: "queue.SimpleQueue" = queue.SimpleQueue()
    for i, (ids, cfg) in enumerate(zip(prompts, configs)):
        engine.submit(engine.new_session_id(), ids, engine.sampling_params(cfg, len(ids)),
                      lambda out, i=i: outbox.put((i, out)))
    remaining = len(prompts)
    while remaining:
        i, out = outbox.get(timeout=120)
        deltas[i].append((out.text, out.token_ids, out.finish_reason, out.num_output_tokens))
        remaining -= out.finish_reason is not None
    return [deltas[i] for i in range(len(prompts))]


def generated(pipe) -> int:
    return pipe.stats()["num_generated_tokens_computed"]


def test_deltas_and_stops_match_the_step_by_step_order(pipes):
    plain, overlapped = pipes
    free_run = stream(plain, PROMPTS, [GenerationConfig(max_new_tokens=24, ignore_eos=True)] * len(PROMPTS))
    configs = []
    for i, deltas in enumerate(free_run):
        text = "".join(d[0] for d in deltas)
        ids = [t for d in deltas for t in d[1]]
        if i % 3 == 0:  # a stop string from the middle of the text, likely spanning tokens
            configs.append(GenerationConfig(max_new_tokens=24, ignore_eos=True, stop_words=[text[8:12]]))
        elif i % 3 == 1:  # a stop id
            configs.append(GenerationConfig(max_new_tokens=24, ignore_eos=True, stop_token_ids=[ids[6]]))
        else:
            configs.append(GenerationConfig(max_new_tokens=5 + i, ignore_eos=True))
    before = generated(plain), generated(overlapped)
    expected = stream(plain, PROMPTS, configs)
    got = stream(overlapped, PROMPTS, configs)
    assert got == expected
    by_string = sum(1 for i, deltas in enumerate(expected) if i % 3 == 0 and deltas[-1][2] == "stop")
    assert by_string >= 2
    assert generated(overlapped) - before[1] == generated(plain) - before[0] + by_string
    assert_all_blocks_free(plain)
    assert_all_blocks_free(overlapped)


def run_session(pipe, stop_word):
    """Three turns; the first one ends on a stop string, the third is queued while the second runs."""
    turns = []
    cfg = GenerationConfig(max_new_tokens=12, ignore_eos=True, stop_words=[stop_word])
    deltas = list(pipe.stream_generate(session_id=SID, input_ids=PROMPTS[0], gen_config=cfg, sequence_end=False))
    turns.append([(d.text, d.token_ids, d.finish_reason) for d in deltas])
    engine = pipe
    outbox: "queue.SimpleQueue" = queue.SimpleQueue()
    greedy = GenerationConfig(max_new_tokens=6, ignore_eos=True)
    for ids in (PROMPTS[1], PROMPTS[2]):  # back to back: the second waits for the first to finish
        engine.submit(SID, ids, engine.sampling_params(greedy, len(ids)), outbox.put, sequence_start=False,
                      sequence_end=False)
    for _ in range(2):
        turn = []
        while not turn or turn[-1][2] is None:
            out = outbox.get(timeout=120)
            turn.append((out.text, out.token_ids, out.finish_reason))
        turns.append(turn)
    num_tokens = asyncio.run(pipe.session_tokens(SID))
    pipe.end_session_nowait(SID)
    return turns, num_tokens


def test_sessions_match_the_step_by_step_order(pipes):
    plain, overlapped = pipes
    text = "".join(d.text for d in plain.stream_generate(input_ids=PROMPTS[0],
                                                  gen_config=GenerationConfig(max_new_tokens=12, ignore_eos=True)))
    expected = run_session(plain, text[5:8])
    assert expected[0][0][-1][2] == "stop"
    assert run_session(overlapped, text[5:8]) == expected
    assert_all_blocks_free(overlapped)


def test_stop_session_mid_stream_then_the_session_goes_on(pipes):
    _, overlapped = pipes
    deltas = overlapped.stream_generate(session_id=SID + 1, input_ids=PROMPTS[3], sequence_end=False,
                                 gen_config=GenerationConfig(max_new_tokens=2000, ignore_eos=True))
    next(deltas)
    overlapped.stop_session_nowait(SID + 1)
    rest = list(deltas)
    assert [d.finish_reason for d in rest].count("abort") == 1 and rest[-1].finish_reason == "abort"
    assert all(d.finish_reason is None for d in rest[:-1])
    held = asyncio.run(overlapped.session_tokens(SID + 1))
    assert held > len(PROMPTS[3])
    turn2 = list(overlapped.stream_generate(session_id=SID + 1, input_ids=[7, 8], sequence_start=False, step=held,
                                     gen_config=GenerationConfig(max_new_tokens=3, ignore_eos=True)))
    assert turn2[-1].finish_reason == "length" and sum(len(d.token_ids) for d in turn2) == 3
    overlapped.end_session_nowait(SID + 1)
    assert_all_blocks_free(overlapped)


def test_preemption_matches_the_step_by_step_order(model_dir):
    # 12 blocks of 4 tokens cannot hold eight sequences of up to ~40 tokens at once.
    configs = [GenerationConfig(max_new_tokens=16, ignore_eos=True)] * len(PROMPTS)
    results = []
    for overlap in (False, True):
        with open_pipe(model_dir, overlap, num_gpu_blocks=12, block_size=4) as pipe:
            results.append(stream(pipe, PROMPTS, configs))
            assert pipe.stats()["num_preemptions"] > 0
            assert_all_blocks_free(pipe)
    assert results[1] == results[0]
    assert all(deltas[-1][2] == "length" for deltas in results[1])


def test_a_bug_while_sending_fails_every_turn_in_flight_and_the_engine_recovers(pipes):
    _, overlapped = pipes
    engine = overlapped._loop.engine
    real = engine._send

    def broken(seq, token_id, logprobs, finish_reason):
        if finish_reason == "length":  # the turn's last token: its sequence has left the scheduler
            raise AssertionError("detokenizer broke")
        return real(seq, token_id, logprobs, finish_reason)

    engine._send = broken
    try:
        results = stream(overlapped, PROMPTS[:2], [GenerationConfig(max_new_tokens=n, ignore_eos=True)
                                                   for n in (2, 30)])
    finally:
        del engine._send
    assert [deltas[-1][2] for deltas in results] == ["error", "error"]
    assert stream(overlapped, PROMPTS[:1], [GenerationConfig(max_new_tokens=3, ignore_eos=True)])[0][-1][2] == "length"
    assert_all_blocks_free(overlapped)
