"""A KV-cache write that a compiled prefill or mixed step can call: an opaque custom op.

The compiled prefill/mixed step (``engine/cpu_steps.py``) keeps each layer's attention an opaque op
(``cpu_attention_step.py``: it needs host reads), and this write is part of it. The compiled decode step
writes inside its trace instead (``cpu_attention.write_kv``), which inductor performs in place. (An
earlier trace of the write measured a copy of the whole layer cache per step, 2.5 s a step for a 4 GiB
cache with torch 2.13's ahead-of-time compile; ``write_kv``'s ``index_put_`` by block and offset runs in
place: SmolLM2-135M's batch-1 step with the default 4 GiB cache takes 11-14 ms on a 2-core Xeon.)

Every slot must be a real one: the compiled CPU steps never pad a batch (their shapes are dynamic), so
the write has no padding check; a negative slot raises ``IndexError``. Dropping the check (a min and a
host read per layer call) took the call from 25 to 14 us on a 2-core AVX-512 Xeon, 30 calls a step.

The op is registered with ``torch.library.Library`` (the dispatcher calls the Python kernel directly)
rather than ``torch.library.custom_op``, whose Python wrapper costs ~3x the write itself: measured on
a 2-core AVX2 EPYC, one decode token's write, 140 us vs 45 us per layer call, x30 layers per step.
"""
from __future__ import annotations

import torch


def _fill_kv_cache_slots(k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                         slot_mapping: torch.Tensor) -> None:
    num_kv_heads, head_dim = k_cache.shape[-2], k_cache.shape[-1]
    slots = slot_mapping.long()
    k_cache.view(-1, num_kv_heads, head_dim).index_copy_(0, slots, k)
    v_cache.view(-1, num_kv_heads, head_dim).index_copy_(0, slots, v)


def _fake(k, v, k_cache, v_cache, slot_mapping) -> None:
    return None


# Registered once per process: a second execution of this module (dropped from sys.modules and imported
# again) finds the op in place. The dispatcher keeps the first registration's kernel, and through its
# globals the Library, alive.
if not hasattr(torch.ops.lmwrap, "fill_kv_cache_slots"):
    _lib = torch.library.Library("lmwrap", "FRAGMENT")
    _lib.define("fill_kv_cache_slots(Tensor k, Tensor v, Tensor(a!) k_cache, Tensor(b!) v_cache, "
                "Tensor slot_mapping) -> ()")
    _lib.impl("fill_kv_cache_slots", _fill_kv_cache_slots, "CompositeExplicitAutograd")
    torch.library.register_fake("lmwrap::fill_kv_cache_slots", _fake, lib=_lib)


def fill_kv_cache_slots(k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                        slot_mapping: torch.Tensor) -> None:
    """Write ``k, v [T, Hk, D]`` into the paged caches at ``slot_mapping [T]`` (in place). Every slot must
    be a real one (``0 <= slot < num_blocks * block_size``), else ``IndexError``."""
    torch.ops.lmwrap.fill_kv_cache_slots(k, v, k_cache, v_cache, slot_mapping)
