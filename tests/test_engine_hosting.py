"""The engine made fit to be hosted: lmdeploy's AsyncEngine surface on what pipeline() returns, closing
while requests stream, work off the event loop, two engines in one process, bounded kept sessions, and
arguments or config values the engine would not honour."""
import asyncio
import inspect
import threading
import time

import pytest

from lmwrap_engine import (AsyncEngine, GenerationConfig, GenOut, Pipeline, PytorchEngineConfig,
                           TurbomindEngineConfig, pipeline)
from tiny_models import reference_greedy, load_reference, tiny_config

GREEDY = GenerationConfig(max_new_tokens=6, ignore_eos=True)
ENDLESS = GenerationConfig(max_new_tokens=100_000, ignore_eos=True)


async def collect(engine, *args, **kwargs):
    return [out async for out in engine.generate(*args, **kwargs)]


# -- lmdeploy v0.6.2's AsyncEngine API on pipeline() ---------------------------------------------


def test_pipeline_returns_an_async_engine_with_lmdeploys_coroutines(pipe):
    assert isinstance(pipe, AsyncEngine) and isinstance(pipe, Pipeline)
    assert inspect.isasyncgenfunction(pipe.generate)
    for name in ("stop_session", "end_session", "session_tokens", "astats"):
        assert inspect.iscoroutinefunction(getattr(pipe, name)), name
    for name in ("__call__", "batch_infer", "stream_infer", "chat", "stream_generate", "stats", "close"):
        assert not inspect.iscoroutinefunction(getattr(pipe, name)), name

    async def main():  # code written for lmdeploy's AsyncEngine, unchanged
        texts = []
        async for out in pipe.generate([{"role": "user", "content": "hi"}], 5, gen_config=GREEDY,
                                       stream_response=True, sequence_start=True, sequence_end=False,
                                       step=0, do_preprocess=True, adapter_name=None):
            assert isinstance(out, GenOut)
            texts.append(out.response)
        held = await pipe.session_tokens(5)
        await pipe.stop_session(5)
        await pipe.end_session(5)
        return texts, held, await pipe.session_tokens(5), await pipe.astats()
    texts, held, after_end, stats = asyncio.run(main())
    assert len(texts) == 6 and held > 6 and after_end == 0
    assert stats["num_free_blocks"] == stats["num_blocks"] and stats["num_sessions"] == 0
    sync_text = "".join(r.text for r in pipe.stream_generate([{"role": "user", "content": "hi"}], gen_config=GREEDY))
    assert "".join(texts) == sync_text


def test_async_engine_takes_lmdeploys_argument_order(model_dir):
    engine = AsyncEngine(model_dir, "my-model", "pytorch", tiny_config(), None, None)
    try:
        assert engine.model_name == "my-model" and engine.block_size == tiny_config().block_size
        [out] = asyncio.run(collect(engine, "hello", None, GREEDY, stream_response=False))
        assert out.generate_token_len == 6 and out.finish_reason == "length"
    finally:
        engine.close()


def test_unknown_arguments_are_errors_naming_them(pipe, model_dir):
    with pytest.raises(TypeError, match="temprature"):
        AsyncEngine(model_dir, backend_config=tiny_config(), temprature=0.5)
    with pytest.raises(TypeError, match="session"):
        asyncio.run(collect(pipe, "hi", 9, GREEDY, session=3))
    with pytest.raises(TypeError, match="use_cache"):
        pipe("hi", gen_config=GREEDY, use_cache=True)
    with pytest.raises(ValueError, match="tp=3"):
        AsyncEngine(model_dir, tp=3)


@pytest.mark.parametrize("config, field", [
    (PytorchEngineConfig(prefill_interval=8), "prefill_interval"),
    (PytorchEngineConfig(num_cpu_blocks=16), "num_cpu_blocks"),
    (TurbomindEngineConfig(cache_chunk_size=1), "cache_chunk_size"),
    (TurbomindEngineConfig(num_tokens_per_iter=512), "num_tokens_per_iter"),
    (TurbomindEngineConfig(max_prefill_iters=2), "max_prefill_iters"),
])
def test_config_values_the_engine_does_not_honour_are_errors(config, field):
    with pytest.raises(NotImplementedError, match=field):
        config.to_engine_config()


def test_honoured_config_fields_reach_the_engine():
    cfg = PytorchEngineConfig(thread_safe=True, revision="v2", max_sessions=3, session_idle_timeout=5.0)
    engine_cfg = cfg.to_engine_config()
    assert (engine_cfg.revision, engine_cfg.max_sessions, engine_cfg.session_idle_timeout) == ("v2", 3, 5.0)
    assert TurbomindEngineConfig(revision="abc", eager_mode=True).to_engine_config().eager_mode
    with pytest.raises(ValueError, match="session_idle_timeout"):
        PytorchEngineConfig(session_idle_timeout=-1).to_engine_config()


# -- work off the event loop -----------------------------------------------------------------------


def test_templating_and_tokenising_run_off_the_event_loop(pipe, monkeypatch):
    threads = []
    real = pipe.encode_prompt

    def spy(*args, **kwargs):
        threads.append(threading.current_thread())
        return real(*args, **kwargs)
    monkeypatch.setattr(pipe, "encode_prompt", spy)

    async def main():
        loop_thread = threading.current_thread()
        await collect(pipe, [{"role": "user", "content": "hi"}], None, GREEDY)
        return loop_thread
    loop_thread = asyncio.run(main())
    assert threads and all(t is not loop_thread for t in threads)


# -- closing while requests stream -----------------------------------------------------------------


def test_close_fails_streaming_requests_promptly_and_later_calls_raise(model_dir):
    engine = pipeline(model_dir, tiny_config())
    sync_stream = engine.stream_generate("hello", gen_config=ENDLESS)
    assert next(sync_stream).finish_reason is None
    results = {}

    async def async_reader():
        outs = []
        async for out in engine.generate("world", None, ENDLESS):
            outs.append(out)
            if len(outs) == 2:
                started.set()
        results["async"] = outs[-1]

    started = threading.Event()
    reader = threading.Thread(target=lambda: asyncio.run(async_reader()))
    reader.start()
    assert started.wait(30)
    engine.close()
    reader.join(10)
    assert not reader.is_alive(), "an async reader was left waiting after close()"
    last_sync = list(sync_stream)[-1]
    for last in (last_sync, results["async"]):
        assert last.finish_reason == "error"
    assert "closed" in last_sync.text and "closed" in results["async"].response
    with pytest.raises(RuntimeError, match="closed"):
        engine("hi", gen_config=GREEDY)
    with pytest.raises(RuntimeError, match="closed"):
        asyncio.run(collect(engine, "hi", None, GREEDY))
    engine.close()  # twice is fine


# -- two engines in one process ---------------------------------------------------------------------


def test_two_engines_on_two_threads_do_not_share_forward_state(tiny_model_dir):
    """Different models (different layer counts and head shapes) stepping at the same time on two threads:
    a process-wide forward context would hand one model the other's slot mapping and lengths."""
    paths = [tiny_model_dir("llama"), tiny_model_dir("qwen2", seed=3)]
    prompts = [[(7 * i + j) % 300 + 5 for j in range(20 + 9 * i)] for i in range(6)]
    cfg = GenerationConfig(max_new_tokens=12, ignore_eos=True, do_sample=False)
    expected = {}
    for path in paths:
        ref = load_reference(path)
        expected[path] = [reference_greedy(ref, ids, 12)[len(ids):] for ids in prompts]
    results, errors = {}, []

    def work(path):
        try:
            with pipeline(path, tiny_config()) as pipe:
                for _ in range(3):  # many steps overlapping with the other engine's
                    results.setdefault(path, []).append(
                        [[t for d in pipe.stream_generate(input_ids=ids, gen_config=cfg) for t in d.token_ids]
                         for ids in prompts])
        except Exception as exc:
            errors.append(exc)
    threads = [threading.Thread(target=work, args=(p,)) for p in paths]
    for t in threads:
        t.start()
    for t in threads:
        t.join(300)
    assert not errors, errors
    for path in paths:
        assert results[path] == [expected[path]] * 3


# -- kept sessions whose clients never come back -----------------------------------------------------


def test_kept_sessions_past_the_cap_end_the_longest_idle(model_dir):
    with pipeline(model_dir, tiny_config(max_sessions=2)) as pipe:
        for sid in (1, 2, 3):
            list(pipe.stream_generate("hello", session_id=sid, gen_config=GREEDY, sequence_end=False))
            time.sleep(0.01)

        def held(*sids):
            return [asyncio.run(pipe.session_tokens(sid)) for sid in sids]
        tokens = held(1, 2, 3)
        assert tokens[0] == 0 and tokens[1] > 0 and tokens[2] > 0
        stats = pipe.stats()
        assert stats["num_sessions"] == 2 and stats["num_sessions_ended_idle"] == 1
        # session 2 is used again, so 3 is now the longest idle one
        list(pipe.stream_generate(" more", session_id=2, gen_config=GREEDY, sequence_start=False, sequence_end=False))
        list(pipe.stream_generate("hello", session_id=4, gen_config=GREEDY, sequence_end=False))
        tokens = held(2, 3, 4)
        assert tokens[1] == 0 and tokens[0] > 0 and tokens[2] > 0
        # an ended session cannot be continued: a clear error, not a silent restart
        [last] = list(pipe.stream_generate(" again", session_id=1, gen_config=GREEDY, sequence_start=False))[-1:]
        assert last.finish_reason == "error" and "no history" in last.text


def test_idle_sessions_time_out_and_free_their_blocks(model_dir):
    with pipeline(model_dir, tiny_config(session_idle_timeout=0.3)) as pipe:
        list(pipe.stream_generate("hello", session_id=11, gen_config=GREEDY, sequence_end=False))
        assert asyncio.run(pipe.session_tokens(11)) > 0
        deadline = time.monotonic() + 10
        while asyncio.run(pipe.session_tokens(11)) and time.monotonic() < deadline:
            time.sleep(0.05)
        stats = pipe.stats()
        assert stats["num_sessions"] == 0 and stats["num_free_blocks"] == stats["num_blocks"]
        assert stats["num_sessions_ended_idle"] == 1
