"""Per-step metadata shared by every attention layer of one model, set once per forward by its runner."""
from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass
from typing import Iterator, Optional

import torch


@dataclass
class ForwardContext:
    """The batch's first ``num_decode_tokens`` rows are decode rows (one new token per sequence),
    the rest are prefill chunks; each part carries its own metadata so no layer slices it again."""

    slot_mapping: torch.Tensor          # [T] cache slot of each new token
    num_decode_tokens: int
    decode_block_tables: torch.Tensor   # [B_decode, max_blocks]
    decode_kv_lens: torch.Tensor        # [B_decode] cached tokens incl. this step's
    prefill_block_tables: torch.Tensor  # [B_prefill, max_blocks]
    prefill_cu_seqlens_q: torch.Tensor  # [B_prefill + 1] offsets of each chunk within the prefill rows
    prefill_kv_lens: torch.Tensor       # [B_prefill]
    # A decode-only step traced by torch.compile (cpu_graphs.py): attention takes the traceable
    # sync-free kernels, which read the cache in place over the block table's full width.
    traceable: bool = False
    # A prefill or mixed step traced by torch.compile (cpu_steps.py): attention is one opaque op that
    # reads the step's metadata from these fixed buffers (kernels/cpu_attention_step.py).
    step_buffers: Optional["StepBuffers"] = None


@dataclass
class StepBuffers:
    """Fixed-size metadata of a compiled prefill or mixed step; layout in ``kernels/cpu_attention_step.py``."""

    block_tables: torch.Tensor  # [max_batch, max_blocks], decode rows first
    kv_lens: torch.Tensor       # [max_batch]
    cu_seqlens_q: torch.Tensor  # [max_batch + 1] offsets of the prefill chunks within the prefill rows
    counts: torch.Tensor        # [3]: sequences, decode rows, widest table in use


class StepContext:
    """Holds the forward context of one model: its runner sets it around each forward and its
    attention layers read it. One per model, never process-wide, so two engines in one process
    (or on two threads) never see each other's metadata."""

    def __init__(self):
        self._ctx: Optional[ForwardContext] = None

    @contextmanager
    def use(self, ctx: ForwardContext) -> Iterator[None]:
        self._ctx = ctx
        try:
            yield
        finally:
            self._ctx = None

    def get(self) -> ForwardContext:
        assert self._ctx is not None, "attention ran outside a model-runner step"
        return self._ctx
