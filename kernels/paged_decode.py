"""Paged decode attention (one query token per sequence), flash-decoding style.

Each program takes one (sequence, KV head, key partition): all query heads that share the KV
head are stacked into the rows of one ``tl.dot``, so every K/V tile is read once per KV head.
Partitions write a partial output and its log-sum-exp; a second kernel merges them. With a
single partition the first kernel writes the final output itself.

The grid depends only on shapes, never on the values of ``kv_lens``: no host sync, and a CUDA
graph can capture it. The number of partitions is fixed per launch; each sequence cuts its own
``kv_len`` keys into at most that many partitions of at least ``MIN_PARTITION`` keys, so a short sequence
uses few programs however wide the block table is (a graph captured for 8k tokens serves 300-token
sequences as well as an eager launch does). Partitions past a sequence's end return at once.
"""
from __future__ import annotations

from typing import NamedTuple, Optional

import torch
import triton
import triton.language as tl

LOG2E = 1.4426950408889634


@triton.jit
def _load_kv_tile(k_cache_ptr, v_cache_ptr, k_sz_ptr, v_sz_ptr, block_table, n, n_mask, cols, col_mask, kv_head, q,
                  stride_kb, stride_ks, stride_kh, stride_vb, stride_vs, stride_vh,
                  stride_kszb, stride_kszs, stride_kszh, stride_vszb, stride_vszs, stride_vszh,
                  BLOCK_SIZE: tl.constexpr, QUANT: tl.constexpr):
    """K and V rows ``n`` of one KV head through the block table, dequantised to ``q``'s dtype when QUANT."""
    page = tl.load(block_table + n // BLOCK_SIZE, mask=n_mask, other=0).to(tl.int64)
    offset = n % BLOCK_SIZE
    kv_mask = n_mask[:, None] & col_mask[None, :]
    k = tl.load(k_cache_ptr + (page * stride_kb + offset * stride_ks + kv_head * stride_kh)[:, None]
                + cols[None, :], mask=kv_mask, other=0)
    v = tl.load(v_cache_ptr + (page * stride_vb + offset * stride_vs + kv_head * stride_vh)[:, None]
                + cols[None, :], mask=kv_mask, other=0)
    if QUANT:
        k_sz = k_sz_ptr + page * stride_kszb + offset * stride_kszs + kv_head * stride_kszh
        v_sz = v_sz_ptr + page * stride_vszb + offset * stride_vszs + kv_head * stride_vszh
        k_scale = tl.load(k_sz, mask=n_mask, other=0.0).to(tl.float32)
        k_zero = tl.load(k_sz + 1, mask=n_mask, other=0.0).to(tl.float32)
        v_scale = tl.load(v_sz, mask=n_mask, other=0.0).to(tl.float32)
        v_zero = tl.load(v_sz + 1, mask=n_mask, other=0.0).to(tl.float32)
        k = ((k.to(tl.float32) - k_zero[:, None]) * k_scale[:, None]).to(q.dtype)
        v = ((v.to(tl.float32) - v_zero[:, None]) * v_scale[:, None]).to(q.dtype)
    return k, v


@triton.jit
def _partition_size(kv_len, num_splits, BLOCK_N: tl.constexpr, MIN_PARTITION: tl.constexpr):
    """Keys per partition of one sequence: a multiple of BLOCK_N, at least MIN_PARTITION."""
    return tl.maximum(tl.cdiv(tl.cdiv(kv_len, num_splits), BLOCK_N) * BLOCK_N, MIN_PARTITION)


@triton.jit
def _decode_partition_kernel(
        q_ptr, k_cache_ptr, v_cache_ptr, k_sz_ptr, v_sz_ptr, block_tables_ptr, kv_lens_ptr,
        out_ptr, mid_o_ptr, mid_lse_ptr,
        stride_qb, stride_qh, stride_ob, stride_oh,
        stride_kb, stride_ks, stride_kh, stride_vb, stride_vs, stride_vh,
        stride_kszb, stride_kszs, stride_kszh, stride_vszb, stride_vszs, stride_vszh,
        stride_bt, stride_mb, stride_mh, stride_ms, qk_scale_log2, num_splits,
        GROUP: tl.constexpr, BLOCK_G: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
        BLOCK_SIZE: tl.constexpr, BLOCK_N: tl.constexpr, MIN_PARTITION: tl.constexpr,
        QUANT: tl.constexpr, DIRECT: tl.constexpr, DOT_PRECISION: tl.constexpr):
    b = tl.program_id(0).to(tl.int64)
    kv_head = tl.program_id(1)
    split = tl.program_id(2)
    kv_len = tl.load(kv_lens_ptr + b)
    partition = _partition_size(kv_len, num_splits, BLOCK_N, MIN_PARTITION)
    start = split * partition
    is_active = start < kv_len
    if DIRECT:
        is_active = start <= kv_len  # start == 0: always, so that kv_len == 0 still writes (zeros)
    if is_active:
        end = tl.minimum(start + partition, kv_len)
        rows = tl.arange(0, BLOCK_G)
        heads = kv_head * GROUP + rows
        row_mask = rows < GROUP
        cols = tl.arange(0, BLOCK_D)
        col_mask = cols < HEAD_DIM
        q = tl.load(q_ptr + b * stride_qb + heads[:, None] * stride_qh + cols[None, :],
                    mask=row_mask[:, None] & col_mask[None, :], other=0.0)

        m_i = tl.full([BLOCK_G], float("-inf"), tl.float32)
        l_i = tl.zeros([BLOCK_G], tl.float32)
        acc = tl.zeros([BLOCK_G, BLOCK_D], tl.float32)
        block_table = block_tables_ptr + b * stride_bt
        for n0 in range(start, end, BLOCK_N):
            n = n0 + tl.arange(0, BLOCK_N)
            n_mask = n < end
            k, v = _load_kv_tile(
                k_cache_ptr, v_cache_ptr, k_sz_ptr, v_sz_ptr, block_table, n, n_mask, cols, col_mask, kv_head, q,
                stride_kb, stride_ks, stride_kh, stride_vb, stride_vs, stride_vh,
                stride_kszb, stride_kszs, stride_kszh, stride_vszb, stride_vszs, stride_vszh, BLOCK_SIZE, QUANT)
            qk = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION) * qk_scale_log2
            qk = tl.where(n_mask[None, :], qk, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(qk, axis=1))
            alpha = tl.exp2(m_i - m_new)
            p = tl.exp2(qk - m_new[:, None])
            l_i = l_i * alpha + tl.sum(p, axis=1)
            acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=DOT_PRECISION)
            m_i = m_new

        out_mask = row_mask[:, None] & col_mask[None, :]
        if DIRECT:
            # l_i == 0 only for kv_len == 0: write zeros rather than NaN.
            out = acc / tl.where(l_i > 0, l_i, 1.0)[:, None]
            tl.store(out_ptr + b * stride_ob + heads[:, None] * stride_oh + cols[None, :],
                     out.to(out_ptr.dtype.element_ty), mask=out_mask)
        else:
            mid = b * stride_mb + heads * stride_mh + split * stride_ms
            tl.store(mid_o_ptr + mid[:, None] * HEAD_DIM + cols[None, :], acc / l_i[:, None], mask=out_mask)
            tl.store(mid_lse_ptr + mid, m_i + tl.log2(l_i), mask=row_mask)


@triton.jit
def _decode_reduce_kernel(mid_o_ptr, mid_lse_ptr, kv_lens_ptr, out_ptr,
                          stride_mb, stride_mh, stride_ms, stride_ob, stride_oh, num_splits,
                          HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_S: tl.constexpr,
                          BLOCK_N: tl.constexpr, MIN_PARTITION: tl.constexpr):
    b = tl.program_id(0).to(tl.int64)
    h = tl.program_id(1)
    kv_len = tl.load(kv_lens_ptr + b)
    num_active = tl.cdiv(kv_len, _partition_size(kv_len, num_splits, BLOCK_N, MIN_PARTITION))
    splits = tl.arange(0, BLOCK_S)
    split_mask = splits < num_active
    cols = tl.arange(0, BLOCK_D)
    col_mask = cols < HEAD_DIM
    mid = b * stride_mb + h * stride_mh + splits * stride_ms
    lse = tl.load(mid_lse_ptr + mid, mask=split_mask, other=float("-inf"))
    top = tl.max(lse, axis=0)
    top = tl.where(top == float("-inf"), 0.0, top)  # kv_len == 0: no partition, and no -inf - -inf
    weight = tl.where(split_mask, tl.exp2(lse - top), 0.0)
    part = tl.load(mid_o_ptr + mid[:, None] * HEAD_DIM + cols[None, :],
                   mask=split_mask[:, None] & col_mask[None, :], other=0.0)
    total = tl.sum(weight, axis=0)
    out = tl.sum(part * weight[:, None], axis=0) / tl.where(total > 0, total, 1.0)
    tl.store(out_ptr + b * stride_ob + h * stride_oh + cols, out.to(out_ptr.dtype.element_ty), mask=col_mask)


class DecodeConfig(NamedTuple):
    block_n: int  # keys per tile
    num_warps: int
    num_stages: int
    min_partition: int  # fewest keys per partition
    programs_per_sm: int  # partitions per sequence are chosen for about this many programs per SM


def _config(head_dim: int, dtype: torch.dtype, device: torch.device) -> DecodeConfig:
    if device.type != "cuda":
        return DecodeConfig(16, 4, 1, 16, 8)  # interpreter: tiny test shapes still get several partitions
    if dtype == torch.float32:
        return DecodeConfig(32, 4, 2, 128, 8)
    if head_dim <= 128:
        return DecodeConfig(64, 4, 3, 256, 8)
    return DecodeConfig(32, 4, 3, 128, 8)


def _num_sms(device: torch.device) -> int:
    return torch.cuda.get_device_properties(device).multi_processor_count if device.type == "cuda" else 4


def _num_splits(max_context: int, num_pairs: int, num_sms: int, cfg: DecodeConfig) -> int:
    """Partitions per sequence, from shapes alone: about ``programs_per_sm`` (sequence, KV head,
    partition) programs per SM, no more than a ``max_context``-long sequence fills with
    ``min_partition``-key partitions, and at most 128."""
    wanted = triton.cdiv(cfg.programs_per_sm * num_sms, num_pairs)
    return max(1, min(wanted, triton.cdiv(max_context, cfg.min_partition), 128))


def paged_decode_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                           block_tables: torch.Tensor, kv_lens: torch.Tensor, scale: float,
                           k_scales_zeros: Optional[torch.Tensor] = None,
                           v_scales_zeros: Optional[torch.Tensor] = None) -> torch.Tensor:
    """One query per sequence: ``q [B, H, D]`` attends its ``kv_lens[b]`` cached keys. Returns ``[B, H, D]``."""
    if q.dim() != 3:
        raise ValueError(f"q must be [B, H, D], got {tuple(q.shape)}")
    batch, num_heads, head_dim = q.shape
    _check_cache(q, k_cache, v_cache, k_scales_zeros, v_scales_zeros)
    num_blocks, block_size, num_kv_heads, _ = k_cache.shape
    if block_tables.dim() != 2 or block_tables.shape[0] != batch or block_tables.dtype != torch.int32:
        raise ValueError(f"block_tables must be int32 [{batch}, max_blocks], "
                         f"got {block_tables.dtype} {tuple(block_tables.shape)}")
    if block_tables.stride(1) != 1:
        raise ValueError(f"block_tables must be contiguous in its last dim, got strides {block_tables.stride()}")
    if kv_lens.shape != (batch,) or kv_lens.dtype != torch.int32 or not kv_lens.is_contiguous():
        raise ValueError(f"kv_lens must be contiguous int32 [{batch}], got {kv_lens.dtype} {tuple(kv_lens.shape)}")
    for name, t in (("block_tables", block_tables), ("kv_lens", kv_lens)):
        if t.device != q.device:
            raise ValueError(f"{name} is on {t.device} but q is on {q.device}")
    out = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    if batch == 0:
        return out
    quant = k_scales_zeros is not None
    group = num_heads // num_kv_heads
    cfg = _config(head_dim, q.dtype, q.device)
    max_context = block_tables.shape[1] * block_size
    num_splits = _num_splits(max_context, batch * num_kv_heads, _num_sms(q.device), cfg)
    direct = num_splits == 1
    if direct:
        mid_o = mid_lse = out  # unused
        mid_strides = (0, 0, 0)
    else:
        mid_lse = torch.empty(batch, num_heads, num_splits, dtype=torch.float32, device=q.device)
        mid_o = torch.empty(batch, num_heads, num_splits, head_dim, dtype=torch.float32, device=q.device)
        mid_strides = mid_lse.stride()
    k_sz = k_scales_zeros if quant else k_cache
    v_sz = v_scales_zeros if quant else v_cache
    block_d = triton.next_power_of_2(head_dim)
    _decode_partition_kernel[(batch, num_kv_heads, num_splits)](
        q, k_cache, v_cache, k_sz, v_sz, block_tables, kv_lens, out, mid_o, mid_lse,
        q.stride(0), q.stride(1), out.stride(0), out.stride(1),
        k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        v_cache.stride(0), v_cache.stride(1), v_cache.stride(2),
        k_sz.stride(0), k_sz.stride(1), k_sz.stride(2), v_sz.stride(0), v_sz.stride(1), v_sz.stride(2),
        block_tables.stride(0), *mid_strides, scale * LOG2E, num_splits,
        GROUP=group, BLOCK_G=max(16, triton.next_power_of_2(group)), HEAD_DIM=head_dim, BLOCK_D=block_d,
        BLOCK_SIZE=block_size, BLOCK_N=cfg.block_n, MIN_PARTITION=cfg.min_partition,
        QUANT=quant, DIRECT=direct,
        DOT_PRECISION="ieee" if q.dtype == torch.float32 else "tf32",
        num_warps=cfg.num_warps, num_stages=cfg.num_stages)
    if not direct:
        _decode_reduce_kernel[(batch, num_heads)](
            mid_o, mid_lse, kv_lens, out, *mid_strides, out.stride(0), out.stride(1), num_splits,
            HEAD_DIM=head_dim, BLOCK_D=block_d, BLOCK_S=triton.next_power_of_2(num_splits),
            BLOCK_N=cfg.block_n, MIN_PARTITION=cfg.min_partition, num_warps=4)
    return out


def _check_cache(q, k_cache, v_cache, k_scales_zeros, v_scales_zeros) -> None:
    """Shape/dtype/stride/device checks shared by the decode and prefill launchers."""
    if q.dtype not in (torch.float16, torch.bfloat16, torch.float32):
        raise ValueError(f"q must be float16/bfloat16/float32, got {q.dtype}")
    if q.stride(-1) != 1:
        raise ValueError(f"q must be contiguous in its last dim, got strides {q.stride()}")
    head_dim, num_heads = q.shape[-1], q.shape[-2]
    if k_cache.dim() != 4 or v_cache.shape != k_cache.shape:
        raise ValueError(f"k_cache and v_cache must both be [num_blocks, block_size, Hk, D], "
                         f"got {tuple(k_cache.shape)} and {tuple(v_cache.shape)}")
    num_blocks, block_size, num_kv_heads, cache_dim = k_cache.shape
    if cache_dim != head_dim:
        raise ValueError(f"cache head dim {cache_dim} != q head dim {head_dim}")
    if head_dim < 16:
        raise ValueError(f"head dim must be >= 16, got {head_dim}")
    if num_heads % num_kv_heads:
        raise ValueError(f"query heads ({num_heads}) must be a multiple of KV heads ({num_kv_heads})")
    if block_size & (block_size - 1):
        raise ValueError(f"block_size must be a power of two, got {block_size}")
    quant = k_scales_zeros is not None
    if quant != (v_scales_zeros is not None):
        raise ValueError("pass both k_scales_zeros and v_scales_zeros, or neither")
    cache_dtype = torch.uint8 if quant else q.dtype
    if k_cache.dtype != cache_dtype or v_cache.dtype != cache_dtype:
        raise ValueError(f"caches must be {cache_dtype} here, got {k_cache.dtype} and {v_cache.dtype}")
    named = {"k_cache": k_cache, "v_cache": v_cache}
    if quant:
        named.update(k_scales_zeros=k_scales_zeros, v_scales_zeros=v_scales_zeros)
        for name in ("k_scales_zeros", "v_scales_zeros"):
            sz = named[name]
            if sz.shape != (num_blocks, block_size, num_kv_heads, 2) or not sz.is_floating_point():
                raise ValueError(f"{name} must be float [{num_blocks}, {block_size}, {num_kv_heads}, 2], "
                                 f"got {sz.dtype} {tuple(sz.shape)}")
    for name, t in named.items():
        if t.stride(-1) != 1:
            raise ValueError(f"{name} must be contiguous in its last dim, got strides {t.stride()}")
        if t.device != q.device:
            raise ValueError(f"{name} is on {t.device} but q is on {q.device}")
