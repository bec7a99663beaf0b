"""A multimodal item: one image's placeholder run in a token sequence, its pixel inputs and, once encoded,
its embeddings (kept with the request so chunked prefill and recompute after preemption reuse them)."""
from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from typing import Dict, List, Optional

import torch

# The placeholder a chat-templated prompt carries for each image, in order (lmdeploy's spelling).
IMAGE_TOKEN = "<IMAGE_TOKEN>"
HASH_BITS = 62


@dataclass
class MultimodalItem:
    offset: int                  # first placeholder token: in the processor's ids, then (engine) in the sequence
    length: int                  # placeholder tokens == rows of ``embeds``
    pixel_inputs: Dict[str, torch.Tensor] = field(repr=False)  # this image's tensors from the HF processor
    content_hash: int            # of the pixel inputs; part of the prefix-cache key of the placeholder tokens
    mrope_positions: Optional[torch.Tensor] = field(default=None, repr=False)  # [3, length], relative to start
    mrope_delta: int = 0         # shift of every later text position: mrope_positions.max() + 1 - length
    embeds: Optional[torch.Tensor] = field(default=None, repr=False)  # [length, hidden], set once by the runner

    @property
    def end(self) -> int:
        return self.offset + self.length

    def shifted(self, by: int) -> "MultimodalItem":
        """A copy placed ``by`` tokens later (sharing tensors and embeddings)."""
        return MultimodalItem(self.offset + by, self.length, self.pixel_inputs, self.content_hash,
                              self.mrope_positions, self.mrope_delta, self.embeds)


def content_hash(*tensors: torch.Tensor) -> int:
    """A stable 62-bit hash of tensors' shapes, dtypes and bytes."""
    h = hashlib.sha256()
    for t in tensors:
        t = t.detach().cpu().contiguous()
        h.update(f"{tuple(t.shape)}{t.dtype}".encode())
        h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return int.from_bytes(h.digest()[:8], "little") >> (64 - HASH_BITS)


def placeholder_runs(ids: List[int], token_id: int) -> List[tuple]:
    """``(offset, length)`` of each maximal run of ``token_id`` in ``ids``."""
    runs = []
    i, n = 0, len(ids)
    while i < n:
        if ids[i] == token_id:
            j = i
            while j < n and ids[j] == token_id:
                j += 1
            runs.append((i, j - i))
            i = j
        else:
            i += 1
    return runs


def split_runs(ids: List[int], token_id: int, lengths: List[int]) -> List[int]:
    """Offsets of consecutive placeholder runs of the given lengths (adjacent images share one run)."""
    offsets = []
    runs = placeholder_runs(ids, token_id)
    want = list(lengths)
    for start, n in runs:
        while n > 0 and want:
            k = want.pop(0)
            if k > n:
                raise ValueError(f"an image needs {k} placeholder tokens but the prompt has a run of {n}")
            offsets.append(start)
            start += k
            n -= k
        if n:
            raise ValueError("the prompt has more image placeholder tokens than its images need")
    if want:
        raise ValueError(f"the prompt has placeholders for {len(offsets)} images, {len(lengths)} were given")
    return offsets


class PromptIds(list):
    """Token ids of a prompt with images: a list of ints that also carries its ``mm_items``."""

    def __init__(self, ids, mm_items):
        super().__init__(ids)
        self.mm_items = list(mm_items)
