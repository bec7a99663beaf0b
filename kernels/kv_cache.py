"""Scatter this step's K/V into the paged cache, optionally quantising to uint8 on the way (quant_policy=8)."""
from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl


@triton.jit
def _store_heads(x_ptr, cache_ptr, sz_ptr, stride_xh, stride_ch, stride_szh, num_kv_heads,
                 QUANT: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_D: tl.constexpr):
    heads = tl.arange(0, BLOCK_H)
    cols = tl.arange(0, BLOCK_D)
    for h0 in range(0, num_kv_heads, BLOCK_H):
        h = h0 + heads
        mask = (h[:, None] < num_kv_heads) & (cols[None, :] < HEAD_DIM)
        x = tl.load(x_ptr + h[:, None] * stride_xh + cols[None, :], mask=mask, other=0.0)
        if QUANT:
            # Asymmetric per token-head uint8, the same arithmetic as reference.quantize_int8.
            xf = x.to(tl.float32)
            lo = tl.min(tl.where(mask, xf, float("inf")), axis=1)
            hi = tl.max(tl.where(mask, xf, float("-inf")), axis=1)
            scale = tl.maximum((hi - lo) / 255.0, 1e-8)
            zero = -lo / scale
            q = tl.floor(xf / scale[:, None] + zero[:, None] + 0.5)
            q = tl.minimum(tl.maximum(q, 0.0), 255.0)
            tl.store(cache_ptr + h[:, None] * stride_ch + cols[None, :], q.to(tl.uint8), mask=mask)
            sz_ty = sz_ptr.dtype.element_ty
            h_mask = h < num_kv_heads
            tl.store(sz_ptr + h * stride_szh, scale.to(sz_ty), mask=h_mask)
            tl.store(sz_ptr + h * stride_szh + 1, zero.to(sz_ty), mask=h_mask)
        else:
            tl.store(cache_ptr + h[:, None] * stride_ch + cols[None, :], x, mask=mask)


@triton.jit
def _fill_kv_cache_kernel(k_ptr, v_ptr, k_cache_ptr, v_cache_ptr, slot_ptr, k_sz_ptr, v_sz_ptr,
                          stride_kt, stride_kh, stride_vt, stride_vh,
                          stride_kcb, stride_kcs, stride_kch, stride_vcb, stride_vcs, stride_vch,
                          stride_kszb, stride_kszs, stride_kszh, stride_vszb, stride_vszs, stride_vszh,
                          num_kv_heads, BLOCK_SIZE: tl.constexpr, QUANT: tl.constexpr,
                          HEAD_DIM: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_D: tl.constexpr):
    t = tl.program_id(0).to(tl.int64)
    slot = tl.load(slot_ptr + t).to(tl.int64)
    if slot >= 0:  # negative slots are padding (e.g. CUDA-graph batch padding) and write nothing
        block = slot // BLOCK_SIZE
        offset = slot % BLOCK_SIZE
        _store_heads(k_ptr + t * stride_kt, k_cache_ptr + block * stride_kcb + offset * stride_kcs,
                     k_sz_ptr + block * stride_kszb + offset * stride_kszs, stride_kh, stride_kch, stride_kszh,
                     num_kv_heads, QUANT, HEAD_DIM, BLOCK_H, BLOCK_D)
        _store_heads(v_ptr + t * stride_vt, v_cache_ptr + block * stride_vcb + offset * stride_vcs,
                     v_sz_ptr + block * stride_vszb + offset * stride_vszs, stride_vh, stride_vch, stride_vszh,
                     num_kv_heads, QUANT, HEAD_DIM, BLOCK_H, BLOCK_D)


def fill_kv_cache(k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                  slot_mapping: torch.Tensor, k_scales_zeros: Optional[torch.Tensor] = None,
                  v_scales_zeros: Optional[torch.Tensor] = None) -> None:
    """Write ``k, v [T, Hk, D]`` into the paged caches at ``slot_mapping [T]`` (in place).

    Slots < 0 are skipped. With ``*_scales_zeros`` the caches are uint8 and each token-head is
    quantised as in ``reference.quantize_int8``.
    """
    if k.dim() != 3 or v.shape != k.shape:
        raise ValueError(f"k and v must both be [T, Hk, D], got {tuple(k.shape)} and {tuple(v.shape)}")
    num_tokens, num_kv_heads, head_dim = k.shape
    if k_cache.dim() != 4 or v_cache.shape != k_cache.shape:
        raise ValueError(f"k_cache and v_cache must both be [num_blocks, block_size, Hk, D], "
                         f"got {tuple(k_cache.shape)} and {tuple(v_cache.shape)}")
    num_blocks, block_size, cache_heads, cache_dim = k_cache.shape
    if (cache_heads, cache_dim) != (num_kv_heads, head_dim):
        raise ValueError(f"cache heads/dim {(cache_heads, cache_dim)} do not match k {(num_kv_heads, head_dim)}")
    if slot_mapping.shape != (num_tokens,) or slot_mapping.dtype not in (torch.int32, torch.int64):
        raise ValueError(f"slot_mapping must be int32/int64 [{num_tokens}], "
                         f"got {slot_mapping.dtype} {tuple(slot_mapping.shape)}")
    quant = k_scales_zeros is not None
    if quant != (v_scales_zeros is not None):
        raise ValueError("pass both k_scales_zeros and v_scales_zeros, or neither")
    if v.dtype != k.dtype:
        raise ValueError(f"k and v must share a dtype, got {k.dtype} and {v.dtype}")
    cache_dtype = torch.uint8 if quant else k.dtype
    if k_cache.dtype != cache_dtype or v_cache.dtype != cache_dtype:
        raise ValueError(f"caches must be {cache_dtype} here, got {k_cache.dtype} and {v_cache.dtype}")
    if quant:
        for name, sz in (("k_scales_zeros", k_scales_zeros), ("v_scales_zeros", v_scales_zeros)):
            if sz.shape != (num_blocks, block_size, num_kv_heads, 2) or sz.stride(-1) != 1:
                raise ValueError(f"{name} must be [{num_blocks}, {block_size}, {num_kv_heads}, 2] contiguous "
                                 f"in its last dim, got {tuple(sz.shape)} strides {sz.stride()}")
            if not sz.is_floating_point():
                raise ValueError(f"{name} must be a float tensor, got {sz.dtype}")
    named = {"k": k, "v": v, "k_cache": k_cache, "v_cache": v_cache}
    for name, t in named.items():
        if t.stride(-1) != 1:
            raise ValueError(f"{name} must be contiguous in its last dim, got strides {t.stride()}")
    named["slot_mapping"] = slot_mapping
    if quant:
        named.update(k_scales_zeros=k_scales_zeros, v_scales_zeros=v_scales_zeros)
    for name, t in named.items():
        if t.device != k.device:
            raise ValueError(f"{name} is on {t.device} but k is on {k.device}")
    if num_tokens == 0:
        return
    k_sz = k_scales_zeros if quant else k_cache
    v_sz = v_scales_zeros if quant else v_cache
    block_d = triton.next_power_of_2(head_dim)
    block_h = max(1, min(triton.next_power_of_2(num_kv_heads), 2048 // block_d))
    _fill_kv_cache_kernel[(num_tokens,)](
        k, v, k_cache, v_cache, slot_mapping, k_sz, v_sz,
        k.stride(0), k.stride(1), v.stride(0), v.stride(1),
        k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        v_cache.stride(0), v_cache.stride(1), v_cache.stride(2),
        k_sz.stride(0), k_sz.stride(1), k_sz.stride(2), v_sz.stride(0), v_sz.stride(1), v_sz.stride(2),
        num_kv_heads, BLOCK_SIZE=block_size, QUANT=quant, HEAD_DIM=head_dim, BLOCK_H=block_h, BLOCK_D=block_d,
        num_warps=4)
