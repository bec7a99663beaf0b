"""``lmwrap bench throughput|latency|coldstart``: our engine and ``transformers`` side by side, same run.

Throughput workload (fixed, seeded): ``--num-requests`` (64) prompts of random token ids with
lengths uniform in [32, 512], output lengths uniform in [16, 256], EOS ignored. transformers runs
the same prompts in padded batches of ``--hf-batch-size`` with ``generate`` (greedy), each batch
generating up to its longest requested output; only requested tokens are counted for either side.
"""
from __future__ import annotations

import argparse
import queue
import random
import subprocess
import sys
import time
from typing import List, Tuple


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("model", nargs="?", default=None, help="HF folder, .gguf, or default model when omitted")
    parser.add_argument("--dtype", default="auto", choices=["auto", "float32", "float16", "bfloat16"])
    parser.add_argument("--num-requests", type=int, default=64)
    parser.add_argument("--input-len", type=int, nargs=2, default=[32, 512], metavar=("MIN", "MAX"))
    parser.add_argument("--output-len", type=int, nargs=2, default=[16, 256], metavar=("MIN", "MAX"))
    parser.add_argument("--hf-batch-size", type=int, default=16)
    parser.add_argument("--no-hf", action="store_true", help="skip the transformers baseline")
    parser.add_argument("--max-batch-size", type=int, default=128)
    parser.add_argument("--max-prefill-token-num", type=int, default=4096)
    parser.add_argument("--seed", type=int, default=0)


def make_workload(vocab_ids: List[int], n: int, input_len, output_len, seed: int) -> List[Tuple[List[int], int]]:
    rng = random.Random(seed)
    return [([rng.choice(vocab_ids) for _ in range(rng.randint(*input_len))], rng.randint(*output_len))
            for _ in range(n)]


def _open_pipeline(args):
    from .config import PytorchEngineConfig
    from .pipeline import pipeline
    cfg = PytorchEngineConfig(dtype=args.dtype, max_batch_size=args.max_batch_size,
                              max_prefill_token_num=args.max_prefill_token_num)
    return pipeline(args.model, cfg)


def _plain_vocab(tokenizer) -> List[int]:
    special = set(tokenizer.all_special_ids)
    return [i for i in range(len(tokenizer)) if i not in special]


def run_engine(pipe, workload) -> Tuple[float, int]:
    from .config import GenerationConfig
    engine = pipe.async_engine
    done: "queue.SimpleQueue" = queue.SimpleQueue()
    start = time.perf_counter()
    for ids, out_len in workload:
        params = engine.sampling_params(GenerationConfig(max_new_tokens=out_len, ignore_eos=True), len(ids))
        engine.submit(engine.new_session_id(), ids, params,
                      lambda out: done.put(out) if out.finish_reason else None)
    tokens = 0
    for _ in workload:
        out = done.get()
        if out.finish_reason == "error":
            raise RuntimeError(out.error)
        tokens += out.num_output_tokens
    return time.perf_counter() - start, tokens


def run_transformers(model_dir: str, dtype, workload, batch_size: int) -> Tuple[float, int]:
    import torch
    from transformers import AutoModelForCausalLM
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype).eval()
    pad = model.config.pad_token_id or 0
    tokens = 0
    start = time.perf_counter()
    for b in range(0, len(workload), batch_size):
        batch = workload[b:b + batch_size]
        width = max(len(ids) for ids, _ in batch)
        input_ids = torch.tensor([[pad] * (width - len(ids)) + ids for ids, _ in batch])
        mask = torch.tensor([[0] * (width - len(ids)) + [1] * len(ids) for ids, _ in batch])
        n = max(out for _, out in batch)
        with torch.no_grad():
            model.generate(input_ids=input_ids, attention_mask=mask, max_new_tokens=n, min_new_tokens=n,
                           do_sample=False, pad_token_id=pad)
        tokens += sum(out for _, out in batch)
    return time.perf_counter() - start, tokens


def throughput(args) -> None:
    pipe = _open_pipeline(args)
    runner = pipe.async_engine.engine.runner
    workload = make_workload(_plain_vocab(pipe.tokenizer), args.num_requests, args.input_len, args.output_len,
                             args.seed)
    num_in = sum(len(ids) for ids, _ in workload)
    print(f"workload: {len(workload)} requests, {num_in} prompt tokens, "
          f"{sum(o for _, o in workload)} output tokens, EOS ignored; dtype {runner.dtype}, device {runner.device}")
    run_engine(pipe, workload[:2])  # warm-up
    secs, toks = run_engine(pipe, workload)
    print(f"lmwrap       : {secs:8.2f} s  {toks / secs:9.1f} output tok/s  {(toks + num_in) / secs:9.1f} total tok/s")
    model_dir = pipe.async_engine.model_dir
    pipe.close()
    if args.no_hf:
        return
    hf_secs, hf_toks = run_transformers(model_dir, runner.dtype, workload, args.hf_batch_size)
    print(f"transformers : {hf_secs:8.2f} s  {hf_toks / hf_secs:9.1f} output tok/s  "
          f"(padded batches of {args.hf_batch_size})")
    print(f"ratio        : {(toks / secs) / (hf_toks / hf_secs):.2f}x")


def add_latency_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("model", nargs="?", default=None)
    parser.add_argument("--dtype", default="auto", choices=["auto", "float32", "float16", "bfloat16"])
    parser.add_argument("--input-len", type=int, default=128)
    parser.add_argument("--output-len", type=int, default=128)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--no-hf", action="store_true")


def latency(args) -> None:
    import statistics
    from .config import GenerationConfig
    pipe = _open_pipeline(argparse.Namespace(model=args.model, dtype=args.dtype, max_batch_size=8,
                                             max_prefill_token_num=4096))
    runner = pipe.async_engine.engine.runner
    ids = make_workload(_plain_vocab(pipe.tokenizer), 1, (args.input_len, args.input_len), (1, 1), 0)[0][0]
    gen = GenerationConfig(max_new_tokens=args.output_len, ignore_eos=True)
    list(pipe.generate(input_ids=ids, gen_config=GenerationConfig(max_new_tokens=4, ignore_eos=True)))
    ttfts, rates = [], []
    for _ in range(args.runs):
        start = time.perf_counter()
        first = None
        for delta in pipe.generate(input_ids=ids, gen_config=gen):
            if first is None:
                first = time.perf_counter()
        end = time.perf_counter()
        ttfts.append(first - start)
        rates.append((args.output_len - 1) / (end - first))
    print(f"batch 1, {args.input_len}-token prompt, {args.output_len} new tokens, dtype {runner.dtype}, "
          f"device {runner.device}, median of {args.runs}")
    print(f"lmwrap       : time to first token {statistics.median(ttfts) * 1e3:7.1f} ms   "
          f"decode {statistics.median(rates):7.1f} tok/s")
    model_dir = pipe.async_engine.model_dir
    pipe.close()
    if args.no_hf:
        return
    import torch
    from transformers import AutoModelForCausalLM
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=runner.dtype).eval()
    x = torch.tensor([ids])
    with torch.no_grad():
        model.generate(x, max_new_tokens=4, min_new_tokens=4, do_sample=False)
        start = time.perf_counter()
        model.generate(x, max_new_tokens=1, min_new_tokens=1, do_sample=False)
        ttft = time.perf_counter() - start
        start = time.perf_counter()
        model.generate(x, max_new_tokens=args.output_len, min_new_tokens=args.output_len, do_sample=False)
        total = time.perf_counter() - start
    print(f"transformers : time to first token {ttft * 1e3:7.1f} ms   "
          f"decode {(args.output_len - 1) / max(total - ttft, 1e-9):7.1f} tok/s")


COLD_START = """
import time, sys
t0 = float(sys.argv[1])
from lmwrap_engine import pipeline, GenerationConfig
pipe = pipeline(sys.argv[2] if len(sys.argv) > 2 else None)
t1 = time.time()
for d in pipe.generate("What is the capital of France?", gen_config=GenerationConfig(max_new_tokens=1)):
    break
t2 = time.time()
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
    print(f"cold start (best of {args.runs}): engine ready {load:.2f} s, first token {first:.2f} s after process start")
