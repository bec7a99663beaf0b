"""The CPU fast path: 4-bit GGUF weights kept 4-bit (quant_linear.py), bf16 on CPUs with native bf16."""
import os
import shutil

import numpy as np
import pytest
import torch
from torch import nn

from tiny_models import assert_compiled_decode_matches_eager, load_reference, reference_greedy

from lmwrap_engine import GenerationConfig, PytorchEngineConfig, pipeline
from lmwrap_engine.config import EngineConfig
from lmwrap_engine.engine import cpu_features, model_runner
from lmwrap_engine.engine.model_runner import ModelRunner
from lmwrap_engine.models.layers import prepacked_linear
from lmwrap_engine.models.layers.bf16_decode_linear import MAX_BF16_ROWS, Bf16DecodeLinear, convert_bf16_decode_linears
from lmwrap_engine.models.layers.quant_linear import (Int4Linear, convert_int4_linears, find_int4_lattice,
                                                       prepack_dense_weights)
from test_engine_parity import run_prefill_logits

gguf = pytest.importorskip("gguf")
Q = gguf.GGMLQuantizationType


def onednn_packs_bf16() -> bool:
    """oneDNN packs bf16 weights only where the CPU has AVX-512; elsewhere the calls keep ``F.linear``."""
    return prepacked_linear.prepack(torch.zeros(32, 32, dtype=torch.bfloat16)) is not None


def gguf_roundtrip(w: torch.Tensor, qtype) -> torch.Tensor:
    """``w`` quantised and dequantised the way a .gguf file stores it (the gguf package mirrors llama.cpp)."""
    x = w.detach().float().numpy()
    return torch.from_numpy(np.ascontiguousarray(gguf.quants.dequantize(gguf.quants.quantize(x, qtype), qtype)))


@pytest.mark.parametrize("qtype", [Q.Q4_0, Q.Q4_1])
def test_int4_lattice_recovers_gguf_4bit_weights_exactly(qtype):
    torch.manual_seed(0)
    w = gguf_roundtrip(torch.randn(64, 128) * 0.1, qtype)
    q, step, base = find_int4_lattice(w)
    assert q.min() >= 0 and q.max() <= 15
    rebuilt = (q.view(64, 4, 32) * step[..., None] + base[..., None]).view(64, 128)
    torch.testing.assert_close(rebuilt, w, atol=1e-6, rtol=0)


@pytest.mark.parametrize("qtype", [None, Q.Q8_0, Q.Q5_1])
def test_int4_lattice_rejects_other_weights(qtype):
    torch.manual_seed(0)
    w = torch.randn(64, 128) * 0.1
    if qtype is not None:
        w = gguf_roundtrip(w, qtype)
    assert find_int4_lattice(w) is None


@pytest.mark.parametrize("dtype,atol", [(torch.float32, 1e-4), (torch.bfloat16, 0.05)])
def test_int4_linear_matches_the_dense_linear(dtype, atol):
    torch.manual_seed(0)
    dense = nn.Linear(128, 48, bias=True)
    with torch.no_grad():
        dense.weight.copy_(gguf_roundtrip(dense.weight, Q.Q4_1))
    model = nn.Sequential(dense)
    assert convert_int4_linears(model, dtype) == 1
    assert isinstance(model[0], Int4Linear)
    for rows in (1, 4, 9):  # up to 4 rows the 4-bit kernel, more take the dense copy
        x = torch.randn(rows, 1, 128).to(dtype)
        expected = nn.functional.linear(x, dense.weight.to(dtype), dense.bias.to(dtype)).float()
        torch.testing.assert_close(model(x).float(), expected, atol=atol, rtol=0)


@pytest.mark.skipif(not torch.backends.mkldnn.is_available(), reason="torch built without oneDNN")
def test_prepacked_dense_weight_gives_the_dense_linears_bits_for_prefill():
    """Int4Linears take a oneDNN-blocked copy of the dense weight for calls of more than 4 rows: in bf16
    the same bits as ``F.linear``, in fp32 the same to float rounding; the 4-bit kernel still serves 4
    rows or fewer. Plain ``nn.Linear``s are left alone."""
    torch.manual_seed(0)
    dense = nn.Linear(128, 48, bias=True)
    with torch.no_grad():
        dense.weight.copy_(gguf_roundtrip(dense.weight, Q.Q4_1))
    model = nn.Sequential(dense, nn.Sequential(nn.Linear(48, 32, bias=False)))
    convert_int4_linears(model, torch.bfloat16)
    model = model.to(torch.bfloat16)
    fp32 = nn.Sequential(nn.Linear(128, 48))
    with torch.no_grad():
        fp32[0].weight.copy_(dense.weight)
        fp32[0].bias.copy_(dense.bias)
    convert_int4_linears(fp32, torch.float32, kernel_dtype=torch.bfloat16)
    bf16_packs = onednn_packs_bf16()
    assert prepack_dense_weights(model) == int(bf16_packs) and prepack_dense_weights(fp32) == 1
    layer = model[0]
    assert (layer.packed_dense is not None) is bf16_packs and model[1][0].__class__ is nn.Linear
    w, b = dense.weight.to(torch.bfloat16), dense.bias.to(torch.bfloat16)
    for shape in ((9, 128), (130, 128), (9, 1, 128)):
        x = torch.randn(shape)
        assert torch.equal(layer(x.to(torch.bfloat16)), nn.functional.linear(x.to(torch.bfloat16), w, b)), shape
        torch.testing.assert_close(fp32[0](x), nn.functional.linear(x, dense.weight, dense.bias), atol=1e-5, rtol=1e-5)
    x = torch.randn(3, 128).to(torch.bfloat16)  # 4 rows or fewer: the 4-bit kernel, not the dense bits
    assert not torch.equal(layer(x), nn.functional.linear(x, w, b))


def test_compiled_steps_reach_the_prepacked_weights(monkeypatch):
    """The packed copy never enters a graph: the lookup takes the plain weight and finds the copy at run
    time, eager (called directly) and inside an inductor-compiled function (through the opaque op) alike;
    without a copy it is ``F.linear``."""
    from lmwrap_engine.models.layers import prepacked_linear
    if not torch.backends.mkldnn.is_available():
        pytest.skip("no oneDNN in this torch")
    hits = []
    lookup = prepacked_linear._lookup
    monkeypatch.setattr(prepacked_linear, "_lookup", lambda x, w: hits.append(lookup(x, w)) or hits[-1])
    torch.manual_seed(0)
    head = Bf16DecodeLinear(nn.Linear(64, 96, bias=False).requires_grad_(False))  # as the engine's weights
    x = torch.randn(8, 64)
    want = nn.functional.linear(x, head.weight)
    torch.testing.assert_close(head(x), want)  # not packed yet: F.linear
    assert hits == [None]
    assert prepack_dense_weights(nn.Sequential(head)) == 1
    eager = head(x)
    compiled = torch.compile(head, fullgraph=True)(x)
    assert len(hits) == 3 and all(h is head.packed_dense.packed for h in hits[1:])
    assert torch.equal(compiled, eager)
    torch.testing.assert_close(eager, want, atol=1e-5, rtol=1e-5)
    head.packed_dense = None  # the registry holds copies weakly: the owner's reference is what keeps one
    import gc
    gc.collect()
    head(x)
    assert hits[-1] is None


def test_large_fp32_calls_take_mkl_and_smaller_ones_the_packed_copy(monkeypatch):
    """From ``MKL_MIN_ROWS`` rows (a large prefill) an fp32 call goes to ``F.linear`` (MKL's sgemm), which is
    faster there; decode-sized calls keep the packed copy."""
    import types
    from lmwrap_engine.models.layers import prepacked_linear
    if not torch.backends.mkldnn.is_available():
        pytest.skip("no oneDNN in this torch")
    torch.manual_seed(0)
    head = Bf16DecodeLinear(nn.Linear(64, 96, bias=False).requires_grad_(False))
    assert prepack_dense_weights(nn.Sequential(head)) == 1
    rows = []
    real = nn.functional.linear
    monkeypatch.setattr(prepacked_linear, "F", types.SimpleNamespace(linear=lambda x, *a: rows.append(x.shape[0])
                                                                     or real(x, *a)))
    small, large = torch.randn(8, 64), torch.randn(prepacked_linear.MKL_MIN_ROWS, 64)
    torch.testing.assert_close(head(small), real(small, head.weight), atol=1e-5, rtol=1e-5)
    assert torch.equal(head(large), real(large, head.weight))
    assert rows == [prepacked_linear.MKL_MIN_ROWS]


def test_int4_linear_keeps_its_kernel_scales_through_model_to():
    """``model.to(dtype)`` casts the dense copy; the 4-bit kernel's scales stay in the kernel's dtype."""
    torch.manual_seed(0)
    dense = nn.Linear(128, 48, bias=False)
    with torch.no_grad():
        dense.weight.copy_(gguf_roundtrip(dense.weight, Q.Q4_1))
    model = nn.Sequential(dense)
    convert_int4_linears(model, torch.float32, kernel_dtype=torch.bfloat16)
    before = model[0].scales_zeros.clone()
    for dtype in (torch.float32, torch.bfloat16, torch.float32):
        model = model.to(dtype)
        assert model[0].weight.dtype == dtype
        assert model[0].scales_zeros.dtype == torch.bfloat16 and torch.equal(model[0].scales_zeros, before)
    x = torch.randn(1, 128)
    torch.testing.assert_close(model(x), nn.functional.linear(x, dense.weight), atol=0.05, rtol=0)


def test_tied_and_non_lattice_linears_stay_dense():
    torch.manual_seed(0)
    emb = nn.Embedding(64, 32)
    head = nn.Linear(32, 64, bias=False)
    with torch.no_grad():
        emb.weight.copy_(gguf_roundtrip(emb.weight, Q.Q4_1))
    head.weight = emb.weight  # tied: the embedding still needs the float table
    model = nn.ModuleDict(dict(emb=emb, head=head, other=nn.Linear(32, 32)))
    assert convert_int4_linears(model, torch.float32) == 0


@pytest.fixture(scope="module")
def q4_model_dir(tiny_model_dir, tmp_path_factory):
    """The tiny llama with every projection snapped to Q4_1 (Q4_0 for the MLP's down projection),
    saved as float32 like a converted GGUF."""
    from transformers import AutoModelForCausalLM
    src = tiny_model_dir()
    dst = str(tmp_path_factory.mktemp("q4") / "llama-q4")
    model = AutoModelForCausalLM.from_pretrained(src, torch_dtype=torch.float32)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("proj.weight"):
                p.copy_(gguf_roundtrip(p, Q.Q4_0 if "down_proj" in name else Q.Q4_1))
    model.save_pretrained(dst, safe_serialization=True)
    for f in os.listdir(src):
        if f.startswith("tokenizer") or f.endswith(".jinja") or f == "special_tokens_map.json":
            shutil.copy(os.path.join(src, f), dst)
    return dst


def _runner(path, dtype):
    return ModelRunner(path, EngineConfig(dtype=dtype, num_gpu_blocks=16, block_size=16, device_type="cpu"))


def _int4_count(runner):
    return sum(isinstance(m, Int4Linear) for m in runner.model.modules())


def test_int4_path_in_float32_matches_transformers_logits_and_greedy(q4_model_dir):
    """Exact check of the 4-bit path: fp32 activations over the recovered 4-bit weights equal
    transformers on the dequantised weights (the engine only picks int4 for bf16; forced here)."""
    runner = _runner(q4_model_dir, "float32")
    assert convert_int4_linears(runner.model, torch.float32) == 2 * 4  # qkv, o, gate_up, down per layer
    ref = load_reference(q4_model_dir)
    ids = list(range(3, 40))
    with torch.no_grad():
        expected = ref(torch.tensor([ids])).logits[0]
    for chunks in ([len(ids)], [30] + [1] * 7):
        torch.testing.assert_close(run_prefill_logits(runner, ids, chunks), expected, atol=2e-4, rtol=1e-4)
    want = reference_greedy(ref, ids[:10], 12)
    got = list(ids[:10])
    for _ in range(12):
        got.append(int(run_prefill_logits(runner, got, [len(got)])[-1].argmax()))
    assert got == want


def test_bf16_engine_keeps_4bit_weights_4bit(q4_model_dir, monkeypatch):
    int4 = _runner(q4_model_dir, "bfloat16")
    assert _int4_count(int4) == 8
    assert int4.model.model.layers[0].mlp.down_proj.packed_weight.dtype == torch.uint8
    if onednn_packs_bf16():  # prefill's dense products through oneDNN-blocked weights
        assert int4.model.model.layers[0].mlp.down_proj.packed_dense is not None
    monkeypatch.setenv("LMWRAP_INT4", "0")
    dense = _runner(q4_model_dir, "bfloat16")
    assert _int4_count(dense) == 0
    ids = list(range(3, 40))
    full = run_prefill_logits(_runner(q4_model_dir, "float32"), ids, [len(ids)])
    for runner in (int4, dense):
        torch.testing.assert_close(run_prefill_logits(runner, ids, [30] + [1] * 7), full, atol=0.2, rtol=0)


def _pipeline_greedy(path, prompts, n):
    with pipeline(path, PytorchEngineConfig(dtype="bfloat16", num_gpu_blocks=32, block_size=16)) as pipe:
        return [[t for d in pipe.stream_generate(input_ids=ids, gen_config=GenerationConfig(
            max_new_tokens=n, ignore_eos=True)) for t in d.token_ids] for ids in prompts]


def test_bf16_int4_pipeline_greedy_matches_transformers_bf16(q4_model_dir):
    ref = load_reference(q4_model_dir).to(torch.bfloat16)
    prompts = [list(range(3, 20)), list(range(50, 90))]
    got = _pipeline_greedy(q4_model_dir, prompts, 8)
    assert got == [reference_greedy(ref, ids, 8)[len(ids):] for ids in prompts]


@pytest.fixture(scope="module")
def q4_1_gguf(tiny_model_dir, tmp_path_factory):
    from test_gguf import write_gguf
    return write_gguf(tiny_model_dir(), str(tmp_path_factory.mktemp("gguf") / "tiny.Q4_1.gguf"), Q.Q4_1)


def test_q4_1_gguf_runs_4bit_on_cpu_bf16(q4_1_gguf, tmp_path):
    """The real path: .gguf -> converted fp32 folder -> recognised as 4-bit at load."""
    from lmwrap_engine.loader.gguf import gguf_to_hf_dir
    folder = gguf_to_hf_dir(q4_1_gguf, str(tmp_path))
    runner = _runner(folder, "bfloat16")
    assert _int4_count(runner) == 2 * 4 + 1  # every projection and the (untied) lm_head
    ids = list(range(3, 40))
    full = run_prefill_logits(_runner(folder, "float32"), ids, [len(ids)])
    torch.testing.assert_close(run_prefill_logits(runner, ids, [30] + [1] * 7), full, atol=0.2, rtol=0)


def test_bench_compare_llama_cpp_runs_on_the_same_gguf(q4_1_gguf, tmp_path):
    pytest.importorskip("llama_cpp")
    from lmwrap_engine import bench_llamacpp
    assert bench_llamacpp.gguf_file(str(tmp_path)) is None
    assert "skipped" in bench_llamacpp.latency(str(tmp_path), [[5, 6, 7]], 4, 1)
    line = bench_llamacpp.latency(q4_1_gguf, [list(range(3, 40)), list(range(5, 30))], 8, 1)
    assert line.startswith("llama.cpp    : time to first token") and "tiny.Q4_1.gguf" in line, line
    line = bench_llamacpp.throughput(q4_1_gguf, [(list(range(3, 20)), 5), (list(range(9, 40)), 3)], 1)
    assert "output tok/s" in line, line


def test_bf16_decode_linear_serves_small_calls_from_its_bf16_copy():
    torch.manual_seed(0)
    emb = nn.Embedding(64, 32)
    head = nn.Linear(32, 64, bias=False)
    head.weight = emb.weight
    model = nn.ModuleDict(dict(emb=emb, head=head, other=nn.Linear(32, 16)))
    assert convert_bf16_decode_linears(model) == 2
    assert isinstance(model["head"], Bf16DecodeLinear) and model["head"].weight is model["emb"].weight
    other = model["other"]
    for rows in (1, MAX_BF16_ROWS, MAX_BF16_ROWS + 1, 9):
        x = torch.randn(rows, 32)
        got = other(x)
        assert got.dtype == torch.float32
        if rows <= MAX_BF16_ROWS:
            bf16 = nn.functional.linear(x.bfloat16(), other.weight.bfloat16()).float() + other.bias
            torch.testing.assert_close(got, bf16, atol=0, rtol=0)
            torch.testing.assert_close(got, nn.functional.linear(x, other.weight, other.bias), atol=0.05, rtol=0)
        else:
            torch.testing.assert_close(got, nn.functional.linear(x, other.weight, other.bias), atol=0, rtol=0)


@pytest.fixture
def no_fast_bf16(monkeypatch):
    """The engine sees a CPU without AVX-512 BF16 / AMX (an AVX2-only machine)."""
    monkeypatch.setattr(model_runner, "cpu_has_fast_bf16", lambda: False)


def _mixed_runner(path):
    runner = _runner(path, "auto")
    assert runner.dtype == torch.float32 and runner.small_batch_dtype == torch.bfloat16
    return runner


def test_auto_without_fast_bf16_is_fp32_with_bf16_small_batches(q4_model_dir, no_fast_bf16):
    """``auto`` on an AVX2-only CPU: an fp32 model whose 4-bit layers keep their 4-bit kernel (bf16
    activations) and whose other linears (the LM head) get a bf16 copy, both for calls of few rows.
    Prefill is exactly fp32; decode steps are close to it; ``float32`` asked for explicitly is exact."""
    runner = _mixed_runner(q4_model_dir)
    int4 = [m for m in runner.model.modules() if isinstance(m, Int4Linear)]
    assert len(int4) == 8
    assert all(m.kernel_dtype == torch.bfloat16 and m.scales_zeros.dtype == torch.bfloat16
               and m.weight.dtype == torch.float32 for m in int4)
    assert isinstance(runner.model.lm_head, Bf16DecodeLinear)
    exact = _runner(q4_model_dir, "float32")
    assert exact.small_batch_dtype == torch.float32 and _int4_count(exact) == 0
    assert not any(isinstance(m, Bf16DecodeLinear) for m in exact.model.modules())
    ids = list(range(3, 40))
    full = run_prefill_logits(exact, ids, [len(ids)])
    torch.testing.assert_close(run_prefill_logits(runner, ids, [len(ids)]), full, atol=2e-4, rtol=1e-4)
    decoded = run_prefill_logits(runner, ids, [30] + [1] * 7)
    torch.testing.assert_close(decoded, full, atol=0.1, rtol=0)
    assert not torch.equal(decoded[30:], full[30:])  # the decode steps did take the bf16 kernels


def _greedy_up_to_a_near_tie(ref, ids, n, margin):
    """transformers' greedy tokens after ``ids``, cut before the first step whose top two logits lie
    within ``margin`` (there bf16 rounding may rightly pick the other one, and the texts part)."""
    seq = reference_greedy(ref, ids, n)
    with torch.no_grad():
        top = ref(torch.tensor([seq])).logits[0, len(ids) - 1:-1].topk(2, -1).values
    gaps = (top[:, 0] - top[:, 1]).tolist()
    cut = next((i for i, gap in enumerate(gaps) if gap < margin), n)
    return seq[len(ids):len(ids) + cut]


def test_auto_without_fast_bf16_greedy_matches_transformers_fp32(q4_model_dir, no_fast_bf16):
    """Greedy parity with transformers in fp32 up to the first near-tie (bf16 decode moves this model's
    logits by up to ~0.03; its top two often lie closer, hence the cuts)."""
    ref = load_reference(q4_model_dir)
    prompts = [list(range(start, start + length)) for start, length in ((3, 17), (50, 40), (100, 30), (20, 9), (150, 60))]
    want = [_greedy_up_to_a_near_tie(ref, ids, 12, margin=0.05) for ids in prompts]
    assert sum(len(w) for w in want) >= 8, want  # enough tokens to make the check mean something
    with pipeline(q4_model_dir, PytorchEngineConfig(num_gpu_blocks=32, block_size=16)) as pipe:
        assert pipe._loop.engine.runner.small_batch_dtype == torch.bfloat16
        got = [[t for d in pipe.stream_generate(input_ids=ids, gen_config=GenerationConfig(
            max_new_tokens=12, ignore_eos=True)) for t in d.token_ids] for ids in prompts]
    assert [g[:len(w)] for g, w in zip(got, want)] == want


def test_auto_without_fast_bf16_compiled_decode_matches_eager(q4_model_dir, no_fast_bf16, monkeypatch):
    monkeypatch.setenv("LMWRAP_CPU_COMPILE", "1")
    runner = ModelRunner(q4_model_dir, EngineConfig(num_gpu_blocks=16, block_size=4, device_type="cpu"))
    assert runner.small_batch_dtype == torch.bfloat16
    assert_compiled_decode_matches_eager(runner, atol=2e-2)


def test_bf16_int4_decode_of_more_than_4_rows_compiles_ahead_of_time(q4_model_dir, monkeypatch, tmp_path, caplog):
    """The oneDNN copy of the dense weight stays out of the traced steps (Dynamo cannot trace a oneDNN
    tensor; the opaque op finds it at run time): a 6-row decode compiles ahead of time like the others,
    and gives the eager step's logits."""
    from lmwrap_engine.engine.cuda_graph import DecodeGraphs
    monkeypatch.setenv("LMWRAP_CPU_COMPILE", "1")
    monkeypatch.setenv("LMWRAP_CACHE", str(tmp_path))
    runner = ModelRunner(q4_model_dir, EngineConfig(dtype="bfloat16", num_gpu_blocks=16, block_size=4,
                                                    device_type="cpu"))
    if onednn_packs_bf16():
        assert runner.model.model.layers[0].self_attn.qkv_proj.packed_dense is not None
    eager = DecodeGraphs(runner.model, runner.step_context, 8, 16, runner.args.hidden_size, runner.dtype,
                         runner.device, capture=False)
    torch.manual_seed(0)
    runner.k_cache.normal_()
    runner.v_cache.normal_()
    step = dict(input_ids=[5, 7, 11, 13, 17, 19], positions=[9, 3, 6, 2, 4, 8],
                slots=[2 * 4 + 1, 5 * 4 + 3, 8 * 4 + 2, 9 * 4 + 2, 10 * 4 + 0, 12 * 4 + 0],
                kv_lens=[10, 4, 7, 3, 5, 9], block_tables=[[0, 1, 2], [5], [7, 8], [9], [3, 10], [4, 6, 12]])
    with torch.inference_mode(), caplog.at_level("WARNING", logger="lmwrap_engine"):
        want = runner.model.compute_logits(eager.run(**step))
        got = runner.decode_graphs.run(**step)
    assert not runner.decode_graphs.failed
    assert not [r for r in caplog.records if "ahead of time failed" in r.getMessage()], caplog.text
    assert len(os.listdir(tmp_path / "decode-programs")) == 3  # batch 1 and prefill (at start-up), and >4
    torch.testing.assert_close(got, want, atol=0.05, rtol=0)  # bf16
    # A later engine loads the >4-row program from disk (the opaque op included) and finds its own copies.
    again = ModelRunner(q4_model_dir, EngineConfig(dtype="bfloat16", num_gpu_blocks=16, block_size=4,
                                                   device_type="cpu"))
    again.k_cache.copy_(runner.k_cache)
    again.v_cache.copy_(runner.v_cache)
    caplog.clear()
    with torch.inference_mode(), caplog.at_level("INFO", logger="lmwrap_engine"):
        assert torch.equal(again.decode_graphs.run(**step), got)
    assert any(r.getMessage().startswith("loaded") and "batch" in r.getMessage() for r in caplog.records), caplog.text


def test_q8_lattice_recovers_gguf_q8_0_weights_exactly():
    from lmwrap_engine.models.layers.q8_weight import find_q8_lattice
    torch.manual_seed(0)
    w = gguf_roundtrip(torch.randn(96, 128) * 0.1, Q.Q8_0)
    w[3, :32] = 0  # an all-zero group
    q8 = find_q8_lattice(w)
    assert q8.values.dtype == torch.int8 and q8.values.abs().max() == 127
    rebuilt = (q8.values.view(96, 4, 32).float() * q8.step[..., None]).view(96, 128)
    assert torch.equal(rebuilt, w)
    for other in (torch.randn(96, 128) * 0.1, gguf_roundtrip(torch.randn(96, 128) * 0.1, Q.Q4_1)):
        assert find_q8_lattice(other) is None
    x = torch.randn(1, 128)
    compiled = torch.compile(lambda x: q8.single_row(x), fullgraph=True)(x)
    torch.testing.assert_close(compiled, x @ w.T, atol=1e-5, rtol=1e-5)  # fp32 products of the exact weights


@pytest.fixture(scope="module")
def q8_head_model_dir(q4_model_dir, tmp_path_factory):
    """``q4_model_dir`` with its LM head stored as Q8_0, as GGUF files store the (tied) token embedding."""
    from transformers import AutoModelForCausalLM
    dst = str(tmp_path_factory.mktemp("q8") / "llama-q8-head")
    model = AutoModelForCausalLM.from_pretrained(q4_model_dir, torch_dtype=torch.float32)
    with torch.no_grad():
        model.lm_head.weight.copy_(gguf_roundtrip(model.lm_head.weight, Q.Q8_0))
    model.save_pretrained(dst, safe_serialization=True)
    for f in os.listdir(q4_model_dir):
        if not f.endswith((".safetensors", "config.json")) or f.startswith("tokenizer"):
            shutil.copy(os.path.join(q4_model_dir, f), dst)
    return dst


@pytest.mark.parametrize("fast_bf16", [False, True])
def test_q8_0_lm_head_serves_the_compiled_batch_1_step_in_int8(q8_head_model_dir, q4_model_dir, fast_bf16, monkeypatch,
                                                               tmp_path):
    """A Q8_0-stored head keeps an int8 form that the compiled batch-1 step reads in an fp32 model under
    auto (a CPU without fast bf16); that step gives the eager step's logits. A bf16 model's head, and a
    head off the lattice, get none."""
    from lmwrap_engine.models.layers import q8_weight
    monkeypatch.setattr(model_runner, "cpu_has_fast_bf16", lambda: fast_bf16)
    monkeypatch.setattr(model_runner, "int8_head_pays_off", lambda: True)  # as on AVX-512 (the test below)
    monkeypatch.setenv("LMWRAP_CPU_COMPILE", "1")
    monkeypatch.setenv("LMWRAP_CACHE", str(tmp_path))  # compiled here, not loaded: the trace is seen
    traced = []
    single_row = q8_weight.Q8Weight.single_row
    monkeypatch.setattr(q8_weight.Q8Weight, "single_row", lambda self, x: traced.append(x.shape) or single_row(self, x))
    runner = ModelRunner(q8_head_model_dir, EngineConfig(num_gpu_blocks=16, block_size=4, device_type="cpu"))
    assert runner.dtype == (torch.bfloat16 if fast_bf16 else torch.float32)
    head = runner.model.lm_head
    if fast_bf16:
        assert getattr(head, "q8", None) is None
        assert_compiled_decode_matches_eager(runner, atol=5e-2)
        assert not traced
        return
    assert head.q8 is not None and head.q8.step.dtype == torch.float32
    torch.testing.assert_close(head.q8.values.float().view(head.out_features, -1, 32) * head.q8.step[..., None],
                               load_reference(q8_head_model_dir).lm_head.weight.view(head.out_features, -1, 32),
                               atol=0, rtol=0)
    assert_compiled_decode_matches_eager(runner, atol=2e-2)
    assert traced and all(shape[0] == 1 for shape in traced)
    plain = ModelRunner(q4_model_dir, EngineConfig(num_gpu_blocks=16, block_size=4, device_type="cpu", eager_mode=True))
    assert plain.model.lm_head.q8 is None


@pytest.mark.parametrize("capability, kept", [("AVX512", True), ("AVX2", False), ("DEFAULT", False)])
def test_q8_0_lm_head_is_kept_8_bit_only_where_torch_runs_avx512(q8_head_model_dir, capability, kept, monkeypatch):
    """With AVX2 code inductor's int8 loads are scalar copies (the int8 head ran 6x slower than the bf16
    copy): there the head keeps the bf16 copy, and the compiled step reads that."""
    monkeypatch.setattr(model_runner, "cpu_has_fast_bf16", lambda: False)
    monkeypatch.setattr(torch.backends.cpu, "get_cpu_capability", lambda: capability)
    assert cpu_features.int8_head_pays_off() is kept
    runner = ModelRunner(q8_head_model_dir, EngineConfig(num_gpu_blocks=16, block_size=4, device_type="cpu",
                                                         eager_mode=True))
    head = runner.model.lm_head
    assert isinstance(head, Bf16DecodeLinear) and (head.q8 is not None) is kept
