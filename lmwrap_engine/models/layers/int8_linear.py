"""Weight-only int8 linears for the CPU (``weight_quant='int8'``): a post-load pass over every plain linear.

Decode at small batch reads every weight once per token, so its speed is the bytes it reads. Each
weight row (output channel) becomes ``w = s[n] * q[n, k]`` with ``q`` in -127..127 and ``s = max|w[n]| / 127``.
The LM head, the largest matrix of a small model, is converted too; when it is tied to the embedding,
the shared table is overwritten with its dequantised values, so the lookup and the head see the same
weights (exactly those of a checkpoint saved from the dequantised model).

Which kernel serves a call (measured on a 2-core AVX-512 BF16 EPYC, 1 thread, SmolLM2-135M shapes, sweeps
over many layers + the LM head so that weights come from memory, not cache; the machine was shared, so
compare within a line):

- inside the compiled decode step (``engine/cpu_graphs.py``), one row, or up to ``MAX_INT8_ROWS`` rows in
  fp32: ``sum_k x[m, k] q[n, k]`` written as a broadcast and a reduction, which inductor fuses into one
  pass over the int8 weight per row. 10 layers + LM head, fp32: 1 row 4.5 ms vs dense 25.9; 2 rows 8.0
  vs 49.1; 4 rows 15.1 vs 33.9. bf16: 1 row 5.3 ms vs dense 18.1 and ``_weight_int8pack_mm`` 10.4; 2
  rows 11.1 vs 16.0 and 12.6 (the LM head alone at 4 rows: 11.3 ms vs int8pack 7.2, so bf16 takes
  int8pack from 2 rows on).
- bf16, up to ``MAX_INT8_ROWS`` rows otherwise: ``torch._weight_int8pack_mm`` (scales in the activation
  dtype). 30 layers / LM head, eager: 1 row 17.9 / 5.0 ms vs dense 34.6 / 8.5; 4 rows 24.7 / 6.8 vs
  37.1 / 8.8; 8 rows 37.8 / 13.3 vs 42.7 / 10.3; 16 rows 63.7 / 24.1 vs 50.5 / 12.5.
- an fp32 model with bf16 small-batch kernels (``dtype='auto'`` on a CPU without fast bf16, see
  ``bf16_decode_linear.py``), up to ``MAX_INT8_ROWS`` rows: ``_weight_int8pack_mm`` on bf16 activations
  (bf16 scales), compiled or not. On a 2-core AVX2-only EPYC (``bench latency --weight-quant int8``) the
  fused fp32 reduction above ran batch-1 decode at 4.9 tok/s, int8pack on bf16 at 26.6 (in a slower hour,
  when the run without int8 gave 28.7); int8pack on bf16 takes the LM head in 3.9 ms against 13.7 for
  dense fp32.
- everything else: a dense copy of the dequantised weight. Torch's fp32 int8 kernel is 3x slower than
  a dense fp32 matmul (1 row, 30 layers: 131 ms vs 43 ms), and dequantising per call instead of keeping
  the copy costs 1.3x (64 rows: 128 ms vs 100 ms) to 1.1x (256 rows) on the layers and 4x on the LM head
  (dequantising 28 M weights each call, ~80 ms eager). The copy costs memory: int8 + dense is 1.5x the
  bf16 weight bytes (1.25x fp32); a tied LM head's copy is the embedding table, which exists anyway.
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from .linear import realized
from .quant_linear import replace_linears

# Rows up to which _weight_int8pack_mm beats the dense bf16 matmul (see the module docstring: the
# layers win up to 8 rows, the LM head up to 4). The same limit as MAX_INT4_ROWS keeps the compiled
# decode step at three programs (batch 1, 2..4, more).
MAX_INT8_ROWS = 4


def quantize_int8(weight: torch.Tensor, scale_dtype: torch.dtype) -> Tuple[torch.Tensor, torch.Tensor]:
    """``(q [N, K] int8 in -127..127, scales [N] in scale_dtype)``, symmetric per output channel, so that
    ``q * scales[:, None]`` is the dequantised weight (an all-zero row gets scale 1)."""
    w = weight.detach().float()
    amax = w.abs().amax(-1)
    scales = torch.where(amax > 0, amax / 127, torch.ones_like(amax)).to(scale_dtype)
    q = torch.round(w / scales.float()[:, None]).clamp_(-127, 127).to(torch.int8)
    return q, scales


def dequantize_int8(q: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """``q * scales[:, None]`` in the scales' dtype (computed in fp32, rounded once)."""
    return (q.float() * scales.float()[:, None]).to(scales.dtype)


class Int8Linear(nn.Module):
    """``y = x @ W.T (+ bias)`` with ``W`` held as per-channel int8 for small batches (CPU only).

    ``weight`` is the dense dequantised copy (the same ``Parameter`` as a tied embedding's table)."""

    def __init__(self, weight: nn.Parameter, qweight: torch.Tensor, scales: torch.Tensor,
                 bias: Optional[torch.Tensor], small_batch_dtype: Optional[torch.dtype] = None):
        super().__init__()
        self.weight = weight
        # bf16 in an fp32 model whose small calls run bf16 kernels: they take int8pack on bf16 activations.
        self.small_batch_dtype = small_batch_dtype or weight.dtype
        self.out_features, self.in_features = qweight.shape
        self.register_buffer("qweight", qweight.contiguous(), persistent=False)
        self.register_buffer("scales", scales.contiguous().to(self.small_batch_dtype), persistent=False)
        self.bias = None if bias is None else nn.Parameter(bias.detach(), requires_grad=False)

    @classmethod
    def from_linear(cls, linear: nn.Linear, small_batch_dtype: Optional[torch.dtype] = None) -> "Int8Linear":
        """Quantises ``linear.weight`` and overwrites it in place with its dequantised values (so every
        module sharing that parameter computes with the same weights)."""
        weight = linear.weight
        q, scales = quantize_int8(weight, weight.dtype)
        with torch.no_grad():
            weight.copy_(dequantize_int8(q, scales))
        return cls(weight, q, scales, linear.bias, small_batch_dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        rows = x.numel() // self.in_features
        if rows <= MAX_INT8_ROWS and self.small_batch_dtype != x.dtype:
            y = torch._weight_int8pack_mm(x.reshape(-1, shape[-1]).to(self.small_batch_dtype).contiguous(),
                                          self.qweight, self.scales).to(x.dtype)
        elif (rows <= MAX_INT8_ROWS and torch.compiler.is_compiling()
                and (rows == 1 or x.dtype == torch.float32)):
            # Inductor fuses the broadcast and the reduction into one pass over the int8 weight per row;
            # eagerly this would materialise a rows x N x K product.
            xf = realized(x).reshape(-1, 1, self.in_features).float()
            y = ((xf * self.qweight.float()).sum(-1) * self.scales.float()).to(x.dtype)
        elif rows <= MAX_INT8_ROWS and x.dtype == torch.bfloat16:
            y = torch._weight_int8pack_mm(x.reshape(-1, shape[-1]).contiguous(), self.qweight, self.scales)
        else:
            return F.linear(x, self.weight, self.bias)
        if self.bias is not None:
            y = y + self.bias
        return y.view(*shape[:-1], self.out_features)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}"


def convert_int8_linears(model: nn.Module, small_batch_dtype: Optional[torch.dtype] = None) -> int:
    """Swap every plain ``nn.Linear`` (tensor-parallel ones at ``tp_size == 1`` included, the LM head
    included, tied or not) for an :class:`Int8Linear`, in place. Modules that are not ``nn.Linear``
    (an :class:`~.quant_linear.Int4Linear`) stay as they are. ``small_batch_dtype``: bf16 in an fp32 model
    whose calls of few rows run bf16 kernels. Returns how many were swapped."""
    return replace_linears(model, lambda linear: Int8Linear.from_linear(linear, small_batch_dtype),
                           "weight-only int8")
