"""BlockManager: allocation by capacity, reference counts, prefix-cache hits (chain hashes, the cap that
leaves one token to compute, collisions), LRU eviction of cached free blocks, and the bookkeeping
invariants under a long random workload."""

from __future__ import annotations

import random

import pytest

from llmx.common.errors import LlmxError
from llmx.runtime.block_manager import BlockManager
from llmx.runtime.sequence import SamplingParams, Sequence

BS = 16


def make_seq(tokens, seq_id=0):
    return Sequence(seq_id=seq_id, prompt_token_ids=list(tokens), params=SamplingParams())


def compute_all(bm, seq):
    """What a full prefill does to the bookkeeping: allocate, 'compute' every token, register full blocks."""
    bm.allocate_prefix(seq)
    assert bm.allocate_for(seq, seq.num_tokens - seq.num_computed_tokens)
    seq.num_computed_tokens = seq.num_tokens
    bm.mark_computed(seq)


def check_invariants(bm, live_seqs):
    holders = {}
    for seq in live_seqs:
        assert len(set(seq.block_table)) == len(seq.block_table), "a block appears twice in one table"
        for block in seq.block_table:
            holders[block] = holders.get(block, 0) + 1
    for block in range(bm.num_blocks):
        assert bm.ref_count(block) == holders.get(block, 0)
        if holders.get(block, 0) > 1:
            assert bm.is_cached(block), "a block is shared without going through the prefix cache"
    assert bm.num_free_blocks == sum(1 for b in range(bm.num_blocks) if bm.ref_count(b) == 0)
    assert bm.num_used_blocks + bm.num_free_blocks == bm.num_blocks
    assert bm.usage == pytest.approx(len(holders) / bm.num_blocks)


def test_allocate_for_covers_the_positions_and_fails_without_side_effects():
    bm = BlockManager(num_blocks=4, block_size=BS)
    a = make_seq(range(40))
    assert bm.allocate_for(a, 17)  # positions 0..16 -> 2 blocks
    assert len(a.block_table) == 2 and bm.num_free_blocks == 2
    assert bm.allocate_for(a, 32)  # positions 0..31 are already covered
    assert len(a.block_table) == 2
    a.num_computed_tokens = 17
    b = make_seq(range(100), seq_id=1)
    assert not bm.allocate_for(b, 33)  # needs 3 blocks, 2 free
    assert b.block_table == [] and bm.num_free_blocks == 2
    assert bm.blocks_needed(a, 40) == 2  # positions up to 57 -> 4 blocks, holds 2
    assert bm.allocate_for(a, 40) and bm.num_free_blocks == 0 and bm.usage == 1.0
    check_invariants(bm, [a, b])


def test_free_returns_every_block_and_is_idempotent():
    bm = BlockManager(num_blocks=6, block_size=BS)
    seqs = [make_seq(range(i, i + 30), seq_id=i) for i in range(3)]
    for seq in seqs:
        compute_all(bm, seq)
    assert bm.num_free_blocks == 0
    check_invariants(bm, seqs)
    bm.free(seqs[1])
    assert seqs[1].block_table == [] and bm.num_free_blocks == 2
    bm.free(seqs[1])
    assert bm.num_free_blocks == 2
    for seq in seqs:
        bm.free(seq)
    assert bm.num_free_blocks == 6 and bm.usage == 0.0
    check_invariants(bm, [])


def test_prefix_hit_shares_full_blocks_and_leaves_the_last_prompt_token_to_compute():
    bm = BlockManager(num_blocks=10, block_size=BS)
    prompt = [(7 * i) % 101 for i in range(50)]
    a = make_seq(prompt)
    assert bm.allocate_prefix(a) == 0
    compute_all(bm, a)
    assert bm.num_cached_blocks == 3  # the 4th block holds only 2 tokens: not full, not cached

    b = make_seq(prompt, seq_id=1)
    assert bm.allocate_prefix(b) == 48
    assert b.num_computed_tokens == 48 and b.num_cached_prompt_tokens == 48
    assert b.block_table == a.block_table[:3]
    assert [bm.ref_count(blk) for blk in b.block_table] == [2, 2, 2]
    assert bm.allocate_for(b, 2)
    assert b.block_table[3] != a.block_table[3]  # the partial block is never shared
    assert bm.prefix_hit_tokens == 48
    check_invariants(bm, [a, b])

    # A 48-token prompt has 3 full cached blocks but must compute its last token: only 2 blocks are used.
    c = make_seq(prompt[:48], seq_id=2)
    assert bm.allocate_prefix(c) == 32
    assert c.block_table == a.block_table[:2]


def test_prefix_hit_stops_at_the_first_differing_block():
    bm = BlockManager(num_blocks=12, block_size=BS)
    prompt = list(range(60))
    a = make_seq(prompt)
    compute_all(bm, a)
    changed = prompt[:20] + [999] + prompt[21:]  # differs inside block 1
    b = make_seq(changed, seq_id=1)
    assert bm.allocate_prefix(b) == 16 and b.block_table == a.block_table[:1]
    # Same tokens in block 1 onwards but a different block 0: the chain hash makes everything a miss.
    c = make_seq([1000] + prompt[1:], seq_id=2)
    assert bm.allocate_prefix(c) == 0


def test_only_full_computed_blocks_are_registered():
    bm = BlockManager(num_blocks=8, block_size=BS)
    prompt = list(range(50))
    a = make_seq(prompt)
    bm.allocate_prefix(a)
    assert bm.allocate_for(a, 20)
    a.num_computed_tokens = 20
    bm.mark_computed(a)
    assert bm.num_cached_blocks == 1
    b = make_seq(prompt, seq_id=1)
    assert bm.allocate_prefix(b) == 16
    # Generated tokens fill blocks too: they are cached like prompt blocks.
    assert bm.allocate_for(a, 30)
    a.num_computed_tokens = 50
    a.output_token_ids.extend([3, 4, 5])
    assert bm.allocate_for(a, 3)
    a.num_computed_tokens = 53
    bm.mark_computed(a)
    assert bm.num_cached_blocks == 3
    follow_up = make_seq(prompt + [3, 4, 5] + [9] * 10, seq_id=2)
    assert bm.allocate_prefix(follow_up) == 48


def test_freed_cached_blocks_stay_reusable_and_a_hit_takes_them_out_of_the_free_pool():
    bm = BlockManager(num_blocks=5, block_size=BS)
    prompt = list(range(40))
    a = make_seq(prompt)
    compute_all(bm, a)
    a_blocks = list(a.block_table)
    bm.free(a)
    assert bm.num_free_blocks == 5 and bm.num_cached_blocks == 2
    b = make_seq(prompt, seq_id=1)
    assert bm.allocate_prefix(b) == 32
    assert b.block_table == a_blocks[:2]
    assert bm.num_free_blocks == 3
    check_invariants(bm, [b])


def test_blank_blocks_are_used_before_evicting_and_eviction_takes_a_tail_first():
    bm = BlockManager(num_blocks=4, block_size=BS)
    prompt = list(range(100, 132))  # exactly 2 full blocks
    a = make_seq(prompt + [1])
    compute_all(bm, a)
    head, tail = a.block_table[:2]
    bm.free(a)
    assert bm.num_cached_blocks == 2

    other = make_seq(range(500, 548), seq_id=1)  # 3 blocks: both blank ones, then one eviction
    assert bm.allocate_for(other, 48)
    assert tail in other.block_table and head not in other.block_table
    assert bm.num_cached_blocks == 1 and bm.is_cached(head) and not bm.is_cached(tail)

    again = make_seq(prompt + [1], seq_id=2)
    assert bm.allocate_prefix(again) == 16 and again.block_table == [head]
    check_invariants(bm, [other, again])


def test_a_hash_collision_is_a_miss(monkeypatch):
    bm = BlockManager(num_blocks=8, block_size=BS)
    monkeypatch.setattr(bm, "_hash_block", lambda parent, tokens: 42)
    a = make_seq(range(40))
    compute_all(bm, a)
    b = make_seq(range(1, 41), seq_id=1)
    assert bm.allocate_prefix(b) == 0
    same_first_block = make_seq(list(range(16)) + [7] * 24, seq_id=2)
    assert bm.allocate_prefix(same_first_block) == 16


def test_prefix_caching_can_be_disabled():
    bm = BlockManager(num_blocks=8, block_size=BS, enable_prefix_caching=False)
    prompt = list(range(40))
    a = make_seq(prompt)
    compute_all(bm, a)
    assert bm.num_cached_blocks == 0
    b = make_seq(prompt, seq_id=1)
    assert bm.allocate_prefix(b) == 0 and b.block_table == []
    bm.free(a)
    assert bm.num_free_blocks == 8


def test_cancel_admission_restores_everything():
    bm = BlockManager(num_blocks=6, block_size=BS)
    prompt = list(range(40))
    a = make_seq(prompt)
    compute_all(bm, a)
    b = make_seq(prompt + list(range(200, 260)), seq_id=1)
    assert bm.allocate_prefix(b) == 32
    assert not bm.allocate_for(b, b.num_tokens - 32)  # 68 more tokens need 5 blocks, 3 free
    bm.cancel_admission(b)
    assert b.block_table == [] and b.num_computed_tokens == 0 and b.num_cached_prompt_tokens == 0
    assert bm.prefix_hit_tokens == 0 and bm.num_free_blocks == 3
    check_invariants(bm, [a])


def test_allocate_prefix_refuses_a_sequence_that_holds_blocks():
    bm = BlockManager(num_blocks=4, block_size=BS)
    a = make_seq(range(20))
    assert bm.allocate_for(a, 5)
    with pytest.raises(ValueError, match="holding no blocks"):
        bm.allocate_prefix(a)


@pytest.mark.parametrize("num_blocks, block_size", [(0, 16), (4, 0)])
def test_bad_sizes_are_user_errors(num_blocks, block_size):
    with pytest.raises(LlmxError):
        BlockManager(num_blocks, block_size)


@pytest.mark.parametrize("seed", range(4))
def test_random_workload_keeps_the_invariants_and_hits_hold_the_right_tokens(seed):
    """Sequences with shared prefixes are admitted, computed chunk by chunk, decoded and freed at random.
    A shadow 'KV cache' records which tokens were written into each block: every prefix-cache hit must
    hand out blocks that hold exactly the sequence's own tokens."""
    rng = random.Random(seed)
    bs = 4
    bm = BlockManager(num_blocks=24, block_size=bs)
    block_tokens: dict[int, list[int]] = {}  # block id -> tokens written into it, by position in block
    prefixes = [[rng.randrange(50) for _ in range(rng.randrange(4, 14))] for _ in range(3)]
    live: list[Sequence] = []
    next_id = 0
    for _ in range(600):
        op = rng.random()
        if op < 0.3 or not live:
            prompt = rng.choice(prefixes) + [rng.randrange(50) for _ in range(rng.randrange(0, 9))]
            seq = make_seq(prompt, seq_id=next_id)
            next_id += 1
            cached = bm.allocate_prefix(seq)
            assert cached % bs == 0 and cached <= seq.num_tokens - 1
            for i, block in enumerate(seq.block_table):
                assert block_tokens[block] == seq.token_ids[i * bs:(i + 1) * bs]
            if bm.allocate_for(seq, 1):
                live.append(seq)
            else:
                bm.cancel_admission(seq)
        elif op < 0.85:
            seq = rng.choice(live)
            if seq.num_computed_tokens == seq.num_tokens:
                seq.output_token_ids.append(rng.randrange(50))
            n = rng.randint(1, seq.num_tokens - seq.num_computed_tokens)
            if not bm.allocate_for(seq, n):
                continue
            for p in range(seq.num_computed_tokens, seq.num_computed_tokens + n):
                block = seq.block_table[p // bs]
                assert bm.ref_count(block) == 1, "writing KV into a shared block"
                written = block_tokens.setdefault(block, [])
                del written[p % bs:]
                written.append(seq.token_ids[p])
            seq.num_computed_tokens += n
            bm.mark_computed(seq)
        else:
            seq = live.pop(rng.randrange(len(live)))
            bm.free(seq)
        check_invariants(bm, live)
    for seq in live:
        bm.free(seq)
    check_invariants(bm, [])
    assert bm.num_free_blocks == bm.num_blocks
