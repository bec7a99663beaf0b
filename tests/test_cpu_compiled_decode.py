"""The inductor-compiled CPU decode step (engine/cpu_graphs.py): parity with the eager path and with
transformers, sessions / prefix cache / preemption through it, the switches, and the eager fallback.

Tiny models keep each compile short (~40 s for the first test with a cold inductor cache, seconds warm)."""
import logging
import os
import platform
import subprocess
import sys
import time

import pytest
import torch

from tiny_models import (assert_all_blocks_free, assert_compiled_decode_matches_eager, load_reference,
                         reference_greedy, tiny_config)

from kernels import reference
from kernels.cpu_kv_cache import fill_kv_cache_slots
from lmwrap_engine import GenerationConfig, pipeline
from lmwrap_engine.engine import cpu_graphs, cpu_programs
from lmwrap_engine.engine.cpu_features import cpu_flags
from lmwrap_engine.engine.cpu_graphs import CompiledDecode

PROMPTS = ["hello world", "The capital of France is Paris. The capital of Italy is", "a",
           "def add(a, b):\n    return a + b\n# numbers 0 1 2 3 4 5 6 7 8 9", "Name three rivers:",
           "tiny models for a tiny tokenizer, this is a test of a test"]
OUTPUT_LENS = [9, 3, 14, 6, 11, 1]  # the batch shrinks step by step: batch 1 and the dynamic-batch program


@pytest.fixture(autouse=True)
def compile_on(monkeypatch):
    monkeypatch.setenv("LMWRAP_CPU_COMPILE", "1")


def _runner(pipe):
    return pipe._loop.engine.runner


def _expected(pipe, ref, prompts, lens):
    out = []
    for prompt, n in zip(prompts, lens):
        ids = pipe.tokenizer.encode(prompt)
        out.append(reference_greedy(ref, ids, n)[len(ids):])
    return out


def test_compiled_steps_cache_write_matches_the_reference_and_refuses_a_padding_slot():
    torch.manual_seed(0)
    k, v = torch.randn(3, 2, 8), torch.randn(3, 2, 8)
    slots = torch.tensor([5, 9, 15])
    caches = [torch.randn(4, 4, 2, 8) for _ in range(2)]
    expected = [c.clone() for c in caches]
    reference.fill_kv_cache(k, v, *expected, slots)
    fill_kv_cache_slots(k, v, *caches, slots)
    for got, want in zip(caches, expected):
        assert torch.equal(got, want)
    with pytest.raises(IndexError):  # the compiled steps never pad; a padding slot must not write anywhere
        fill_kv_cache_slots(k, v, *caches, torch.tensor([5, -1, 9]))


def test_compiled_decode_is_token_identical_to_transformers(tiny_model_dir):
    path = tiny_model_dir("llama")
    ref = load_reference(path)
    with pipeline(path, tiny_config(block_size=4)) as pipe:
        graphs = _runner(pipe).decode_graphs
        assert isinstance(graphs, CompiledDecode) and not graphs.failed
        configs = [GenerationConfig(max_new_tokens=n, ignore_eos=True) for n in OUTPUT_LENS]
        got = [r.token_ids for r in pipe(PROMPTS, gen_config=configs, do_preprocess=False)]
        assert graphs.num_runs >= 10 and not graphs.failed
        assert_all_blocks_free(pipe)
    assert got == _expected(pipe, ref, PROMPTS, OUTPUT_LENS)


def test_compiled_logits_match_eager_logits(tiny_model_dir):
    with pipeline(tiny_model_dir("llama"), tiny_config(block_size=4)) as pipe:
        assert_compiled_decode_matches_eager(_runner(pipe))


def test_sessions_prefix_cache_and_preemption_through_the_compiled_step(tiny_model_dir, monkeypatch):
    path = tiny_model_dir("llama")
    ref = load_reference(path)
    gen = GenerationConfig(max_new_tokens=7, ignore_eos=True)
    configs = [GenerationConfig(max_new_tokens=n, ignore_eos=True) for n in OUTPUT_LENS]

    def session_turns(pipe):
        sess = pipe.chat("hello world", gen_config=gen)
        sess = pipe.chat("The capital of France", session=sess, gen_config=gen)
        tokens = sess.response.token_ids
        sess.close()
        return tokens

    monkeypatch.setenv("LMWRAP_CPU_COMPILE", "0")
    with pipeline(path, tiny_config(block_size=4)) as pipe:
        assert _runner(pipe).decode_graphs is None
        eager_turns = session_turns(pipe)
    monkeypatch.setenv("LMWRAP_CPU_COMPILE", "1")
    with pipeline(path, tiny_config(block_size=4)) as pipe:
        graphs = _runner(pipe).decode_graphs
        assert session_turns(pipe) == eager_turns
        assert graphs.num_runs > 0 and not graphs.failed
    # 12 blocks of 4 tokens cannot hold six sequences of up to ~40 tokens at once: preemption.
    with pipeline(path, tiny_config(block_size=4, num_gpu_blocks=12, enable_prefix_caching=True)) as pipe:
        graphs = _runner(pipe).decode_graphs
        for _ in range(2):  # the second round hits the prefix cache
            got = [r.token_ids for r in pipe(PROMPTS, gen_config=configs, do_preprocess=False)]
            assert got == _expected(pipe, ref, PROMPTS, OUTPUT_LENS)
        stats = pipe.stats()
        assert stats["num_preemptions"] > 0 and stats["num_prefix_hit_tokens"] > 0
        assert graphs.num_runs > 0 and not graphs.failed
        assert_all_blocks_free(pipe)


@pytest.mark.parametrize("how", ["eager_mode", "env"])
def test_switched_off(how, tiny_model_dir, monkeypatch):
    if how == "env":
        monkeypatch.setenv("LMWRAP_CPU_COMPILE", "0")
    with pipeline(tiny_model_dir("llama"), tiny_config(eager_mode=how == "eager_mode")) as pipe:
        assert _runner(pipe).decode_graphs is None


def _no_compiler(*args, **kwargs):
    raise RuntimeError("InductorError: no C++ compiler found")


def _generate(pipe):
    configs = [GenerationConfig(max_new_tokens=n, ignore_eos=True) for n in OUTPUT_LENS]
    return [r.token_ids for r in pipe(PROMPTS, gen_config=configs, do_preprocess=False)]


def test_a_failed_compile_warns_once_and_decodes_eagerly(tiny_model_dir, monkeypatch, caplog):
    monkeypatch.setattr(cpu_programs, "load_or_compile", _no_compiler)
    monkeypatch.setattr(cpu_graphs, "compiled_decode_logits", lambda: _no_compiler)
    path = tiny_model_dir("llama")
    ref = load_reference(path)
    with caplog.at_level(logging.WARNING, logger="lmwrap_engine"):
        with pipeline(path, tiny_config(block_size=4)) as pipe:
            graphs = _runner(pipe).decode_graphs
            assert graphs.failed
            got = _generate(pipe)
            assert graphs.num_runs >= 10
    warnings = [r for r in caplog.records if "decoding eagerly" in r.getMessage()]
    assert len(warnings) == 1
    assert got == _expected(pipe, ref, PROMPTS, OUTPUT_LENS)


def test_without_the_ahead_of_time_compile_torch_compile_serves(tiny_model_dir, monkeypatch, caplog):
    """An older torch (no ``aot_compile``) or a model it cannot serialise: Dynamo's guarded programs instead."""
    monkeypatch.setattr(cpu_programs, "load_or_compile", _no_compiler)
    path = tiny_model_dir("llama")
    ref = load_reference(path)
    with caplog.at_level(logging.WARNING, logger="lmwrap_engine"):
        with pipeline(path, tiny_config(block_size=4)) as pipe:
            graphs = _runner(pipe).decode_graphs
            got = _generate(pipe)
            assert not graphs.failed and set(graphs.programs) == {"1", "2..4", ">4"}
    assert any("using torch.compile" in r.getMessage() for r in caplog.records)
    assert got == _expected(pipe, ref, PROMPTS, OUTPUT_LENS)


def test_programs_are_saved_and_loaded_by_the_next_engine(tiny_model_dir, tmp_path, monkeypatch, caplog):
    """The second engine of the same model loads every program from disk (no trace) and decodes the
    same tokens; a model of another shape gets programs of its own; a damaged file is compiled over."""
    monkeypatch.setenv("LMWRAP_CACHE", str(tmp_path))
    path = tiny_model_dir("llama")
    outputs, messages = [], []
    for _ in range(2):
        caplog.clear()
        with caplog.at_level(logging.INFO, logger="lmwrap_engine"):
            with pipeline(path, tiny_config(block_size=4), log_level="INFO") as pipe:
                outputs.append(_generate(pipe))
                assert set(_runner(pipe).decode_graphs.programs) == {"1", "2..4", ">4"}
        messages.append([r.getMessage() for r in caplog.records
                         if "the CPU decode step for batch" in r.getMessage() or "the CPU prefill step" in r.getMessage()])
    assert outputs[0] == outputs[1]
    assert len(messages[0]) == 4 and all(m.startswith("compiled and saved") for m in messages[0])
    assert len(messages[1]) == 4 and all(m.startswith("loaded") for m in messages[1])
    files = sorted((tmp_path / "decode-programs").iterdir())
    assert len(files) == 4  # batch 1, 2..4, >4, and the prefill and mixed steps

    stale = tmp_path / "decode-programs" / "decode-stale.bin"  # unused for longer than UNUSED_DAYS
    stale.write_bytes(b"old")
    old = time.time() - (cpu_programs.UNUSED_DAYS + 1) * 86400
    os.utime(stale, (old, old))
    with pipeline(path, tiny_config(block_size=8)) as pipe:  # another KV cache shape: other programs
        pipe("hello", gen_config=GenerationConfig(max_new_tokens=2, ignore_eos=True), do_preprocess=False)
    assert not stale.exists()  # pruned when the new program was saved
    assert len(list((tmp_path / "decode-programs").iterdir())) == 6  # + its batch-1 and prefill programs

    for f in files:
        f.write_bytes(f.read_bytes()[:100])
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="lmwrap_engine"):
        with pipeline(path, tiny_config(block_size=4)) as pipe:  # batch 1 and prefill: two compiled over
            one = pipe(PROMPTS[0], gen_config=GenerationConfig(max_new_tokens=OUTPUT_LENS[0], ignore_eos=True),
                       do_preprocess=False)
    assert one.token_ids == outputs[0][0]
    assert any("could not load the compiled CPU program" in r.getMessage() for r in caplog.records)
    assert sum(f.stat().st_size > 100 for f in files) == 2


VEC_ISA_PROBE = """
import sys
from torch._inductor import config, cpu_vec_isa
from lmwrap_engine.engine.cpu_programs import vec_isa
picked = vec_isa()
print(picked, config.cpp.vec_isa_ok, picked == str(cpu_vec_isa.pick_vec_isa()), sep="|")
"""


@pytest.mark.skipif(platform.machine() not in ("x86_64", "AMD64"), reason="the record is kept for x86 CPUs only")
def test_inductors_instruction_set_probe_runs_once_per_machine(tmp_path):
    """The first process probes (and records what passed); a later one skips the probes and picks the
    same set; a record that does not cover every set the CPU reports keeps the probes on."""
    env = {**os.environ, "LMWRAP_CACHE": str(tmp_path)}

    def probe():
        out = subprocess.run([sys.executable, "-c", VEC_ISA_PROBE], env=env, check=True, capture_output=True,
                             text=True).stdout.strip().split("|")
        return out[0], out[1], out[2]

    first, ok_flag, consistent = probe()
    assert ok_flag == "None" and consistent == "True"
    [record] = (tmp_path / "vec-isa").iterdir()
    assert first in record.read_text().split("\n")
    assert probe() == (first, "True", "True")
    record.write_text("\n".join(record.read_text().split("\n")[:-1] + ["one that failed"]))
    assert probe() == (first, "None", "True")


SHARED_CACHE_ATTENTION = """
import torch
from lmwrap_engine.engine.cpu_programs import pin_vec_isa
from kernels import cpu_attention, reference
pin_vec_isa()
torch.manual_seed(0)
q, k_cache, v_cache = torch.randn(1, 4, 16), torch.randn(8, 16, 2, 16), torch.randn(8, 16, 2, 16)
tables, lens = torch.tensor([[1, 2]]), torch.tensor([20])
want = reference.paged_decode_attention(q, k_cache, v_cache, tables, lens, 0.25)
got = torch.compile(cpu_attention.paged_decode_attention, dynamic=False)(q, k_cache, v_cache, tables, lens, 0.25)
print((got - want).abs().max().item())
"""


@pytest.mark.skipif("avx512f" not in cpu_flags() or platform.machine() not in ("x86_64", "AMD64"),
                    reason="needs a CPU with AVX-512 to generate code for two vector widths")
def test_a_process_limited_to_avx2_never_takes_avx512_code_from_a_shared_inductor_cache(tmp_path):
    """Inductor's FX graph cache keys its code without the instruction set: a process limited to AVX2
    that found AVX-512 code for the same graph compiled it for 8-float vectors and got garbage (max error
    7.8e37 in torch 2.13). ``pin_vec_isa`` (every CPU engine calls it) gives each width its own entries."""
    env = {**os.environ, "TORCHINDUCTOR_CACHE_DIR": str(tmp_path / "inductor"), "LMWRAP_CACHE": str(tmp_path)}

    def max_error(capability):
        run_env = {**env, "ATEN_CPU_CAPABILITY": capability}
        out = subprocess.run([sys.executable, "-c", SHARED_CACHE_ATTENTION], env=run_env, check=True,
                             capture_output=True, text=True).stdout.strip().split("\n")[-1]
        return float(out)

    # twice: the first process also probes the instruction sets (cpu_programs.vec_isa), which changes
    # inductor's config and so the key; the second fills the cache as every later process finds it
    assert max_error("avx512") < 1e-5 and max_error("avx512") < 1e-5
    assert max_error("avx2") < 1e-5
