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
    # an exact repeat of 8 tokens: one token must be computed, so block 1 is reused at token grain
    # (3 of its 4 slots): it is shared, so the tokens are copied into a new block
    c = seq_of([1, 2, 3, 4, 5, 6, 7, 8], 2)
    assert bm.match_prefix(c) == 7
    assert c.block_table == [0, 4]
    assert c.block_hashes == a.block_hashes[:1]
    assert bm.take_copies() == [(1, 4)]
    assert refs(bm)[:5] == [3, 2, 1, 1, 1]
    # a different first block means no hit at all, even if the second block is equal (chained hash)
    d = seq_of([9, 9, 9, 9, 5, 6, 7, 8, 1], 3)
    assert bm.match_prefix(d) == 0


def test_freed_cached_blocks_are_reused_lru_and_evicted_last():
    bm = BlockManager(4, 4, enable_prefix_caching=True)
    a = seq_of([1, 2, 3, 4, 5, 6, 7, 8, 9])   # blocks 0, 1 full and cached; block 2 partial
    compute(bm, a, 9)
    bm.free(a)
    # the never-used block 3 first, then a's blocks tail to head (partial block 2 is indexed too)
    assert bm.free_order() == [3, 2, 1, 0]
    b = seq_of([1, 2, 3, 4, 5, 6, 7, 8, 10], 1)
    assert bm.match_prefix(b) == 8 and b.block_table == [0, 1]
    assert bm.free_order() == [3, 2]
    bm.free(b)
    assert bm.free_order() == [3, 2, 1, 0]
    # a new unrelated sequence of 4 blocks evicts in queue order; the cache forgets 1 and 0
    c = seq_of(range(100, 116), 2)
    compute(bm, c, 16)
    assert c.block_table == [3, 2, 1, 0]
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


# -- token-grain reuse: adopt a free partial block, copy a shared one --------------------------

def finish_turn(bm, seq, sampled):
    """A turn ends: its last sampled token is in the sequence but has no KV yet; then it is freed."""
    seq.token_ids.append(sampled)
    bm.free(seq)


def test_free_partial_block_is_adopted_in_place():
    bm = BlockManager(6, 4, enable_prefix_caching=True)
    a = seq_of(range(1, 11))            # blocks 0, 1 full; block 2 holds 9, 10
    compute(bm, a, 10)
    assert a.block_table == [0, 1, 2] and bm.blocks[2].owner is a
    finish_turn(bm, a, 11)
    assert bm.blocks[2].token_ids == (9, 10) and bm.blocks[2].indexed and bm.blocks[2].hash is None
    # the next turn re-sends the whole history (with the sampled 11) plus new tokens
    b = seq_of(list(range(1, 12)) + [50, 51], 1)
    assert bm.match_prefix(b) == 10     # 2 full blocks + 2 tokens of block 2: only 11, 50, 51 to compute
    assert b.block_table == [0, 1, 2]
    assert bm.take_copies() == []
    assert refs(bm) == [1, 1, 1, 0, 0, 0]
    assert bm.blocks[2].owner is b and bm._content(bm.blocks[2]) == [9, 10]
    compute(bm, b, 3)
    assert b.block_table == [0, 1, 2, 3] and b.num_computed_tokens == 13
    assert bm.blocks[2].hash == b.block_hashes[2] and bm.blocks[2].token_ids == (9, 10, 11, 50)
    assert bm.blocks[3].owner is b
    bm.free(b)
    assert bm.num_free_blocks == 6


def test_partial_match_of_an_adopted_block_is_copied():
    bm = BlockManager(8, 4, enable_prefix_caching=True)
    a = seq_of(range(1, 8))             # block 0 full; block 1 holds 5, 6, 7
    compute(bm, a, 7)
    finish_turn(bm, a, 8)
    b = seq_of([1, 2, 3, 4, 5, 6, 60, 61], 1)
    c = seq_of([1, 2, 3, 4, 5, 6, 70, 71], 2)
    # b adopts block 1 (matching 5, 6); c, admitted in the same pass, copies those two tokens from it
    assert bm.match_prefix(b) == 6 and b.block_table == [0, 1]
    assert bm.match_prefix(c) == 6 and c.block_table == [0, 2]
    assert bm.take_copies() == [(1, 2)]
    assert refs(bm)[:3] == [2, 1, 1]
    assert bm.blocks[2].indexed is False  # a copy's destination is indexed only once computed
    compute(bm, b, 2)
    compute(bm, c, 2)
    assert bm.blocks[1].hash == b.block_hashes[1] and bm.blocks[2].hash == c.block_hashes[1]
    for s in (b, c):
        bm.free(s)
    assert bm.num_free_blocks == 8 and refs(bm) == [0] * 8


def test_running_partial_block_is_copied_not_shared():
    bm = BlockManager(6, 4, enable_prefix_caching=True)
    a = seq_of(range(1, 7))             # block 0 full; block 1 holds 5, 6 and a keeps writing it
    compute(bm, a, 6)
    b = seq_of(list(range(1, 7)) + [20, 21, 22], 1)
    assert bm.match_prefix(b) == 6
    assert b.block_table == [0, 2]
    assert bm.take_copies() == [(1, 2)]
    assert refs(bm)[:3] == [2, 1, 1]    # the written block 1 stays a's alone
    assert bm.blocks[1].uses == 2       # a wrote it, b copied from it
    a.token_ids.append(7)
    compute(bm, a, 1)                   # a's next token lands in block 1; b's copy is block 2
    compute(bm, b, 3)
    assert b.block_table == [0, 2, 3]
    assert bm.blocks[2].hash == b.block_hashes[1] and bm.blocks[2].token_ids == (5, 6, 20, 21)
    for s in (a, b):
        bm.free(s)
    assert bm.num_free_blocks == 6


def test_full_cached_block_matched_in_part_is_copied_and_stays_cached():
    bm = BlockManager(6, 4, enable_prefix_caching=True)
    a = seq_of(range(1, 10))            # blocks 0, 1 full and cached
    compute(bm, a, 9)
    bm.free(a)
    b = seq_of([1, 2, 3, 4, 5, 6, 99, 98, 97], 1)
    assert bm.match_prefix(b) == 6
    assert b.block_table == [0, 3]      # block 3: the first unindexed free block
    assert bm.take_copies() == [(1, 3)]
    assert bm.blocks[1].ref_count == 0 and bm.cached_blocks[bm.blocks[1].hash] == 1
    c = seq_of(range(1, 10), 2)         # a's prompt again: still all cached
    assert bm.match_prefix(c) == 8 and c.block_table == [0, 1]


def test_pending_copy_is_dropped_when_its_block_is_freed():
    bm = BlockManager(6, 4, enable_prefix_caching=True)
    a = seq_of(range(1, 7))
    compute(bm, a, 6)
    b = seq_of(list(range(1, 7)) + [20], 1)
    assert bm.match_prefix(b) == 6
    bm.free(b)                          # e.g. not admitted after all
    assert bm.take_copies() == []
    bm.free(a)
    assert bm.num_free_blocks == 6


def test_truncate_drops_an_indexed_partial_block():
    bm = BlockManager(6, 4, enable_prefix_caching=True)
    s = seq_of(range(1, 11))            # block 2 partial, owned by s
    compute(bm, s, 10)
    bm.truncate(s, 6)                   # block 1 partly kept (unindexed), block 2 dropped with its content
    assert s.block_table == [0, 1] and s.num_computed_tokens == 6
    assert not bm.blocks[1].indexed and not bm.blocks[2].indexed
    assert bm.lookup(seq_of(range(1, 12), 1)).partial is None
    s.token_ids += [40, 41]
    compute(bm, s, 2)                   # rewritten past the cut: a full block of the new content
    assert bm.blocks[1].token_ids == (5, 6, 40, 41)
    bm.free(s)
    assert bm.num_free_blocks == 6


# -- eviction keeps what many sequences share -------------------------------------------------

def test_eviction_keeps_widely_used_blocks_after_single_use_ones():
    bm = BlockManager(6, 4, enable_prefix_caching=True)
    system = [1, 2, 3, 4, 5, 6, 7, 8]
    for i in range(3):                  # three requests share a 2-block system prompt
        s = seq_of(system + [100 + i], i)
        bm.match_prefix(s)
        compute(bm, s, s.num_tokens - s.num_computed_tokens)
        bm.free(s)
    assert [bm.blocks[i].uses for i in (0, 1)] == [3, 3]
    one = seq_of(range(200, 208), 9)    # single-use, and freed after the system prompt
    compute(bm, one, 8)
    bm.free(one)
    # least recently freed would be the system prompt's blocks; they go last: level by use count
    order = bm.free_order()
    assert order[-2:] == [1, 0] and set(order[:-2]) == {2, 3, 4, 5}
    big = seq_of(range(300, 316), 10)   # needs 4 blocks: everything but the system prompt
    compute(bm, big, 16)
    assert sorted(big.block_table) == [2, 3, 4, 5]
    bm.free(big)
    again = seq_of(system + [7], 11)
    assert bm.match_prefix(again) == 8 and again.block_table == [0, 1]


def test_use_counts_reset_when_a_block_is_reused():
    bm = BlockManager(2, 4, enable_prefix_caching=True)
    for i in range(3):
        s = seq_of([1, 2, 3, 4, 9], i)
        bm.match_prefix(s)
        compute(bm, s, s.num_tokens - s.num_computed_tokens)
        bm.free(s)
    assert bm.blocks[0].uses == 3
    big = seq_of(range(10, 18), 5)
    compute(bm, big, 8)                 # pressure: the shared block is reused after all
    assert sorted(big.block_table) == [0, 1] and bm.blocks[0].uses == 1
    assert bm.cached_blocks == {bm.blocks[0].hash: 0, bm.blocks[1].hash: 1}
    bm.free(big)


# -- a block being computed is waited for, not computed twice ---------------------------------

def test_waiting_for_a_prefix_another_sequence_is_computing():
    from lmwrap_engine.engine.sequence import SequenceStatus
    bm = BlockManager(8, 4, enable_prefix_caching=True)
    a = seq_of([1, 2, 3, 4, 5, 6, 7, 8, 9])
    m = bm.lookup(a)
    assert m.block_ids == [] and m.miss_hash is not None
    assert not bm.computing_elsewhere(a, m)
    bm.attach(a, m)
    assert bm.in_flight == {m.miss_hash: a}
    a.status = SequenceStatus.RUNNING
    b = seq_of([1, 2, 3, 4, 5, 6, 7, 8, 10], 1)
    mb = bm.lookup(b)
    assert mb.miss_hash == m.miss_hash and bm.computing_elsewhere(b, mb)
    compute(bm, a, 9)
    assert bm.in_flight == {}
    mb = bm.lookup(b)
    assert not bm.computing_elsewhere(b, mb)
    assert bm.attach(b, mb) == 8 and b.block_table == [0, 1]
    for s in (a, b):
        bm.free(s)
    assert bm.num_free_blocks == 8


def test_copy_blocks_copies_every_layer_and_int8_scales():
    import torch
    from kernels.reference import copy_blocks
    k = torch.randn(2, 5, 4, 2, 3)
    sz = torch.randn(2, 5, 4, 2, 2)
    q = torch.randint(0, 255, (2, 5, 4, 2, 3), dtype=torch.uint8)
    before = [t.clone() for t in (k, sz, q)]
    # 1 -> 3 and 3 -> 4 in one call: sources are read before destinations are written
    copy_blocks([k, sz, q], torch.tensor([1, 3]), torch.tensor([3, 4]))
    for t, old in zip((k, sz, q), before):
        assert torch.equal(t[:, 3], old[:, 1]) and torch.equal(t[:, 4], old[:, 3])
        assert torch.equal(t[:, [0, 1, 2]], old[:, [0, 1, 2]])
