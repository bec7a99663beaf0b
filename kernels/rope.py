"""Neox-style (rotate-halves) rotary embedding for q and k in one launch: one program per token."""
from __future__ import annotations

from typing import Tuple

import torch
import triton
import triton.language as tl


@triton.jit
def _rotate_heads(x_ptr, out_ptr, stride_xh, stride_oh, num_heads, cos, sin,
                  HALF: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_HALF: tl.constexpr):
    heads = tl.arange(0, BLOCK_H)[:, None]
    cols = tl.arange(0, BLOCK_HALF)[None, :]
    for h0 in range(0, num_heads, BLOCK_H):
        mask = (h0 + heads < num_heads) & (cols < HALF)
        x_offs = (h0 + heads) * stride_xh + cols
        o_offs = (h0 + heads) * stride_oh + cols
        x1 = tl.load(x_ptr + x_offs, mask=mask, other=0.0).to(tl.float32)
        x2 = tl.load(x_ptr + x_offs + HALF, mask=mask, other=0.0).to(tl.float32)
        out_ty = out_ptr.dtype.element_ty
        tl.store(out_ptr + o_offs, (x1 * cos - x2 * sin).to(out_ty), mask=mask)
        tl.store(out_ptr + o_offs + HALF, (x2 * cos + x1 * sin).to(out_ty), mask=mask)


@triton.jit
def _rotary_kernel(q_ptr, k_ptr, cos_ptr, sin_ptr, q_out_ptr, k_out_ptr,
                   stride_qt, stride_qh, stride_kt, stride_kh, stride_cos, stride_sin,
                   stride_qot, stride_qoh, stride_kot, stride_koh, num_heads, num_kv_heads,
                   HALF: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_HALF: tl.constexpr):
    t = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK_HALF)[None, :]
    cos = tl.load(cos_ptr + t * stride_cos + cols, mask=cols < HALF, other=0.0).to(tl.float32)
    sin = tl.load(sin_ptr + t * stride_sin + cols, mask=cols < HALF, other=0.0).to(tl.float32)
    _rotate_heads(q_ptr + t * stride_qt, q_out_ptr + t * stride_qot, stride_qh, stride_qoh, num_heads,
                  cos, sin, HALF, BLOCK_H, BLOCK_HALF)
    _rotate_heads(k_ptr + t * stride_kt, k_out_ptr + t * stride_kot, stride_kh, stride_koh, num_kv_heads,
                  cos, sin, HALF, BLOCK_H, BLOCK_HALF)


def apply_rotary(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor,
                 sin: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """Neox-style rotary embedding (rotate halves) on ``q [T, H, D]`` and ``k [T, Hk, D]``.

    ``cos``/``sin`` are ``[T, D // 2]`` for each token's position (any scaling already folded in).
    """
    if q.dim() != 3 or k.dim() != 3:
        raise ValueError(f"q and k must be [T, H, D], got {tuple(q.shape)} and {tuple(k.shape)}")
    num_tokens, num_heads, head_dim = q.shape
    if k.shape[0] != num_tokens or k.shape[2] != head_dim or head_dim % 2:
        raise ValueError(f"k {tuple(k.shape)} must be [T, Hk, D] matching q {tuple(q.shape)} with even D")
    half = head_dim // 2
    for name, t in (("cos", cos), ("sin", sin)):
        if t.shape != (num_tokens, half):
            raise ValueError(f"{name} must be [T, D // 2] = [{num_tokens}, {half}], got {tuple(t.shape)}")
        if t.stride(1) != 1:
            raise ValueError(f"{name} must be contiguous in its last dim, got strides {t.stride()}")
    for name, t in (("q", q), ("k", k)):
        if t.stride(2) != 1:
            raise ValueError(f"{name} must be contiguous in its last dim, got strides {t.stride()}")
    if k.dtype != q.dtype:
        raise ValueError(f"q and k must share a dtype, got {q.dtype} and {k.dtype}")
    for name, t in (("k", k), ("cos", cos), ("sin", sin)):
        if t.device != q.device:
            raise ValueError(f"{name} is on {t.device} but q is on {q.device}")
    q_out = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    k_out = torch.empty(k.shape, dtype=k.dtype, device=k.device)
    if num_tokens == 0:
        return q_out, k_out
    block_half = triton.next_power_of_2(half)
    block_h = max(1, min(triton.next_power_of_2(max(num_heads, k.shape[1])), 4096 // block_half))
    _rotary_kernel[(num_tokens,)](
        q, k, cos, sin, q_out, k_out,
        q.stride(0), q.stride(1), k.stride(0), k.stride(1), cos.stride(0), sin.stride(0),
        q_out.stride(0), q_out.stride(1), k_out.stride(0), k_out.stride(1), num_heads, k.shape[1],
        HALF=half, BLOCK_H=block_h, BLOCK_HALF=block_half, num_warps=4)
    return q_out, k_out
