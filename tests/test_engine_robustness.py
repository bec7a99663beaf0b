"""Failures inside the engine fail their requests, free their blocks, and never stop the engine."""
import pytest

from lmwrap_engine import GenerationConfig, PytorchEngineConfig, pipeline


@pytest.fixture(scope="module")
def pipe(tiny_model_dir):
    with pipeline(tiny_model_dir("llama"), PytorchEngineConfig(dtype="float32", num_gpu_blocks=64,
                                                               block_size=16)) as p:
        yield p


def ok(pipe):
    r = pipe("hello world", gen_config=GenerationConfig(max_new_tokens=4, ignore_eos=True), do_preprocess=False)
    assert r.finish_reason == "length" and r.generate_token_len == 4


def test_failing_logits_processor_fails_its_step_only(pipe):
    def boom(ids, scores):
        raise RuntimeError("processor exploded")
    bad = GenerationConfig(max_new_tokens=4, logits_processors=[boom])
    r = pipe("hello world", gen_config=bad, do_preprocess=False)
    assert r.finish_reason == "error" and "processor exploded" in r.text
    ok(pipe)
    stats = pipe.stats()
    assert stats["num_free_blocks"] == stats["num_blocks"]


def test_bug_in_the_step_fails_everything_in_flight_and_the_engine_recovers(pipe):
    engine = pipe._loop.engine
    real = engine.scheduler.schedule
    calls = []

    def broken():
        calls.append(1)
        if len(calls) == 3:
            raise AssertionError("scheduler bookkeeping broke")
        return real()

    engine.scheduler.schedule = broken
    try:
        results = pipe(["hello world", "The capital of France"], do_preprocess=False,
                       gen_config=GenerationConfig(max_new_tokens=8, ignore_eos=True))
    finally:
        engine.scheduler.schedule = real
    assert [r.finish_reason for r in results] == ["error", "error"]
    assert "scheduler bookkeeping broke" in results[0].text
    ok(pipe)
    stats = pipe.stats()
    assert stats["num_free_blocks"] == stats["num_blocks"]


def test_the_engine_is_built_on_its_own_thread_and_a_failed_build_raises_to_the_caller(tiny_model_dir):
    """The thread that steps the engine also loads it (engine_loop.py says why); errors still reach the caller."""
    import threading

    from lmwrap_engine.async_engine import load_tokenizer
    from lmwrap_engine.config import EngineConfig
    from lmwrap_engine.engine.engine_loop import EngineLoop
    from lmwrap_engine.engine.llm_engine import LLMEngine

    path = tiny_model_dir()
    builders = []

    def build():
        builders.append(threading.current_thread())
        config = EngineConfig(dtype="float32", num_gpu_blocks=8, block_size=16, device_type="cpu")
        return LLMEngine(path, config, load_tokenizer(path))

    loop = EngineLoop(build)
    try:
        assert builders == [loop._thread] and loop._thread is not threading.current_thread()
        assert loop.ask(lambda engine: engine is loop.engine and not engine.has_work()).result(timeout=60)
    finally:
        loop.close()

    def broken():
        raise ValueError("no such weights")
    with pytest.raises(ValueError, match="no such weights"):
        EngineLoop(broken)
