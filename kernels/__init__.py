"""Kernel dispatch: Triton kernels for CUDA tensors, the torch references otherwise.

Every public function here has the signature of its counterpart in ``kernels/reference.py``.
``LMWRAP_FORCE_TRITON=1`` sends CPU tensors to the Triton kernels too (with ``TRITON_INTERPRET=1``,
which must be set before the first kernel module is imported); the kernel tests use it.
Triton is imported only when a kernel is first used, so this package imports without it.
CPU decode attention (bf16/fp32 KV) goes to the C++ kernel of ``cpu_paged_decode.py`` (built on first
use), else to the inductor-compiled in-place kernel of ``cpu_compiled.py``
(``LMWRAP_CPU_ATTENTION=compiled`` forces the latter, ``reference`` the torch reference).
"""
from __future__ import annotations

import importlib
import os
import sys
import types
from typing import Optional, Tuple

import torch

from . import cpu_compiled, cpu_paged_decode, reference


def _use_triton(t: torch.Tensor) -> bool:
    return t.is_cuda or os.environ.get("LMWRAP_FORCE_TRITON") == "1"


def _kernel(module: str, name: str):
    return getattr(importlib.import_module(f"{__name__}.{module}"), name)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """``x * rsqrt(mean(x^2) + eps) * weight``, computed in fp32, returned in x's dtype."""
    if _use_triton(x):
        return _kernel("rms_norm", "rms_norm")(x, weight, eps)
    return reference.rms_norm(x, weight, eps)


def add_rms_norm(x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor,
                 eps: float) -> Tuple[torch.Tensor, torch.Tensor]:
    """Returns ``(rms_norm(x + residual), x + residual)``."""
    if _use_triton(x):
        return _kernel("rms_norm", "add_rms_norm")(x, residual, weight, eps)
    return reference.add_rms_norm(x, residual, weight, eps)


def apply_rotary(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor,
                 sin: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """Neox-style rotary embedding on ``q [T, H, D]`` and ``k [T, Hk, D]``; ``cos``/``sin`` are ``[T, D // 2]``."""
    if _use_triton(q):
        return _kernel("rope", "apply_rotary")(q, k, cos, sin)
    return reference.apply_rotary(q, k, cos, sin)


def silu_and_mul(x: torch.Tensor) -> torch.Tensor:
    """``silu(x[..., :I]) * x[..., I:]`` for ``x [..., 2I]``."""
    if _use_triton(x):
        return _kernel("activation", "silu_and_mul")(x)
    return reference.silu_and_mul(x)


def fill_kv_cache(k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                  slot_mapping: torch.Tensor, k_scales_zeros: Optional[torch.Tensor] = None,
                  v_scales_zeros: Optional[torch.Tensor] = None) -> None:
    """Write ``k, v [T, Hk, D]`` into the paged caches at ``slot_mapping [T]`` (in place); slots < 0 are skipped."""
    if _use_triton(k):
        return _kernel("kv_cache", "fill_kv_cache")(k, v, k_cache, v_cache, slot_mapping,
                                                    k_scales_zeros, v_scales_zeros)
    return reference.fill_kv_cache(k, v, k_cache, v_cache, slot_mapping, k_scales_zeros, v_scales_zeros)


def paged_decode_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                           block_tables: torch.Tensor, kv_lens: torch.Tensor, scale: float,
                           k_scales_zeros: Optional[torch.Tensor] = None,
                           v_scales_zeros: Optional[torch.Tensor] = None) -> torch.Tensor:
    """One query per sequence: ``q [B, H, D]`` attends its ``kv_lens[b]`` cached keys. Returns ``[B, H, D]``."""
    if _use_triton(q):
        return _kernel("paged_decode", "paged_decode_attention")(
            q, k_cache, v_cache, block_tables, kv_lens, scale, k_scales_zeros, v_scales_zeros)
    if k_scales_zeros is None and cpu_paged_decode.supports(k_cache):
        return cpu_paged_decode.paged_decode_attention(q, k_cache, v_cache, block_tables, kv_lens, scale)
    if k_scales_zeros is None and cpu_compiled.enabled():
        return cpu_compiled.paged_decode_attention(q, k_cache, v_cache, block_tables, kv_lens, scale)
    return reference.paged_decode_attention(q, k_cache, v_cache, block_tables, kv_lens, scale,
                                            k_scales_zeros, v_scales_zeros)


def paged_prefill_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                            block_tables: torch.Tensor, cu_seqlens_q: torch.Tensor, kv_lens: torch.Tensor,
                            scale: float, k_scales_zeros: Optional[torch.Tensor] = None,
                            v_scales_zeros: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Variable-length causal attention over paged KV; ``q [T, H, D]`` -> ``[T, H, D]``."""
    if _use_triton(q):
        return _kernel("paged_prefill", "paged_prefill_attention")(
            q, k_cache, v_cache, block_tables, cu_seqlens_q, kv_lens, scale, k_scales_zeros, v_scales_zeros)
    return reference.paged_prefill_attention(q, k_cache, v_cache, block_tables, cu_seqlens_q, kv_lens, scale,
                                             k_scales_zeros, v_scales_zeros)


class _Package(types.ModuleType):
    def __setattr__(self, name, value):
        # Importing the submodule `kernels.rms_norm` would rebind the package attribute
        # `rms_norm` from the dispatching function to that module; keep the function.
        current = self.__dict__.get(name)
        if isinstance(value, types.ModuleType) and callable(current) and not isinstance(current, types.ModuleType):
            return
        super().__setattr__(name, value)


sys.modules[__name__].__class__ = _Package

__all__ = ["reference", "rms_norm", "add_rms_norm", "apply_rotary", "silu_and_mul", "fill_kv_cache",
           "paged_decode_attention", "paged_prefill_attention"]
