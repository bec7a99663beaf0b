"""Paged KV-cache bookkeeping: block pool, ref counts, a hash-chained prefix cache reused at token grain,
and eviction that keeps the blocks many sequences share.

Pure Python; the model runner only sees the resulting block tables and each step's block copies.

Prefix cache. A full computed block is cached under its chain hash (of its parent's chain hash and
its tokens) and taken by reference. Every indexed block is also listed under its parent's chain
hash (``children``), so a sequence whose next tokens only *start* like a block's reuses them too:

- a free partial block (the computed last block of a freed sequence: the previous turn of an agent
  that re-sends its history) is *adopted* in place: no copy; the sequence becomes its owner and
  writes on after the match;
- any other block (a cached full block, or the last block a live sequence is still writing) is
  *copied*: the sequence gets a new block, filled from the source by the model runner before the
  step's forward (``take_copies``). Whole blocks are copied; slots past the match are rewritten.

Invariants:
- a block is free (in exactly one of ``free_levels``, at ``block.level``) iff its ref count is 0;
- a block is in ``cached_blocks`` iff it holds a full, computed block whose chain hash is ``block.hash``;
- a block is in ``children[block.parent]`` iff ``block.indexed``; its content is then ``block.token_ids``
  (cached full blocks, free partial blocks) or, for the partial last block a live sequence is writing,
  ``owner.token_ids[start:owner.num_computed_tokens]`` (read when matched, so it is always current);
- a block with ref count > 1 is full and cached: a block somebody writes to is never shared
  (partial content is shared by copy only); a copy's destination is not indexed before its step ran;
- ``in_flight[h]`` names a sequence that was admitted to compute the first prompt block it missed,
  of chain hash ``h``; a newcomer missing the same block waits for it (see ``computing_elsewhere``).

Eviction. Free blocks are reused level by level: unindexed blocks first (level 0), then indexed ones
by how many sequences used them (level ``min(uses.bit_length(), MAX_LEVEL)``: 1, 2-3, 4-7, ... uses),
least recently freed first within a level; a sequence frees its tail before its head. A system
prompt shared by many agents thus outlives single-use conversation blocks. A block's use count
starts at 1 when it is written and grows by one per prefix hit, adoption or copy; it resets when the
block is reused for other content. Allocating is O(MAX_LEVEL), every other operation O(1) per block.
"""
from __future__ import annotations

from collections import OrderedDict
from typing import Dict, List, NamedTuple, Optional, Sequence as Seq

from .sequence import Sequence, SequenceStatus

MAX_LEVEL = 6
# Newest candidates scanned for a token-grain match under one parent (each costs <= block_size compares).
PARTIAL_SCAN_LIMIT = 32


class Block:
    __slots__ = ("block_id", "ref_count", "hash", "token_ids", "indexed", "parent", "owner", "start", "uses",
                 "level")

    def __init__(self, block_id: int):
        self.block_id = block_id
        self.ref_count = 0
        self.hash: Optional[int] = None
        self.token_ids: tuple = ()
        self.indexed = False
        self.parent: Optional[int] = None
        self.owner: Optional[Sequence] = None
        self.start = 0
        self.uses = 0
        self.level = 0

    def __repr__(self):
        return f"Block({self.block_id}, ref={self.ref_count}, hash={self.hash}, uses={self.uses})"


class PrefixMatch(NamedTuple):
    """What the prefix cache holds for a sequence's prompt (``BlockManager.lookup``)."""
    block_ids: List[int]      # cached full blocks, in order
    hashes: List[int]         # their chain hashes
    partial: Optional[int]    # a block whose first ``partial_len`` tokens are the next ones
    partial_len: int
    miss_hash: Optional[int]  # chain hash of the first full prompt block not cached, if any


def chain_hash(parent_hash: Optional[int], token_ids: Seq[int]) -> int:
    return hash((parent_hash, tuple(token_ids)))


def _common_prefix_len(a: Seq[int], b: Seq[int]) -> int:
    n = min(len(a), len(b))
    if list(a[:n]) == list(b[:n]):
        return n
    for i in range(n):
        if a[i] != b[i]:
            return i
    return n


class BlockManager:
    def __init__(self, num_blocks: int, block_size: int, enable_prefix_caching: bool = False):
        self.block_size = block_size
        self.enable_prefix_caching = enable_prefix_caching
        self.blocks = [Block(i) for i in range(num_blocks)]
        # OrderedDicts as ordered sets with O(1) removal from the middle (a prefix hit on a free block).
        self.free_levels: List["OrderedDict[int, None]"] = [OrderedDict() for _ in range(MAX_LEVEL + 1)]
        self.free_levels[0].update((i, None) for i in range(num_blocks))
        self._num_free = num_blocks
        self.cached_blocks: Dict[int, int] = {}  # chain hash -> block id
        self.children: Dict[Optional[int], Dict[int, None]] = {}  # parent chain hash -> indexed block ids
        self.in_flight: Dict[int, Sequence] = {}
        self._copies: Dict[int, int] = {}  # destination block -> source block, for the next step

    @property
    def num_blocks(self) -> int:
        return len(self.blocks)

    @property
    def num_free_blocks(self) -> int:
        return self._num_free

    def free_order(self) -> List[int]:
        """Free block ids in the order they will be reused (tests, debugging)."""
        return [i for level in self.free_levels for i in level]

    def blocks_needed(self, num_tokens: int) -> int:
        return (num_tokens + self.block_size - 1) // self.block_size

    # -- prefix cache -------------------------------------------------------------------------

    def match_prefix(self, seq: Sequence) -> int:
        """Attach the cached prefix of a sequence that has no blocks yet (``lookup`` + ``attach``).

        At least one token is left to compute, so the step that finishes the prompt yields logits.
        Returns the number of tokens now computed.
        """
        if not self.enable_prefix_caching or seq.block_table:
            return seq.num_computed_tokens
        return self.attach(seq, self.lookup(seq))

    def lookup(self, seq: Sequence) -> PrefixMatch:
        """The longest cached prefix of ``seq``'s tokens (all but the last), at token grain; takes nothing."""
        bs = self.block_size
        limit = seq.num_tokens - 1
        parent: Optional[int] = None
        block_ids: List[int] = []
        hashes: List[int] = []
        miss = None
        for i in range(limit // bs):
            tokens = tuple(seq.token_ids[i * bs:(i + 1) * bs])
            h = chain_hash(parent, tokens)
            block_id = self.cached_blocks.get(h)
            if block_id is None or self.blocks[block_id].token_ids != tokens:
                miss = h
                break
            block_ids.append(block_id)
            hashes.append(h)
            parent = h
        start = len(block_ids) * bs
        want = seq.token_ids[start:min(start + bs, limit)]
        best, best_len = None, 0
        candidates = self.children.get(parent) if want else None
        if candidates:
            for n, block_id in enumerate(reversed(candidates)):  # newest first
                if n == PARTIAL_SCAN_LIMIT:
                    break
                block = self.blocks[block_id]
                k = _common_prefix_len(self._content(block), want)
                if k > best_len or (k == best_len and k and self._adoptable(block)):
                    best, best_len = block_id, k
        return PrefixMatch(block_ids, hashes, best, best_len, miss)

    def attach(self, seq: Sequence, match: PrefixMatch) -> int:
        """Give ``seq`` (no blocks yet) the blocks of ``match``; returns its computed tokens."""
        assert not seq.block_table
        for block_id in match.block_ids:
            self._take(block_id)
        seq.block_table.extend(match.block_ids)
        seq.block_hashes.extend(match.hashes)
        computed = len(match.block_ids) * self.block_size
        if match.partial is not None:
            src = self.blocks[match.partial]
            if self._adoptable(src):
                self._take(src.block_id)
                # Stays indexed, now read through its new owner: the matched tokens at once (others
                # admitted in this pass may copy them), then whatever the owner computes after them.
                src.token_ids, src.owner, src.start = (), seq, computed
                seq.block_table.append(src.block_id)
                computed += match.partial_len
            elif self._num_free:
                self._touch(src)  # counted as used (and made recent) before a free block is taken
                dst = self._pop_free()
                dst.ref_count, dst.uses = 1, 1
                self._copies[dst.block_id] = src.block_id
                seq.block_table.append(dst.block_id)
                computed += match.partial_len
        seq.num_computed_tokens = computed
        h = match.miss_hash
        if h is not None and (h not in self.in_flight or self.in_flight[h].status is not SequenceStatus.RUNNING):
            self.in_flight[h] = seq
            seq.in_flight_hash = h
        return computed

    def computing_elsewhere(self, seq: Sequence, match: PrefixMatch) -> bool:
        """Whether another running sequence is computing the first block ``seq`` misses.

        Then ``seq`` should wait: once that block is computed, ``seq`` finds it (and what follows
        it in that sequence, at token grain) in the cache instead of computing it again.
        """
        h = match.miss_hash
        other = self.in_flight.get(h) if h is not None else None
        if other is None or other is seq:
            return False
        if other.status is SequenceStatus.RUNNING and len(other.block_hashes) <= len(match.block_ids):
            return True
        del self.in_flight[h]  # stale: it finished, was preempted, or computed the block (since evicted)
        return False

    def take_copies(self) -> List[tuple]:
        """``(src, dst)`` block pairs to copy before the next forward; the scheduler puts them in its batch."""
        copies = list(self._copies.items())
        self._copies.clear()
        return [(src, dst) for dst, src in copies]

    def cache_full_blocks(self, seq: Sequence) -> None:
        """Index ``seq``'s blocks computed since the last call: full ones by hash, the partial last one by owner."""
        if not self.enable_prefix_caching:
            return
        bs = self.block_size
        for i in range(len(seq.block_hashes), seq.num_computed_tokens // bs):
            tokens = tuple(seq.token_ids[i * bs:(i + 1) * bs])
            parent = seq.block_hashes[-1] if seq.block_hashes else None
            h = chain_hash(parent, tokens)
            seq.block_hashes.append(h)
            if self.in_flight.get(h) is seq:
                del self.in_flight[h]
            block = self.blocks[seq.block_table[i]]
            if block.hash is None and h not in self.cached_blocks:
                if not block.indexed:
                    self._index(block, parent)
                block.hash, block.token_ids, block.owner = h, tokens, None
                self.cached_blocks[h] = block.block_id
            elif block.hash is None and block.indexed:
                self._unindex(block)  # the same content is cached in another block, which serves it
        i = len(seq.block_hashes)
        if seq.num_computed_tokens > i * bs:
            block = self.blocks[seq.block_table[i]]
            if not block.indexed:
                self._index(block, seq.block_hashes[-1] if i else None)
                block.owner, block.start = seq, i * bs

    # -- allocation ---------------------------------------------------------------------------

    def allocate_slots(self, seq: Sequence, num_new_tokens: int) -> bool:
        """Grow ``seq``'s block table to hold ``num_computed_tokens + num_new_tokens``; False if the pool is short."""
        needed = self.blocks_needed(seq.num_computed_tokens + num_new_tokens) - seq.num_blocks
        if needed > self._num_free:
            return False
        for _ in range(needed):
            block = self._pop_free()
            block.ref_count, block.uses = 1, 1
            seq.block_table.append(block.block_id)
        return True

    def free(self, seq: Sequence) -> None:
        """Release all of ``seq``'s blocks; its tokens must be recomputed (or found in the prefix cache)."""
        in_flight = getattr(seq, "in_flight_hash", None)
        if in_flight is not None and self.in_flight.get(in_flight) is seq:
            del self.in_flight[in_flight]
        # Tail blocks go back first, so the head of a shared prefix is evicted last.
        for block_id in reversed(seq.block_table):
            block = self.blocks[block_id]
            block.ref_count -= 1
            assert block.ref_count >= 0, f"double free of {block}"
            if block.owner is not None:  # a partial block being written: freeze its content, or drop it
                if block.owner is seq:
                    block.token_ids = tuple(seq.token_ids[block.start:seq.num_computed_tokens])
                    block.owner = None
                if not block.token_ids:
                    self._unindex(block)
            if block.ref_count == 0:
                self._copies.pop(block_id, None)
                self._release(block)
        seq.block_table = []
        seq.block_hashes = []
        seq.num_computed_tokens = 0

    def truncate(self, seq: Sequence, num_tokens: int) -> None:
        """Keep only the first ``num_tokens`` tokens of ``seq`` and their KV (a session rewound to ``step``)."""
        keep = num_tokens // self.block_size
        partial = num_tokens % self.block_size
        # A partly kept block will be overwritten past num_tokens: keep it only if nobody shares it.
        if partial and keep < seq.num_blocks and self.blocks[seq.block_table[keep]].ref_count == 1:
            self._unindex(self.blocks[seq.block_table[keep]])  # re-indexed as partial after its next step
            keep += 1
        else:
            partial = 0
        tail = _Detached(seq.block_table[keep:])
        seq.block_table = seq.block_table[:keep]
        self.free(tail)  # the tail's partial block is owned by seq, not the detached list: it is dropped
        seq.num_computed_tokens = min(seq.num_computed_tokens, num_tokens if partial else keep * self.block_size)
        del seq.block_hashes[seq.num_computed_tokens // self.block_size:]
        del seq.token_ids[num_tokens:]

    # -- internals ----------------------------------------------------------------------------

    def _content(self, block: Block) -> Seq[int]:
        owner = block.owner
        if owner is None:
            return block.token_ids
        return owner.token_ids[block.start:min(block.start + self.block_size, owner.num_computed_tokens)]

    @staticmethod
    def _adoptable(block: Block) -> bool:
        return block.ref_count == 0 and block.hash is None and block.owner is None and block.indexed

    def _index(self, block: Block, parent: Optional[int]) -> None:
        block.indexed, block.parent = True, parent
        self.children.setdefault(parent, {})[block.block_id] = None

    def _unindex(self, block: Block) -> None:
        if block.hash is not None and self.cached_blocks.get(block.hash) == block.block_id:
            del self.cached_blocks[block.hash]
        if block.indexed:
            siblings = self.children[block.parent]
            del siblings[block.block_id]
            if not siblings:
                del self.children[block.parent]
        block.hash, block.token_ids, block.owner, block.indexed, block.parent = None, (), None, False, None

    def _level(self, block: Block) -> int:
        return min(block.uses.bit_length(), MAX_LEVEL) if block.indexed else 0

    def _release(self, block: Block) -> None:
        block.level = self._level(block)
        self.free_levels[block.level][block.block_id] = None
        self._num_free += 1

    def _pop_free(self) -> Block:
        for level in self.free_levels:
            if level:
                block_id, _ = level.popitem(last=False)
                self._num_free -= 1
                block = self.blocks[block_id]
                self._unindex(block)
                block.uses = 0
                return block
        raise RuntimeError("no free KV block")

    def _take(self, block_id: int) -> None:
        block = self.blocks[block_id]
        if block.ref_count == 0:
            del self.free_levels[block.level][block_id]
            self._num_free -= 1
        block.ref_count += 1
        block.uses += 1

    def _touch(self, block: Block) -> None:
        block.uses += 1
        if block.ref_count == 0:  # free: to its (maybe higher) level's most recent end
            del self.free_levels[block.level][block.block_id]
            self._num_free -= 1
            self._release(block)


class _Detached:
    """A block list to free that belongs to no live sequence."""

    def __init__(self, block_table: List[int]):
        self.block_table = block_table
        self.block_hashes: List[int] = []
        self.num_computed_tokens = 0
        self.token_ids: List[int] = []
        self.in_flight_hash = None
