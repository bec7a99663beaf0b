"""Paged attention over this layer's slice of the KV cache."""
from __future__ import annotations

import torch
from torch import nn

import kernels
from kernels import cpu_attention, cpu_paged_decode
from kernels.cpu_attention_step import paged_attention_step


class PagedAttention(nn.Module):
    def __init__(self, num_heads: int, num_kv_heads: int, head_dim: int, scale: float):
        super().__init__()
        self.num_heads = num_heads
        self.num_kv_heads = num_kv_heads
        self.head_dim = head_dim
        self.scale = scale
        # Assigned by the model runner once the cache is allocated.
        self.step_context = None  # the runner's StepContext
        self.k_cache = self.v_cache = None
        self.k_scales_zeros = self.v_scales_zeros = None

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """``q [T, H, D]``, ``k/v [T, Hk, D]`` for this step's tokens -> ``[T, H, D]``."""
        ctx = self.step_context.get()
        if ctx.traceable:  # a compiled decode step: no int8 KV, no host syncs (engine/cpu_graphs.py)
            cpu_attention.write_kv(k, v, self.k_cache, self.v_cache, ctx.slot_mapping)
            attend = (cpu_paged_decode.paged_decode_attention if cpu_paged_decode.supports(self.k_cache)
                      else cpu_attention.paged_decode_attention)
            return attend(q, self.k_cache, self.v_cache, ctx.decode_block_tables, ctx.decode_kv_lens, self.scale)
        if ctx.step_buffers is not None:  # a compiled prefill or mixed step (engine/cpu_steps.py)
            b = ctx.step_buffers
            return paged_attention_step(q, k, v, self.k_cache, self.v_cache, ctx.slot_mapping, b.block_tables,
                                        b.kv_lens, b.cu_seqlens_q, b.counts, self.scale)
        quant = dict(k_scales_zeros=self.k_scales_zeros, v_scales_zeros=self.v_scales_zeros)
        kernels.fill_kv_cache(k, v, self.k_cache, self.v_cache, ctx.slot_mapping, **quant)
        n = ctx.num_decode_tokens
        if n == q.shape[0]:
            return kernels.paged_decode_attention(q, self.k_cache, self.v_cache, ctx.decode_block_tables,
                                                  ctx.decode_kv_lens, self.scale, **quant)
        prefill = kernels.paged_prefill_attention(q[n:], self.k_cache, self.v_cache, ctx.prefill_block_tables,
                                                  ctx.prefill_cu_seqlens_q, ctx.prefill_kv_lens, self.scale,
                                                  **quant)
        if n == 0:
            return prefill
        decode = kernels.paged_decode_attention(q[:n], self.k_cache, self.v_cache, ctx.decode_block_tables,
                                                ctx.decode_kv_lens, self.scale, **quant)
        return torch.cat([decode, prefill])
