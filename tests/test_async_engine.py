"""AsyncEngine.generate (lmdeploy's asyncio API): messages or token ids, streaming or not, stop/end session,
same-session ordering, and callers that walk away mid-stream."""
import asyncio
import time

import pytest

from lmwrap_engine import AsyncEngine, GenerationConfig, GenOut, PytorchEngineConfig

GREEDY = GenerationConfig(max_new_tokens=8, ignore_eos=True)
LONG = GenerationConfig(max_new_tokens=600, ignore_eos=True)
MESSAGES = [{"role": "user", "content": "Name three rivers"}]


@pytest.fixture(scope="module")
def engine(tiny_model_dir):
    eng = AsyncEngine(tiny_model_dir(), PytorchEngineConfig(dtype="float32", num_gpu_blocks=64, block_size=16))
    yield eng
    eng.close()


def run(coro):
    return asyncio.run(coro)


async def collect(engine, *args, **kwargs):
    return [out async for out in engine.generate(*args, **kwargs)]


def wait_until_all_blocks_free(engine, timeout=10.0):
    deadline = time.monotonic() + timeout
    while True:
        assert engine._loop._thread.is_alive(), "the engine thread died"  # else stats() would wait forever
        stats = engine.stats()
        if stats["num_free_blocks"] == stats["num_blocks"] or time.monotonic() > deadline:
            assert stats["num_free_blocks"] == stats["num_blocks"], stats
            return stats
        time.sleep(0.02)


def joined(outs):
    return "".join(o.response for o in outs), [t for o in outs for t in o.token_ids]


def test_generate_messages_streams_genout_deltas(engine):
    outs = run(collect(engine, MESSAGES, 101, GREEDY))
    assert all(isinstance(o, GenOut) for o in outs)
    assert [o.generate_token_len for o in outs] == list(range(1, 9))
    assert [o.finish_reason for o in outs] == [None] * 7 + ["length"]
    ids = engine.encode_prompt(MESSAGES, True, True)
    assert {o.input_token_len for o in outs} == {len(ids)} and {o.history_token_len for o in outs} == {0}
    text, token_ids = joined(outs)
    assert text == engine.tokenizer.decode(token_ids, skip_special_tokens=True)
    # the same prompt as token ids, and without streaming
    by_ids = run(collect(engine, None, 102, GREEDY, input_ids=ids))
    assert joined(by_ids) == (text, token_ids)
    [whole] = run(collect(engine, MESSAGES, 103, GREEDY, stream_response=False))
    assert (whole.response, whole.token_ids, whole.generate_token_len, whole.finish_reason) == (
        text, token_ids, 8, "length")
    wait_until_all_blocks_free(engine)


def test_generate_str_with_and_without_template(engine):
    templated = run(collect(engine, "Name three rivers", 104, GREEDY))
    assert joined(templated) == joined(run(collect(engine, MESSAGES, 105, GREEDY)))
    raw = run(collect(engine, "Name three rivers", 106, GREEDY, do_preprocess=False))
    assert raw[-1].input_token_len == len(engine.tokenizer.encode("Name three rivers"))


def test_stop_session_cancels_a_running_generation(engine):
    async def main():
        outs = []
        async for out in engine.generate(MESSAGES, 201, LONG):
            outs.append(out)
            if len(outs) == 3:
                await engine.stop_session(201)
        return outs
    outs = run(main())
    assert outs[-1].finish_reason == "abort"
    assert 3 <= outs[-1].generate_token_len < 600
    wait_until_all_blocks_free(engine)


def test_end_session_frees_the_kv_cache(engine):
    outs = run(collect(engine, MESSAGES, 301, GREEDY, sequence_end=False))
    assert outs[-1].finish_reason == "length"
    stats = engine.stats()
    assert stats["num_free_blocks"] < stats["num_blocks"]  # kept for the next turn
    run(engine.end_session(301))
    wait_until_all_blocks_free(engine)
    # the session is gone: continuing it is an error, starting it again works
    gone = run(collect(engine, "again", 301, GREEDY, sequence_start=False))
    assert gone[-1].finish_reason == "error" and "301" in gone[-1].response
    assert run(collect(engine, "again", 301, GREEDY))[-1].finish_reason == "length"
    wait_until_all_blocks_free(engine)


def test_end_session_stops_a_running_generation(engine):
    async def main():
        outs = []
        async for out in engine.generate(MESSAGES, 302, LONG, sequence_end=False):
            outs.append(out)
            if len(outs) == 2:
                await engine.end_session(302)
        return outs
    outs = run(main())
    assert outs[-1].finish_reason == "abort"
    wait_until_all_blocks_free(engine)


def test_same_session_requests_run_one_after_another(engine):
    first_ids = engine.encode_prompt(MESSAGES, True, True)
    second_ids = engine.encode_prompt("What else?", False, True)
    order = []

    async def turn(name, **kwargs):
        outs = []
        async for out in engine.generate(None, 401, GREEDY, sequence_end=False, **kwargs):
            order.append(name)
            outs.append(out)
        return outs

    async def main():
        return await asyncio.gather(turn("first", input_ids=first_ids),
                                    turn("second", input_ids=second_ids, sequence_start=False))
    first, second = run(main())
    assert order == ["first"] * 8 + ["second"] * 8
    assert second[-1].history_token_len == len(first_ids) + 8
    # the second turn saw the first turn's tokens: same as one request over the whole conversation
    whole = first_ids + joined(first)[1] + second_ids
    assert joined(second)[1] == joined(run(collect(engine, None, 402, GREEDY, input_ids=whole)))[1]
    run(engine.end_session(401))
    wait_until_all_blocks_free(engine)


def generated_so_far(engine):
    return engine.stats()["num_generated_tokens_computed"]


def assert_request_stopped(engine, before):
    stats = wait_until_all_blocks_free(engine)
    after = stats["num_generated_tokens_computed"]
    time.sleep(0.2)
    assert generated_so_far(engine) == after  # nothing runs any more
    assert after - before < 600  # not all the tokens asked for


def test_break_out_of_the_async_generator_stops_the_request(engine):
    before = generated_so_far(engine)

    async def main():
        async for out in engine.generate(MESSAGES, 501, LONG):
            if out.generate_token_len == 3:
                break
        await asyncio.sleep(0.05)  # the dropped generator is closed by the event loop
    run(main())
    assert_request_stopped(engine, before)


def test_cancelling_the_task_stops_the_request(engine):
    before = generated_so_far(engine)

    async def main():
        started = asyncio.Event()

        async def consume():
            async for out in engine.generate(MESSAGES, 502, LONG):
                started.set()
        task = asyncio.create_task(consume())
        await started.wait()
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
    run(main())
    assert_request_stopped(engine, before)


def test_dropping_the_generator_after_its_last_delta_does_not_abort_the_next_turn(engine):
    async def main():
        async for out in engine.generate(MESSAGES, 601, GREEDY, sequence_end=False):
            if out.finish_reason is not None:
                break  # the generator is closed later, by the event loop
        return await collect(engine, "And then?", 601, GREEDY, sequence_start=False, sequence_end=True)
    second = run(main())
    assert second[-1].finish_reason == "length" and second[-1].generate_token_len == 8
    wait_until_all_blocks_free(engine)


def test_bad_requests_fail_alone(engine):
    vocab = engine.vocab_size
    with pytest.raises(ValueError, match="input_ids"):
        run(collect(engine, None, 701, GREEDY, input_ids=[1, vocab + 5]))
    with pytest.raises(TypeError, match="GenerationConfig"):
        run(collect(engine, MESSAGES, 701, {"max_new_tokens": 3}))
    with pytest.raises(NotImplementedError):
        run(collect(engine, MESSAGES, 701, GREEDY, adapter_name="x"))
    too_long = run(collect(engine, None, 702, GREEDY, input_ids=[5] * engine.session_len))
    assert [(o.response, o.finish_reason, o.generate_token_len) for o in too_long] == [("", "length", 0)]
    assert run(collect(engine, MESSAGES, 703, GREEDY))[-1].finish_reason == "length"
    wait_until_all_blocks_free(engine)


def test_a_caller_whose_event_loop_closed_mid_request_is_stopped(engine):
    before = generated_so_far(engine)
    loop = asyncio.new_event_loop()
    stream = engine.generate(MESSAGES, 801, LONG)
    first = loop.run_until_complete(stream.__anext__())
    assert first.generate_token_len == 1
    loop.close()  # the engine's next delta has nowhere to go
    assert_request_stopped(engine, before)
    assert run(collect(engine, MESSAGES, 802, GREEDY))[-1].finish_reason == "length"


def test_a_failing_output_callback_does_not_stop_the_engine(engine):
    def broken(out):
        raise RuntimeError("consumer gone")
    params = engine.sampling_params(GREEDY, 3)
    engine.submit(901, [5, 6, 7], params, broken)
    wait_until_all_blocks_free(engine)
    assert run(collect(engine, MESSAGES, 902, GREEDY))[-1].finish_reason == "length"


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_load_tokenizer_gives_autotokenizers_pick(tiny_model_dir, arch, monkeypatch):
    """A llama folder naming the generic fast tokenizer skips AutoTokenizer (1 s of a cold start) for the
    same tokenizer; others (transformers 5 gives qwen2 its own class) still go through it."""
    import transformers
    from lmwrap_engine.async_engine import load_tokenizer
    path = tiny_model_dir(arch)
    auto = transformers.AutoTokenizer.from_pretrained(path)
    consulted = []
    real = transformers.AutoTokenizer.from_pretrained
    monkeypatch.setattr(transformers.AutoTokenizer, "from_pretrained",
                        lambda *a, **k: consulted.append(a) or real(*a, **k))
    ours = load_tokenizer(path)
    assert bool(consulted) == (arch != "llama")
    assert type(ours) is type(auto)
    text = "<|im_start|>user\nName three rivers<|im_end|>\n"
    assert ours.encode(text) == auto.encode(text) and ours.decode(ours.encode(text)) == auto.decode(auto.encode(text))
    assert (ours.special_tokens_map, ours.chat_template, ours.eos_token_id) == (
        auto.special_tokens_map, auto.chat_template, auto.eos_token_id)
