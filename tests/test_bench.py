"""`lmwrap bench throughput` workloads and random-weight (dummy) models, on CPU with tiny shapes."""
import json
import os
import re
import statistics
import subprocess
import sys

import pytest
import torch

from lmwrap_engine import GenerationConfig, pipeline
from lmwrap_engine.bench import make_workload
from lmwrap_engine.cli import build_parser
from lmwrap_engine.config import EngineConfig
from lmwrap_engine.loader.dummy import SHAPES, dummy_cache_dir, init_dummy_weights, write_dummy_model_dir
from lmwrap_engine.models.config import ModelArgs
from lmwrap_engine.models.registry import build_model

TINY = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, vocab_size=300, max_position_embeddings=256)


def test_dummy_dir_has_config_and_a_tokenizer_over_the_whole_vocab(tmp_path):
    from transformers import AutoTokenizer
    path = write_dummy_model_dir("tiny-llama", str(tmp_path))
    assert path == os.path.join(str(tmp_path), "tiny-llama")
    assert json.load(open(os.path.join(path, "config.json"))) == SHAPES["tiny-llama"]
    assert not [f for f in os.listdir(path) if f.endswith((".safetensors", ".bin", ".gguf"))]
    tok = AutoTokenizer.from_pretrained(path)
    vocab_size = SHAPES["tiny-llama"]["vocab_size"]
    assert len(tok) == tok.backend_tokenizer.get_vocab_size() == vocab_size
    assert (tok.bos_token_id, tok.eos_token_id) == (SHAPES["tiny-llama"]["bos_token_id"],
                                                    SHAPES["tiny-llama"]["eos_token_id"])
    assert tok.decode([vocab_size - 1]) == f" t{vocab_size - 1}"
    assert tok.decode(tok.encode("héllo, world", add_special_tokens=False)) == "héllo, world"
    assert "user\nhi" in tok.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False)

    mtime = os.path.getmtime(os.path.join(path, "tokenizer.json"))
    assert write_dummy_model_dir("tiny-llama", str(tmp_path)) == path
    assert os.path.getmtime(os.path.join(path, "tokenizer.json")) == mtime  # reused, not rewritten
    with pytest.raises(ValueError, match="unknown dummy model shape"):
        write_dummy_model_dir("no-such-shape", str(tmp_path))


def test_dummy_qwen2_dir_decodes_the_same_under_transformers_qwen2_tokenizer(tmp_path):
    """transformers forces Qwen2Tokenizer on qwen2 folders; the dummy tokenizer must survive that."""
    from transformers import AutoTokenizer
    path = write_dummy_model_dir("qwen2.5-7b", str(tmp_path))
    tok = AutoTokenizer.from_pretrained(path)
    assert len(tok) == SHAPES["qwen2.5-7b"]["vocab_size"]
    assert tok.decode([1000, 152063]) == " t1000 t152063"
    assert tok.decode(tok.encode("hello", add_special_tokens=False)) == "hello"


def test_real_shapes_match_their_published_configs():
    llama = SHAPES["llama-3.1-8b"]
    assert (llama["hidden_size"], llama["num_hidden_layers"], llama["num_attention_heads"],
            llama["num_key_value_heads"], llama["intermediate_size"], llama["vocab_size"]) == (
        4096, 32, 32, 8, 14336, 128256)
    assert llama["rope_scaling"] == {"factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                                     "original_max_position_embeddings": 8192, "rope_type": "llama3"}
    assert (llama["rope_theta"], llama["max_position_embeddings"], llama["tie_word_embeddings"]) == (
        500000.0, 131072, False)
    for shape, config in SHAPES.items():
        args = ModelArgs.from_hf_config(config)  # every shape is one our engine can build
        assert args.num_heads % args.num_kv_heads == 0, shape


def test_dummy_model_opens_and_generates_through_the_pipeline(tmp_path):
    path = write_dummy_model_dir("tiny-llama", str(tmp_path))
    with pipeline(path, EngineConfig(load_format="dummy", dtype="float32", device_type="cpu")) as pipe:
        out = pipe(["t5 t6 hello"], gen_config=GenerationConfig(max_new_tokens=8, ignore_eos=True))[0]
        assert out.generate_token_len == 8 and out.finish_reason == "length"
        assert out.text  # every generated id decodes
        weights = dict(pipe._loop.engine.runner.model.named_parameters())
        assert all(torch.isfinite(p).all() for p in weights.values())


def test_a_closed_engine_lets_go_of_its_weights_before_transformers_loads(tmp_path, monkeypatch):
    """bench throughput frees our engine before building transformers' copy (two 8B models do not fit)."""
    import argparse
    import gc
    import weakref
    from lmwrap_engine.bench import _open_pipeline
    monkeypatch.setenv("LMWRAP_CACHE", str(tmp_path))
    pipe = _open_pipeline(argparse.Namespace(model=None, random_weights="tiny-llama", dtype="float32",
                                             max_batch_size=4, max_prefill_token_num=256))
    assert pipe.model_dir == os.path.join(str(tmp_path), "dummy", "tiny-llama")
    runner = pipe._loop.engine.runner
    model, k_cache = weakref.ref(runner.model), weakref.ref(runner.k_cache)
    list(pipe.stream_generate(input_ids=[5, 6, 7], gen_config=GenerationConfig(max_new_tokens=2, ignore_eos=True)))
    pipe.close()
    del pipe, runner
    gc.collect()
    assert model() is None and k_cache() is None


def _model(arch: str, **overrides):
    cfg = dict(TINY, architectures=[arch], **overrides)
    with torch.device("meta"):
        model = build_model(ModelArgs.from_hf_config(cfg))
    model = model.to_empty(device="cpu")
    model.tie_weights()
    with torch.no_grad():
        for p in model.parameters():
            p.fill_(float("nan"))  # stands for torch.empty's garbage
    return model


@pytest.mark.parametrize("arch", ["LlamaForCausalLM", "Qwen2ForCausalLM", "Qwen3ForCausalLM",
                                  "InternLM2ForCausalLM"])
def test_init_dummy_weights_fills_every_parameter_deterministically(arch):
    model = _model(arch)
    init_dummy_weights(model, seed=0)
    params = dict(model.named_parameters())
    assert arch != "Qwen2ForCausalLM" or any(n.endswith("bias") for n in params)
    assert arch != "Qwen3ForCausalLM" or any("q_norm" in n for n in params)
    for name, p in params.items():
        assert torch.isfinite(p).all(), name
        assert (p != 0).all(), name
        if "norm" in name:
            assert ((p >= 0.9) & (p <= 1.1)).all(), name
        elif p.numel() >= 1000:
            assert 0.015 < p.std().item() < 0.025 and abs(p.mean().item()) < 0.005, name

    again = _model(arch)
    init_dummy_weights(again, seed=0)
    other = _model(arch)
    init_dummy_weights(other, seed=1)
    for name, p in params.items():
        assert torch.equal(p, dict(again.named_parameters())[name]), name
        assert not torch.equal(p, dict(other.named_parameters())[name]), name


def test_init_dummy_weights_keeps_tied_embeddings_tied_and_the_dtype():
    model = _model("LlamaForCausalLM", tie_word_embeddings=True).to(torch.bfloat16)
    model.tie_weights()
    init_dummy_weights(model)
    assert model.lm_head.weight is model.model.embed_tokens.weight
    assert model.lm_head.weight.dtype == torch.bfloat16 and torch.isfinite(model.lm_head.weight).all()


def test_uniform_workload_is_unchanged():
    workload = make_workload(list(range(3, 500)), 64, (32, 512), (16, 256), 0)
    # The numbers of the workload before --dataset existed (seed 0).
    assert (sum(len(ids) for ids, _ in workload), sum(n for _, n in workload)) == (16933, 8601)
    assert workload[0][0][:5] == [200, 391, 458, 218, 23] and workload[0][1] == 218


def test_sharegpt_like_workload_is_clipped_seeded_and_has_the_documented_means():
    vocab = list(range(10, 1000))
    workload = make_workload(vocab, 2000, (4, 1024), (4, 1024), 0, "sharegpt-like")
    num_in = [len(ids) for ids, _ in workload]
    num_out = [n for _, n in workload]
    assert min(num_in) >= 4 and max(num_in) <= 1024 and min(num_out) >= 4 and max(num_out) <= 1024
    assert max(num_in) == 1024  # the long tail reaches the clip
    assert all(t in set(vocab) for ids, _ in workload[:50] for t in ids)
    # The module docstring's numbers: clipped means ~218 / ~199, medians ~121 / ~141.
    assert 195 < statistics.mean(num_in) < 240 and 180 < statistics.mean(num_out) < 220
    assert 105 < statistics.median(num_in) < 140 and 125 < statistics.median(num_out) < 160

    assert make_workload(vocab, 50, (4, 1024), (4, 1024), 0, "sharegpt-like") == workload[:50]
    assert make_workload(vocab, 50, (4, 1024), (4, 1024), 1, "sharegpt-like") != workload[:50]

    narrow = make_workload(vocab, 300, (50, 60), (100, 200), 3, "sharegpt-like")
    for lengths, (lo, hi) in (([len(ids) for ids, _ in narrow], (50, 60)), ([n for _, n in narrow], (100, 200))):
        assert min(lengths) == lo and max(lengths) == hi  # clipped at both ends
    with pytest.raises(ValueError, match="unknown dataset"):
        make_workload(vocab, 1, (4, 8), (4, 8), 0, "sharegpt")


def test_the_gpu_command_line_parses():
    args = build_parser().parse_args(
        "bench throughput --random-weights llama-3.1-8b --dtype bfloat16 --num-requests 1000 --dataset sharegpt-like "
        "--max-batch-size 256 --hf-num-requests 64 --hf-batch-size 32".split())
    assert (args.random_weights, args.dtype, args.num_requests, args.dataset, args.max_batch_size,
            args.hf_num_requests, args.hf_batch_size, args.model) == (
        "llama-3.1-8b", "bfloat16", 1000, "sharegpt-like", 256, 64, 32, None)


def test_random_weights_with_a_model_is_a_clear_error(tmp_path):
    args = build_parser().parse_args(["bench", "throughput", str(tmp_path), "--random-weights", "tiny-llama"])
    with pytest.raises(SystemExit, match="omit the model argument"):
        args.func(args)
    args = build_parser().parse_args(["bench", "throughput", "--random-weights", "tiny-llama", "--dataset",
                                      "sharegpt-like", "--output-len", "9", "3"])
    with pytest.raises(SystemExit, match="--output-len needs 1 <= MIN <= MAX"):
        args.func(args)


def test_dummy_cache_dir_follows_lmwrap_cache(monkeypatch, tmp_path):
    monkeypatch.setenv("LMWRAP_CACHE", str(tmp_path))
    assert dummy_cache_dir() == os.path.join(str(tmp_path), "dummy")
    monkeypatch.delenv("LMWRAP_CACHE")
    assert dummy_cache_dir() == os.path.join(os.path.expanduser("~"), ".cache", "lmwrap", "dummy")


def test_bench_throughput_random_weights_sharegpt_like_runs_both_sides(tmp_path):
    env = dict(os.environ, LMWRAP_CACHE=str(tmp_path))
    proc = subprocess.run(
        [sys.executable, "-m", "lmwrap_engine.cli", "bench", "throughput", "--random-weights", "tiny-llama",
         "--dtype", "float32", "--num-requests", "6", "--dataset", "sharegpt-like", "--hf-num-requests", "2",
         "--hf-batch-size", "2", "--input-len", "4", "48", "--output-len", "4", "12"],
        capture_output=True, text=True, timeout=300, env=env)
    assert proc.returncode == 0, proc.stderr
    out = proc.stdout
    assert "model: random weights, tiny-llama shape" in out
    workload = re.search(r"workload: 6 requests \(sharegpt-like lognormal lengths, prompts clipped to 4-48, "
                         r"outputs to 4-12\), (\d+) prompt tokens, (\d+) output tokens, EOS ignored; "
                         r"dtype torch.float32, device cpu", out)
    assert workload, out
    assert 6 * 4 <= int(workload.group(1)) <= 6 * 48 and 6 * 4 <= int(workload.group(2)) <= 6 * 12
    assert re.search(r"^lmwrap       : +[\d.]+ s +[\d.]+ output tok/s +[\d.]+ total tok/s$", out, re.M), out
    steps = re.search(r"^engine steps : (\d+) \(0 run by the compiled decode, 0 by the compiled prefill\), [\d.]+ ms/step, 0 preemptions$",
                      out, re.M)
    assert steps, out
    # Every request is in flight at once: at least one step per token of the longest output, at
    # most one per output token plus a prefill step per request.
    assert int(workload.group(2)) / 6 <= int(steps.group(1)) <= int(workload.group(2)) + 6
    assert re.search(r"^transformers : +[\d.]+ s +[\d.]+ output tok/s +\(first 2 of 6 requests, "
                     r"padded batches of 2\)$", out, re.M), out
    assert re.search(r"^ratio        : +[\d.]+x output tok/s$", out, re.M), out
    assert os.path.exists(os.path.join(str(tmp_path), "dummy", "tiny-llama", "config.json"))


CPU_LINE = r"^cpu: .+, \d+ physical cores; flags: .+; torch kernels: \w+; \d+ intra-op threads$"


def test_bench_latency_uses_a_new_prompt_each_run_and_names_the_cpu(model_dir):
    proc = subprocess.run(
        [sys.executable, "-m", "lmwrap_engine.cli", "bench", "latency", model_dir, "--dtype", "float32",
         "--input-len", "140", "--output-len", "6", "--runs", "2"], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    out = proc.stdout
    assert "batch 1, 140-token prompt (a new one each run), 6 new tokens, dtype torch.float32, device cpu" in out, out
    assert re.search(CPU_LINE, out, re.M), out
    # The prefix cache holds the warm-up and earlier runs; a fresh prompt per run finds none of it.
    assert re.search(r"^lmwrap       : time to first token +[\d.]+ ms   decode +[\d.]+ tok/s   "
                     r"\(0 prompt tokens served by the prefix cache\)$", out, re.M), out
    assert re.search(r"^transformers : time to first token +[\d.]+ ms   decode +[\d.]+ tok/s$", out, re.M), out


def test_bench_coldstart_exits_cleanly_and_names_the_cpu(model_dir):
    proc = subprocess.run([sys.executable, "-m", "lmwrap_engine.cli", "bench", "coldstart", model_dir, "--runs", "1"],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert re.search(r"^cold start \(best of 1\): engine ready [\d.]+ s, first token [\d.]+ s after process start$",
                     proc.stdout, re.M), proc.stdout
    assert re.search(CPU_LINE, proc.stdout, re.M), proc.stdout
