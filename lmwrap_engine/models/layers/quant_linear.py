"""Weight-only int4 linears for the CPU: a post-load pass that keeps 4-bit GGUF weights 4-bit.

A GGUF file is converted to a float32 checkpoint (``loader/gguf.py``), so a Q4_0/Q4_1 tensor arrives
here already dequantised. Its values still sit on the 4-bit lattice the file stored: in each group of
32 along a row, ``w = m + d * q`` with ``q`` in 0..15: for Q4_1 llama.cpp's quantiser puts the group's
minimum at ``q = 0`` and its maximum at ``q = 15``, for Q4_0 ``m = -8 d`` and the largest-magnitude value
sits at ``q = 0``. So ``d``, ``m`` and ``q`` are recovered from the float weights, and a weight is only converted when that reconstruction is exact (to float
rounding): the pass never makes a model lossier than the file it came from. Any other linear (HF
weights, Q8_0/K-quant tensors, the tied embedding / lm_head) stays as it is.

The 4-bit weights feed torch's ``_weight_int4pack_mm_for_cpu`` (torch's ``w = (q - 8) * scale + zero``
layout, so ``zero = m + 8 d``), which reads a quarter of the bf16 bytes per token: decode at small
batch is bound by the bytes it reads. Larger batches (prefill, batched decode) are compute-bound, and
there the dense bf16 matmul wins, so the module keeps both (1.28x the bf16 weight bytes).

In an fp32 model (``dtype='auto'`` on a CPU without fast bf16) the 4-bit kernel still takes bf16
activations (``kernel_dtype``): torch's kernel is fast for bf16 input on AVX2 too, and 8x slower for fp32
input. Only the activations entering the kernel are rounded; the weights are exactly the file's.
"""
from __future__ import annotations

import logging
import os
from typing import Callable, Optional, Tuple

import torch
from torch import nn

from . import prepacked_linear

logger = logging.getLogger("lmwrap_engine")

GROUP_SIZE = 32  # the block size of every GGUF 4-bit type
# A group counts as 4-bit when its reconstruction error stays below this fraction of its step d:
# a lattice weight reconstructs to float rounding (~1e-6 d), any other weight is off by up to d / 2.
EXACT_TOLERANCE = 1e-3
_INNER_K_TILES = 2
# Rows up to which the 4-bit kernel beats the dense bf16 matmul (1 thread, 2-core AVX-512 BF16 EPYC,
# SmolLM2-135M shapes: 4-bit 1.5-1.8x faster at 1 row, even at 4, 2x slower at 16).
MAX_INT4_ROWS = 4
# find_int4_lattice's rows per pass: SmolLM2-135M's 210 weights in 0.6-0.9 s (whole weights at once 1.5-2.1 s,
# 64 rows 1.2-1.5 s; 2-core AVX-512 Xeon).
_ROWS_PER_PASS = 512


def find_int4_lattice(weight: torch.Tensor, group_size: int = GROUP_SIZE) -> Optional[Tuple[torch.Tensor, ...]]:
    """``(q [N, K] int32 in 0..15, step [N, K/g], minimum [N, K/g])`` with ``weight == minimum + step * q``
    per group of ``group_size`` along K, or ``None`` when ``weight`` is not (exactly) on such a lattice.

    Each group is tried as Q4_1 (``min + d q``: the group's min at q = 0, its max at q = 15) and, where
    that fails, as Q4_0 (``d (q - 8)`` with ``d = -x / 8`` for the group's largest-magnitude value ``x``,
    so ``d`` may be negative). Rows go ``_ROWS_PER_PASS`` at a time (smaller temporaries), and a weight
    off the lattice is rejected at its first block of rows.
    """
    n, k = weight.shape
    if k % group_size or n % 16:
        return None
    qs, steps, bases = [], [], []
    for start in range(0, n, _ROWS_PER_PASS):
        w = weight[start:start + _ROWS_PER_PASS].detach().float().view(-1, k // group_size, group_size)
        lo, hi = w.amin(-1), w.amax(-1)
        largest = torch.where(hi.abs() > lo.abs(), hi, lo)
        step, base = (hi - lo) / 15, lo
        q, ok = fit_lattice(w, step, base, largest)
        if not bool(ok.all()):
            sym_step = -largest / 8
            sym_q, sym_ok = fit_lattice(w, sym_step, -8 * sym_step, largest)
            take = sym_ok & ~ok
            q = torch.where(take[..., None], sym_q, q)
            step, base = torch.where(take, sym_step, step), torch.where(take, -8 * sym_step, base)
            if not bool((ok | sym_ok).all()):
                return None
        qs.append(q.to(torch.int32))
        steps.append(step)
        bases.append(base)
    return torch.cat(qs).view(n, k), torch.cat(steps), torch.cat(bases)


def fit_lattice(w: torch.Tensor, step: torch.Tensor, base: torch.Tensor, largest: torch.Tensor,
                q_range: Tuple[int, int] = (0, 15)):
    """``(q, ok)`` for groups ``w [..., g]``: each group's nearest lattice points ``base + step * q`` (``q`` in
    ``q_range``) and whether all its weights sit on them (``largest``: the group's largest magnitude)."""
    safe = torch.where(step != 0, step, torch.ones_like(step))
    q = ((w - base[..., None]) / safe[..., None]).round_().clamp_(*q_range)
    err = (q * step[..., None] + base[..., None] - w).abs_().amax(-1)
    return q, err <= EXACT_TOLERANCE * step.abs() + 1e-6 * largest.abs()


class Int4Linear(nn.Module):
    """``y = x @ W.T (+ bias)`` with ``W`` held as packed 4-bit groups for small batches (CPU only)."""

    def __init__(self, q: torch.Tensor, step: torch.Tensor, minimum: torch.Tensor, weight: torch.Tensor,
                 bias: Optional[torch.Tensor], dtype: torch.dtype, group_size: int = GROUP_SIZE,
                 kernel_dtype: Optional[torch.dtype] = None):
        super().__init__()
        self.kernel_dtype = kernel_dtype or dtype  # what the 4-bit kernel computes in (input, scales, output)
        # The dense copy serves batches of more than MAX_INT4_ROWS rows (prefill, batched decode),
        # where the dense matmul is faster than unpacking 4-bit groups.
        self.weight = nn.Parameter(weight.detach().to(dtype), requires_grad=False)
        self.in_features = q.shape[1]
        self.out_features = q.shape[0]
        self.group_size = group_size
        packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(q.contiguous(), _INNER_K_TILES)
        scales_zeros = torch.stack([step, minimum + 8 * step], -1).transpose(0, 1).contiguous().to(self.kernel_dtype)
        self.register_buffer("packed_weight", packed, persistent=False)
        self.register_buffer("scales_zeros", scales_zeros, persistent=False)
        self.bias = None if bias is None else nn.Parameter(bias.detach().to(dtype), requires_grad=False)
        self.packed_dense = None  # the dense weight's oneDNN copy, see prepack_dense_weights

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        if x.numel() > MAX_INT4_ROWS * shape[-1]:
            return prepacked_linear.linear(x, self.weight, self.bias)
        y = torch.ops.aten._weight_int4pack_mm_for_cpu(x.reshape(-1, shape[-1]).to(self.kernel_dtype).contiguous(),
                                                       self.packed_weight, self.group_size, self.scales_zeros).to(x.dtype)
        if self.bias is not None:
            y = y + self.bias
        return y.view(*shape[:-1], self.out_features)

    def _apply(self, fn, recurse=True):
        # ``model.to(dtype)`` casts the dense copy; the kernel's scales stay in its dtype (bf16 -> fp32 -> bf16
        # is exact, so a round trip through another float dtype loses nothing).
        super()._apply(fn, recurse)
        self.scales_zeros = self.scales_zeros.to(self.kernel_dtype)
        return self

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, group_size={self.group_size}, "
                f"kernel_dtype={self.kernel_dtype}")


def int4_pays_off(device: torch.device, kernel_dtype: torch.dtype) -> bool:
    """Where the packed kernel beats a dense matmul: CPU with bf16 activations. (With fp32 input torch's
    CPU kernel is many times slower than a dense fp32 matmul, measured; CUDA has its own layout.)
    ``LMWRAP_INT4=0`` turns it off."""
    return device.type == "cpu" and kernel_dtype == torch.bfloat16 and os.environ.get("LMWRAP_INT4", "1") != "0"


def convert_int4_linears(model: nn.Module, dtype: torch.dtype, kernel_dtype: Optional[torch.dtype] = None) -> int:
    """Swap every ``nn.Linear`` whose weight lies on a 4-bit group lattice for an :class:`Int4Linear`
    (in place), its dense copy in ``dtype``, its 4-bit kernel in ``kernel_dtype`` (default ``dtype``).
    Linears whose weight is shared (tied embeddings) are left alone. Returns how many."""
    counts = {}
    for p in _all_params(model):
        counts[id(p)] = counts.get(id(p), 0) + 1

    def make(linear: nn.Linear) -> Optional[Int4Linear]:
        if counts.get(id(linear.weight), 0) > 1:
            return None
        lattice = find_int4_lattice(linear.weight)
        if lattice is None:
            return None
        return Int4Linear(*lattice, linear.weight, linear.bias, dtype, kernel_dtype=kernel_dtype)

    return replace_linears(model, make, "weight-only int4 (linears kept 4-bit)")


def prepack_dense_weights(model: nn.Module) -> int:
    """Give the dense weights that CPU calls of more than a few rows use (each :class:`Int4Linear`'s and
    :class:`~.bf16_decode_linear.Bf16DecodeLinear`'s, the LM head's included) a oneDNN-blocked copy,
    which those calls then take, eager and compiled (``prepacked_linear.py``). Measured on a 2-core
    AMX Xeon, bf16, SmolLM2-135M: TTFT of a 128-token prompt 71 -> 60 ms, the same bits; on a 2-core
    AVX-512 (no BF16) Xeon, fp32 (``auto``), the 5-32-row matmuls of batched decode 1.5-3.7x faster. The copies
    cost the dense weights' bytes again. Call it after the model's last ``.to()``, on the thread that runs
    the model (parallel torch ops on a second thread start a second OpenMP pool: bf16 matmuls then ran
    1.3-1.4x slower here). Returns how many."""
    from .bf16_decode_linear import Bf16DecodeLinear
    count = 0
    for m in model.modules():
        if isinstance(m, (Int4Linear, Bf16DecodeLinear)):
            m.packed_dense = prepacked_linear.prepack(m.weight)
            count += m.packed_dense is not None
    if count:
        logger.info("oneDNN prepacked dense weights: %d linears", count)
    return count


def replace_linears(model: nn.Module, make: Callable[[nn.Linear], Optional[nn.Module]], what: str) -> int:
    """Swap each plain ``nn.Linear`` of ``model`` (tensor-parallel ones at ``tp_size == 1`` included) for
    ``make(linear)``, in place; where ``make`` returns ``None`` the linear stays. Modules that are not
    ``nn.Linear`` (one swapped earlier) are not offered. Logs ``what`` with the count; returns the count."""
    swaps = []
    for name, module in list(model.named_modules()):
        if isinstance(module, nn.Linear) and _plain_forward(module):
            new = make(module)
            if new is not None:
                swaps.append((name, new))
    for name, new in swaps:
        parent_name, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent_name) if parent_name else model, child, new)
    if swaps:
        logger.info("%s: %d linears", what, len(swaps))
    return len(swaps)


def _all_params(model: nn.Module):
    for module in model.modules():
        for p in module._parameters.values():
            if p is not None:
                yield p


def _plain_forward(module: nn.Linear) -> bool:
    """A subclass that does more than ``F.linear`` keeps its own forward: a tensor-parallel linear's
    collectives (at ``tp_size == 1`` they are exactly ``F.linear``, so the swap is safe there)."""
    return type(module).forward is nn.Linear.forward or getattr(module, "tp_size", None) == 1
