"""bf16 weights for small batches in an fp32 CPU model: the decode half of ``dtype='auto'`` on a CPU
without fast bf16 (AVX2 only).

There ``auto`` keeps the model in fp32: torch emulates bf16 matrix products there, so prefill and
large batches would be slower in bf16 (3.8x at 32 rows, below). Decode at a few rows is bound by the bytes of
weights it reads instead, and torch's bf16 matrix-vector kernels are fast on AVX2. So each dense
linear (the LM head included, tied or not) keeps a bf16 copy of its weight and uses it, with bf16
activations and an fp32 result, for calls of up to ``MAX_BF16_ROWS`` rows; larger calls use the fp32
weight. Measured on a 2-core AVX2-only EPYC, 2 threads, SmolLM2-135M shapes, weights from memory
(30 layers / LM head): 1 row 18.0 / 4.1 ms vs fp32 48.4 / 13.7; 4 rows 60.6 / 15.7 vs 90.3 / 31.7;
8 rows 105.5 / 26.3 vs 69.9 / 28.9; 32 rows 453.5 / 133.1 vs 119.7 / 63.9. The copy costs half the fp32 weight bytes again.
A single row inside a compiled decode step (batch 1) keeps its fp32 activations instead: the product
is written as a multiply-sum over the bf16 weight, which inductor fuses into one pass at memory speed.

Small batches then compute with bf16-rounded weights (and, but for that single row, activations), the precision of ``auto`` on a
bf16 CPU; ``dtype='float32'`` keeps every call in fp32.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from . import prepacked_linear
from .linear import is_compiled_single_row, single_row_linear
from .quant_linear import MAX_INT4_ROWS, replace_linears

# The 4-bit layers' limit, so that the compiled decode step keeps its three programs (1, 2..4, more).
MAX_BF16_ROWS = MAX_INT4_ROWS


class Bf16DecodeLinear(nn.Module):
    """``y = x @ W.T (+ bias)`` in fp32, through a bf16 copy of ``W`` for calls of few rows (CPU).

    ``weight`` is the original fp32 ``Parameter`` (still shared with a tied embedding)."""

    def __init__(self, linear: nn.Linear):
        super().__init__()
        self.weight = linear.weight
        self.bias = linear.bias
        self.out_features, self.in_features = linear.weight.shape
        self.register_buffer("weight_bf16", linear.weight.detach().to(torch.bfloat16), persistent=False)
        self.packed_dense = None  # the fp32 weight's oneDNN copy, see quant_linear.prepack_dense_weights
        self.q8 = None  # the weight's int8 form for compiled single rows, where it has one (q8_weight.py)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.numel() > MAX_BF16_ROWS * self.in_features:
            return prepacked_linear.linear(x, self.weight, self.bias)
        if is_compiled_single_row(x):  # fp32 activations, one fused pass over the bf16 (or int8) weight
            y = single_row_linear(x, self.weight_bf16) if self.q8 is None else self.q8.single_row(x)
        else:
            y = F.linear(x.to(torch.bfloat16), self.weight_bf16).to(x.dtype)
        return y if self.bias is None else y + self.bias

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}"


def convert_bf16_decode_linears(model: nn.Module) -> int:
    """Swap every plain ``nn.Linear`` (the LM head included) for a :class:`Bf16DecodeLinear`, in place.
    Modules that are not ``nn.Linear`` (an :class:`~.quant_linear.Int4Linear`) stay. Returns how many."""
    return replace_linears(model, Bf16DecodeLinear, "bf16 decode weights")
