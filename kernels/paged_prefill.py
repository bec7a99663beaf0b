"""Variable-length causal flash attention over the paged KV cache (prefill, chunked prefill,
prefix-cache hits, later session turns).

Query ``i`` of sequence ``b`` sits at position ``kv_lens[b] - q_len[b] + i``; its keys (the cached
prefix and this step's tokens) are all read from the cache. One program per (query head, tile of
BLOCK_M queries of one sequence). Tiles are numbered without a host sync: sequence ``b`` owns tile
ids from ``cu_seqlens_q[b] // BLOCK_M + b``, which over-counts by at most one per sequence, so the
grid is ``T // BLOCK_M + B`` tiles and surplus programs return at once.
"""
from __future__ import annotations

from typing import NamedTuple, Optional

import torch
import triton
import triton.language as tl

from .paged_decode import LOG2E, _check_cache, _load_kv_tile


@triton.jit
def _attend_tiles(acc, l_i, m_i, q, q_pos, key_start, key_end, kv_len,
                  k_cache_ptr, v_cache_ptr, k_sz_ptr, v_sz_ptr, block_table, kv_head,
                  stride_kb, stride_ks, stride_kh, stride_vb, stride_vs, stride_vh,
                  stride_kszb, stride_kszs, stride_kszh, stride_vszb, stride_vszs, stride_vszh,
                  qk_scale_log2, cols, col_mask,
                  BLOCK_SIZE: tl.constexpr, BLOCK_N: tl.constexpr, CAUSAL_MASK: tl.constexpr,
                  QUANT: tl.constexpr, DOT_PRECISION: tl.constexpr):
    """Online-softmax over keys [key_start, key_end). Without CAUSAL_MASK every key is visible to
    every query row and lies inside the sequence, so no per-element masking is needed."""
    for n0 in range(key_start, key_end, BLOCK_N):
        n = n0 + tl.arange(0, BLOCK_N)
        if CAUSAL_MASK:
            n_mask = n < kv_len
        else:
            n_mask = n < key_end
        k, v = _load_kv_tile(
            k_cache_ptr, v_cache_ptr, k_sz_ptr, v_sz_ptr, block_table, n, n_mask, cols, col_mask, kv_head, q,
            stride_kb, stride_ks, stride_kh, stride_vb, stride_vs, stride_vh,
            stride_kszb, stride_kszs, stride_kszh, stride_vszb, stride_vszs, stride_vszh, BLOCK_SIZE, QUANT)
        qk = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION) * qk_scale_log2
        if CAUSAL_MASK:
            qk = tl.where((n[None, :] <= q_pos[:, None]) & n_mask[None, :], qk, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(qk, axis=1))
        alpha = tl.exp2(m_i - m_new)
        p = tl.exp2(qk - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, axis=1)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=DOT_PRECISION)
        m_i = m_new
    return acc, l_i, m_i


@triton.jit
def _prefill_kernel(
        q_ptr, k_cache_ptr, v_cache_ptr, k_sz_ptr, v_sz_ptr, block_tables_ptr, cu_seqlens_q_ptr, kv_lens_ptr,
        out_ptr, stride_qt, stride_qh, stride_ot, stride_oh,
        stride_kb, stride_ks, stride_kh, stride_vb, stride_vs, stride_vh,
        stride_kszb, stride_kszs, stride_kszh, stride_vszb, stride_vszs, stride_vszh,
        stride_bt, qk_scale_log2, num_seqs, num_tiles,
        GROUP: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_SIZE: tl.constexpr,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, QUANT: tl.constexpr, DOT_PRECISION: tl.constexpr):
    head = tl.program_id(0)
    # Highest tile ids first: the last tiles of each sequence see the most keys, so the long
    # programs start early and the short ones fill the tail.
    tile = num_tiles - 1 - tl.program_id(1)

    # Largest b with cu_seqlens_q[b] // BLOCK_M + b <= tile (binary search; the key is monotone).
    lo = tl.zeros([], tl.int32)  # tensors, not constexprs: both are reassigned in the loop
    hi = lo + num_seqs - 1
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if tl.load(cu_seqlens_q_ptr + mid) // BLOCK_M + mid <= tile:
            lo = mid
        else:
            hi = mid - 1
    seq = lo
    q_start = tl.load(cu_seqlens_q_ptr + seq)
    q_len = tl.load(cu_seqlens_q_ptr + seq + 1) - q_start
    m_start = (tile - (q_start // BLOCK_M + seq)) * BLOCK_M
    if m_start < q_len:
        kv_len = tl.load(kv_lens_ptr + seq)
        prefix = kv_len - q_len
        kv_head = head // GROUP
        rows = m_start + tl.arange(0, BLOCK_M)
        row_mask = rows < q_len
        q_pos = prefix + rows
        cols = tl.arange(0, BLOCK_D)
        col_mask = cols < HEAD_DIM
        io_mask = row_mask[:, None] & col_mask[None, :]
        q_rows = (q_start + rows).to(tl.int64)
        q = tl.load(q_ptr + q_rows[:, None] * stride_qt + head * stride_qh + cols[None, :], mask=io_mask, other=0.0)

        m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
        l_i = tl.zeros([BLOCK_M], tl.float32)
        acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
        block_table = block_tables_ptr + seq.to(tl.int64) * stride_bt
        # Keys before the tile's first query position are visible to every row: no masking.
        full_end = (prefix + m_start) // BLOCK_N * BLOCK_N
        acc, l_i, m_i = _attend_tiles(
            acc, l_i, m_i, q, q_pos, 0, full_end, kv_len,
            k_cache_ptr, v_cache_ptr, k_sz_ptr, v_sz_ptr, block_table, kv_head,
            stride_kb, stride_ks, stride_kh, stride_vb, stride_vs, stride_vh,
            stride_kszb, stride_kszs, stride_kszh, stride_vszb, stride_vszs, stride_vszh,
            qk_scale_log2, cols, col_mask, BLOCK_SIZE, BLOCK_N, False, QUANT, DOT_PRECISION)
        causal_end = tl.minimum(prefix + m_start + BLOCK_M, kv_len)
        acc, l_i, m_i = _attend_tiles(
            acc, l_i, m_i, q, q_pos, full_end, causal_end, kv_len,
            k_cache_ptr, v_cache_ptr, k_sz_ptr, v_sz_ptr, block_table, kv_head,
            stride_kb, stride_ks, stride_kh, stride_vb, stride_vs, stride_vh,
            stride_kszb, stride_kszs, stride_kszh, stride_vszb, stride_vszs, stride_vszh,
            qk_scale_log2, cols, col_mask, BLOCK_SIZE, BLOCK_N, True, QUANT, DOT_PRECISION)
        # Every real row saw at least key 0, so l_i > 0 there; padding rows are not stored.
        out = acc / tl.where(l_i > 0, l_i, 1.0)[:, None]
        tl.store(out_ptr + q_rows[:, None] * stride_ot + head * stride_oh + cols[None, :],
                 out.to(out_ptr.dtype.element_ty), mask=io_mask)


class PrefillConfig(NamedTuple):
    block_m: int  # queries per program
    block_n: int  # keys per tile
    num_warps: int
    num_stages: int


def _config(head_dim: int, dtype: torch.dtype, device: torch.device) -> PrefillConfig:
    if device.type != "cuda":
        return PrefillConfig(16, 16, 4, 1)  # interpreter: small tiles keep the tiny test shapes multi-tile
    if dtype == torch.float32:
        return PrefillConfig(64, 32, 4, 2)
    if head_dim <= 64:
        return PrefillConfig(128, 64, 4, 3)
    if head_dim <= 128:
        return PrefillConfig(128, 64, 8, 3)
    return PrefillConfig(64, 32, 4, 2)


def paged_prefill_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                            block_tables: torch.Tensor, cu_seqlens_q: torch.Tensor, kv_lens: torch.Tensor,
                            scale: float, k_scales_zeros: Optional[torch.Tensor] = None,
                            v_scales_zeros: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Variable-length causal attention over paged KV; ``q [T, H, D]`` -> ``[T, H, D]``.

    Each sequence's earlier tokens (prefix cache, earlier chunks, earlier session turns) must
    already be in the cache together with this step's tokens.
    """
    if q.dim() != 3:
        raise ValueError(f"q must be [T, H, D], got {tuple(q.shape)}")
    num_tokens, num_heads, head_dim = q.shape
    _check_cache(q, k_cache, v_cache, k_scales_zeros, v_scales_zeros)
    num_blocks, block_size, num_kv_heads, _ = k_cache.shape
    if kv_lens.dim() != 1 or kv_lens.dtype != torch.int32 or not kv_lens.is_contiguous():
        raise ValueError(f"kv_lens must be contiguous int32 [B], got {kv_lens.dtype} {tuple(kv_lens.shape)}")
    batch = kv_lens.shape[0]
    if cu_seqlens_q.shape != (batch + 1,) or cu_seqlens_q.dtype != torch.int32 or not cu_seqlens_q.is_contiguous():
        raise ValueError(f"cu_seqlens_q must be contiguous int32 [B + 1] = [{batch + 1}], "
                         f"got {cu_seqlens_q.dtype} {tuple(cu_seqlens_q.shape)}")
    if block_tables.dim() != 2 or block_tables.shape[0] != batch or block_tables.dtype != torch.int32:
        raise ValueError(f"block_tables must be int32 [{batch}, max_blocks], "
                         f"got {block_tables.dtype} {tuple(block_tables.shape)}")
    if block_tables.stride(1) != 1:
        raise ValueError(f"block_tables must be contiguous in its last dim, got strides {block_tables.stride()}")
    for name, t in (("block_tables", block_tables), ("cu_seqlens_q", cu_seqlens_q), ("kv_lens", kv_lens)):
        if t.device != q.device:
            raise ValueError(f"{name} is on {t.device} but q is on {q.device}")
    out = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    if num_tokens == 0 or batch == 0:
        return out
    quant = k_scales_zeros is not None
    cfg = _config(head_dim, q.dtype, q.device)
    num_tiles = num_tokens // cfg.block_m + batch
    k_sz = k_scales_zeros if quant else k_cache
    v_sz = v_scales_zeros if quant else v_cache
    _prefill_kernel[(num_heads, num_tiles)](
        q, k_cache, v_cache, k_sz, v_sz, block_tables, cu_seqlens_q, kv_lens, out,
        q.stride(0), q.stride(1), out.stride(0), out.stride(1),
        k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        v_cache.stride(0), v_cache.stride(1), v_cache.stride(2),
        k_sz.stride(0), k_sz.stride(1), k_sz.stride(2), v_sz.stride(0), v_sz.stride(1), v_sz.stride(2),
        block_tables.stride(0), scale * LOG2E, batch, num_tiles,
        GROUP=num_heads // num_kv_heads, HEAD_DIM=head_dim, BLOCK_D=triton.next_power_of_2(head_dim),
        BLOCK_SIZE=block_size, BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, QUANT=quant,
        DOT_PRECISION="ieee" if q.dtype == torch.float32 else "tf32",
        num_warps=cfg.num_warps, num_stages=cfg.num_stages)
    return out
