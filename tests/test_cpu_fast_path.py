"""The CPU fast path: 4-bit GGUF weights kept 4-bit (quant_linear.py), bf16 on CPUs with native bf16."""
import os
import shutil

import numpy as np
import pytest
import torch
from torch import nn

from tiny_models import load_reference, reference_greedy

from lmwrap_engine import GenerationConfig, PytorchEngineConfig, pipeline
from lmwrap_engine.config import EngineConfig
from lmwrap_engine.engine.model_runner import ModelRunner
from lmwrap_engine.models.layers.quant_linear import Int4Linear, convert_int4_linears, find_int4_lattice
from test_engine_parity import run_prefill_logits

gguf = pytest.importorskip("gguf")
Q = gguf.GGMLQuantizationType


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
