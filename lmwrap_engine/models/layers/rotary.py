"""Rotary position embedding tables (default, linear and Llama-3 scaling)."""
from __future__ import annotations

import math
from typing import Optional

import torch
from torch import nn


def _llama3_inv_freq(inv_freq: torch.Tensor, scaling: dict) -> torch.Tensor:
    factor = scaling["factor"]
    low_freq_factor = scaling.get("low_freq_factor", 1.0)
    high_freq_factor = scaling.get("high_freq_factor", 4.0)
    old_context_len = scaling["original_max_position_embeddings"]
    low_freq_wavelen = old_context_len / low_freq_factor
    high_freq_wavelen = old_context_len / high_freq_factor
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > low_freq_wavelen, inv_freq / factor, inv_freq)
    smooth = (old_context_len / wavelen - low_freq_factor) / (high_freq_factor - low_freq_factor)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    is_medium = (wavelen >= high_freq_wavelen) & (wavelen <= low_freq_wavelen)
    return torch.where(is_medium, smoothed, scaled)


def compute_inv_freq(head_dim: int, base: float, scaling: Optional[dict]) -> torch.Tensor:
    inv_freq = 1.0 / (base ** (torch.arange(0, head_dim, 2, dtype=torch.int64).float() / head_dim))
    rope_type = (scaling or {}).get("rope_type", (scaling or {}).get("type", "default"))
    if rope_type == "default":
        return inv_freq
    if rope_type == "linear":
        return inv_freq / scaling["factor"]
    if rope_type == "llama3":
        return _llama3_inv_freq(inv_freq, scaling)
    raise NotImplementedError(f"rope scaling {rope_type!r} is not supported (default, linear, llama3 are)")


class RotaryEmbedding(nn.Module):
    """Holds cos/sin tables ``[max_position, head_dim // 2]``; built lazily on the device first used."""

    def __init__(self, head_dim: int, max_position: int, base: float, scaling: Optional[dict] = None):
        super().__init__()
        self.head_dim = head_dim
        self.max_position = max_position
        self.base = base
        self.scaling = scaling
        self._cache: dict = {}

    def cos_sin(self, positions: torch.Tensor, dtype: torch.dtype):
        key = (positions.device, dtype)
        if key not in self._cache:
            inv_freq = compute_inv_freq(self.head_dim, self.base, self.scaling)
            freqs = torch.outer(torch.arange(self.max_position, dtype=torch.float32), inv_freq)
            self._cache[key] = (freqs.cos().to(positions.device, dtype), freqs.sin().to(positions.device, dtype))
        cos, sin = self._cache[key]
        return cos[positions], sin[positions]
