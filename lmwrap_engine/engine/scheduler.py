"""Continuous batching with chunked prefill under a token budget; preemption by recompute.

Each step gives every running sequence the tokens it still needs (1 for decode, the rest of its
prompt, capped by the budget, for prefill), then admits waiting sequences while budget, batch
slots and KV blocks last. When blocks run out, idle sessions' KV is dropped first, then the
most recently admitted running sequence is preempted: its blocks are freed and it goes back to
the front of the queue to be recomputed (its blocks usually come back from the prefix cache).

With prefix caching, a waiting sequence whose first uncached prompt block a running sequence is
computing right now (agents sharing a system prompt, arriving together) waits for it rather than
computing it again; sequences behind it are admitted meanwhile, and it keeps its place.
"""
from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field
from typing import Callable, Deque, List, Optional, Tuple

from .block_manager import BlockManager
from .sequence import Sequence, SequenceStatus


@dataclass
class ScheduledBatch:
    seqs: List[Sequence]           # decode rows (one new token) first, then prefill rows
    num_new_tokens: List[int]
    num_decode_seqs: int
    # (src, dst) KV blocks to copy before the forward: prefix reuse at token grain (copy-on-write).
    copies: List[Tuple[int, int]] = field(default_factory=list)


class Scheduler:
    def __init__(self, block_manager: BlockManager, max_batch_size: int, max_num_batched_tokens: int,
                 evict_idle_session: Callable[[], bool] = lambda: False,
                 blocks_pending_release: Callable[[], bool] = lambda: False):
        self.block_manager = block_manager
        self.max_batch_size = max_batch_size
        self.max_num_batched_tokens = max_num_batched_tokens
        self.evict_idle_session = evict_idle_session
        # Turns that have ended but not yet given their blocks back (the engine's unsent outputs).
        self.blocks_pending_release = blocks_pending_release
        self.waiting: Deque[Sequence] = deque()
        self.running: List[Sequence] = []
        self.num_preemptions = 0
        # Prompt tokens looked up in the prefix cache on admission, and how many of them it held.
        self.num_prefix_query_tokens = 0
        self.num_prefix_hit_tokens = 0
        self.unschedulable: List[Sequence] = []  # too big for the whole cache; the engine fails them

    def add(self, seq: Sequence) -> None:
        seq.status = SequenceStatus.WAITING
        self.waiting.append(seq)

    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    def remove(self, seq: Sequence) -> None:
        if seq in self.running:
            self.running.remove(seq)
        elif seq in self.waiting:
            self.waiting.remove(seq)

    def schedule(self) -> Optional[ScheduledBatch]:
        budget = self.max_num_batched_tokens
        scheduled: List[Sequence] = []
        counts: List[int] = []
        preempted = False
        i = 0
        while i < len(self.running) and budget > 0:
            seq = self.running[i]
            n = min(seq.num_tokens - seq.num_computed_tokens, budget)
            while not self.block_manager.allocate_slots(seq, n):
                if self.evict_idle_session():
                    continue
                victim = self.running.pop()
                self._preempt(victim)
                preempted = True
                if victim is seq:
                    break
            else:
                scheduled.append(seq)
                counts.append(n)
                budget -= n
                i += 1
        bm = self.block_manager
        deferred: List[Sequence] = []
        while not preempted and self.waiting and budget > 0 and len(self.running) < self.max_batch_size:
            seq = self.waiting[0]
            had_blocks = bool(seq.block_table)
            before = seq.num_computed_tokens
            if bm.enable_prefix_caching and not had_blocks:
                match = bm.lookup(seq)
                if bm.computing_elsewhere(seq, match):
                    deferred.append(self.waiting.popleft())
                    continue
                bm.attach(seq, match)
            n = min(seq.num_tokens - seq.num_computed_tokens, budget)
            if not bm.allocate_slots(seq, n):
                if not had_blocks:
                    bm.free(seq)
                if self.evict_idle_session():
                    continue
                if not self.running and not scheduled and not self.blocks_pending_release():
                    self.waiting.popleft()
                    self.unschedulable.append(seq)
                    continue
                break
            self.waiting.popleft()
            self.num_prefix_query_tokens += seq.num_tokens - before
            self.num_prefix_hit_tokens += seq.num_computed_tokens - before
            seq.status = SequenceStatus.RUNNING
            self.running.append(seq)
            scheduled.append(seq)
            counts.append(n)
            budget -= n
        self.waiting.extendleft(reversed(deferred))
        if not scheduled:
            return None
        order = sorted(range(len(scheduled)), key=lambda j: counts[j] != 1)
        return ScheduledBatch([scheduled[j] for j in order], [counts[j] for j in order],
                              sum(1 for c in counts if c == 1), bm.take_copies())

    def _preempt(self, seq: Sequence) -> None:
        self.block_manager.free(seq)
        seq.status = SequenceStatus.WAITING
        self.waiting.appendleft(seq)
        self.num_preemptions += 1
