"""In-flight batching: which sequences run in the next step, and how many of their tokens.

A step is a list of ScheduledSeq(seq, num_new_tokens): the model runner computes positions
[seq.num_computed_tokens, seq.num_computed_tokens + num_new_tokens) of seq.token_ids into the KV slots of
seq.block_table, and samples one token only for entries that reach the end of the known tokens. Prefill,
chunked prefill, decode and the recompute of a preempted sequence are all this one operation.

Policy per step, under a budget of max_num_tokens tokens and at most max_num_seqs running sequences:
1. RUNNING sequences in arrival order each get their remaining tokens (a decode token or the next prefill
   chunk). When KV blocks run out, the most recently arrived running sequence is preempted: its blocks are
   freed and it goes back to the front of the waiting queue, to recompute prompt + generated tokens later.
2. If nothing was preempted, WAITING sequences are admitted first come first served while the budget, the
   seats and the KV blocks allow, each starting from its longest prefix-cache hit.

Which KV blocks "allow" an admission is the `admission` policy:
- "reserve" (default): the running sequences plus the newcomer must fit the cache at every future step if each
  runs to its output limit (EOS is not counted on). Since sequences free their blocks as they finish, the
  need is the peak over the coming steps, not the sum of every sequence's final size. Sequences are then never
  preempted as long as every step advances every running sequence; a long-output workload that would outgrow
  the cache runs fewer sequences at a time instead of recomputing them.
- "watermark": admit while the blocks for the first chunk leave `watermark` of the cache free, counting on
  sequences ending early (on EOS) and preempting when they do not; a watermark of 0 admits whenever the
  first chunk fits.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from operator import itemgetter

from llmx.common.errors import LlmxError
from llmx.runtime.block_manager import BlockManager
from llmx.runtime.sequence import FinishReason, Sequence, SequenceStatus

ADMISSION_POLICIES = ("reserve", "watermark")


class ScheduledSeq(tuple):
    """One sequence's share of a step: positions [start_position, end_position) of seq.token_ids.

    start_position and samples are taken when the entry is made (at schedule time), so they stay right
    after postprocess has advanced the sequence. An immutable tuple (seq, num_new_tokens, start_position,
    samples) rather than a frozen dataclass: a step makes one per running sequence, and a tuple is built in
    a third of the time.
    """

    __slots__ = ()

    def __new__(cls, seq: Sequence, num_new_tokens: int) -> "ScheduledSeq":
        start = seq.num_computed_tokens
        return tuple.__new__(cls, (seq, num_new_tokens, start, start + num_new_tokens == seq.num_tokens))

    def __reduce__(self):  # copy/pickle keep the stored positions instead of re-reading the sequence
        return tuple.__new__, (type(self), tuple(self))

    seq: Sequence = property(itemgetter(0))
    num_new_tokens: int = property(itemgetter(1))
    start_position: int = property(itemgetter(2))
    samples: bool = property(itemgetter(3), doc="the step reaches the end of the known tokens: the runner samples")

    @property
    def end_position(self) -> int:
        return self[2] + self[1]

    def __repr__(self) -> str:
        return (f"ScheduledSeq(seq_id={self[0].seq_id}, num_new_tokens={self[1]}, start_position={self[2]}, "
                f"samples={self[3]})")


@dataclass
class SchedulerOutput:
    """What schedule() decided for one step."""

    scheduled: list[ScheduledSeq] = field(default_factory=list)
    preempted: list[Sequence] = field(default_factory=list)  # sent back to WAITING this step (KV freed)
    admitted: list[Sequence] = field(default_factory=list)  # moved from WAITING to RUNNING this step
    errored: list[Sequence] = field(default_factory=list)  # finished with FinishReason.ERROR since last step

    @property
    def num_batched_tokens(self) -> int:
        return sum(item.num_new_tokens for item in self.scheduled)


class Scheduler:
    """Decides each step's batch and applies its results (see the module docstring for the policy)."""

    def __init__(self, block_manager: BlockManager, *, max_num_seqs: int, max_num_tokens: int,
                 max_model_len: int, block_size: int, eos_token_ids: tuple[int, ...] = (),
                 chunked_prefill: bool = True, admission: str = "reserve", watermark: float = 0.01):
        if max_num_seqs < 1:
            raise LlmxError(f"max_batch_size must be at least 1, got {max_num_seqs}; rebuild the engine with a "
                            "positive --max-batch-size.")
        if max_num_tokens < 1:
            raise LlmxError(f"max_num_tokens must be at least 1, got {max_num_tokens}; rebuild the engine with a "
                            "positive --max-num-tokens.")
        if max_model_len < 2:
            raise LlmxError(f"max_seq_len must be at least 2 (one prompt token and one generated), got "
                            f"{max_model_len}; rebuild the engine with a larger --max-seq-len.")
        if admission not in ADMISSION_POLICIES:
            raise LlmxError(f"unknown admission policy {admission!r}; use one of {', '.join(ADMISSION_POLICIES)}.")
        if not 0.0 <= watermark < 1.0:
            raise LlmxError(f"the admission watermark is a fraction of the KV cache in [0, 1), got {watermark}.")
        if block_size != block_manager.block_size:
            raise LlmxError(f"the scheduler's block_size {block_size} differs from the KV cache's "
                            f"{block_manager.block_size}; build both from the engine's kv_block_size.")
        self.block_manager = block_manager
        self.max_num_seqs = max_num_seqs
        self.max_num_tokens = max_num_tokens
        self.max_model_len = max_model_len
        self.block_size = block_size
        self.eos_token_ids = tuple(eos_token_ids)
        self.chunked_prefill = chunked_prefill
        self.admission = admission
        self.watermark_blocks = int(watermark * block_manager.num_blocks)
        self.num_preemptions = 0  # total over the scheduler's life, for stats

        self._waiting: deque[Sequence] = deque()
        self._running: list[Sequence] = []  # in arrival order (preempted ones come back in order, see _preempt)
        self._errored: list[Sequence] = []
        # Most output tokens each sequence may have: max_new_tokens clipped to max_model_len and the KV cache.
        self._output_limits: dict[Sequence, int] = {}
        # "reserve" bookkeeping: the blocks the running sequences hold at their limits, summed (when the
        # newcomer fits under that, the peak need is not computed); a counter of changes to the running set
        # and to the head of the queue; and the value it had when the head last did not fit (for schedule_ahead).
        self._final_blocks_sum = 0
        self._version = 0
        self._head_blocked_at = -1

    # ---- state -------------------------------------------------------------------------------------------
    @property
    def num_waiting(self) -> int:
        return len(self._waiting)

    @property
    def num_running(self) -> int:
        return len(self._running)

    @property
    def kv_cache_usage(self) -> float:
        return self.block_manager.usage

    def has_unfinished(self) -> bool:
        """True while a sequence waits, runs, or finished with an error not yet returned by schedule()."""
        return bool(self._waiting or self._running or self._errored)

    def output_limit(self, seq: Sequence) -> int:
        """The most output tokens seq will get: its max_new_tokens clipped to what the engine can hold."""
        return self._output_limits[seq]

    # ---- requests ------------------------------------------------------------------------------------------
    def add(self, seq: Sequence) -> None:
        """Queue a new sequence. One that can never be served is finished with FinishReason.ERROR and handed
        back by the next schedule() call; the others are unaffected."""
        if seq.status is not SequenceStatus.WAITING or seq.block_table or seq.num_computed_tokens \
                or seq in self._output_limits:
            raise ValueError(f"sequence {seq.seq_id} was already added or has state; add a fresh Sequence")
        error = self._admission_error(seq)
        if error is not None:
            seq.finish(FinishReason.ERROR, error)
            self._errored.append(seq)
            return
        kv_capacity = self.block_manager.num_blocks * self.block_size
        # A sequence ending with T tokens has KV for T - 1 of them (the last one is sampled, never computed).
        self._output_limits[seq] = min(seq.params.max_new_tokens, self.max_model_len - seq.num_prompt_tokens,
                                       kv_capacity - seq.num_prompt_tokens + 1)
        self._waiting.append(seq)

    def _admission_error(self, seq: Sequence) -> str | None:
        n = seq.num_prompt_tokens
        if n == 0:
            return f"Request {seq.seq_id}: the prompt is empty; send at least one token."
        if n >= self.max_model_len:
            return (f"Request {seq.seq_id}: the prompt has {n} tokens but the engine's max sequence length is "
                    f"{self.max_model_len}, so prompts may have at most {self.max_model_len - 1} tokens; shorten "
                    "the prompt or rebuild the engine with a larger --max-seq-len.")
        kv_capacity = self.block_manager.num_blocks * self.block_size
        if n > kv_capacity:
            return (f"Request {seq.seq_id}: the prompt has {n} tokens but the KV cache holds only {kv_capacity} "
                    "tokens; give the engine more KV-cache memory or shorten the prompt.")
        if not self.chunked_prefill and n > self.max_num_tokens:
            return (f"Request {seq.seq_id}: the prompt has {n} tokens but a step processes at most "
                    f"{self.max_num_tokens} tokens and chunked prefill is off; enable chunked prefill or "
                    "rebuild the engine with a larger --max-num-tokens.")
        return None

    def finish(self, seq: Sequence, reason: FinishReason, error: str | None = None) -> None:
        """End seq now (stop string, abort): free its KV blocks and mark it. No-op if already finished."""
        if seq.is_finished:
            return
        if seq in self._running:
            self._running.remove(seq)
            self._left_running(seq)
        elif seq in self._waiting:
            self._waiting.remove(seq)
            self._version += 1
        self.block_manager.free(seq)
        self._output_limits.pop(seq, None)
        seq.finish(reason, error)

    # ---- the step ------------------------------------------------------------------------------------------
    def schedule(self) -> SchedulerOutput:
        out = SchedulerOutput(errored=self._errored)
        self._errored = []
        budget = self._schedule_running(out, self.max_num_tokens)
        if not out.preempted:
            # After a preemption the cache is short of blocks: admitting now would only thrash.
            self._admit_waiting(out, budget)
        return out

    def _schedule_running(self, out: SchedulerOutput, budget: int) -> int:
        queue = deque(self._running)
        kept: list[Sequence] = []  # running after this step, in arrival order
        scheduled = out.scheduled
        block_size = self.block_size
        while queue:
            seq = queue.popleft()
            if budget == 0:
                kept.append(seq)
                kept.extend(queue)
                break
            computed = seq.num_computed_tokens
            num_new = min(seq.num_tokens - computed, budget)
            # A decode step fills a new block only every block_size tokens: the other steps need no blocks, so
            # the block manager is asked only when the step's positions run past the sequence's blocks.
            if computed + num_new > len(seq.block_table) * block_size and \
                    not self._allocate_or_preempt(seq, num_new, queue, has_older=bool(kept), out=out):
                continue
            kept.append(seq)
            scheduled.append(ScheduledSeq(seq, num_new))
            budget -= num_new
        self._running = kept
        return budget

    def _allocate_or_preempt(self, seq: Sequence, num_new: int, queue: deque[Sequence], *, has_older: bool,
                             out: SchedulerOutput) -> bool:
        """Get seq the blocks for num_new tokens, preempting the newest unscheduled running sequences (from
        the back of queue) as needed, and seq itself last. Returns False if seq was preempted."""
        while not self.block_manager.allocate_for(seq, num_new):
            if queue:
                victim = queue.pop()
            elif has_older:
                victim = seq  # only older sequences hold blocks now: seq is the newest, so it yields
            else:
                raise RuntimeError(f"sequence {seq.seq_id} cannot get KV blocks even alone; add() should have "
                                   "clipped it to the cache capacity")
            self._preempt(victim)
            out.preempted.append(victim)
            if victim is seq:
                return False
        return True

    def _preempt(self, seq: Sequence) -> None:
        """Free seq's KV and send it to the front of the waiting queue; it recomputes its tokens later.
        Victims are taken newest first, so pushing each to the front keeps the queue in arrival order."""
        self._left_running(seq)
        self.block_manager.free(seq)
        seq.num_computed_tokens = 0
        seq.status = SequenceStatus.WAITING
        seq.num_preemptions += 1
        self.num_preemptions += 1
        self._waiting.appendleft(seq)

    def _admit_waiting(self, out: SchedulerOutput, budget: int) -> None:
        while self._waiting and budget > 0 and len(self._running) < self.max_num_seqs:
            seq = self._waiting[0]
            num_new = self._try_admit(seq, budget)
            if num_new == 0:
                break  # first come first served: nobody overtakes the head of the queue
            self._waiting.popleft()
            seq.status = SequenceStatus.RUNNING
            self._running.append(seq)
            self._final_blocks_sum += self._final_blocks(seq)
            self._version += 1
            out.admitted.append(seq)
            out.scheduled.append(ScheduledSeq(seq, num_new))
            budget -= num_new

    def _try_admit(self, seq: Sequence, budget: int) -> int:
        """Give seq its prefix-cache hit and blocks for its first chunk; returns the chunk's token count, or
        0 with nothing held if it does not fit now."""
        if self.admission == "reserve" and not self._fits_reservation(seq):
            self._head_blocked_at = self._version
            return 0
        self.block_manager.allocate_prefix(seq)
        remaining = seq.num_tokens - seq.num_computed_tokens
        # Without chunked prefill a prompt runs whole. A preempted sequence's prompt + generated tokens can
        # exceed a step's budget; it is recomputed in chunks anyway, else it could never come back.
        if self.chunked_prefill or remaining > self.max_num_tokens:
            num_new = min(remaining, budget)
        else:
            num_new = remaining if remaining <= budget else 0
        if num_new and self._leaves_watermark(seq, num_new) and self.block_manager.allocate_for(seq, num_new):
            return num_new
        self.block_manager.cancel_admission(seq)
        return 0

    def _leaves_watermark(self, seq: Sequence, num_new: int) -> bool:
        """"watermark" admission: the first chunk leaves watermark_blocks free (always true with nothing
        running, so that a prompt near the cache's size still runs)."""
        if self.admission != "watermark" or not self._running:
            return True
        bm = self.block_manager
        return bm.num_free_blocks - bm.blocks_needed(seq, num_new) >= self.watermark_blocks

    # ---- "reserve" admission -----------------------------------------------------------------------------
    def _final_blocks(self, seq: Sequence) -> int:
        """Blocks seq holds at its output limit: KV for prompt + limit - 1 tokens (the last is never computed)."""
        return -(-(seq.num_prompt_tokens + self._output_limits[seq] - 1) // self.block_size)

    def _left_running(self, seq: Sequence) -> None:
        self._final_blocks_sum -= self._final_blocks(seq)
        self._version += 1

    def _fits_reservation(self, seq: Sequence) -> bool:
        """Whether seq can join the running sequences without the KV cache running out at any later step,
        if every sequence runs to its output limit and each step advances each sequence by one token."""
        if not self._running:
            return True  # add() clipped seq's limit to the cache: alone it always fits
        num_blocks = self.block_manager.num_blocks
        if self._final_blocks_sum + self._final_blocks(seq) <= num_blocks:
            return True  # even with no sequence finishing, everything fits
        return self.projected_peak_blocks(seq) <= num_blocks

    def projected_peak_blocks(self, extra: Sequence | None = None) -> int:
        """The most KV blocks the running sequences (and `extra`) will hold at once, if each runs to its limit.

        A sequence with r tokens still to sample holds KV for a = final - r tokens' worth of its life now (the
        prompt counted whole, even mid-prefill) and a + s after s more steps, until it ends at s = r and frees
        its blocks. The total grows between endings, so its peak is at an ending: the largest, over each r, of
        the blocks of the sequences with at least r tokens to go, at s = r. ceil((a + s) / block_size) is
        bounded by (a + s + block_size - 1) / block_size, which makes the sum one pass over the sequences
        sorted by r, and overstates the peak by less than a block per sequence.
        """
        limits = self._output_limits
        entries = [(limits[s] - len(s.output_token_ids), s.num_prompt_tokens + limits[s] - 1)
                   for s in self._running]
        if extra is not None:
            entries.append((limits[extra] - len(extra.output_token_ids),
                            extra.num_prompt_tokens + limits[extra] - 1))
        entries.sort(reverse=True)
        pad = self.block_size - 1
        peak = count = sum_a = 0
        for i, (r, final) in enumerate(entries):
            sum_a += final - r
            count += 1
            if i + 1 == len(entries) or entries[i + 1][0] != r:  # every sequence with at least r to go is in
                peak = max(peak, (sum_a + count * (r + pad)) // self.block_size)
        return peak

    def schedule_ahead(self, previous: list[ScheduledSeq]) -> SchedulerOutput | None:
        """The decode step after `previous` (scheduled, not yet postprocessed), or None when it cannot be
        decided before that step's tokens are known.

        Used to queue step N+1 while step N still runs on the device: every sequence of step N that sampled
        continues with one token, the one step N is sampling (its input comes from the device). It is what
        schedule() would return after postprocess(N) whenever no sequence of N finished; a sequence that
        finishes on an EOS or stop token then ran one step for nothing, and the engine drops that result.
        None (and the engine waits for step N, then schedules as usual) when: an item of N did not sample
        (a prompt chunk), a running sequence is not in N, errors are pending, a waiting request could take
        a seat that is free or that step N frees by a length limit, or KV blocks run out (no preemption here).
        A free seat does not count while the head of the queue is held back by "reserve" admission and the
        running set has not changed since: the running sequences' peak need stays what it was.
        Blocks for the new positions are allocated now; the KV write of a dropped step lands in its own
        sequence's blocks, ahead (on the device) of any later step that could reuse them.
        """
        if self._errored or not all(item[3] for item in previous):
            return None
        live = [item for item in previous if not item[0].is_finished]
        if not live or len(live) != len(self._running) or len(live) > self.max_num_tokens:
            return None
        limits = self._output_limits
        # After step N each sequence holds one more output token than now: those at their limit end there.
        continuing = [item for item in live if len(item[0].output_token_ids) + 1 < limits[item[0]]]
        if self._waiting and (len(continuing) < len(live) or (len(self._running) < self.max_num_seqs
                                                             and self._head_blocked_at != self._version)):
            return None
        out = SchedulerOutput()
        block_size = self.block_size
        for seq, num_new, start, _ in continuing:
            position = start + num_new  # where the token sampled by step N goes
            if position >= len(seq.block_table) * block_size and \
                    not self.block_manager.allocate_for(seq, position + 1 - seq.num_computed_tokens):
                return None
            out.scheduled.append(tuple.__new__(ScheduledSeq, (seq, 1, position, True)))
        return out if out.scheduled else None

    # ---- results ---------------------------------------------------------------------------------------------
    def postprocess(self, batch: SchedulerOutput | Iterable[ScheduledSeq],
                    sampled: Mapping[Sequence, int]) -> list[Sequence]:
        """Apply a step's results: advance each sequence, append its sampled token, finish it on EOS, a stop
        token id or its length limit, and free its blocks. Returns the sequences finished by this step."""
        items = batch.scheduled if isinstance(batch, SchedulerOutput) else list(batch)
        live = [item for item in items if not item.seq.is_finished]  # finish() may have ended one mid-step
        # Check the whole batch before changing anything, so a bad batch leaves every sequence as it was.
        for seq, num_new, start, samples in live:
            if seq.num_computed_tokens != start:
                raise ValueError(f"sequence {seq.seq_id}: postprocess got a batch that is not the last "
                                 "schedule() output (or applied it twice)")
            if samples != (seq in sampled):
                raise ValueError(
                    f"sequence {seq.seq_id}: the model runner must sample exactly when a step reaches the "
                    f"end of the known tokens (step ends at {start + num_new} of {seq.num_tokens}, "
                    f"sampled: {seq in sampled})")
        finished = []
        block_size = self.block_size
        mark_computed = self.block_manager.mark_computed if self.block_manager.enable_prefix_caching else None
        for seq, num_new, start, samples in live:
            end = seq.num_computed_tokens = start + num_new
            # A block becomes full (and registrable in the prefix cache) only in a step that reaches or crosses
            # a block boundary; most decode steps do not.
            if mark_computed is not None and end // block_size != start // block_size:
                mark_computed(seq)
            if samples:
                seq.output_token_ids.append(int(sampled[seq]))
                reason = self._finish_reason(seq)
                if reason is not None:
                    self.finish(seq, reason)
                    finished.append(seq)
        return finished

    def _finish_reason(self, seq: Sequence) -> FinishReason | None:
        token = seq.output_token_ids[-1]
        if not seq.params.ignore_eos and token in self.eos_token_ids:
            return FinishReason.EOS
        if token in seq.params.stop_token_ids:
            return FinishReason.STOP
        if len(seq.output_token_ids) >= self._output_limits[seq]:
            return FinishReason.LENGTH
        return None
