"""Paged KV-cache bookkeeping: block pool, ref counts, hash-chained prefix cache, LRU eviction.

Pure Python; the model runner only ever sees the resulting block tables.

Invariants:
- a block is in ``free_queue`` iff its ref count is 0;
- a block is in ``cached_blocks`` iff it holds a full, computed block whose chain hash is ``block.hash``;
- free blocks are reused from the left of ``free_queue``: blocks without a cached prefix first, then
  cached ones in the order they were freed (least recently used first).
"""
from __future__ import annotations

from collections import OrderedDict
from typing import Dict, List, Optional, Sequence as Seq

from .sequence import Sequence


class Block:
    __slots__ = ("block_id", "ref_count", "hash", "token_ids")

    def __init__(self, block_id: int):
        self.block_id = block_id
        self.ref_count = 0
        self.hash: Optional[int] = None
        self.token_ids: tuple = ()

    def __repr__(self):
        return f"Block({self.block_id}, ref={self.ref_count}, hash={self.hash})"


def chain_hash(parent_hash: Optional[int], token_ids: Seq[int]) -> int:
    return hash((parent_hash, tuple(token_ids)))


class BlockManager:
    def __init__(self, num_blocks: int, block_size: int, enable_prefix_caching: bool = False):
        self.block_size = block_size
        self.enable_prefix_caching = enable_prefix_caching
        self.blocks = [Block(i) for i in range(num_blocks)]
        # OrderedDict as an ordered set with O(1) removal from the middle (a prefix hit on a free block).
        self.free_queue: "OrderedDict[int, None]" = OrderedDict((i, None) for i in range(num_blocks))
        self.cached_blocks: Dict[int, int] = {}  # chain hash -> block id

    @property
    def num_blocks(self) -> int:
        return len(self.blocks)

    @property
    def num_free_blocks(self) -> int:
        return len(self.free_queue)

    def blocks_needed(self, num_tokens: int) -> int:
        return (num_tokens + self.block_size - 1) // self.block_size

    # -- prefix cache -------------------------------------------------------------------------

    def match_prefix(self, seq: Sequence) -> int:
        """Attach cached blocks for the longest cached prefix of a sequence that has no blocks yet.

        At least one token is left to compute, so the step that finishes the prompt yields logits.
        Returns the number of tokens now computed.
        """
        if not self.enable_prefix_caching or seq.block_table:
            return seq.num_computed_tokens
        parent = None
        max_blocks = (seq.num_tokens - 1) // self.block_size
        for i in range(max_blocks):
            tokens = seq.token_ids[i * self.block_size:(i + 1) * self.block_size]
            h = chain_hash(parent, tokens)
            block_id = self.cached_blocks.get(h)
            if block_id is None or self.blocks[block_id].token_ids != tuple(tokens):
                break
            self._take(block_id)
            seq.block_table.append(block_id)
            seq.block_hashes.append(h)
            parent = h
        seq.num_computed_tokens = len(seq.block_table) * self.block_size
        return seq.num_computed_tokens

    def cache_full_blocks(self, seq: Sequence) -> None:
        """Register the blocks of ``seq`` that have filled since the last call in the prefix cache."""
        if not self.enable_prefix_caching:
            return
        for i in range(len(seq.block_hashes), seq.num_computed_tokens // self.block_size):
            tokens = tuple(seq.token_ids[i * self.block_size:(i + 1) * self.block_size])
            h = chain_hash(seq.block_hashes[-1] if seq.block_hashes else None, tokens)
            seq.block_hashes.append(h)
            block = self.blocks[seq.block_table[i]]
            if block.hash is None and h not in self.cached_blocks:
                block.hash, block.token_ids = h, tokens
                self.cached_blocks[h] = block.block_id

    # -- allocation ---------------------------------------------------------------------------

    def allocate_slots(self, seq: Sequence, num_new_tokens: int) -> bool:
        """Grow ``seq``'s block table to hold ``num_computed_tokens + num_new_tokens``; False if the pool is short."""
        needed = self.blocks_needed(seq.num_computed_tokens + num_new_tokens) - seq.num_blocks
        if needed > self.num_free_blocks:
            return False
        for _ in range(needed):
            block_id, _ = self.free_queue.popitem(last=False)
            self._uncache(block_id)
            self.blocks[block_id].ref_count = 1
            seq.block_table.append(block_id)
        return True

    def free(self, seq: Sequence) -> None:
        """Release all of ``seq``'s blocks; its tokens must be recomputed (or found in the prefix cache)."""
        # Tail blocks go back first, so the head of a shared prefix is evicted last.
        uncached = []
        for block_id in reversed(seq.block_table):
            block = self.blocks[block_id]
            block.ref_count -= 1
            assert block.ref_count >= 0, f"double free of {block}"
            if block.ref_count == 0:
                if block.hash is None:
                    uncached.append(block_id)
                else:
                    self.free_queue[block_id] = None
        for block_id in uncached:
            self.free_queue[block_id] = None
            self.free_queue.move_to_end(block_id, last=False)
        seq.block_table = []
        seq.block_hashes = []
        seq.num_computed_tokens = 0

    def truncate(self, seq: Sequence, num_tokens: int) -> None:
        """Keep only the first ``num_tokens`` tokens of ``seq`` and their KV (a session rewound to ``step``)."""
        keep = num_tokens // self.block_size
        partial = num_tokens % self.block_size
        # A partly kept block will be overwritten past num_tokens: keep it only if nobody shares it.
        if partial and keep < seq.num_blocks and self.blocks[seq.block_table[keep]].ref_count == 1:
            self._uncache(seq.block_table[keep])
            keep += 1
        else:
            partial = 0
        tail = _Detached(seq.block_table[keep:])
        seq.block_table = seq.block_table[:keep]
        self.free(tail)
        seq.num_computed_tokens = min(seq.num_computed_tokens, num_tokens if partial else keep * self.block_size)
        del seq.block_hashes[seq.num_computed_tokens // self.block_size:]
        del seq.token_ids[num_tokens:]

    # -- internals ----------------------------------------------------------------------------

    def _take(self, block_id: int) -> None:
        block = self.blocks[block_id]
        if block.ref_count == 0:
            del self.free_queue[block_id]
        block.ref_count += 1

    def _uncache(self, block_id: int) -> None:
        block = self.blocks[block_id]
        if block.hash is not None and self.cached_blocks.get(block.hash) == block_id:
            del self.cached_blocks[block.hash]
        block.hash, block.token_ids = None, ()


class _Detached:
    """A block list to free that belongs to no live sequence."""

    def __init__(self, block_table: List[int]):
        self.block_table = block_table
        self.block_hashes: List[int] = []
        self.num_computed_tokens = 0
