"""Megatron-style tensor-parallel layers (column / row parallel linear, vocabulary-parallel embedding and LM head).

Each layer holds only its rank's shard and knows how to cut it from a full checkpoint tensor
(``shard_view``). With ``tp_size=1`` every layer is exactly its torch parent (same parameters, same
forward, no collective), so single-device models are unchanged. Collectives run on the default
``torch.distributed`` process group of the worker process (one group per worker: gloo on CPU, NCCL
on CUDA).
"""
from __future__ import annotations

from typing import List, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import nn


def _divide(n: int, tp_size: int, what: str) -> int:
    if n % tp_size:
        raise ValueError(f"{what}={n} is not divisible by tp={tp_size}; pick a tp that divides it")
    return n // tp_size


def check_tp(num_heads: int, num_kv_heads: int, tp_size: int) -> None:
    """Raises ``ValueError`` when the attention heads cannot be split over ``tp_size`` ranks."""
    _divide(num_heads, tp_size, "num_attention_heads")
    if num_kv_heads >= tp_size:
        _divide(num_kv_heads, tp_size, "num_key_value_heads")
    else:
        _divide(tp_size, num_kv_heads, "tp (with fewer KV heads than ranks, a multiple of them)")


def is_compiled_single_row(x: torch.Tensor) -> bool:
    """``x`` is one row ``[1, K]`` traced inside a compiled decode step (batch 1)."""
    return x.dim() == 2 and x.shape[0] == 1 and torch.compiler.is_compiling()


def realized(x: torch.Tensor) -> torch.Tensor:
    """``x`` computed once into a buffer in a compiled step. A multiply-sum over a weight reads ``x`` once per
    weight row, and inductor would otherwise inline ``x``'s producer (an RMSNorm, ``silu(g) * u``) into that
    loop and recompute it per row: the LM head took 6.4 ms per step that way on a 2-core Xeon, 3.1 without."""
    return torch.ops.prims.inductor_force_stride_order(x, x.stride())


def single_row_linear(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """``x [1, K] @ weight.T`` as a multiply-sum with fp32 products and sums, in ``x``'s dtype. Traced by
    inductor it is one pass over the weight at memory speed: SmolLM2's 49152 x 576 bf16 LM head on a 2-core
    AVX-512 EPYC, 1.5 ms against 2.4-3.4 ms for torch's matrix-vector product. (Eagerly it would
    materialise the whole ``[1, N, K]`` product: only for compiled single rows.)"""
    return (realized(x).float()[:, None, :] * weight.float()).sum(-1).to(x.dtype)


def all_reduce(x: torch.Tensor) -> torch.Tensor:
    import torch.distributed as dist
    dist.all_reduce(x)
    return x


class ColumnParallelLinear(nn.Linear):
    """``y = x Wᵀ`` with the output features split over ranks; ``output_sizes`` are the full sizes of
    the parts stored fused (each split on its own, so rank r holds part i's r-th slice of each)."""

    def __init__(self, in_features: int, output_sizes: List[int], bias: bool, tp_rank: int = 0, tp_size: int = 1):
        self.tp_rank, self.tp_size = tp_rank, tp_size
        self.output_sizes = list(output_sizes)
        self.local_sizes = [_divide(n, tp_size, "output size") for n in output_sizes]
        super().__init__(in_features, sum(self.local_sizes), bias=bias)

    def _part(self, shard) -> Tuple[int, int, int]:
        """(offset in this rank's rows, rows, offset in the full checkpoint tensor) of fused part ``shard``."""
        i = 0 if shard is None else shard
        return sum(self.local_sizes[:i]), self.local_sizes[i], self.tp_rank * self.local_sizes[i]

    def shard_view(self, pname: str, dest: torch.Tensor, tensor: torch.Tensor, shard=None):
        """``(where, what)``: the slice of this rank's parameter and the part of the checkpoint tensor to copy there."""
        offset, rows, start = self._part(shard)
        return dest.narrow(0, offset, rows), _narrow(tensor, 0, start, rows, self.output_sizes[shard or 0])


class MergedColumnParallelLinear(ColumnParallelLinear):
    """Gate and up projections stored as one ``[gate; up]`` weight; each rank holds its slice of both."""


class QKVParallelLinear(ColumnParallelLinear):
    """Fused q/k/v: each rank holds ``num_heads / tp`` query heads and ``num_kv_heads / tp`` KV heads,
    or, when there are fewer KV heads than ranks, the one KV head its query heads attend to (replicated)."""

    def __init__(self, hidden_size: int, head_dim: int, num_heads: int, num_kv_heads: int, bias: bool,
                 tp_rank: int = 0, tp_size: int = 1):
        self.head_dim = head_dim
        check_tp(num_heads, num_kv_heads, tp_size)
        self.num_heads = num_heads // tp_size
        if num_kv_heads >= tp_size:
            self.num_kv_heads = num_kv_heads // tp_size
            self.kv_head_start = tp_rank * self.num_kv_heads
        else:
            self.num_kv_heads = 1
            self.kv_head_start = tp_rank // (tp_size // num_kv_heads)
        self.full_sizes = {"q": num_heads * head_dim, "k": num_kv_heads * head_dim, "v": num_kv_heads * head_dim}
        q, kv = self.num_heads * head_dim, self.num_kv_heads * head_dim
        self.tp_rank, self.tp_size = tp_rank, tp_size
        self.output_sizes, self.local_sizes = [q * tp_size, kv * tp_size, kv * tp_size], [q, kv, kv]
        nn.Linear.__init__(self, hidden_size, q + 2 * kv, bias=bias)

    def shard_view(self, pname: str, dest: torch.Tensor, tensor: torch.Tensor, shard=None):
        q, kv = self.local_sizes[0], self.local_sizes[1]
        if shard == "q":
            where, start = (0, q), self.tp_rank * q
        elif shard in ("k", "v"):
            where, start = (q if shard == "k" else q + kv, kv), self.kv_head_start * self.head_dim
        else:
            raise ValueError(f"qkv_proj takes q, k and v separately, got shard {shard!r}")
        return dest.narrow(0, *where), _narrow(tensor, 0, start, where[1], self.full_sizes[shard])


class RowParallelLinear(nn.Linear):
    """``y = x Wᵀ + b`` with the input features split over ranks (the input is a column-parallel
    output); the partial sums are all-reduced, then the bias (held whole) is added once."""

    def __init__(self, in_features: int, out_features: int, bias: bool, tp_rank: int = 0, tp_size: int = 1):
        self.tp_rank, self.tp_size = tp_rank, tp_size
        self.full_in_features = in_features
        super().__init__(_divide(in_features, tp_size, "input size"), out_features, bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.tp_size == 1:
            return super().forward(x)
        out = all_reduce(F.linear(x, self.weight))
        return out if self.bias is None else out + self.bias

    def shard_view(self, pname: str, dest: torch.Tensor, tensor: torch.Tensor, shard=None):
        if pname == "bias":
            return dest, tensor
        n = self.in_features
        return dest, _narrow(tensor, 1, self.tp_rank * n, n, self.full_in_features)


class VocabParallelEmbedding(nn.Embedding):
    """Rank r holds rows ``[r * ceil(V / tp), ...)`` of the table (the last shard zero-padded); ids outside
    its rows look up zeros and the all-reduce sums the one rank that holds each id."""

    def __init__(self, num_embeddings: int, embedding_dim: int, tp_rank: int = 0, tp_size: int = 1):
        self.tp_rank, self.tp_size = tp_rank, tp_size
        self.full_num_embeddings = num_embeddings
        per_rank = -(-num_embeddings // tp_size)
        self.vocab_start = tp_rank * per_rank
        self.vocab_end = min(num_embeddings, self.vocab_start + per_rank)
        super().__init__(per_rank, embedding_dim)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        if self.tp_size == 1:
            return super().forward(ids)
        outside = (ids < self.vocab_start) | (ids >= self.vocab_end)
        out = F.embedding((ids - self.vocab_start).masked_fill(outside, 0), self.weight)
        return all_reduce(out.masked_fill(outside.unsqueeze(-1), 0))

    def shard_view(self, pname: str, dest: torch.Tensor, tensor: torch.Tensor, shard=None):
        rows = self.vocab_end - self.vocab_start
        dest[rows:].zero_()  # padding rows of the last shard: their logits are cut off after the gather
        return dest[:rows], _narrow(tensor, 0, self.vocab_start, rows, self.full_num_embeddings)


class ParallelLMHead(nn.Linear):
    """The LM head split by vocabulary rows like ``VocabParallelEmbedding`` (so tied weights are the
    same shard); each rank's logits are all-gathered and the padding cut, so every rank gets ``[T, V]``."""

    def __init__(self, hidden_size: int, vocab_size: int, tp_rank: int = 0, tp_size: int = 1):
        self.tp_rank, self.tp_size = tp_rank, tp_size
        self.full_vocab_size = vocab_size
        per_rank = -(-vocab_size // tp_size)
        self.vocab_start = tp_rank * per_rank
        self.vocab_end = min(vocab_size, self.vocab_start + per_rank)
        super().__init__(hidden_size, per_rank, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.tp_size == 1:
            if is_compiled_single_row(x):
                return single_row_linear(x, self.weight)
            return super().forward(x)
        import torch.distributed as dist
        local = F.linear(x, self.weight).contiguous()
        parts = [torch.empty_like(local) for _ in range(self.tp_size)]
        dist.all_gather(parts, local)
        return torch.cat(parts, dim=-1)[..., : self.full_vocab_size]

    shard_view = VocabParallelEmbedding.shard_view

    @property
    def full_num_embeddings(self) -> int:
        return self.full_vocab_size


def _narrow(tensor: torch.Tensor, dim: int, start: int, length: int, full: Optional[int]) -> torch.Tensor:
    """``tensor.narrow`` of a full checkpoint tensor, which must have ``full`` rows along ``dim``
    (anything else is a shape error the caller reports with the full shape)."""
    if full is not None and tensor.dim() > dim and tensor.shape[dim] != full:
        return tensor  # the caller's shape check fails with the tensor's real shape
    return tensor.narrow(dim, start, length)
