"""Paged attention for the CPU that reads the KV cache in place (no per-sequence gather copies).

Written in plain torch so that inductor (``torch.compile``) fuses the indirect cache loads into the
attention's reductions; the functions here stay traceable: no host syncs, no data-dependent shapes.
Shapes and conventions are those of ``kernels/reference.py``, which stays the correctness reference.
"""
from __future__ import annotations

import torch


def write_kv(k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
             slot_mapping: torch.Tensor) -> None:
    """``k, v [T, Hk, D]`` into the paged caches ``[N, S, Hk, D]`` at ``slot_mapping [T]``, in place; every
    slot must be a real one (a negative slot would wrap around, as Python indexing does).

    For the compiled decode step, inside its trace: inductor performs the ``index_put_`` in place and
    fuses it into the layer's one attention kernel (with the rotary embedding): one kernel and one
    Python call a layer fewer than the opaque op (``cpu_kv_cache.py``, a Python kernel). On a 2-core
    AVX-512 Xeon, SmolLM2-135M's batch-1 decode went from 13.2-15.8 to 11.1-14.3 ms a token (6
    alternated process pairs, median 1.10x).
    """
    block_size = k_cache.shape[1]
    blocks, offsets = slot_mapping // block_size, slot_mapping % block_size
    k_cache.index_put_((blocks, offsets), k)
    v_cache.index_put_((blocks, offsets), v)


def paged_decode_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                           block_tables: torch.Tensor, kv_lens: torch.Tensor, scale: float) -> torch.Tensor:
    """One query per row: ``q [B, H, D]`` attends its ``kv_lens[b]`` cached keys -> ``[B, H, D]``.

    Every row spans the table's full width (``block_tables [B, W]``); positions at or past a row's
    length are masked, and blocks wholly past it read block 0 instead (stale table entries may hold
    anything, unused cache slots even NaN). A row with no keys gets zeros, as in the reference.
    """
    batch, num_heads, head_dim = q.shape
    block_size, num_kv_heads = k_cache.shape[1], k_cache.shape[2]
    group = num_heads // num_kv_heads
    starts = torch.arange(block_tables.shape[1], device=q.device) * block_size
    ids = torch.where(starts[None, :] < kv_lens[:, None], block_tables.long(), 0)                 # [B, W]
    valid = (starts[:, None] + torch.arange(block_size, device=q.device)) < kv_lens[:, None, None]  # [B, W, S]
    # Gathered by block, not by slot: within a block the loads stay affine, so inductor vectorises
    # over the head dim (by slot it may vectorise over positions with scalar gathers, ~7x slower
    # at block size 64). Multiply-sum rather than matmul: the indirect loads fuse into the
    # reductions instead of materialising K/V for an external bmm (~2-3x slower).
    k = k_cache[ids]                                                                   # [B, W, S, Hk, D]
    v = v_cache[ids]
    qg = q.view(batch, 1, 1, num_kv_heads, group, head_dim).float()
    scores = (k.unsqueeze(4).float() * qg).sum(-1) * scale                           # [B, W, S, Hk, G]
    scores = scores.masked_fill(~valid[..., None, None], float("-inf"))
    weights = torch.exp(scores - scores.amax(dim=(1, 2), keepdim=True))
    total = weights.sum(dim=(1, 2))                                                    # [B, Hk, G]
    v = torch.where(valid[..., None, None], v.float(), 0.0)  # block 0 may hold NaN: 0 * NaN is NaN
    out = (weights.unsqueeze(-1) * v.unsqueeze(4)).sum(dim=(1, 2)) / total.unsqueeze(-1)  # [B, Hk, G, D]
    out = torch.where(kv_lens[:, None, None, None] > 0, out, 0.0)  # all masked: 0 / 0
    return out.reshape(batch, num_heads, head_dim).to(q.dtype)


def paged_prefill_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                            block_tables: torch.Tensor, cu_seqlens_q: torch.Tensor, kv_lens: torch.Tensor,
                            scale: float) -> torch.Tensor:
    """Variable-length causal attention over paged KV; ``q [T, H, D]`` -> ``[T, H, D]``.

    Each query token becomes one decode row: its sequence's block table and, as its length, its
    position + 1 (earlier chunks and prefix tokens are already in the cache). Rows past
    ``cu_seqlens_q[-1]`` get zeros. Traceable (for a caller compiling a whole mixed step), but every
    token then reads its whole context: compiled it measured 15-20x slower than the reference's
    per-sequence SDPA on a 2-core EPYC, so the eager path keeps the reference for prefill.
    """
    tokens = torch.arange(q.shape[0], device=q.device)
    ends = cu_seqlens_q[1:].long()
    seq = torch.searchsorted(ends, tokens, right=True).clamp_max(ends.shape[0] - 1)
    lens = kv_lens.long()[seq] - (ends[seq] - tokens) + 1
    lens = torch.where(tokens < ends[-1], lens, 0)
    return paged_decode_attention(q, k_cache, v_cache, block_tables[seq], lens, scale)
