"""The C++ CPU decode attention (kernels/cpu_paged_decode.py) against the reference, in the dispatch and in the engine."""
import logging

import pytest
import torch

import kernels
from kernels import cpu_paged_decode, reference
from test_cpu_attention import LENS, TOL, _paged_case

pytestmark = pytest.mark.skipif(not cpu_paged_decode.available(),
                                reason="the kernel needs an x86 CPU whose torch kernels run AVX2 or AVX-512")


@pytest.mark.parametrize("dtype,lens,block", [
    (torch.float32, LENS, 16), (torch.bfloat16, LENS, 16), (torch.float32, [37], 16), (torch.float32, LENS, 4),
    (torch.bfloat16, LENS, 4), (torch.float32, LENS + [64, 65, 130, 200], 64), (torch.float32, [0, 0], 16)],
    ids=["fp32", "bf16", "fp32-one-row", "fp32-block4", "bf16-block4", "fp32-block64", "all-empty"])
def test_kernel_matches_reference(dtype, lens, block):
    q, k_cache, v_cache, tables, kv_lens = _paged_case(lens, dtype, block=block)  # stale tables, NaN slots
    expected = reference.paged_decode_attention(q, k_cache, v_cache, tables, kv_lens, 0.2)
    got = cpu_paged_decode.paged_decode_attention(q, k_cache, v_cache, tables, kv_lens, 0.2)
    assert got.dtype == q.dtype and got.shape == q.shape and not got.isnan().any()
    torch.testing.assert_close(got, expected, **TOL[dtype])
    for b, n in enumerate(lens):
        if n == 0:
            assert (got[b] == 0).all()


def test_kernel_with_large_scores_long_rows_and_fp32_queries_on_a_bf16_cache():
    # scores far apart (the online softmax rescales across blocks), rows of many blocks, int64 metadata
    q, k_cache, v_cache, tables, kv_lens = _paged_case([300, 1, 129, 77], torch.bfloat16, seed=3, block=16)
    q = q.float() * 30
    expected = reference.paged_decode_attention(q, k_cache.float(), v_cache.float(), tables, kv_lens, 0.2)
    got = cpu_paged_decode.paged_decode_attention(q, k_cache, v_cache, tables.long(), kv_lens.long(), 0.2)
    assert got.dtype == torch.float32
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)


def test_no_rows():
    q, k_cache, v_cache, tables, kv_lens = _paged_case([5], torch.float32)
    got = cpu_paged_decode.paged_decode_attention(q[:0], k_cache, v_cache, tables[:0], kv_lens[:0], 0.2)
    assert got.shape == (0, *q.shape[1:])


def test_importing_the_kernel_leaves_triton_unimported():
    """tests/test_kernels.py must set TRITON_INTERPRET before triton's import; this module is imported first."""
    import subprocess
    import sys
    code = ("import sys; from kernels import cpu_paged_decode as c; c.available(); "
            "assert 'triton' not in sys.modules and 'torch._dynamo' not in sys.modules, 'imported'")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]


def test_a_row_longer_than_its_table_is_refused():
    q, k_cache, v_cache, tables, kv_lens = _paged_case([20, 5], torch.float32)
    kv_lens[0] = tables.shape[1] * k_cache.shape[1] + 1
    with pytest.raises(RuntimeError, match="longer than its block table"):
        cpu_paged_decode.paged_decode_attention(q, k_cache, v_cache, tables, kv_lens, 0.2)


def test_dispatch_takes_the_kernel_and_the_switch_turns_it_off(monkeypatch):
    calls = []
    real = cpu_paged_decode._extension
    monkeypatch.setattr(cpu_paged_decode, "_extension", lambda: calls.append(1) or real())
    q, k_cache, v_cache, tables, kv_lens = _paged_case([5, 20], torch.float32)
    kernels.paged_decode_attention(q, k_cache, v_cache, tables, kv_lens, 0.2)
    assert calls
    for choice in ("compiled", "reference"):
        monkeypatch.setenv("LMWRAP_CPU_ATTENTION", choice)
        calls.clear()
        kernels.paged_decode_attention(q, k_cache, v_cache, tables, kv_lens, 0.2)
        assert not calls


def test_a_failed_build_leaves_inductors_kernel_serving(monkeypatch, caplog):
    from torch.utils import cpp_extension

    def broken(*args, **kwargs):
        raise RuntimeError("no C++ compiler")
    # the dispatch's own module: tests/test_kernels.py drops kernels' submodules, and a later import makes another
    module = kernels.cpu_paged_decode
    monkeypatch.setattr(cpp_extension, "load_inline", broken)
    monkeypatch.setattr(module, "_built", None)
    module._extension.cache_clear()
    try:
        with caplog.at_level(logging.WARNING, logger="lmwrap_engine"):
            assert not module.available() and not module.available()
        assert len([r for r in caplog.records if "no C++ compiler" in r.getMessage()]) == 1
        q, k_cache, v_cache, tables, kv_lens = _paged_case([5, 20], torch.float32)
        assert not module.supports(k_cache)
        expected = reference.paged_decode_attention(q, k_cache, v_cache, tables, kv_lens, 0.2)
        torch.testing.assert_close(kernels.paged_decode_attention(q, k_cache, v_cache, tables, kv_lens, 0.2),
                                   expected, **TOL[torch.float32])
    finally:
        monkeypatch.undo()  # _built back, load_inline back
        module._extension.cache_clear()
    assert module.available()


@pytest.mark.parametrize("compile_steps", ["1", "0"], ids=["compiled-steps", "eager"])
def test_engine_greedy_parity_through_the_kernel(monkeypatch, tiny_model_dir, compile_steps):
    """Token-identical to transformers with the kernel traced into the compiled decode programs (an op, after
    the KV write) and in the eager path; every KV block returns to the pool."""
    from test_cpu_compiled_decode import OUTPUT_LENS, PROMPTS, _expected, _runner
    from tiny_models import assert_all_blocks_free, load_reference, tiny_config

    from lmwrap_engine import GenerationConfig, pipeline
    from lmwrap_engine.engine.cpu_graphs import CompiledDecode

    monkeypatch.setenv("LMWRAP_CPU_COMPILE", compile_steps)
    calls = []
    real = cpu_paged_decode._extension
    monkeypatch.setattr(cpu_paged_decode, "_extension", lambda: calls.append(1) or real())
    path = tiny_model_dir("llama")
    with pipeline(path, tiny_config(block_size=16)) as pipe:
        graphs = _runner(pipe).decode_graphs
        configs = [GenerationConfig(max_new_tokens=n, ignore_eos=True) for n in OUTPUT_LENS]
        calls.clear()
        got = [r.token_ids for r in pipe(PROMPTS, gen_config=configs, do_preprocess=False)]
        if compile_steps == "1":
            assert isinstance(graphs, CompiledDecode) and graphs.num_runs >= 10 and not graphs.failed
        assert calls  # the op ran (its Python kernel looks the extension up on every call)
        assert_all_blocks_free(pipe)
        expected = _expected(pipe, load_reference(path), PROMPTS, OUTPUT_LENS)
    assert got == expected
