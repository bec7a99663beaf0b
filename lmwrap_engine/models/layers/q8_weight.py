"""The LM head's weight kept 8-bit where a GGUF file stored it as Q8_0, for the compiled batch-1 step.

GGUF files usually store the token embedding (SmolLM2's, tied to the LM head) as Q8_0: in each group of
32 along a row, ``w = d * q`` with ``q`` in -127..127 and the group's largest magnitude at ``q = +-127``.
Converted to float32 (``loader/gguf.py``) the values still sit on that lattice, so ``d`` and ``q`` are
recovered exactly, as ``quant_linear.find_int4_lattice`` does for 4-bit weights. The head is the largest
read of a decode step (49152 x 576 for SmolLM2); in an fp32 model under ``auto`` (a CPU without fast
bf16, ``bf16_decode_linear.py``) a batch-1 step inside a compiled program then computes it as one
multiply-sum over the int8 values (``Q8Weight.single_row``), with fp32 products and sums: on a 2-core
AVX-512 (no BF16) Xeon 2.5 ms against 3.9 ms for the bf16 copy it replaces there, and the weights are
the file's exactly (the bf16 copy rounds them). Other calls keep their path, and so do bf16 models:
on a 2-core AMX Xeon an int8 head measured no faster than the bf16 one (3.25 vs 3.1 ms). Only where
torch's kernels run AVX-512 (``engine/cpu_features.int8_head_pays_off``).
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from .linear import realized
from .quant_linear import GROUP_SIZE, fit_lattice

_ROWS_PER_PASS = 512  # find_q8_lattice: blocks of rows (the temporaries stay small; 0.08 s for 49152 x 576)


class Q8Weight(nn.Module):
    """``weight [N, K] == step[:, g] * values[:, g*32:(g+1)*32]`` held as int8 ``values`` and fp32 ``step``."""

    def __init__(self, values: torch.Tensor, step: torch.Tensor):
        super().__init__()
        self.register_buffer("values", values, persistent=False)
        self.register_buffer("step", step, persistent=False)

    def single_row(self, x: torch.Tensor) -> torch.Tensor:
        """``x [1, K] @ weight.T`` as a multiply-sum (for a compiled step: eagerly it would materialise
        the whole product), in ``x``'s dtype."""
        n, k = self.values.shape
        groups = self.step.shape[1]
        products = self.values.view(n, groups, k // groups).float() * self.step[..., None]
        return (products * realized(x).float().view(groups, k // groups)).sum((-1, -2))[None].to(x.dtype)

    def extra_repr(self) -> str:
        return f"out_features={self.values.shape[0]}, in_features={self.values.shape[1]}, group_size={GROUP_SIZE}"


def find_q8_lattice(weight: torch.Tensor, group_size: int = GROUP_SIZE) -> Optional[Q8Weight]:
    """``weight`` (float) as a :class:`Q8Weight` if each group of ``group_size`` along K is ``d * q`` with
    integer ``q`` in -127..127 and ``d = max |w| / 127`` (exactly, to float rounding), else ``None``."""
    n, k = weight.shape
    if k % group_size:
        return None
    values, steps = [], []
    for start in range(0, n, _ROWS_PER_PASS):
        w = weight[start:start + _ROWS_PER_PASS].detach().float().view(-1, k // group_size, group_size)
        largest = w.abs().amax(-1)
        step = largest / 127
        q, ok = fit_lattice(w, step, torch.zeros_like(step), largest, (-127, 127))
        if not bool(ok.all()):
            return None
        values.append(q.to(torch.int8).view(-1, k))
        steps.append(step)
    return Q8Weight(torch.cat(values), torch.cat(steps))
