"""``lmwrap bench kernels``: how close the attention kernels get to the GPU's limits.

Decode attention is memory bound, so it is reported in GB/s against the device-to-device copy
bandwidth measured on the same GPU; prefill attention is compute bound, so it is reported in
TFLOP/s against PyTorch's flash SDPA on the same (unpaged) shapes.
"""
from __future__ import annotations

import argparse
import importlib
import statistics
from typing import Callable, List, Optional, Tuple

DTYPES = ("bfloat16", "float16")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--batch", type=int, default=64, help="decode: sequences in the batch")
    parser.add_argument("--context", type=int, default=4096, help="decode: cached tokens per sequence")
    parser.add_argument("--num-heads", type=int, default=32, help="query heads (default: Llama-3-8B)")
    parser.add_argument("--num-kv-heads", type=int, default=8, help="KV heads (default: Llama-3-8B)")
    parser.add_argument("--head-dim", type=int, default=128)
    parser.add_argument("--block-size", type=int, default=64, help="KV cache block size (tokens)")
    parser.add_argument("--prefill-seqs", type=int, default=8, help="prefill: sequences")
    parser.add_argument("--prefill-len", type=int, default=2048, help="prefill: tokens per sequence (causal)")
    parser.add_argument("--dtype", choices=DTYPES, default="bfloat16")
    parser.add_argument("--copy-mib", type=int, default=2048,
                        help="size of the buffer copied for the bandwidth baseline")
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--repeats", type=int, default=20, help="timed runs; the median is reported")
    parser.add_argument("--sweep", action="store_true",
                        help="also time alternative tile/warp/stage configurations of both attention kernels")


def run(args: argparse.Namespace) -> None:
    import torch

    if not torch.cuda.is_available():
        print("lmwrap bench kernels: kernel benchmarks need a CUDA GPU and none is visible here; nothing was measured.")
        return
    import kernels

    dtype = getattr(torch, args.dtype)
    device = torch.device("cuda")
    print(f"device: {torch.cuda.get_device_name(device)}, dtype {args.dtype}, "
          f"heads {args.num_heads}q/{args.num_kv_heads}kv x {args.head_dim}, block size {args.block_size}")
    rows: List[Tuple[str, str, str]] = []

    copy_gbs = _copy_bandwidth(args, device)
    rows.append(("device-to-device copy", f"{copy_gbs:.0f} GB/s", "100%"))

    for quant in (False, True):
        case = _decode_case(args, dtype, device, quant)
        ms = _median_ms(lambda: kernels.paged_decode_attention(*case["args"]), args)
        gbs = case["bytes"] / ms / 1e6
        label = f"decode b{args.batch} ctx{args.context}" + (" int8 KV" if quant else "")
        rows.append((label, f"{gbs:.0f} GB/s", f"{100 * gbs / copy_gbs:.0f}% of copy ({ms * 1e3:.0f} us)"))
        del case

    prefill = _prefill_case(args, dtype, device, prefix=0)
    ms = _median_ms(lambda: kernels.paged_prefill_attention(*prefill["args"]), args)
    ours = prefill["flops"] / ms / 1e9
    sdpa_ms = _sdpa_flash_ms(args, dtype, device)
    label = f"prefill {args.prefill_seqs}x{args.prefill_len} causal"
    if sdpa_ms is None:
        rows.append((label, f"{ours:.1f} TFLOP/s", "flash SDPA unavailable"))
    else:
        sdpa = prefill["flops"] / sdpa_ms / 1e9
        rows.append(("SDPA flash, same shapes", f"{sdpa:.1f} TFLOP/s", f"({sdpa_ms * 1e3:.0f} us)"))
        rows.append((label, f"{ours:.1f} TFLOP/s", f"{100 * ours / sdpa:.0f}% of SDPA flash ({ms * 1e3:.0f} us)"))
    del prefill
    chunk = _prefill_case(args, dtype, device, prefix=3 * args.prefill_len // 4)
    ms = _median_ms(lambda: kernels.paged_prefill_attention(*chunk["args"]), args)
    rows.append(("prefill, last quarter after cached prefix", f"{chunk['flops'] / ms / 1e9:.1f} TFLOP/s",
                 f"({ms * 1e3:.0f} us)"))
    del chunk
    _print_table(("kernel", "achieved", "relative"), rows)

    if args.sweep:
        _sweep(args, dtype, device, copy_gbs)


def _median_ms(fn: Callable[[], object], args) -> float:
    import torch

    for _ in range(args.warmup):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(args.repeats):
        start = torch.cuda.Event(enable_timing=True)
        end = torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


def _copy_bandwidth(args, device) -> float:
    """GB/s of ``dst.copy_(src)`` counting the bytes read plus the bytes written."""
    import torch

    num_bytes = args.copy_mib << 20
    src = torch.empty(num_bytes, dtype=torch.uint8, device=device).random_()
    dst = torch.empty_like(src)
    ms = _median_ms(lambda: dst.copy_(src), args)
    return 2 * num_bytes / ms / 1e6


def _decode_case(args, dtype, device, quant: bool) -> dict:
    import torch

    batch, context, block_size = args.batch, args.context, args.block_size
    blocks_per_seq = -(-context // block_size)
    num_blocks = batch * blocks_per_seq
    shape = (num_blocks, block_size, args.num_kv_heads, args.head_dim)
    if quant:
        k_cache = torch.randint(0, 256, shape, dtype=torch.uint8, device=device)
        v_cache = torch.randint(0, 256, shape, dtype=torch.uint8, device=device)
        scales_zeros = torch.rand(shape[:3] + (2,), device=device).to(dtype)
        sz = [scales_zeros, scales_zeros.clone()]
    else:
        k_cache = torch.randn(shape, device=device, dtype=dtype)
        v_cache = torch.randn(shape, device=device, dtype=dtype)
        sz = [None, None]
    # Scattered blocks, as a long-running engine's block pool hands them out.
    block_tables = torch.randperm(num_blocks, device=device).to(torch.int32).view(batch, blocks_per_seq)
    kv_lens = torch.full((batch,), context, dtype=torch.int32, device=device)
    q = torch.randn(batch, args.num_heads, args.head_dim, device=device, dtype=dtype)
    elem = torch.finfo(dtype).bits // 8
    token_bytes = args.num_kv_heads * (args.head_dim + 2 * elem if quant else args.head_dim * elem)
    num_bytes = 2 * batch * context * token_bytes + 2 * q.numel() * elem  # K + V read, q read, out written
    return {"args": (q, k_cache, v_cache, block_tables, kv_lens, args.head_dim ** -0.5, *sz), "bytes": num_bytes}


def _prefill_case(args, dtype, device, prefix: int) -> dict:
    """``prefill_seqs`` sequences of ``prefill_len`` tokens, the first ``prefix`` of each already cached."""
    import torch

    seqs, seq_len, block_size = args.prefill_seqs, args.prefill_len, args.block_size
    q_len = seq_len - prefix
    blocks_per_seq = -(-seq_len // block_size)
    num_blocks = seqs * blocks_per_seq
    shape = (num_blocks, block_size, args.num_kv_heads, args.head_dim)
    k_cache = torch.randn(shape, device=device, dtype=dtype)
    v_cache = torch.randn(shape, device=device, dtype=dtype)
    block_tables = torch.randperm(num_blocks, device=device).to(torch.int32).view(seqs, blocks_per_seq)
    kv_lens = torch.full((seqs,), seq_len, dtype=torch.int32, device=device)
    cu_seqlens_q = torch.arange(0, seqs + 1, dtype=torch.int32, device=device) * q_len
    q = torch.randn(seqs * q_len, args.num_heads, args.head_dim, device=device, dtype=dtype)
    # Query i (0-based, at position prefix + i) sees prefix + i + 1 keys; two matmuls of 2 flops per MAC.
    pairs = q_len * prefix + q_len * (q_len + 1) // 2
    flops = 4 * seqs * args.num_heads * args.head_dim * pairs
    return {"args": (q, k_cache, v_cache, block_tables, cu_seqlens_q, kv_lens, args.head_dim ** -0.5),
            "flops": flops}


def _sdpa_flash_ms(args, dtype, device) -> Optional[float]:
    import torch
    import torch.nn.functional as F
    from torch.nn.attention import SDPBackend, sdpa_kernel

    shape = (args.prefill_seqs, args.num_heads, args.prefill_len, args.head_dim)
    q, k, v = (torch.randn(shape, device=device, dtype=dtype) for _ in range(3))  # KV heads already expanded
    try:
        with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
            return _median_ms(lambda: F.scaled_dot_product_attention(q, k, v, is_causal=True), args)
    except RuntimeError as e:
        print(f"flash SDPA failed: {e}")
        return None


def _sweep(args, dtype, device, copy_gbs: float) -> None:
    """Times alternative launch configurations by swapping each kernel module's ``_config``."""
    import kernels

    paged_decode = importlib.import_module("kernels.paged_decode")
    paged_prefill = importlib.import_module("kernels.paged_prefill")

    case = _decode_case(args, dtype, device, quant=False)
    configs = [paged_decode.DecodeConfig(block_n, warps, stages, 4 * block_n, per_sm)
               for block_n in (32, 64, 128) for warps in (4, 8) for stages in (2, 3, 4) for per_sm in (4, 8, 16)]
    timed = _time_configs(paged_decode, configs, lambda: kernels.paged_decode_attention(*case["args"]), args)
    rows = [(str(tuple(cfg)), _fmt(ms, lambda t: f"{case['bytes'] / t / 1e6:.0f} GB/s"),
             _fmt(ms, lambda t: f"{100 * case['bytes'] / t / 1e6 / copy_gbs:.0f}%")) for cfg, ms in timed]
    _print_table(("decode (block_n, warps, stages, min_partition, programs/SM)", "achieved", "of copy"), rows[:15])
    del case

    case = _prefill_case(args, dtype, device, prefix=0)
    configs = [paged_prefill.PrefillConfig(*cfg) for cfg in [
        (128, 64, 8, 3), (128, 128, 8, 2), (128, 128, 8, 3), (128, 64, 4, 3), (128, 32, 4, 4),
        (64, 64, 4, 3), (64, 128, 4, 2), (128, 64, 8, 4), (64, 64, 4, 4)]]
    timed = _time_configs(paged_prefill, configs, lambda: kernels.paged_prefill_attention(*case["args"]), args)
    rows = [(str(tuple(cfg)), _fmt(ms, lambda t: f"{case['flops'] / t / 1e9:.1f} TFLOP/s"),
             _fmt(ms, lambda t: f"{t * 1e3:.0f} us")) for cfg, ms in timed]
    _print_table(("prefill (block_m, block_n, warps, stages)", "achieved", "time"), rows)


def _time_configs(module, configs, fn, args) -> List[Tuple[object, Optional[float]]]:
    """(config, median ms or None if it failed to compile or run), fastest first."""
    original = module._config
    timed = []
    try:
        for cfg in configs:
            module._config = lambda *_, cfg=cfg: cfg
            try:
                timed.append((cfg, _median_ms(fn, args)))
            except Exception as e:  # a configuration the compiler or the GPU rejects (too much shared memory...)
                print(f"{tuple(cfg)} failed: {type(e).__name__}: {str(e)[:100]}")
                timed.append((cfg, None))
    finally:
        module._config = original
    return sorted(timed, key=lambda item: float("inf") if item[1] is None else item[1])


def _fmt(ms: Optional[float], fmt: Callable[[float], str]) -> str:
    return "failed" if ms is None else fmt(ms)


def _print_table(header: Tuple[str, ...], rows: List[Tuple[str, ...]]) -> None:
    widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(len(header))]
    line = "  ".join("-" * w for w in widths)
    print(line)
    print("  ".join(h.ljust(w) for h, w in zip(header, widths)))
    print(line)
    for row in rows:
        print("  ".join(str(c).ljust(w) for c, w in zip(row, widths)))
    print(line)


if __name__ == "__main__":  # python -m lmwrap_engine.bench_kernels [--sweep], before the CLI wires it
    _parser = argparse.ArgumentParser(description=__doc__)
    add_arguments(_parser)
    run(_parser.parse_args())
