"""The compiled in-place CPU attention (kernels/cpu_attention.py, kernels/cpu_compiled.py) against the reference."""
import logging

import pytest
import torch

import kernels
from kernels import cpu_attention, cpu_compiled, reference

HEADS, KV_HEADS, DIM, BLOCK = 8, 2, 32, 16
# ragged, block boundaries (16, 17, 32), one-token and empty rows
LENS = [0, 1, 15, 16, 17, 32, 45, 3]


def _paged_case(lens, dtype, seed=0, q_tokens=None, block=BLOCK):
    """A NaN-filled cache holding random K/V for each row's ``lens``, tables whose unused entries are stale."""
    gen = torch.Generator().manual_seed(seed)
    batch = len(lens)
    width = max(1, (max(lens) + block - 1) // block) + 1  # one spare column: always stale
    num_blocks = batch * width + 2
    k_cache = torch.full((num_blocks, block, KV_HEADS, DIM), float("nan"), dtype=dtype)
    v_cache = torch.full_like(k_cache, float("nan"))
    tables = torch.randperm(num_blocks - 2, generator=gen)[: batch * width].view(batch, width) + 2
    for b, n in enumerate(lens):
        used = (n + block - 1) // block
        tables[b, used:] = torch.randint(-5, 10**6, (width - used,), generator=gen)  # stale: anything
        slots = (tables[b, :used].repeat_interleave(block) * block + torch.arange(block).repeat(used))[:n]
        reference.fill_kv_cache(torch.randn(n, KV_HEADS, DIM, generator=gen).to(dtype),
                                torch.randn(n, KV_HEADS, DIM, generator=gen).to(dtype), k_cache, v_cache, slots)
    q = torch.randn(q_tokens or batch, HEADS, DIM, generator=gen).to(dtype)
    return q, k_cache, v_cache, tables.int(), torch.tensor(lens, dtype=torch.int32)


TOL = {torch.float32: dict(atol=1e-5, rtol=1e-5), torch.bfloat16: dict(atol=2e-2, rtol=2e-2)}


@pytest.mark.parametrize("dtype,lens,block", [
    (torch.float32, LENS, 16), (torch.bfloat16, LENS, 16), (torch.float32, [37], 16), (torch.bfloat16, [37], 16),
    (torch.float32, LENS + [64, 65, 130], 64)], ids=["fp32", "bf16", "fp32-one-row", "bf16-one-row", "fp32-block64"])
def test_compiled_decode_matches_reference(dtype, lens, block):
    q, k_cache, v_cache, tables, kv_lens = _paged_case(lens, dtype, block=block)
    expected = reference.paged_decode_attention(q, k_cache, v_cache, tables, kv_lens, 0.2)
    got = cpu_compiled.paged_decode_attention(q, k_cache, v_cache, tables, kv_lens, 0.2)
    assert cpu_compiled.enabled(), "compilation failed: the test compared the reference with itself"
    assert not got.isnan().any()
    torch.testing.assert_close(got, expected, **TOL[dtype])
    if 0 in lens:
        assert (got[lens.index(0)] == 0).all()


def test_compiled_decode_is_called_by_the_dispatch(monkeypatch):
    monkeypatch.setenv("LMWRAP_CPU_ATTENTION", "compiled")  # by default the C++ kernel serves (test_cpu_paged_decode)
    calls = []
    real = cpu_compiled.paged_decode_attention
    monkeypatch.setattr(cpu_compiled, "paged_decode_attention", lambda *a: calls.append(1) or real(*a))
    q, k_cache, v_cache, tables, kv_lens = _paged_case([5, 20], torch.float32)
    kernels.paged_decode_attention(q, k_cache, v_cache, tables, kv_lens, 0.2)
    assert calls
    monkeypatch.setenv("LMWRAP_CPU_ATTENTION", "reference")
    calls.clear()
    kernels.paged_decode_attention(q, k_cache, v_cache, tables, kv_lens, 0.2)
    assert not calls


def test_failed_compilation_falls_back_to_the_reference_with_one_warning(monkeypatch, caplog):
    def broken():
        raise RuntimeError("no C++ compiler")
    monkeypatch.setenv("LMWRAP_CPU_ATTENTION", "compiled")
    monkeypatch.setattr(cpu_compiled, "_compiled_decode", broken)
    monkeypatch.setattr(cpu_compiled, "_broken", False)
    q, k_cache, v_cache, tables, kv_lens = _paged_case([5, 20, 0], torch.float32)
    expected = reference.paged_decode_attention(q, k_cache, v_cache, tables, kv_lens, 0.2)
    with caplog.at_level(logging.WARNING, logger="kernels.cpu_compiled"):
        for _ in range(3):
            torch.testing.assert_close(kernels.paged_decode_attention(q, k_cache, v_cache, tables, kv_lens, 0.2),
                                       expected, atol=0, rtol=0)
    assert len([r for r in caplog.records if "no C++ compiler" in r.getMessage()]) == 1
    assert not cpu_compiled.enabled()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_traceable_prefill_matches_reference(dtype):
    # (new tokens, tokens already cached): fresh prompts, chunks after history, block boundaries
    chunks = [(5, 0), (1, 16), (17, 15), (16, 0), (3, 29)]
    q_lens = [n for n, _ in chunks]
    q, k_cache, v_cache, tables, kv_lens = _paged_case([n + h for n, h in chunks], dtype, seed=1,
                                                       q_tokens=sum(q_lens) + 2)  # + 2 padding rows
    cu = torch.tensor([0] + torch.tensor(q_lens).cumsum(0).tolist(), dtype=torch.int32)
    expected = reference.paged_prefill_attention(q, k_cache, v_cache, tables, cu, kv_lens, 0.2)
    got = cpu_attention.paged_prefill_attention(q, k_cache, v_cache, tables, cu, kv_lens, 0.2)
    torch.testing.assert_close(got[:-2], expected[:-2], **TOL[dtype])
    assert (got[-2:] == 0).all()


def test_engine_greedy_parity_through_the_compiled_path(monkeypatch, tiny_model_dir):
    from test_engine_parity import PROMPTS, GREEDY, _generate
    from tiny_models import load_reference, reference_greedy
    from transformers import AutoTokenizer

    from lmwrap_engine import PytorchEngineConfig

    monkeypatch.setenv("LMWRAP_CPU_ATTENTION", "compiled")  # inductor's kernel, eager and traced into the programs
    calls = []
    real = cpu_compiled.paged_decode_attention
    monkeypatch.setattr(cpu_compiled, "paged_decode_attention", lambda *a: calls.append(1) or real(*a))
    path = tiny_model_dir("llama")
    tok = AutoTokenizer.from_pretrained(path)
    prompts_ids = [tok.encode(p) for p in PROMPTS]
    ref = load_reference(path)
    expected = [reference_greedy(ref, ids, GREEDY.max_new_tokens)[len(ids):] for ids in prompts_ids]
    got, _ = _generate(path, prompts_ids, PytorchEngineConfig(dtype="float32", num_gpu_blocks=64, block_size=16))
    assert calls and cpu_compiled.enabled()
    assert got == expected


@pytest.mark.parametrize("compiled", [False, True], ids=["eager", "compiled"])
def test_write_kv_matches_the_reference_write_and_touches_nothing_else(compiled):
    torch.manual_seed(0)
    k, v = torch.randn(3, KV_HEADS, DIM), torch.randn(3, KV_HEADS, DIM)
    slots = torch.tensor([5, 16, 63])  # inside a block, a block's first slot, the last slot
    caches = [torch.randn(4, BLOCK, KV_HEADS, DIM) for _ in range(2)]
    expected = [c.clone() for c in caches]
    reference.fill_kv_cache(k, v, *expected, slots)
    write = torch.compile(cpu_attention.write_kv, fullgraph=True) if compiled else cpu_attention.write_kv
    write(k, v, *caches, slots)
    for got, want in zip(caches, expected):
        assert torch.equal(got, want)
