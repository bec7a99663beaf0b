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
