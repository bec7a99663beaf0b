"""Per-step metadata shared by every attention layer, set once per forward by the model runner."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

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


_context: Optional[ForwardContext] = None


def set_context(ctx: Optional[ForwardContext]) -> None:
    global _context
    _context = ctx


def get_context() -> ForwardContext:
    assert _context is not None, "attention ran outside a model-runner step"
    return _context
