"""Weight-only int8 linears (``weight_quant='int8'``, models/layers/int8_linear.py): the module against a dense
matmul on the dequantised weights, the engine against transformers holding those same weights (eager and
compiled decode), tied LM heads, and the config / device checks."""
import os
import shutil

import pytest
import torch
from torch import nn

from tiny_models import assert_compiled_decode_matches_eager, load_reference, reference_greedy, tiny_config

from lmwrap_engine import GenerationConfig, PytorchEngineConfig, TurbomindEngineConfig, pipeline
from lmwrap_engine.config import EngineConfig
from lmwrap_engine.engine.model_runner import ModelRunner, check_weight_quant
from lmwrap_engine.models.layers.int8_linear import (MAX_INT8_ROWS, Int8Linear, convert_int8_linears,
                                                     dequantize_int8, quantize_int8)
from test_engine_parity import run_prefill_logits

PROMPTS = [list(range(3, 20)), list(range(50, 90)), [7]]


def test_quantize_roundtrip_is_per_channel_symmetric():
    torch.manual_seed(0)
    w = torch.randn(8, 32)
    w[3] = 0
    q, s = quantize_int8(w, torch.float32)
    assert q.dtype == torch.int8 and q.abs().max() == 127 and s.shape == (8,)
    assert s[3] == 1 and (q[3] == 0).all()
    err = (dequantize_int8(q, s) - w).abs().amax(-1)
    assert (err <= s / 2 + 1e-7).all()
    q2, s2 = quantize_int8(dequantize_int8(q, s), torch.float32)  # idempotent on its own output
    assert torch.equal(q2, q)


@pytest.mark.parametrize("dtype,atol", [(torch.float32, 1e-5), (torch.bfloat16, 0.03)])
@pytest.mark.parametrize("bias", [False, True])
def test_int8_linear_matches_the_dense_linear_on_dequantised_weights(dtype, atol, bias):
    torch.manual_seed(0)
    dense = nn.Linear(128, 48, bias=bias).to(dtype)
    original = dense.weight.detach().clone()
    model = nn.Sequential(dense)
    assert convert_int8_linears(model) == 1
    layer = model[0]
    assert isinstance(layer, Int8Linear) and layer.qweight.dtype == torch.int8 and layer.scales.dtype == dtype
    deq = dequantize_int8(layer.qweight, layer.scales)
    assert torch.equal(layer.weight, deq) and not torch.equal(deq, original)
    for rows in (1, 2, MAX_INT8_ROWS, MAX_INT8_ROWS + 1, 17):  # int8 kernel (bf16) up to the limit, dense above
        x = torch.randn(rows, 1, 128).to(dtype)
        want = nn.functional.linear(x.float(), deq.float(), None if dense.bias is None else dense.bias.float())
        with torch.inference_mode():
            got = layer(x)
        assert got.dtype == dtype and got.shape == (rows, 1, 48)
        torch.testing.assert_close(got.float(), want, atol=atol, rtol=0)


@pytest.mark.parametrize("dtype,atol", [(torch.float32, 1e-5), (torch.bfloat16, 0.03)])
def test_int8_linear_compiled_matches(dtype, atol):
    """Compiled: the fused int8 reduction (1 row; up to the limit in fp32), int8pack (bf16), the dense copy."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 96)).to(dtype)
    convert_int8_linears(model)
    compiled = torch.compile(model, fullgraph=True, dynamic=False)
    for rows in (1, 3, MAX_INT8_ROWS + 2):
        x = torch.randn(rows, 64).to(dtype)
        want = nn.functional.linear(x.float(), model[0].weight.float(), model[0].bias.float())
        with torch.inference_mode():
            got = compiled(x)
        torch.testing.assert_close(got.float(), want, atol=atol, rtol=0)


def test_int8_linear_in_an_fp32_model_with_bf16_small_batches():
    """``auto`` on a CPU without fast bf16: calls of few rows take int8pack on bf16 activations, larger
    ones the dense fp32 copy, exactly."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(128, 48))
    assert convert_int8_linears(model, torch.bfloat16) == 1
    layer = model[0]
    assert layer.weight.dtype == torch.float32 and layer.scales.dtype == torch.bfloat16
    for rows in (1, MAX_INT8_ROWS, MAX_INT8_ROWS + 1):
        x = torch.randn(rows, 128)
        dense = nn.functional.linear(x, layer.weight, layer.bias)
        with torch.inference_mode():
            got = layer(x)
        assert got.dtype == torch.float32
        if rows <= MAX_INT8_ROWS:
            bf16 = torch._weight_int8pack_mm(x.bfloat16(), layer.qweight, layer.scales).float() + layer.bias
            torch.testing.assert_close(got, bf16, atol=0, rtol=0)
            torch.testing.assert_close(got, dense, atol=0.05, rtol=0)
        else:
            torch.testing.assert_close(got, dense, atol=0, rtol=0)


def test_tied_head_and_embedding_share_the_dequantised_table():
    emb = nn.Embedding(64, 32)
    head = nn.Linear(32, 64, bias=False)
    head.weight = emb.weight
    model = nn.ModuleDict(dict(emb=emb, head=head))
    assert convert_int8_linears(model) == 1
    assert model["head"].weight is model["emb"].weight
    torch.testing.assert_close(model["emb"].weight, dequantize_int8(model["head"].qweight, model["head"].scales),
                               atol=0, rtol=0)


@pytest.mark.parametrize("value", ["int4", "INT8", 8, True, ""])
def test_bad_weight_quant_is_rejected(value):
    with pytest.raises(ValueError, match="weight_quant"):
        EngineConfig(weight_quant=value)
    for cls in (PytorchEngineConfig, TurbomindEngineConfig):
        with pytest.raises(ValueError, match="weight_quant"):
            cls(weight_quant=value).to_engine_config()


def test_weight_quant_passes_through_both_public_configs():
    for cls in (PytorchEngineConfig, TurbomindEngineConfig):
        assert cls(weight_quant="int8").to_engine_config().weight_quant == "int8"
        assert cls().to_engine_config().weight_quant is None


def test_weight_quant_off_the_cpu_raises_not_implemented():
    with pytest.raises(NotImplementedError, match="CPU only"):
        check_weight_quant(EngineConfig(weight_quant="int8"), torch.device("cuda"))
    with pytest.raises(NotImplementedError, match="tp > 1"):
        check_weight_quant(EngineConfig(weight_quant="int8", tp=2), torch.device("cpu"))
    check_weight_quant(EngineConfig(weight_quant="int8"), torch.device("cpu"))
    check_weight_quant(EngineConfig(), torch.device("cuda"))


@pytest.fixture(scope="module", params=[False, True], ids=["untied", "tied"])
def int8_pair(request, tiny_model_dir, tmp_path_factory):
    """``(original folder, folder of the same model with every linear int8-roundtripped)``; the tied model's
    head is its embedding, so that table is roundtripped too (as the engine's tied head and lookup are)."""
    from transformers import AutoModelForCausalLM
    src = tiny_model_dir(tie_word_embeddings=True) if request.param else tiny_model_dir()
    dst = str(tmp_path_factory.mktemp("int8") / "model")
    model = AutoModelForCausalLM.from_pretrained(src, torch_dtype=torch.float32)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, nn.Linear):
                module.weight.copy_(dequantize_int8(*quantize_int8(module.weight, torch.float32)))
    assert (model.lm_head.weight is model.model.embed_tokens.weight) == request.param
    model.save_pretrained(dst, safe_serialization=True)
    for f in os.listdir(src):
        if f.startswith("tokenizer") or f.endswith(".jinja") or f == "special_tokens_map.json":
            shutil.copy(os.path.join(src, f), dst)
    return src, dst


def test_engine_int8_matches_transformers_on_dequantised_weights(int8_pair):
    src, roundtrip = int8_pair
    runner = ModelRunner(src, EngineConfig(dtype="float32", num_gpu_blocks=16, block_size=16, device_type="cpu",
                                           weight_quant="int8"))
    layers = [m for m in runner.model.modules() if isinstance(m, Int8Linear)]
    assert len(layers) == 2 * 4 + 1  # qkv, o, gate_up, down per layer, and the LM head
    assert isinstance(runner.model.lm_head, Int8Linear)
    ref = load_reference(roundtrip)
    ids = list(range(3, 40))
    with torch.no_grad():
        expected = ref(torch.tensor([ids])).logits[0]
    for chunks in ([len(ids)], [30] + [1] * 7):  # prefill (dense copy) and 1-row decode steps
        torch.testing.assert_close(run_prefill_logits(runner, ids, chunks), expected, atol=2e-4, rtol=1e-4)


def _greedy(path, config, n=8):
    gen = GenerationConfig(max_new_tokens=n, ignore_eos=True)
    with pipeline(path, config) as pipe:
        out = [[t for d in pipe.stream_generate(input_ids=ids, gen_config=gen) for t in d.token_ids]
               for ids in PROMPTS]
        return out, pipe._loop.engine.runner


def test_int8_pipeline_greedy_matches_transformers(int8_pair):
    src, roundtrip = int8_pair
    ref = load_reference(roundtrip)
    got, _ = _greedy(src, tiny_config(weight_quant="int8"))
    assert got == [reference_greedy(ref, ids, 8)[len(ids):] for ids in PROMPTS]


def test_int8_compiled_decode_matches_transformers(int8_pair, monkeypatch):
    """Batch 1 alone, then all prompts at once with different output lengths, so the batch shrinks through
    the compiled batch-1 and dynamic-batch programs."""
    src, roundtrip = int8_pair
    ref = load_reference(roundtrip)
    texts, lens = ["hello world", "The capital of France is Paris. The capital of Italy is", "a"], [9, 3, 6]
    monkeypatch.setenv("LMWRAP_CPU_COMPILE", "1")
    with pipeline(src, tiny_config(weight_quant="int8", block_size=4)) as pipe:
        graphs = pipe._loop.engine.runner.decode_graphs
        prompts = [pipe.tokenizer.encode(t) for t in texts]
        gen = GenerationConfig(max_new_tokens=lens[0], ignore_eos=True)
        alone = [t for d in pipe.stream_generate(input_ids=prompts[0], gen_config=gen) for t in d.token_ids]
        configs = [GenerationConfig(max_new_tokens=n, ignore_eos=True) for n in lens]
        batched = [r.token_ids for r in pipe(texts, gen_config=configs, do_preprocess=False)]
        assert graphs is not None and not graphs.failed and graphs.num_runs >= 8
        assert len(graphs.programs) >= 2
    want = [reference_greedy(ref, ids, n)[len(ids):] for ids, n in zip(prompts, lens)]
    assert alone == want[0]
    assert batched == want


def test_bf16_int8_engine_stays_close_to_fp32(int8_pair):
    src, _ = int8_pair
    ids = list(range(3, 40))
    full = run_prefill_logits(ModelRunner(src, EngineConfig(dtype="float32", num_gpu_blocks=16, block_size=16,
                                                            device_type="cpu", weight_quant="int8")), ids, [len(ids)])
    bf16 = ModelRunner(src, EngineConfig(dtype="bfloat16", num_gpu_blocks=16, block_size=16, device_type="cpu",
                                         weight_quant="int8"))
    assert bf16.model.lm_head.qweight.dtype == torch.int8
    torch.testing.assert_close(run_prefill_logits(bf16, ids, [30] + [1] * 7), full, atol=0.2, rtol=0)


@pytest.mark.parametrize("argv", [["chat"], ["serve", "api_server"], ["bench", "throughput"], ["bench", "latency"]])
def test_cli_weight_quant_flag(argv):
    from lmwrap_engine.cli import build_parser
    parser = build_parser()
    assert parser.parse_args(argv + ["--weight-quant", "int8"]).weight_quant == "int8"
    assert parser.parse_args(argv).weight_quant is None
    with pytest.raises(SystemExit):
        parser.parse_args(argv + ["--weight-quant", "int4"])


def test_int8_compiled_logits_match_eager_logits(int8_pair, monkeypatch):
    """Logits of a compiled batch-3 and batch-1 decode step (the fused int8 reduction in fp32) against the
    eager step (the dense dequantised copy)."""
    monkeypatch.setenv("LMWRAP_CPU_COMPILE", "1")
    with pipeline(int8_pair[0], tiny_config(weight_quant="int8", block_size=4)) as pipe:
        assert_compiled_decode_matches_eager(pipe._loop.engine.runner)
