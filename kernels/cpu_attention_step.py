"""One layer's whole attention for a step of decode rows and prefill chunks, as an opaque custom op.

A compiled prefill or mixed step (``lmwrap_engine/engine/cpu_steps.py``) calls this op where eager
code would write the KV and run the decode and prefill kernels: the token count varies per step and
prefill attention needs host reads (each sequence's length) and per-sequence SDPA, none of which a
trace should see. The op declares that it writes the caches, so inductor calls it in place.

The step's metadata sits in fixed-size buffers (their shapes never vary, so they never become a
program's dynamic dims): ``block_tables [B, W]`` for every sequence, decode rows first;
``kv_lens [B]``; ``cu_seqlens_q [B + 1]``, the offsets of the prefill chunks within the prefill
rows; and ``counts``, three ints: the step's sequences, its decode rows, and the widest block table
in use. Rows past those counts are ignored.
"""
from __future__ import annotations

import torch

import kernels
from .cpu_kv_cache import fill_kv_cache_slots


def _paged_attention_step(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor,
                          v_cache: torch.Tensor, slot_mapping: torch.Tensor, block_tables: torch.Tensor,
                          kv_lens: torch.Tensor, cu_seqlens_q: torch.Tensor, counts: torch.Tensor,
                          scale: float) -> torch.Tensor:
    num_seqs, num_decode, width = counts.tolist()
    fill_kv_cache_slots(k, v, k_cache, v_cache, slot_mapping)
    tables, lens = block_tables[:num_seqs, :width], kv_lens[:num_seqs]
    if num_decode == 0:
        return kernels.paged_prefill_attention(q, k_cache, v_cache, tables, cu_seqlens_q[:num_seqs + 1], lens,
                                               scale)
    decode = kernels.paged_decode_attention(q[:num_decode], k_cache, v_cache, tables[:num_decode],
                                            lens[:num_decode], scale)
    if num_decode == num_seqs:
        return decode
    prefill = kernels.paged_prefill_attention(q[num_decode:], k_cache, v_cache, tables[num_decode:],
                                              cu_seqlens_q[:num_seqs - num_decode + 1], lens[num_decode:], scale)
    return torch.cat([decode, prefill])


def _fake(q, k, v, k_cache, v_cache, slot_mapping, block_tables, kv_lens, cu_seqlens_q, counts, scale):
    return torch.empty_like(q)


# Registered once per process, as in cpu_kv_cache.py (a Library: the dispatcher calls the Python kernel
# directly, without torch.library.custom_op's wrapper).
if not hasattr(torch.ops.lmwrap, "paged_attention_step"):
    _lib = torch.library.Library("lmwrap", "FRAGMENT")
    _lib.define("paged_attention_step(Tensor q, Tensor k, Tensor v, Tensor(a!) k_cache, Tensor(b!) v_cache, "
                "Tensor slot_mapping, Tensor block_tables, Tensor kv_lens, Tensor cu_seqlens_q, Tensor counts, "
                "float scale) -> Tensor")
    _lib.impl("paged_attention_step", _paged_attention_step, "CompositeExplicitAutograd")
    torch.library.register_fake("lmwrap::paged_attention_step", _fake, lib=_lib)


def paged_attention_step(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor,
                         v_cache: torch.Tensor, slot_mapping: torch.Tensor, block_tables: torch.Tensor,
                         kv_lens: torch.Tensor, cu_seqlens_q: torch.Tensor, counts: torch.Tensor,
                         scale: float) -> torch.Tensor:
    """Writes ``k, v [T, Hk, D]`` at ``slot_mapping [T]`` (every slot a real one), then attends: the first
    ``counts[1]`` rows of ``q [T, H, D]`` as decode rows, the rest as the prefill chunks of
    ``cu_seqlens_q``. Returns ``[T, H, D]``; metadata layout in the module docstring."""
    return torch.ops.lmwrap.paged_attention_step(q, k, v, k_cache, v_cache, slot_mapping, block_tables, kv_lens,
                                                 cu_seqlens_q, counts, scale)
