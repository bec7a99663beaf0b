"""Per-step metadata shared by every attention layer, set once per forward by the model runner."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch


@dataclass
class ForwardContext:
    slot_mapping: torch.Tensor          # [T] cache slot of each new token
    block_tables: torch.Tensor          # [B, max_blocks]
    cu_seqlens_q: torch.Tensor          # [B + 1]
    kv_lens: torch.Tensor               # [B] cached tokens incl. this step's
    num_decode_seqs: int                # the first sequences each have exactly one new token
    num_decode_tokens: int
    # Decode rows again, as their own tensors, so the decode kernel never slices per layer.
    decode_block_tables: Optional[torch.Tensor] = None
    decode_kv_lens: Optional[torch.Tensor] = None
    prefill_block_tables: Optional[torch.Tensor] = None
    prefill_kv_lens: Optional[torch.Tensor] = None
    prefill_cu_seqlens_q: Optional[torch.Tensor] = None


_context: Optional[ForwardContext] = None


def set_context(ctx: Optional[ForwardContext]) -> None:
    global _context
    _context = ctx


def get_context() -> ForwardContext:
    assert _context is not None, "attention ran outside a model-runner step"
    return _context
