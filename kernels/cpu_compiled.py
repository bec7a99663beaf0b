"""The eager path's fallback CPU attention (where ``cpu_paged_decode.py``'s kernel is not built or is
switched off): ``kernels/cpu_attention.py`` compiled once per process by inductor.

Compiled with static head/cache shapes and unbacked (never specialised) batch and table width, so
batch and context changes do not recompile: one graph per model shape and dtype. If compilation is
unavailable or fails (no C++ compiler, an inductor error) one warning is logged and the torch
reference serves from then on. ``LMWRAP_CPU_ATTENTION=reference`` forces the reference.
"""
from __future__ import annotations

import functools
import logging
import os
from typing import List, Tuple

import torch

from . import cpu_attention, reference

logger = logging.getLogger(__name__)
_broken = False
# The row groups of the last (kv_lens, block_tables) seen: every layer of a step passes the same tensors.
_last_plan: Tuple = (None, None, None, None, None)


def enabled() -> bool:
    """Whether CPU decode attention goes to the compiled kernel (not disabled, not failed)."""
    return not _broken and os.environ.get("LMWRAP_CPU_ATTENTION", "compiled") != "reference"


def pin_vector_width() -> None:
    """Pin inductor's vector width (``config.cpp.simdlen``) to the instruction set it picks for this process.

    Inductor's FX graph cache keys generated code without the instruction set, yet the code is written
    for one vector width: AVX-512 code (16-float steps) found in the cache by a process limited to AVX2
    (``ATEN_CPU_CAPABILITY=avx2``, or another machine sharing the cache folder) is compiled for 8-float
    vectors and fills half of each step: this attention returned garbage (max error 7.8e37; torch 2.13).
    ``simdlen`` is part of the key and, pinned to the picked set's width, picks the same set."""
    from torch._inductor import config as inductor_config
    from torch._inductor import cpu_vec_isa
    if inductor_config.cpp.simdlen is None:
        width = cpu_vec_isa.pick_vec_isa().bit_width()
        if width:
            inductor_config.cpp.simdlen = width


@functools.lru_cache(maxsize=None)
def _compiled_decode():
    pin_vector_width()
    return torch.compile(cpu_attention.paged_decode_attention, dynamic=False)


def _row_groups(block_tables: torch.Tensor, kv_lens: torch.Tensor, block_size: int) -> List[Tuple]:
    """``(rows or None, tables, lens)`` per group of similar lengths, each table cut to its group's longest row.

    Every row computes over its table's full width, so a short row next to a long one is wasted
    work; a few groups (more at larger batches) bound it without many more calls."""
    global _last_plan
    last_lens, last_tables, lens_copy, tables_copy, plan = _last_plan
    if (last_lens is kv_lens and last_tables is block_tables and torch.equal(lens_copy, kv_lens)
            and torch.equal(tables_copy, block_tables)):  # inference tensors have no version counter
        return plan
    batch = kv_lens.shape[0]
    num_groups = 1 if batch < 16 else 2 if batch < 64 else 4
    if num_groups == 1:
        split = [(None, kv_lens)]
    else:
        order = torch.argsort(kv_lens)
        split = [(rows, kv_lens[rows]) for rows in torch.tensor_split(order, num_groups)]
    plan = []
    for rows, lens in split:
        width = max(1, -(-int(lens.max()) // block_size))
        tables = block_tables[:, :width] if rows is None else block_tables[rows, :width]
        # strides are guarded, and a one-row slice counts as contiguous: copy to plain strides
        plan.append((rows, tables.clone(memory_format=torch.contiguous_format), lens.contiguous()))
    _last_plan = (kv_lens, block_tables, kv_lens.clone(), block_tables.clone(), plan)
    return plan


def _call_compiled(q, k_cache, v_cache, block_tables, kv_lens, scale):
    q = q.contiguous()  # strides are guarded: one graph whether q is a view of a fused qkv or not
    mark = torch._dynamo.decorators.mark_unbacked  # no 0/1 specialisation: batch 1 shares the graph
    for t, dim in ((q, 0), (block_tables, 0), (block_tables, 1), (kv_lens, 0)):
        mark(t, dim)
    return _compiled_decode()(q, k_cache, v_cache, block_tables, kv_lens, scale)


def paged_decode_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                           block_tables: torch.Tensor, kv_lens: torch.Tensor, scale: float) -> torch.Tensor:
    """``cpu_attention.paged_decode_attention`` compiled; the reference if compiling fails."""
    global _broken
    if torch.compiler.is_compiling():  # inside a caller's graph: inline the traceable kernel
        return cpu_attention.paged_decode_attention(q, k_cache, v_cache, block_tables, kv_lens, scale)
    if enabled() and q.shape[0] > 0:
        try:
            plan = _row_groups(block_tables, kv_lens, k_cache.shape[1])
            if len(plan) == 1:
                return _call_compiled(q, k_cache, v_cache, plan[0][1], plan[0][2], scale)
            out = torch.empty_like(q)
            for rows, tables, lens in plan:
                out[rows] = _call_compiled(q[rows], k_cache, v_cache, tables, lens, scale)
            return out
        except Exception as exc:  # compiler missing or broken: serve, slower, rather than fail
            _broken = True
            logger.warning("compiled CPU attention unavailable (%s: %s); using the torch reference "
                           "(set LMWRAP_CPU_ATTENTION=reference to skip the attempt)",
                           type(exc).__name__, str(exc).splitlines()[0] if str(exc) else "")
    return reference.paged_decode_attention(q, k_cache, v_cache, block_tables, kv_lens, scale)
