"""Decode steps replayed from CUDA graphs captured for a ladder of batch sizes.

A decode step launches a few hundred small kernels; at small batch their launch overhead is
larger than their run time. A captured graph replays them all with one launch. Graphs read
their inputs from fixed buffers, so each step copies its inputs there and pads the batch up to
the nearest captured size: padding rows write no KV (slot -1) and attend to nothing (kv_len 0).
The attention kernels size their grids from shapes only (``block_tables`` is always
``max_blocks_per_seq`` wide here), so one graph serves every context up to that width; the model
runner sends longer sequences down the eager path.
"""
from __future__ import annotations

import logging
import time
from typing import List

import torch

from .context import ForwardContext, StepContext

logger = logging.getLogger("lmwrap_engine")


def graph_batch_sizes(max_batch_size: int) -> List[int]:
    """1, 2, 4, 8, then every multiple of 16, up to and including ``max_batch_size``."""
    sizes = [b for b in (1, 2, 4, 8) if b < max_batch_size]
    sizes += [b for b in range(16, max_batch_size, 16)]
    return sizes + [max_batch_size]


class DecodeGraphs:
    """Runs decode-only batches of up to ``max_batch_size`` sequences through fixed input buffers.

    ``run`` returns hidden states, or logits where ``computes_logits`` (a subclass that puts the LM head
    in its graph, ``cpu_graphs.py``).

    With ``capture=False`` (CPU, tests) the same buffers and padding are used but the model runs
    eagerly, so the padding logic is checked without a GPU.
    """

    def __init__(self, model: torch.nn.Module, step_context: StepContext, max_batch_size: int, max_blocks_per_seq: int, hidden_size: int,
                 dtype: torch.dtype, device: torch.device, capture: bool = True):
        self.computes_logits = False
        self.model = model
        self.step_context = step_context
        self.batch_sizes = graph_batch_sizes(max_batch_size)
        self.max_batch_size = max_batch_size
        self.max_blocks_per_seq = max_blocks_per_seq
        self.capture = capture
        int64 = dict(dtype=torch.int64, device=device)
        self.input_ids = torch.zeros(max_batch_size, **int64)
        self.positions = torch.zeros(max_batch_size, **int64)
        self.slot_mapping = torch.full((max_batch_size,), -1, **int64)
        self.kv_lens = torch.zeros(max_batch_size, dtype=torch.int32, device=device)
        self.block_tables = torch.zeros(max_batch_size, max_blocks_per_seq, dtype=torch.int32, device=device)
        self.hidden = torch.zeros(max_batch_size, hidden_size, dtype=dtype, device=device)
        # Host staging, pinned on CUDA so the copies are asynchronous. Reusing it next step is safe:
        # every step ends with the sampler's host sync, after which these copies have completed.
        pin = device.type == "cuda"
        self.host_rows = torch.zeros(3, max_batch_size, dtype=torch.int64, pin_memory=pin)
        self.host_kv_lens = torch.zeros(max_batch_size, dtype=torch.int32, pin_memory=pin)
        self.host_tables = torch.zeros(max_batch_size * max_blocks_per_seq, dtype=torch.int32, pin_memory=pin)
        self.graphs: dict = {}
        self.num_runs = 0
        self.width = max_blocks_per_seq  # the widest block table of the current step
        if capture:
            self._capture_all()

    def _context(self, bs: int) -> ForwardContext:
        empty = self.block_tables[:0]
        return ForwardContext(slot_mapping=self.slot_mapping[:bs], num_decode_tokens=bs,
                              decode_block_tables=self.block_tables[:bs], decode_kv_lens=self.kv_lens[:bs],
                              prefill_block_tables=empty, prefill_cu_seqlens_q=self.kv_lens[:1],
                              prefill_kv_lens=self.kv_lens[:0])

    def _forward(self, bs: int) -> torch.Tensor:
        with self.step_context.use(self._context(bs)):
            self.hidden[:bs] = self.model(self.input_ids[:bs], self.positions[:bs])
        return self.hidden

    @torch.inference_mode()
    def _capture_all(self) -> None:
        start = time.perf_counter()
        pool = None
        for bs in reversed(self.batch_sizes):  # largest first: the smaller graphs fit in its memory pool
            self._forward(bs)  # warm-up: compiles the kernels and builds lazy tables outside the capture
            torch.cuda.synchronize()
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool):
                self._forward(bs)
            if pool is None:
                pool = graph.pool()
            self.graphs[bs] = graph
        torch.cuda.synchronize()
        logger.info("captured %d decode CUDA graphs (batch %d..%d) in %.1f s", len(self.graphs),
                    self.batch_sizes[0], self.batch_sizes[-1], time.perf_counter() - start)

    @torch.inference_mode()
    def run(self, input_ids: List[int], positions: List[int], slots: List[int], kv_lens: List[int],
            block_tables: List[List[int]]) -> torch.Tensor:
        """One decode token per sequence (``n <= max_batch_size``) -> hidden states ``[n, hidden]`` (or logits)."""
        n = len(input_ids)
        bs = next(b for b in self.batch_sizes if b >= n)
        rows, lens = self.host_rows.numpy(), self.host_kv_lens.numpy()
        rows[0, :n], rows[1, :n], rows[2, :n], lens[:n] = input_ids, positions, slots, kv_lens
        rows[2, n:bs] = -1  # padding rows write nowhere ...
        lens[n:bs] = 0      # ... and read nothing
        width = max(len(t) for t in block_tables)
        self.width = width
        tables = self.host_tables[:n * width].view(n, width)
        table_view = tables.numpy()
        for i, table in enumerate(block_tables):
            table_view[i, :len(table)] = table
        # Columns past a row's table hold stale ids: no kernel reads past the row's kv_len.
        self.block_tables[:n, :width].copy_(tables, non_blocking=True)
        self.input_ids[:bs].copy_(self.host_rows[0, :bs], non_blocking=True)
        self.positions[:bs].copy_(self.host_rows[1, :bs], non_blocking=True)
        self.slot_mapping[:bs].copy_(self.host_rows[2, :bs], non_blocking=True)
        self.kv_lens[:bs].copy_(self.host_kv_lens[:bs], non_blocking=True)
        self.num_runs += 1
        if self.capture:
            self.graphs[bs].replay()
            return self.hidden[:n]
        return self._forward(bs)[:n]
