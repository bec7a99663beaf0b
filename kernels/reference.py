"""Torch versions of every kernel: the ground truth for the Triton kernels and the CPU path.

Shapes (T = tokens in the step, B = sequences, H/Hk = query/KV heads, D = head dim):
- KV cache: ``[num_blocks, block_size, Hk, D]``; a token's slot is ``block_id * block_size + offset``.
- ``block_tables``: int32 ``[B, max_blocks]`` (unused entries may hold anything).
- ``cu_seqlens_q``: int32 ``[B + 1]`` offsets of each sequence's new tokens in ``q``.
- ``kv_lens``: int32 ``[B]`` tokens in the cache per sequence *including* this step's tokens.
  Query ``i`` of sequence ``b`` sits at position ``kv_lens[b] - q_len[b] + i`` and sees keys ``0..pos``.
- int8 KV (``quant_policy=8``): caches are uint8 and ``*_scales_zeros`` ``[num_blocks, block_size, Hk, 2]``
  hold per token-head (scale, zero) so that ``x ≈ (q - zero) * scale``.
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch
import torch.nn.functional as F


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """``x * rsqrt(mean(x^2) + eps) * weight``, computed in fp32, returned in x's dtype."""
    xf = F.rms_norm(x.float(), (x.shape[-1],), eps=eps)
    return (xf.to(x.dtype) * weight) if weight.dtype == x.dtype else (xf * weight.float()).to(x.dtype)


def add_rms_norm(x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor,
                 eps: float) -> Tuple[torch.Tensor, torch.Tensor]:
    """Returns ``(rms_norm(x + residual), x + residual)``."""
    residual = x + residual
    return rms_norm(residual, weight, eps), residual


def apply_rotary(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor,
                 sin: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """Neox-style rotary embedding (rotate halves) on ``q [T, H, D]`` and ``k [T, Hk, D]``.

    ``cos``/``sin`` are ``[T, D // 2]`` for each token's position (any scaling already folded in).
    """
    cos = cos.unsqueeze(1)
    sin = sin.unsqueeze(1)

    def rotate(x):
        x1, x2 = x.float().chunk(2, dim=-1)
        return torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1).to(x.dtype)

    return rotate(q), rotate(k)


def silu_and_mul(x: torch.Tensor) -> torch.Tensor:
    """``silu(x[..., :I]) * x[..., I:]`` for ``x [..., 2I]``."""
    gate, up = x.chunk(2, dim=-1)
    return F.silu(gate) * up


def quantize_int8(x: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """Asymmetric per-row (last dim) uint8 quantisation: returns ``(q, scales_zeros[..., 2])``."""
    xf = x.float()
    lo = xf.amin(-1, keepdim=True)
    hi = xf.amax(-1, keepdim=True)
    scale = ((hi - lo) / 255).clamp_min(1e-8)
    zero = -lo / scale
    q = torch.round(xf / scale + zero).clamp(0, 255).to(torch.uint8)
    return q, torch.cat((scale, zero), -1).to(x.dtype)


def dequantize_int8(q: torch.Tensor, scales_zeros: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    scale, zero = scales_zeros.float().unbind(-1)
    return ((q.float() - zero.unsqueeze(-1)) * scale.unsqueeze(-1)).to(dtype)


def fill_kv_cache(k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                  slot_mapping: torch.Tensor, k_scales_zeros: Optional[torch.Tensor] = None,
                  v_scales_zeros: Optional[torch.Tensor] = None) -> None:
    """Write ``k, v [T, Hk, D]`` into the paged caches at ``slot_mapping [T]`` (in place).

    Slots < 0 mark padding tokens and are skipped (a negative index would wrap to the cache's end).
    """
    num_blocks, block_size, num_kv_heads, head_dim = k_cache.shape
    slots = slot_mapping.long()
    if bool((slots < 0).any()):
        keep = slots >= 0
        k, v, slots = k[keep], v[keep], slots[keep]
    if k_scales_zeros is not None:
        k, k_sz = quantize_int8(k)
        v, v_sz = quantize_int8(v)
        k_scales_zeros.view(-1, num_kv_heads, 2)[slots] = k_sz
        v_scales_zeros.view(-1, num_kv_heads, 2)[slots] = v_sz
    k_cache.view(-1, num_kv_heads, head_dim)[slots] = k
    v_cache.view(-1, num_kv_heads, head_dim)[slots] = v


def copy_blocks(caches, src: torch.Tensor, dst: torch.Tensor) -> None:
    """Copy whole blocks ``src[i] -> dst[i]`` in every cache of ``caches`` (each ``[layers, num_blocks, ...]``:
    K, V and, with int8 KV, their scales), all layers at once. Every source is read before any
    destination is written; destinations must be distinct."""
    src, dst = src.long(), dst.long()
    for cache in caches:
        cache.index_copy_(1, dst, cache.index_select(1, src))


def _take_blocks(cache: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """The cache blocks ``ids`` (any shape), stacked; ``index_select`` copies them ~1.5x faster than ``cache[ids]``."""
    return torch.index_select(cache, 0, ids.reshape(-1))


def _gather_kv(cache: torch.Tensor, block_table: torch.Tensor, kv_len: int,
               scales_zeros: Optional[torch.Tensor], dtype: torch.dtype) -> torch.Tensor:
    block_size = cache.shape[1]
    num_blocks = (kv_len + block_size - 1) // block_size
    ids = block_table[:num_blocks].long()
    x = _take_blocks(cache, ids).flatten(0, 1)[:kv_len]
    if scales_zeros is not None:
        x = dequantize_int8(x, _take_blocks(scales_zeros, ids).flatten(0, 1)[:kv_len], dtype)
    return x


def paged_decode_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                           block_tables: torch.Tensor, kv_lens: torch.Tensor, scale: float,
                           k_scales_zeros: Optional[torch.Tensor] = None,
                           v_scales_zeros: Optional[torch.Tensor] = None) -> torch.Tensor:
    """One query per sequence: ``q [B, H, D]`` attends its ``kv_lens[b]`` cached keys. Returns ``[B, H, D]``;
    a sequence with no keys (a CUDA graph's padding row) gets zeros."""
    lens = kv_lens.to(q.device).long()
    batch = q.shape[0]
    # Sequences of similar length are padded to a common length together: on CPU the gathered
    # (padded) K/V bytes are the cost, and a single group would pad everything to the longest.
    num_groups = max(1, min(8, batch // 8))
    if num_groups == 1:
        return _decode_group(q, k_cache, v_cache, block_tables, lens, scale, k_scales_zeros, v_scales_zeros)
    out = torch.empty_like(q)
    for rows in torch.tensor_split(torch.argsort(lens), num_groups):
        out[rows] = _decode_group(q[rows], k_cache, v_cache, block_tables[rows], lens[rows], scale,
                                  k_scales_zeros, v_scales_zeros)
    return out


def _decode_group(q, k_cache, v_cache, block_tables, lens, scale, k_scales_zeros, v_scales_zeros):
    batch, num_heads, head_dim = q.shape
    block_size, num_kv_heads = k_cache.shape[1], k_cache.shape[2]
    if batch == 1 and k_scales_zeros is None and lens[0] > 0:  # exactly its own tokens: no padding to mask
        n = int(lens[0])
        k = _gather_kv(k_cache, block_tables[0], n, None, q.dtype).transpose(0, 1)
        v = _gather_kv(v_cache, block_tables[0], n, None, q.dtype).transpose(0, 1)
        return F.scaled_dot_product_attention(q.unsqueeze(2), k.unsqueeze(0), v.unsqueeze(0), scale=scale,
                                              enable_gqa=num_heads != num_kv_heads).squeeze(2)
    max_blocks = (int(lens.max()) + block_size - 1) // block_size
    length = max_blocks * block_size
    # Gathered block by block. Table entries past a sequence's own blocks may hold anything, so they
    # read block 0 instead (and are masked).
    ids = block_tables[:, :max_blocks].long()
    ids = torch.where(torch.arange(max_blocks, device=q.device) * block_size < lens.unsqueeze(1), ids, 0)
    k = _take_blocks(k_cache, ids).view(batch, length, num_kv_heads, head_dim)
    v = _take_blocks(v_cache, ids).view(batch, length, num_kv_heads, head_dim)
    if k_scales_zeros is not None:
        k = dequantize_int8(k, _take_blocks(k_scales_zeros, ids).view(batch, length, num_kv_heads, 2), q.dtype)
        v = dequantize_int8(v, _take_blocks(v_scales_zeros, ids).view(batch, length, num_kv_heads, 2), q.dtype)
    # Padding slots hold whatever the cache held, even NaN, which survives both a -inf score and a
    # zero weight: zero them (each row's padding is one contiguous tail).
    for row, n in enumerate(lens.tolist()):
        k[row, n:] = 0
        v[row, n:] = 0
    bias = torch.zeros(batch, 1, length, dtype=q.dtype, device=q.device)
    # A row with no keys keeps a zero bias: it then averages zeroed padding and comes out 0, not NaN.
    padding = (torch.arange(length, device=q.device) >= lens[:, None, None]) & (lens[:, None, None] > 0)
    bias.masked_fill_(padding, float("-inf"))
    group = num_heads // num_kv_heads
    qg = q.view(batch, num_kv_heads, group, head_dim)
    out = torch.empty_like(qg)
    for h in range(num_kv_heads):  # per KV head: the strided K/V slices feed the matmuls without a copy
        scores = torch.baddbmm(bias, qg[:, h], k[:, :, h].transpose(1, 2), alpha=scale)
        probs = torch.softmax(scores, dim=-1, dtype=torch.float32).to(q.dtype)
        out[:, h] = torch.bmm(probs, v[:, :, h])
    return out.view(batch, num_heads, head_dim)


def paged_prefill_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                            block_tables: torch.Tensor, cu_seqlens_q: torch.Tensor, kv_lens: torch.Tensor,
                            scale: float, k_scales_zeros: Optional[torch.Tensor] = None,
                            v_scales_zeros: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Variable-length causal attention over paged KV; ``q [T, H, D]`` -> ``[T, H, D]``.

    Each sequence's earlier tokens (prefix cache, earlier chunks, earlier session turns) must
    already be in the cache together with this step's tokens.
    """
    num_heads = q.shape[1]
    num_kv_heads = k_cache.shape[2]
    out = torch.empty_like(q)
    starts = cu_seqlens_q.tolist()
    lens = kv_lens.tolist()
    for b in range(len(lens)):
        q_start, q_end, kv_len = starts[b], starts[b + 1], lens[b]
        q_len = q_end - q_start
        if q_len == 0:
            continue
        k = _gather_kv(k_cache, block_tables[b], kv_len, k_scales_zeros, q.dtype)
        v = _gather_kv(v_cache, block_tables[b], kv_len, v_scales_zeros, q.dtype)
        qb = q[q_start:q_end].transpose(0, 1).unsqueeze(0)
        kb = k.transpose(0, 1).unsqueeze(0)
        vb = v.transpose(0, 1).unsqueeze(0)
        if q_len == kv_len:
            o = F.scaled_dot_product_attention(qb, kb, vb, is_causal=True, scale=scale,
                                               enable_gqa=num_heads != num_kv_heads)
        else:
            pos = torch.arange(kv_len - q_len, kv_len, device=q.device)
            mask = torch.arange(kv_len, device=q.device)[None, :] <= pos[:, None]
            o = F.scaled_dot_product_attention(qb, kb, vb, attn_mask=mask, scale=scale,
                                               enable_gqa=num_heads != num_kv_heads)
        out[q_start:q_end] = o.squeeze(0).transpose(0, 1)
    return out
