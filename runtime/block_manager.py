"""Paged KV-cache bookkeeping: which KV blocks each sequence holds, plus a prefix cache keyed by block hashes.

Pure Python: the model runner owns the KV tensors ([num_blocks, block_size, kv_heads, head_dim] per layer);
this module only decides which block ids a sequence's positions live in. Position p of a sequence lives in
block `seq.block_table[p // block_size]`.

Prefix caching. Once a block is full and its KV computed, it is registered under a chain hash,
hash((parent_hash, its block_size token ids)), so equal hashes mean equal whole prefixes (up to hash
collisions, which are caught by also comparing the stored parent hash and tokens). A sequence admitted later
whose prompt starts with the same blocks shares them (reference count + 1) instead of recomputing them.

Registration happens in `mark_computed(seq)`, which the scheduler calls after every step (in postprocess),
because only then is the KV of the step's positions actually in the cache.

Free blocks come in two kinds: blank ones, and evictable ones that still hold registered KV. Allocation takes
blank blocks first, then evicts the least recently freed evictable block (dropping its registration). A
prefix-cache hit on an evictable block takes it back out of the free pool.
"""

from __future__ import annotations

from collections import OrderedDict, deque
from dataclasses import dataclass

from llmx.common.errors import LlmxError
from llmx.runtime.sequence import Sequence

# Parent hash of a sequence's first block. A constant (not None, whose hash varies per process on
# Python 3.11) so that every process computes the same chain hashes.
_ROOT_HASH = 0


@dataclass(frozen=True)
class _BlockContent:
    """What a registered block holds: compared on every cache hit so a hash collision is a miss."""

    parent_hash: int
    token_ids: tuple[int, ...]


class BlockManager:
    """Hands out KV block ids to sequences, with reference counts so prefix-cached blocks can be shared."""

    def __init__(self, num_blocks: int, block_size: int, enable_prefix_caching: bool = True):
        if num_blocks < 1:
            raise LlmxError(f"KV cache: it has {num_blocks} blocks but needs at least one; give the engine more "
                            "KV-cache memory (a larger kv cache fraction or fewer other processes on the GPU).")
        if block_size < 1:
            raise LlmxError(f"KV cache: block_size must be at least 1, got {block_size}; rebuild the engine "
                            "with a positive --kv-block-size.")
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.enable_prefix_caching = enable_prefix_caching
        self.prefix_hit_tokens = 0  # total tokens served from the prefix cache, for stats

        self._ref_counts = [0] * num_blocks
        self._blank_free: deque[int] = deque(range(num_blocks))
        # Free blocks that still hold registered KV, least recently freed first (evicted from the front).
        self._evictable: OrderedDict[int, None] = OrderedDict()
        self._hash_to_block: dict[int, int] = {}
        self._block_hash: dict[int, int] = {}
        self._block_content: dict[int, _BlockContent] = {}
        # Chain hashes of each sequence's full, computed blocks, in order (also for blocks whose hash was
        # already registered to another block: the chain must continue through them).
        self._seq_hashes: dict[Sequence, list[int]] = {}

    # ---- state -------------------------------------------------------------------------------------------
    @property
    def num_free_blocks(self) -> int:
        return len(self._blank_free) + len(self._evictable)

    @property
    def num_used_blocks(self) -> int:
        return self.num_blocks - self.num_free_blocks

    @property
    def usage(self) -> float:
        """Fraction of blocks held by at least one sequence (evictable cached blocks count as free)."""
        return self.num_used_blocks / self.num_blocks

    @property
    def num_cached_blocks(self) -> int:
        """Blocks registered in the prefix cache, whether in use or evictable."""
        return len(self._hash_to_block)

    def ref_count(self, block_id: int) -> int:
        return self._ref_counts[block_id]

    def is_cached(self, block_id: int) -> bool:
        return block_id in self._block_hash

    def blocks_needed(self, seq: Sequence, num_new_tokens: int) -> int:
        """New blocks seq needs to hold positions up to num_computed_tokens + num_new_tokens."""
        end = seq.num_computed_tokens + num_new_tokens
        return max(0, -(-end // self.block_size) - len(seq.block_table))

    # ---- allocation ----------------------------------------------------------------------------------------
    def allocate_for(self, seq: Sequence, num_new_tokens: int) -> bool:
        """Extend seq.block_table to cover the next num_new_tokens positions; False (nothing changed) if the
        free blocks do not suffice."""
        needed = self.blocks_needed(seq, num_new_tokens)
        if needed > self.num_free_blocks:
            return False
        for _ in range(needed):
            block = self._take_free_block()
            self._ref_counts[block] = 1
            seq.block_table.append(block)
        return True

    def allocate_prefix(self, seq: Sequence) -> int:
        """On admission of a sequence holding no blocks: share the longest run of its leading full blocks
        found in the prefix cache. Sets seq.num_computed_tokens (and, on first admission,
        seq.num_cached_prompt_tokens) to the tokens served and returns that number.

        At least one token is always left to compute, because the model must produce logits for the last
        known token: the hit is capped at (num_tokens - 1) rounded down to a block multiple. A preempted
        sequence coming back uses all its tokens (prompt + generated) as its prefix.
        """
        if seq.block_table or seq.num_computed_tokens:
            raise ValueError(f"sequence {seq.seq_id}: allocate_prefix needs a sequence holding no blocks "
                             f"(it holds {len(seq.block_table)}, {seq.num_computed_tokens} tokens computed)")
        hashes: list[int] = []
        self._seq_hashes[seq] = hashes
        if self.enable_prefix_caching:
            parent = _ROOT_HASH
            for i in range((seq.num_tokens - 1) // self.block_size):
                tokens = tuple(seq.token_slice(i * self.block_size, (i + 1) * self.block_size))
                block_hash = self._hash_block(parent, tokens)
                block = self._hash_to_block.get(block_hash)
                if block is None or self._block_content[block] != _BlockContent(parent, tokens):
                    break
                if self._ref_counts[block] == 0:
                    del self._evictable[block]
                self._ref_counts[block] += 1
                seq.block_table.append(block)
                hashes.append(block_hash)
                parent = block_hash
        cached = len(hashes) * self.block_size
        seq.num_computed_tokens = cached
        if seq.num_preemptions == 0:
            seq.num_cached_prompt_tokens = cached
        self.prefix_hit_tokens += cached
        return cached

    def cancel_admission(self, seq: Sequence) -> None:
        """Undo allocate_prefix (and any allocate_for) of a sequence that could not be admitted after all:
        its blocks go back, its counters and the hit statistics are as before allocate_prefix."""
        self.prefix_hit_tokens -= seq.num_computed_tokens
        self.free(seq)
        seq.num_computed_tokens = 0
        if seq.num_preemptions == 0:
            seq.num_cached_prompt_tokens = 0

    def mark_computed(self, seq: Sequence) -> None:
        """Register seq's blocks that became full and computed since the last call (after each step)."""
        if not self.enable_prefix_caching:
            return
        hashes = self._seq_hashes.setdefault(seq, [])
        for i in range(len(hashes), seq.num_computed_tokens // self.block_size):
            parent = hashes[-1] if hashes else _ROOT_HASH
            tokens = tuple(seq.token_slice(i * self.block_size, (i + 1) * self.block_size))
            block_hash = self._hash_block(parent, tokens)
            hashes.append(block_hash)
            if block_hash in self._hash_to_block:
                continue  # another block already holds this content (computed concurrently): keep that one
            block = seq.block_table[i]
            self._hash_to_block[block_hash] = block
            self._block_hash[block] = block_hash
            self._block_content[block] = _BlockContent(parent, tokens)

    def free(self, seq: Sequence) -> None:
        """Release seq's blocks and clear its block table. Blocks go back in reverse order so that, among
        cached ones, a sequence's tail is evicted before its head (heads are the most shared prefixes)."""
        for block in reversed(seq.block_table):
            self._ref_counts[block] -= 1
            if self._ref_counts[block] < 0:
                raise RuntimeError(f"KV block {block} was freed more often than allocated")
            if self._ref_counts[block] == 0:
                if block in self._block_hash:
                    self._evictable[block] = None
                else:
                    self._blank_free.append(block)
        seq.block_table = []
        self._seq_hashes.pop(seq, None)

    # ---- internals -------------------------------------------------------------------------------------------
    def _hash_block(self, parent_hash: int, token_ids: tuple[int, ...]) -> int:
        return hash((parent_hash, token_ids))

    def _take_free_block(self) -> int:
        if self._blank_free:
            return self._blank_free.popleft()
        block, _ = self._evictable.popitem(last=False)
        del self._hash_to_block[self._block_hash.pop(block)]
        del self._block_content[block]
        return block
