"""Dense CPU linears through a copy of the weight laid out once in oneDNN's blocked format.

``F.linear`` on a CPU hands the plain ``[N, K]`` weight to the BLAS (fp32: MKL) or to oneDNN, which
re-lays it out on every call (bf16). A copy prepacked once (``mkldnn._reorder_linear_weight``) and run
with ``mkldnn._linear_pointwise`` skips that, and oneDNN's kernels are much faster than MKL's sgemm at
the few-to-tens of rows of a batched decode step. Measured on a 2-core AVX-512 (no BF16) Xeon, 2
threads, fp32, SmolLM2-135M shapes, 30 layers: 32 rows 91.3 -> 32.4 ms, 128 rows level, 512 rows 493
-> 468 ms (at 4096 rows the 576 x 3072 product 1.2x slower, the 1536 x 576 one level); the 49152 x 576
LM head at 8 rows 18.4 -> 7.8 ms. bf16 (2-core AMX Xeon): the same bits
as ``F.linear``, 32 rows 10.3 -> 6.4 ms. fp32 results are oneDNN's rounding, not MKL's: equal to
float rounding, not bit for bit. fp32 calls of ``MKL_MIN_ROWS`` rows or more (a large prefill) go to
``F.linear`` after all, where MKL's sgemm is the faster (measured below).

The packed copy is an opaque oneDNN tensor that Dynamo cannot trace, so it never enters a graph: the
op ``lmwrap::prepacked_linear(x, weight, bias)`` takes the plain weight, and its kernel looks the
packed copy up by the weight's address (falling back to ``F.linear`` where there is none). Traced, it
stays one opaque call, so the compiled decode programs use the packed copies too. A module that owns a
packed copy keeps it (``prepack``'s result) alive; the registry holds it weakly, and each entry checks
that the weight it was made from is still alive where the lookup found it, so a freed weight's address
reused by another tensor never finds a stale copy. The copy costs the dense weight's bytes again.
"""
from __future__ import annotations

import weakref
from typing import Optional

import torch
import torch.nn.functional as F


class PackedWeight:
    """A oneDNN-blocked copy of ``weight``; its owner holds it, the registry only weakly."""

    def __init__(self, weight: torch.Tensor):
        self.packed = torch.ops.mkldnn._reorder_linear_weight(weight.detach(), None)
        self.weight_ref = weakref.ref(weight)
        self.key = _key(weight)


def _key(weight: torch.Tensor) -> tuple:
    return weight.data_ptr(), tuple(weight.shape), weight.dtype


_REGISTRY: "weakref.WeakValueDictionary[tuple, PackedWeight]" = weakref.WeakValueDictionary()


def prepack(weight: torch.Tensor) -> Optional[PackedWeight]:
    """A packed copy of the CPU ``weight [N, K]`` (fp32 or bf16), registered for :func:`linear`; ``None``
    where this torch has no oneDNN linear for it. The caller keeps the result alive as long as it wants
    the packed path; the weight must not be modified in place afterwards."""
    if weight.device.type != "cpu" or weight.dtype not in (torch.float32, torch.bfloat16) \
            or not torch.backends.mkldnn.is_available():
        return None
    try:
        entry = PackedWeight(weight)
    except RuntimeError:  # a torch build without oneDNN's linear for this dtype
        return None
    _REGISTRY[entry.key] = entry
    return entry


def _lookup(x: torch.Tensor, weight: torch.Tensor) -> Optional[torch.Tensor]:
    entry = _REGISTRY.get(_key(weight))
    if entry is None or x.dtype != weight.dtype or entry.weight_ref() is None:
        return None
    return entry.packed


# fp32 calls of this many rows or more go to F.linear (MKL's sgemm), which overtakes oneDNN's packed kernels
# in a large prefill: on the 2-core AVX2 EPYC, SmolLM2-135M's four products at 1024 rows 40.8 vs 44.8 ms, at
# 4096 rows 175 vs 199 ms (packed ahead up to 256 rows, level at 512); on the AVX-512 Xeon the packed copy
# led at 512 rows and was level to 1.2x slower at 4096 (module docstring).
MKL_MIN_ROWS = 1024


def _prepacked_linear(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor]) -> torch.Tensor:
    packed = _lookup(x, weight)
    if packed is None or (x.dtype == torch.float32 and x.numel() >= MKL_MIN_ROWS * x.shape[-1]):
        return F.linear(x, weight, bias)
    return torch.ops.mkldnn._linear_pointwise(x.contiguous(), packed, bias, "none", [], "")


def _fake(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor]) -> torch.Tensor:
    return x.new_empty((*x.shape[:-1], weight.shape[0]))


# Registered once per process, with torch.library.Library (the dispatcher calls the Python kernel directly;
# custom_op's wrapper costs more per call: see kernels/cpu_kv_cache.py).
if not hasattr(torch.ops.lmwrap, "prepacked_linear"):
    _lib = torch.library.Library("lmwrap", "FRAGMENT")
    _lib.define("prepacked_linear(Tensor x, Tensor weight, Tensor? bias) -> Tensor")
    _lib.impl("prepacked_linear", _prepacked_linear, "CompositeExplicitAutograd")
    torch.library.register_fake("lmwrap::prepacked_linear", _fake, lib=_lib)


def linear(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor] = None) -> torch.Tensor:
    """``F.linear(x, weight, bias)``, through ``weight``'s packed copy where :func:`prepack` made one
    (eager or inside a compiled step). CPU tensors only."""
    if not torch.compiler.is_compiling():  # eager: the dispatcher's trip to the Python kernel costs ~12 us a call
        return _prepacked_linear(x, weight, bias)
    return torch.ops.lmwrap.prepacked_linear(x, weight, bias)
