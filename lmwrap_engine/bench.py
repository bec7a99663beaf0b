"""``lmwrap bench throughput|latency|coldstart``: our engine and ``transformers`` side by side, same run.

Throughput workload (seeded): ``--num-requests`` (64) prompts of random token ids (the plain
vocabulary, no special tokens), EOS ignored, lengths from ``--dataset``:

- ``uniform`` (default): prompt lengths uniform in ``--input-len`` [32, 512], output lengths
  uniform in ``--output-len`` [16, 256].
- ``sharegpt-like``: a synthetic stand-in for ShareGPT as vLLM/SGLang/LMDeploy benchmarks use it
  (first human turn as the prompt, the reply's length as the output length, sequences under 4
  tokens or prompts over 1024 dropped). Lengths are lognormal, rounded and clipped to
  ``--input-len`` / ``--output-len`` (default [4, 1024] both): prompt ``lognormal(mu=4.8,
  sigma=1.2)`` (median 121, clipped mean about 218 tokens), output ``lognormal(mu=4.95,
  sigma=0.85)`` (median 141, clipped mean about 199 tokens): short chat questions with a long
  tail of pasted documents, and answers of a few hundred tokens. No download.

transformers runs the first ``--hf-num-requests`` requests (default all) in padded batches of
``--hf-batch-size`` with ``generate`` (greedy) on the engine's device, after the engine is freed,
each batch generating up to its longest requested output; only requested tokens are counted for
either side, so the ratio is output tok/s against output tok/s.

``--response-format json`` constrains every request with a small JSON schema (``BENCH_SCHEMA``: a
list of at least 1000 items, so no request's JSON can be complete, and end it, before its output
length) to compare tok/s with and without structured output on the same workload, token for
token: run it once with and once without.

``--random-weights SHAPE`` benchmarks a model of a real shape (e.g. ``llama-3.1-8b``) without its
weights: a config-and-tokenizer folder is written under ``$LMWRAP_CACHE/dummy`` (default
``~/.cache/lmwrap/dummy``), our engine fills the weights at random (``load_format="dummy"``) and
transformers builds the same config with ``from_config``.
"""
from __future__ import annotations

import argparse
import gc
import os
import queue
import random
import subprocess
import sys
import time
from typing import List, Tuple

DATASETS = ("uniform", "sharegpt-like")
DEFAULT_LENGTHS = {"uniform": ((32, 512), (16, 256)), "sharegpt-like": ((4, 1024), (4, 1024))}
SHAREGPT_INPUT_LOGNORMAL = (4.8, 1.2)    # (mu, sigma) of the prompt length
SHAREGPT_OUTPUT_LOGNORMAL = (4.95, 0.85)  # (mu, sigma) of the output length
BENCH_ITEM = {"type": "object", "required": ["name", "qty", "tags"], "properties": {
    "name": {"type": "string"}, "qty": {"type": "integer", "minimum": 0},
    "tags": {"type": "array", "items": {"enum": ["new", "used", "spare"]}}}}
BENCH_SCHEMA = {"type": "object", "required": ["items"],
                "properties": {"items": {"type": "array", "minItems": 1000, "items": BENCH_ITEM}}}
RESPONSE_FORMATS = {"json": {"type": "json_schema", "json_schema": {"name": "bench", "schema": BENCH_SCHEMA}}}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from .cli import WEIGHT_QUANT_HELP
    from .loader.dummy import SHAPES
    parser.add_argument("model", nargs="?", default=None,
                        help="HF folder, .gguf, or default model when omitted (omit with --random-weights)")
    parser.add_argument("--random-weights", default=None, choices=sorted(SHAPES), metavar="SHAPE",
                        help=f"random weights of a known model shape instead of a model ({', '.join(SHAPES)})")
    parser.add_argument("--dtype", default="auto", choices=["auto", "float32", "float16", "bfloat16"])
    parser.add_argument("--weight-quant", default=None, choices=["int8"], help=WEIGHT_QUANT_HELP)
    parser.add_argument("--num-requests", type=int, default=64)
    parser.add_argument("--dataset", default="uniform", choices=DATASETS,
                        help="request lengths: uniform in the ranges, or ShareGPT-like lognormal clipped to them")
    parser.add_argument("--input-len", type=int, nargs=2, default=None, metavar=("MIN", "MAX"),
                        help="prompt length range (default: uniform 32 512, sharegpt-like 4 1024)")
    parser.add_argument("--output-len", type=int, nargs=2, default=None, metavar=("MIN", "MAX"),
                        help="output length range (default: uniform 16 256, sharegpt-like 4 1024)")
    parser.add_argument("--hf-batch-size", type=int, default=16)
    parser.add_argument("--hf-num-requests", type=int, default=None, metavar="N",
                        help="transformers runs only the first N requests (default: all)")
    parser.add_argument("--no-hf", action="store_true", help="skip the transformers baseline")
    parser.add_argument("--max-batch-size", type=int, default=128)
    parser.add_argument("--tp", type=int, default=1, help="tensor-parallel ranks (worker processes)")
    parser.add_argument("--dp", type=int, default=1, help="data-parallel engine replicas (each with --tp ranks)")
    parser.add_argument("--distributed-executor", choices=["mp", "ray"], default="mp",
                        help="ray: tp ranks and dp replicas are Ray actors on the running cluster (RAY_ADDRESS)")
    parser.add_argument("--max-prefill-token-num", type=int, default=4096)
    parser.add_argument("--session-len", type=int, default=None,
                        help="longest sequence (default, and at most: the model's max_position_embeddings)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--enable-prefix-caching", action=argparse.BooleanOptionalAction, default=True,
                        help="the engine's prefix cache (default on; this workload reuses nothing, so "
                             "--no-enable-prefix-caching measures the cache's overhead)")
    parser.add_argument("--response-format", default=None, choices=sorted(RESPONSE_FORMATS),
                        help="constrain every request (json: a small JSON schema) to measure structured output")
    parser.add_argument("--images", type=int, default=0, metavar="N",
                        help="a vision-language model, N random images per request (see lmwrap_engine/bench_vl.py)")
    parser.add_argument("--image-size", type=int, nargs=2, default=(64, 512), metavar=("MIN", "MAX"),
                        help="with --images: image sides uniform in this range of pixels")
    parser.add_argument("--compare", default=None, choices=["llama.cpp"],
                        help="also run llama.cpp (llama-cpp-python) on the same GGUF file, requests one at a time")


def _sharegpt_like_length(rng: random.Random, mu_sigma, bounds) -> int:
    lo, hi = bounds
    return min(hi, max(lo, round(rng.lognormvariate(*mu_sigma))))


def make_workload(vocab_ids: List[int], n: int, input_len, output_len, seed: int,
                  dataset: str = "uniform") -> List[Tuple[List[int], int]]:
    """``n`` seeded requests ``(prompt_ids, output_len)``, lengths drawn as the module docstring says."""
    rng = random.Random(seed)
    if dataset == "uniform":
        return [([rng.choice(vocab_ids) for _ in range(rng.randint(*input_len))], rng.randint(*output_len))
                for _ in range(n)]
    if dataset != "sharegpt-like":
        raise ValueError(f"unknown dataset {dataset!r}; known: {', '.join(DATASETS)}")
    workload = []
    for _ in range(n):
        num_in = _sharegpt_like_length(rng, SHAREGPT_INPUT_LOGNORMAL, input_len)
        num_out = _sharegpt_like_length(rng, SHAREGPT_OUTPUT_LOGNORMAL, output_len)
        workload.append(([rng.choice(vocab_ids) for _ in range(num_in)], num_out))
    return workload


def _open_pipeline(args):
    from .config import EngineConfig
    from .pipeline import pipeline
    shape = getattr(args, "random_weights", None)
    model = args.model
    if shape:
        from .loader.dummy import dummy_cache_dir, write_dummy_model_dir
        model = write_dummy_model_dir(shape, dummy_cache_dir())
    cfg = EngineConfig(dtype=args.dtype, max_batch_size=args.max_batch_size,
                       max_prefill_token_num=args.max_prefill_token_num, session_len=getattr(args, "session_len", None),
                       enable_prefix_caching=getattr(args, "enable_prefix_caching", True),
                       load_format="dummy" if shape else "auto", tp=getattr(args, "tp", 1),
                       distributed_executor_backend=getattr(args, "distributed_executor", "mp"),
                       weight_quant=getattr(args, "weight_quant", None))
    if getattr(args, "dp", 1) > 1:
        from .replicas import ReplicaSet
        return ReplicaSet(model, dp=args.dp, backend_config=cfg)
    return pipeline(model, cfg)


def _weights_note(args, pipe) -> str:
    note = f" with {args.weight_quant} weights" if getattr(args, "weight_quant", None) else ""
    small = getattr(pipe, "small_batch_dtype", pipe.dtype)
    if small != pipe.dtype:
        from .models.layers.bf16_decode_linear import MAX_BF16_ROWS
        note += f" ({str(small).replace('torch.', '')} kernels for calls of up to {MAX_BF16_ROWS} rows)"
    return note


def _plain_vocab(tokenizer) -> List[int]:
    special = set(tokenizer.all_special_ids)
    return [i for i in range(len(tokenizer)) if i not in special]


def run_engine(pipe, workload, response_format=None, finish_reasons=None) -> Tuple[float, int]:
    """Seconds and output tokens of the whole workload; ``finish_reasons`` (a dict) counts them."""
    from .config import GenerationConfig
    engine = pipe
    done: "queue.SimpleQueue" = queue.SimpleQueue()
    start = time.perf_counter()
    for ids, out_len in workload:
        gen = GenerationConfig(max_new_tokens=out_len, ignore_eos=True, response_format=response_format)
        params = engine.sampling_params(gen, len(ids))
        engine.submit(engine.new_session_id(), ids, params,
                      lambda out: done.put(out) if out.finish_reason else None)
    tokens = 0
    for _ in workload:
        out = done.get()
        if out.finish_reason == "error":
            raise RuntimeError(out.error)
        if finish_reasons is not None:
            finish_reasons[out.finish_reason] = finish_reasons.get(out.finish_reason, 0) + 1
        tokens += out.num_output_tokens
    return time.perf_counter() - start, tokens


def load_transformers_model(model_dir: str, dtype, device, random_weights: bool = False):
    """The transformers twin: ``from_pretrained``, or ``from_config`` (random weights) built on ``device``."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM
    if random_weights:
        with torch.device(device):
            model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(model_dir), dtype=dtype)
    else:
        model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype).to(device)
    return model.eval()


def run_transformers(model, workload, batch_size: int) -> Tuple[float, int]:
    import torch
    device = model.device
    pad = model.config.pad_token_id or 0

    def generate(batch):
        width = max(len(ids) for ids, _ in batch)
        input_ids = torch.tensor([[pad] * (width - len(ids)) + ids for ids, _ in batch], device=device)
        mask = torch.tensor([[0] * (width - len(ids)) + [1] * len(ids) for ids, _ in batch], device=device)
        n = max(out for _, out in batch)
        with torch.no_grad():
            model.generate(input_ids=input_ids, attention_mask=mask, max_new_tokens=n, min_new_tokens=n,
                           do_sample=False, pad_token_id=pad)

    generate([(workload[0][0], 2)])  # warm-up
    _synchronize(device)
    tokens = 0
    start = time.perf_counter()
    for b in range(0, len(workload), batch_size):
        batch = workload[b:b + batch_size]
        generate(batch)
        tokens += sum(out for _, out in batch)
    _synchronize(device)
    return time.perf_counter() - start, tokens




def _synchronize(device) -> None:
    import torch
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


def _free_device_memory(device) -> None:
    import torch
    gc.collect()
    if torch.device(device).type == "cuda":
        torch.cuda.empty_cache()


def print_host(device) -> None:
    """The CPU line every CPU figure is reported with: model, ISA flags, torch's kernel ISA, threads."""
    import torch
    if torch.device(device).type == "cpu":
        from .engine.cpu_features import describe_cpu
        print(f"cpu: {describe_cpu()}")


def _intra_op_threads() -> int:
    """The threads our engine computes with (torch's intra-op pool), given to llama.cpp too."""
    import torch
    return torch.get_num_threads()


def _length_bounds(args) -> Tuple[Tuple[int, int], Tuple[int, int]]:
    default_in, default_out = DEFAULT_LENGTHS[args.dataset]
    bounds = (tuple(args.input_len or default_in), tuple(args.output_len or default_out))
    for name, (lo, hi) in zip(("--input-len", "--output-len"), bounds):
        if not 1 <= lo <= hi:
            raise SystemExit(f"lmwrap bench throughput: {name} needs 1 <= MIN <= MAX, got {lo} {hi}")
    return bounds


def throughput(args) -> None:
    if args.random_weights and args.model:
        raise SystemExit(f"lmwrap bench throughput: --random-weights {args.random_weights} builds its own model; "
                         f"omit the model argument ({args.model!r})")
    if args.hf_num_requests is not None and args.hf_num_requests < 1:
        raise SystemExit(f"lmwrap bench throughput: --hf-num-requests must be >= 1, got {args.hf_num_requests}")
    if getattr(args, "images", 0):
        from .bench_vl import throughput_images
        return throughput_images(args)
    input_len, output_len = _length_bounds(args)
    pipe = _open_pipeline(args)
    device, dtype, model_dir = pipe.device, pipe.dtype, pipe.model_dir
    workload = make_workload(_plain_vocab(pipe.tokenizer), args.num_requests, input_len, output_len, args.seed,
                             args.dataset)
    num_in = sum(len(ids) for ids, _ in workload)
    if args.dataset == "uniform":
        lengths = f"uniform lengths, prompts {input_len[0]}-{input_len[1]}, outputs {output_len[0]}-{output_len[1]}"
    else:
        lengths = (f"sharegpt-like lognormal lengths, prompts clipped to {input_len[0]}-{input_len[1]}, "
                   f"outputs to {output_len[0]}-{output_len[1]}")
    model = f"random weights, {args.random_weights} shape" if args.random_weights else model_dir
    print(f"model: {model}")
    print(f"workload: {len(workload)} requests ({lengths}), {num_in} prompt tokens, "
          f"{sum(o for _, o in workload)} output tokens, EOS ignored; dtype {dtype}{_weights_note(args, pipe)}, "
          f"device {device}")
    print_host(device)
    if getattr(args, "tp", 1) > 1 or getattr(args, "dp", 1) > 1:
        print(f"parallelism: tp {args.tp} x dp {args.dp} ({args.tp * args.dp} model ranks, "
              f"{os.cpu_count()} CPUs visible)" if device.type == "cpu" else
              f"parallelism: tp {args.tp} x dp {args.dp}")
    # Warm-up on other prompts: with the prefix cache on, the timed requests must find nothing cached.
    # Six requests of different lengths decode in batches of every compiled kind (1, 2-4, more) on the CPU.
    response_format = RESPONSE_FORMATS.get(getattr(args, "response_format", None))
    run_engine(pipe, make_workload(_plain_vocab(pipe.tokenizer), 6, input_len, output_len, args.seed + 1,
                                   args.dataset), response_format)  # also compiles the grammar
    print(f"prefix caching: {'on' if args.enable_prefix_caching else 'off'}")
    before = pipe.stats()
    reasons: dict = {}
    secs, toks = run_engine(pipe, workload, response_format, reasons)
    if response_format is not None:
        print(f"response format: {args.response_format} (a JSON schema on every request); "
              f"{reasons.get('stop', 0)} of {len(workload)} requests ended by their grammar")
    print(f"lmwrap       : {secs:8.2f} s  {toks / secs:9.1f} output tok/s  {(toks + num_in) / secs:9.1f} total tok/s")
    after = pipe.stats()
    steps = after["num_steps"] - before["num_steps"]
    replays = after["num_graph_replays"] - before["num_graph_replays"]
    how = "replayed from CUDA graphs" if device.type == "cuda" else "run by the compiled decode"
    if device.type == "cpu":
        prefills = after["num_compiled_prefill_steps"] - before["num_compiled_prefill_steps"]
        how += f", {prefills} by the compiled prefill"
    print(f"engine steps : {steps} ({replays} {how}), "
          f"{secs / max(steps, 1) * 1e3:.2f} ms/step, "
          f"{after['num_preemptions'] - before['num_preemptions']} preemptions")
    pipe.close()
    del pipe  # the engine's weights and KV cache go before transformers loads its copy
    _free_device_memory(device)
    if args.compare == "llama.cpp":
        from . import bench_llamacpp
        print(bench_llamacpp.throughput(args.model, workload, _intra_op_threads()))
    if args.no_hf:
        return
    hf_workload = workload[:args.hf_num_requests]
    hf_model = load_transformers_model(model_dir, dtype, device, random_weights=bool(args.random_weights))
    hf_secs, hf_toks = run_transformers(hf_model, hf_workload, args.hf_batch_size)
    subset = (f"first {len(hf_workload)} of {len(workload)} requests, " if len(hf_workload) < len(workload)
              else "")
    print(f"transformers : {hf_secs:8.2f} s  {hf_toks / hf_secs:9.1f} output tok/s  "
          f"({subset}padded batches of {args.hf_batch_size})")
    print(f"ratio        : {(toks / secs) / (hf_toks / hf_secs):.2f}x output tok/s")


def add_latency_arguments(parser: argparse.ArgumentParser) -> None:
    from .cli import WEIGHT_QUANT_HELP
    parser.add_argument("model", nargs="?", default=None)
    parser.add_argument("--dtype", default="auto", choices=["auto", "float32", "float16", "bfloat16"])
    parser.add_argument("--weight-quant", default=None, choices=["int8"], help=WEIGHT_QUANT_HELP)
    parser.add_argument("--input-len", type=int, default=128)
    parser.add_argument("--output-len", type=int, default=128)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--no-hf", action="store_true")
    parser.add_argument("--compare", default=None, choices=["llama.cpp"],
                        help="also run llama.cpp (llama-cpp-python) on the same GGUF file")


def latency(args) -> None:
    """Batch 1: each run a fresh prompt (the prefix cache can serve none of it), the same prompts for
    every contender; medians of time to first token and of decode tok/s after it."""
    import statistics
    from .config import GenerationConfig
    pipe = _open_pipeline(argparse.Namespace(model=args.model, dtype=args.dtype, max_batch_size=8,
                                             max_prefill_token_num=4096,
                                             weight_quant=getattr(args, "weight_quant", None)))
    vocab = _plain_vocab(pipe.tokenizer)
    lengths = (args.input_len, args.input_len), (1, 1)
    prompts = [ids for ids, _ in make_workload(vocab, args.runs, *lengths, seed=0)]
    warm_up = make_workload(vocab, 1, *lengths, seed=1)[0][0]
    gen = GenerationConfig(max_new_tokens=args.output_len, ignore_eos=True)
    list(pipe.stream_generate(input_ids=warm_up, gen_config=GenerationConfig(max_new_tokens=4, ignore_eos=True)))
    before = pipe.stats()
    ttfts, rates = [], []
    for ids in prompts:
        start = time.perf_counter()
        first = None
        for delta in pipe.stream_generate(input_ids=ids, gen_config=gen):
            if first is None:
                first = time.perf_counter()
        end = time.perf_counter()
        ttfts.append(first - start)
        rates.append((args.output_len - 1) / (end - first))
    after = pipe.stats()
    hits = after["num_prefix_hit_tokens"] - before["num_prefix_hit_tokens"]
    print(f"batch 1, {args.input_len}-token prompt (a new one each run), {args.output_len} new tokens, "
          f"dtype {pipe.dtype}{_weights_note(args, pipe)}, device {pipe.device}, median of {args.runs}")
    print_host(pipe.device)
    print(f"lmwrap       : time to first token {statistics.median(ttfts) * 1e3:7.1f} ms   "
          f"decode {statistics.median(rates):7.1f} tok/s   ({hits} prompt tokens served by the prefix cache)")
    device, dtype, model_dir = pipe.device, pipe.dtype, pipe.model_dir
    pipe.close()
    del pipe
    _free_device_memory(device)
    if args.compare == "llama.cpp":
        from . import bench_llamacpp
        print(bench_llamacpp.latency(args.model, prompts, args.output_len, _intra_op_threads()))
    if args.no_hf:
        return
    import torch
    model = load_transformers_model(model_dir, dtype, device)

    def timed_generate(ids, n: int) -> float:
        start = time.perf_counter()
        model.generate(torch.tensor([ids], device=device), max_new_tokens=n, min_new_tokens=n, do_sample=False)
        _synchronize(device)
        return time.perf_counter() - start

    ttfts, rates = [], []
    with torch.no_grad():
        timed_generate(warm_up, 4)
        for ids in prompts:  # the same medians as ours: TTFT from 1-token runs, decode from full ones
            ttfts.append(timed_generate(ids, 1))
            rates.append((args.output_len - 1) / max(timed_generate(ids, args.output_len) - ttfts[-1], 1e-9))
    print(f"transformers : time to first token {statistics.median(ttfts) * 1e3:7.1f} ms   "
          f"decode {statistics.median(rates):7.1f} tok/s")


COLD_START = """
import time, sys
t0 = float(sys.argv[1])
from lmwrap_engine import pipeline, GenerationConfig
pipe = pipeline(sys.argv[2] if len(sys.argv) > 2 else None)
t1 = time.time()
for d in pipe.stream_generate("What is the capital of France?", gen_config=GenerationConfig(max_new_tokens=1)):
    break
t2 = time.time()
pipe.close()  # the engine thread stops before the interpreter tears down
print(f"{t1 - t0:.3f} {t2 - t0:.3f}")
"""


def coldstart(args) -> None:
    """Process start to first token of a fresh interpreter (the GGUF conversion cache already warm)."""
    extra = [args.model] if args.model else []
    subprocess.run([sys.executable, "-c", COLD_START, str(time.time())] + extra, check=True,
                   capture_output=True)  # fills the conversion cache
    results = []
    for _ in range(args.runs):
        out = subprocess.run([sys.executable, "-c", COLD_START, str(time.time())] + extra, check=True,
                             capture_output=True, text=True).stdout.split()
        results.append((float(out[0]), float(out[1])))
    load, first = min(results, key=lambda r: r[1])
    import torch
    print_host("cuda" if torch.cuda.is_available() else "cpu")
    print(f"cold start (best of {args.runs}): engine ready {load:.2f} s, first token {first:.2f} s after process start")
