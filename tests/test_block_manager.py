"""Block manager: exact block ids, ref counts, prefix hits and eviction order."""
from lmwrap_engine.engine.block_manager import BlockManager
from lmwrap_engine.engine.sequence import Sequence


def seq_of(tokens, seq_id=0):
    s = Sequence(seq_id, seq_id)
    s.token_ids = list(tokens)
    return s


def compute(bm, seq, n):
    """What the engine does around a model step: allocate, compute, register full blocks."""
    assert bm.allocate_slots(seq, n)
    seq.num_computed_tokens += n
    bm.cache_full_blocks(seq)


def refs(bm):
    return [b.ref_count for b in bm.blocks]


def test_allocate_and_free_in_order():
    bm = BlockManager(6, 4)
    a = seq_of(range(10))
    compute(bm, a, 10)
    assert a.block_table == [0, 1, 2]
    assert refs(bm) == [1, 1, 1, 0, 0, 0]
    b = seq_of(range(3), 1)
    compute(bm, b, 3)
    assert b.block_table == [3]
    assert bm.num_free_blocks == 2
    assert not bm.allocate_slots(seq_of(range(20), 2), 20)  # needs 5, 2 free
    bm.free(a)
    bm.free(b)
    assert refs(bm) == [0] * 6
    assert bm.num_free_blocks == 6
    assert a.block_table == [] and a.num_computed_tokens == 0


def test_decode_growth_allocates_on_block_boundary():
    bm = BlockManager(4, 4)
    s = seq_of(range(4))
    compute(bm, s, 4)
    assert s.block_table == [0]
    s.token_ids.append(99)
    compute(bm, s, 1)
    assert s.block_table == [0, 1]
    for t in range(3):
        s.token_ids.append(t)
        compute(bm, s, 1)
    assert s.block_table == [0, 1]
    s.token_ids.append(7)
    compute(bm, s, 1)
    assert s.block_table == [0, 1, 2]


def test_prefix_hits_share_blocks_and_leave_one_token():
    bm = BlockManager(8, 4, enable_prefix_caching=True)
    a = seq_of([1, 2, 3, 4, 5, 6, 7, 8, 9])
    compute(bm, a, 9)
    assert a.block_table == [0, 1, 2]
    # same first 8 tokens: two full blocks hit
    b = seq_of([1, 2, 3, 4, 5, 6, 7, 8, 42, 43], 1)
    assert bm.match_prefix(b) == 8
    assert b.block_table == [0, 1]
    assert refs(bm)[:3] == [2, 2, 1]
    compute(bm, b, 2)
    assert b.block_table == [0, 1, 3]
    # an exact repeat of 8 tokens hits only the first block: one token must be computed
    c = seq_of([1, 2, 3, 4, 5, 6, 7, 8], 2)
    assert bm.match_prefix(c) == 4
    assert c.block_table == [0]
    assert c.block_hashes == a.block_hashes[:1]
    # a different first block means no hit at all, even if the second block is equal (chained hash)
    d = seq_of([9, 9, 9, 9, 5, 6, 7, 8, 1], 3)
    assert bm.match_prefix(d) == 0


def test_freed_cached_blocks_are_reused_lru_and_evicted_last():
    bm = BlockManager(4, 4, enable_prefix_caching=True)
    a = seq_of([1, 2, 3, 4, 5, 6, 7, 8, 9])   # blocks 0, 1 full and cached; block 2 partial
    compute(bm, a, 9)
    bm.free(a)
    # uncached block 2 first, then the cached tail before the cached head
    assert list(bm.free_queue) == [2, 3, 1, 0]
    b = seq_of([1, 2, 3, 4, 5, 6, 7, 8, 10], 1)
    assert bm.match_prefix(b) == 8 and b.block_table == [0, 1]
    assert list(bm.free_queue) == [2, 3]
    bm.free(b)
    assert list(bm.free_queue) == [2, 3, 1, 0]
    # a new unrelated sequence of 4 blocks evicts in queue order; the cache forgets 1 and 0
    c = seq_of(range(100, 116), 2)
    compute(bm, c, 16)
    assert c.block_table == [2, 3, 1, 0]
    bm.free(c)
    d = seq_of([1, 2, 3, 4, 5], 3)
    assert bm.match_prefix(d) == 0


def test_cache_full_blocks_is_idempotent_and_dedups():
    bm = BlockManager(8, 4, enable_prefix_caching=True)
    a = seq_of([1, 2, 3, 4, 5])
    compute(bm, a, 5)
    bm.cache_full_blocks(a)
    assert len(bm.cached_blocks) == 1
    b = seq_of([1, 2, 3, 4, 6], 1)  # computed without a prefix lookup: same content, other block
    compute(bm, b, 5)
    assert b.block_table == [2, 3]
    assert len(bm.cached_blocks) == 1 and bm.blocks[2].hash is None


def test_truncate_keeps_prefix_and_frees_tail():
    bm = BlockManager(6, 4, enable_prefix_caching=True)
    s = seq_of(range(14))
    compute(bm, s, 14)
    assert s.block_table == [0, 1, 2, 3]
    bm.truncate(s, 6)
    assert s.block_table == [0, 1]
    assert s.num_tokens == 6 and s.num_computed_tokens == 6
    assert bm.blocks[1].hash is None   # partly kept block is no longer a valid cache entry
    assert refs(bm) == [1, 1, 0, 0, 0, 0]
    bm.free(s)
    assert bm.num_free_blocks == 6


def test_shared_partial_block_is_not_kept_on_truncate():
    bm = BlockManager(6, 4, enable_prefix_caching=True)
    a = seq_of(range(9))
    compute(bm, a, 9)
    b = seq_of(list(range(8)) + [50, 51], 1)
    bm.match_prefix(b)
    compute(bm, b, 2)
    assert b.block_table == [0, 1, 3]
    bm.truncate(b, 6)   # block 1 is shared with a: drop it, recompute tokens 4..5
    assert b.block_table == [0]
    assert b.num_computed_tokens == 4
    assert refs(bm)[:2] == [2, 1]


def test_each_block_is_hashed_once_when_it_fills(monkeypatch):
    import lmwrap_engine.engine.block_manager as bm_module
    calls = []
    real = bm_module.chain_hash
    monkeypatch.setattr(bm_module, "chain_hash", lambda parent, tokens: calls.append(tuple(tokens)) or real(parent, tokens))
    bm = BlockManager(16, 4, enable_prefix_caching=True)
    # Two equal prompts admitted together: the second one's blocks duplicate cached ones and stay unhashed.
    a, b = seq_of(range(1, 10)), seq_of(range(1, 10), 1)
    for s in (a, b):
        compute(bm, s, 9)
    for t in range(10, 20):  # ten decode steps
        for s in (a, b):
            s.token_ids.append(t)
            compute(bm, s, 1)
    expected = [(1, 2, 3, 4), (5, 6, 7, 8), (9, 10, 11, 12), (13, 14, 15, 16)]
    assert sorted(calls) == sorted(expected * 2)
    assert a.block_hashes == b.block_hashes and len(a.block_hashes) == 4
    assert [bm.blocks[i].hash is None for i in b.block_table[:4]] == [True] * 4
