"""Paged attention for the CPU that reads the KV cache in place (no per-sequence gather copies).

Written in plain torch so that inductor (``torch.compile``) fuses the indirect cache loads into the
attention's reductions; the functions here must stay traceable: no host syncs, no data-dependent
shapes. ``kernels/reference.py`` stays the correctness reference.
"""
from __future__ import annotations

import torch


def paged_decode_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                           block_tables: torch.Tensor, kv_lens: torch.Tensor, scale: float) -> torch.Tensor:
    """One query per sequence: ``q [B, H, D]`` attends its ``kv_lens[b]`` cached keys -> ``[B, H, D]``.

    Every row spans the table's full width (``block_tables [B, W]``); positions at or past a row's
    length are masked, and their slots are redirected to slot 0 (a row's stale table entries may hold anything).
    """
    batch, num_heads, head_dim = q.shape
    block_size, num_kv_heads = k_cache.shape[1], k_cache.shape[2]
    group = num_heads // num_kv_heads
    pos = torch.arange(block_tables.shape[1] * block_size, device=q.device)
    valid = pos[None, :] < kv_lens[:, None]                                           # [B, L]
    slots = torch.where(valid, block_tables.long()[:, pos // block_size] * block_size + pos % block_size, 0)
    k = k_cache.view(-1, num_kv_heads, head_dim)[slots]                               # [B, L, Hk, D]
    v = v_cache.view(-1, num_kv_heads, head_dim)[slots]
    qg = q.view(batch, num_kv_heads, group, 1, head_dim).float()
    scores = (qg * k.permute(0, 2, 1, 3).unsqueeze(2).float()).sum(-1) * scale       # [B, Hk, G, L]
    scores = scores.masked_fill(~valid[:, None, None, :], float("-inf"))
    probs = torch.softmax(scores, -1)
    v = torch.where(valid[:, :, None, None], v.float(), 0.0)  # padding may hold NaN: 0 * NaN is NaN
    out = (probs.unsqueeze(-1) * v.permute(0, 2, 1, 3).unsqueeze(2)).sum(-2)          # [B, Hk, G, D]
    return out.reshape(batch, num_heads, head_dim).to(q.dtype)
