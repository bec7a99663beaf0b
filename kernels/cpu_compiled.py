"""The eager path's CPU attention: ``kernels/cpu_attention.py`` compiled once per process by inductor.

Compiled with static head/cache shapes and dynamic batch and table width (so batch and context
changes do not recompile; a batch of 1 or a one-block table is its own graph). If compilation is
unavailable or fails (no C++ compiler, an inductor error) one warning is logged and the torch
reference serves from then on. ``LMWRAP_CPU_ATTENTION=reference`` forces the reference.
"""
from __future__ import annotations

import functools
import logging
import os

import torch

from . import cpu_attention, reference

logger = logging.getLogger(__name__)
_broken = False


def enabled() -> bool:
    """Whether CPU decode attention goes to the compiled kernel (not disabled, not failed)."""
    return not _broken and os.environ.get("LMWRAP_CPU_ATTENTION", "compiled") != "reference"


@functools.lru_cache(maxsize=None)
def _compiled_decode():
    return torch.compile(cpu_attention.paged_decode_attention, dynamic=False)


def paged_decode_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                           block_tables: torch.Tensor, kv_lens: torch.Tensor, scale: float) -> torch.Tensor:
    """``cpu_attention.paged_decode_attention`` compiled; the reference if compiling fails."""
    global _broken
    if torch.compiler.is_compiling():  # inside a caller's graph: inline the traceable kernel
        return cpu_attention.paged_decode_attention(q, k_cache, v_cache, block_tables, kv_lens, scale)
    if enabled():
        for t, dim in ((q, 0), (block_tables, 0), (block_tables, 1), (kv_lens, 0)):
            torch._dynamo.maybe_mark_dynamic(t, dim)
        try:
            return _compiled_decode()(q, k_cache, v_cache, block_tables, kv_lens, scale)
        except Exception as exc:  # compiler missing or broken: serve, slower, rather than fail
            _broken = True
            logger.warning("compiled CPU attention unavailable (%s: %s); using the torch reference "
                           "(set LMWRAP_CPU_ATTENTION=reference to skip the attempt)",
                           type(exc).__name__, str(exc).splitlines()[0] if str(exc) else "")
    return reference.paged_decode_attention(q, k_cache, v_cache, block_tables, kv_lens, scale)
