"""Scheduler: token budget, chunked prefill, admission by seats and KV blocks ("reserve" and "watermark"),
preemption by recompute, prefix-cache hits, per-request errors, length clipping and stop conditions.

A fake model runs over a fake paged KV cache: the KV of position p is mix(KV of position p-1, token p), read
back through the block table, and the next token is a function of the last KV. A wrong block table, a write
into a shared block, a stale cached block or a lost/duplicated position all change the tokens, so comparing
with a direct recurrence (no cache at all) checks the whole bookkeeping end to end."""

from __future__ import annotations

import random

import pytest

from llmx.common.errors import LlmxError
from llmx.runtime.block_manager import BlockManager
from llmx.runtime.scheduler import ScheduledSeq, Scheduler, SchedulerOutput
from llmx.runtime.sequence import FinishReason, SamplingParams, Sequence, SequenceStatus

VOCAB = 50
_MOD = (1 << 61) - 1
_SEED = 12345


def mix(kv: int, token: int) -> int:
    return (kv * 1_000_003 + token + 1) % _MOD


def next_token(kv: int) -> int:
    return (kv >> 7) % VOCAB


class FakeModel:
    """Reads and writes a fake KV cache of num_blocks * block_size slots exactly as the real runner would."""

    def __init__(self, bm: BlockManager):
        self.bm = bm
        self.kv: list[int | None] = [None] * (bm.num_blocks * bm.block_size)
        self.positions: dict[int, list[int]] = {}  # seq_id -> every position computed, in order

    def slot(self, seq: Sequence, p: int) -> int:
        bs = self.bm.block_size
        return seq.block_table[p // bs] * bs + p % bs

    def run(self, batch: list[ScheduledSeq], pending: dict[Sequence, int] | None = None) -> dict[Sequence, int]:
        """pending: the tokens of a step queued just before and not postprocessed yet (a step scheduled
        ahead reads its input token from there, as the runner reads it from the device)."""
        sampled = {}
        for item in batch:
            seq, tokens = item.seq, item.seq.token_ids
            if pending and seq in pending and len(tokens) == item.start_position:
                tokens = tokens + [pending[seq]]
            assert len(seq.block_table) * self.bm.block_size >= item.end_position
            for p in range(item.start_position, item.end_position):
                assert self.bm.ref_count(seq.block_table[p // self.bm.block_size]) == 1, "write into a shared block"
                prev = self.kv[self.slot(seq, p - 1)] if p else _SEED
                assert prev is not None
                self.kv[self.slot(seq, p)] = mix(prev, tokens[p])
                self.positions.setdefault(seq.seq_id, []).append(p)
            if item.samples:
                sampled[seq] = next_token(self.kv[self.slot(seq, item.end_position - 1)])
        return sampled


def reference_output(prompt, params: SamplingParams, eos=(), limit=None) -> list[int]:
    kv = _SEED
    for t in prompt:
        kv = mix(kv, t)
    out = []
    limit = min(params.max_new_tokens, limit or params.max_new_tokens)
    while True:
        token = next_token(kv)
        out.append(token)
        if (not params.ignore_eos and token in eos) or token in params.stop_token_ids or len(out) >= limit:
            return out
        kv = mix(kv, token)


# Admission that counts on sequences ending early and preempts when they do not (the policy before "reserve"):
# the preemption tests need it to run the cache short.
GREEDY = dict(admission="watermark", watermark=0.0)


def make_scheduler(num_blocks=64, block_size=4, *, prefix_caching=True, **kwargs):
    options = dict(max_num_seqs=16, max_num_tokens=64, max_model_len=256, eos_token_ids=())
    options.update(kwargs)
    bm = BlockManager(num_blocks, block_size, enable_prefix_caching=prefix_caching)
    return Scheduler(bm, block_size=block_size, **options)


def make_seq(seq_id, prompt, **params):
    return Sequence(seq_id=seq_id, prompt_token_ids=list(prompt), params=SamplingParams(**params))


def check_step(sched: Scheduler, out: SchedulerOutput, seqs: list[Sequence], running_before: list[Sequence]):
    assert out.num_batched_tokens <= sched.max_num_tokens
    if out.preempted:  # a step that had to preempt admits nobody, victims included (it would only thrash)
        scheduled = [item.seq for item in out.scheduled]
        assert all(any(seq is s for s in running_before) for seq in scheduled)
        assert not any(seq is victim for seq in scheduled for victim in out.preempted)
    assert all(item.num_new_tokens >= 1 for item in out.scheduled)
    ids = [item.seq.seq_id for item in out.scheduled]
    assert ids == sorted(set(ids)), "a batch lists sequences in arrival order, each once"
    running = [s for s in seqs if s.status is SequenceStatus.RUNNING]
    waiting = [s for s in seqs if s.status is SequenceStatus.WAITING]
    assert len(running) == sched.num_running <= sched.max_num_seqs
    assert len(waiting) == sched.num_waiting
    if running and waiting:
        assert max(s.seq_id for s in running) < min(s.seq_id for s in waiting), "FCFS order broken"
    bm = sched.block_manager
    holders: dict[int, int] = {}
    for seq in seqs:
        if seq.status is not SequenceStatus.RUNNING:
            assert seq.block_table == []
        assert len(set(seq.block_table)) == len(seq.block_table)
        for block in seq.block_table:
            holders[block] = holders.get(block, 0) + 1
    for block in range(bm.num_blocks):
        assert bm.ref_count(block) == holders.get(block, 0)
    assert bm.num_free_blocks == bm.num_blocks - len(holders)


def drive(sched: Scheduler, seqs: list[Sequence], arrivals: dict[int, list[Sequence]] | None = None,
          model: FakeModel | None = None, max_steps=5000):
    """schedule -> fake model -> postprocess until done; returns the SchedulerOutputs and the model. Pass
    the model of an earlier drive() on the same scheduler: its fake KV cache backs the cached blocks."""
    model = model or FakeModel(sched.block_manager)
    arrivals = dict(arrivals or {0: seqs})
    added: list[Sequence] = []
    outs = []
    step = 0
    while sched.has_unfinished() or arrivals:
        for seq in arrivals.pop(step, []):
            sched.add(seq)
            added.append(seq)
        running_before = [s for s in added if s.status is SequenceStatus.RUNNING]
        out = sched.schedule()
        check_step(sched, out, added, running_before)
        sched.postprocess(out.scheduled, model.run(out.scheduled))
        outs.append(out)
        step += 1
        assert step < max_steps, "the scheduler stopped making progress"
    assert sched.block_manager.num_free_blocks == sched.block_manager.num_blocks
    return outs, model


def drive_ahead(sched: Scheduler, seqs: list[Sequence], arrivals: dict[int, list[Sequence]] | None = None,
                max_steps=5000):
    """drive() as the engine runs with steps queued ahead: the model runs each step when it is launched
    (as the device would, in launch order), and step N is postprocessed after step N+1 was scheduled ahead
    and launched. Returns the SchedulerOutputs, the model and how many steps were scheduled ahead."""
    model = FakeModel(sched.block_manager)
    arrivals = dict(arrivals or {0: seqs})
    added: list[Sequence] = []
    outs, inflight, ahead_steps, step = [], None, 0, 0
    while sched.has_unfinished() or arrivals or inflight:
        for seq in arrivals.pop(step, []):
            sched.add(seq)
            added.append(seq)
        step += 1
        assert step < max_steps, "the scheduler stopped making progress"
        if inflight is None:
            running_before = [s for s in added if s.status is SequenceStatus.RUNNING]
            out = sched.schedule()
            check_step(sched, out, added, running_before)
            if not out.scheduled:
                continue
            outs.append(out)
            inflight = (out.scheduled, model.run(out.scheduled))
        ahead = sched.schedule_ahead(inflight[0])
        launched = None
        if ahead is not None:
            ahead_steps += 1
            outs.append(ahead)
            launched = (ahead.scheduled, model.run(ahead.scheduled, pending=inflight[1]))
        scheduled, sampled = inflight
        sched.postprocess(scheduled, {seq: t for seq, t in sampled.items() if not seq.is_finished})
        inflight = launched
    assert sched.block_manager.num_free_blocks == sched.block_manager.num_blocks
    return outs, model, ahead_steps


def steps_of(outs, seq):
    return [(item.start_position, item.num_new_tokens, item.samples)
            for out in outs for item in out.scheduled if item.seq is seq]


# ---- budget and chunked prefill ---------------------------------------------------------------------------


def test_chunked_prefill_splits_a_long_prompt_over_steps_within_the_budget():
    sched = make_scheduler(max_num_tokens=32)
    seq = make_seq(0, range(100), max_new_tokens=3)
    outs, _ = drive(sched, [seq])
    assert steps_of(outs, seq) == [(0, 32, False), (32, 32, False), (64, 32, False), (96, 4, True),
                                   (100, 1, True), (101, 1, True)]
    assert seq.output_token_ids == reference_output(range(100), seq.params)
    assert seq.finish_reason is FinishReason.LENGTH


def test_budget_is_shared_first_come_first_served():
    sched = make_scheduler(max_num_tokens=32)
    long, short = make_seq(0, range(50), max_new_tokens=2), make_seq(1, range(100, 110), max_new_tokens=2)
    outs, _ = drive(sched, [long, short])
    first, second = outs[0], outs[1]
    assert [(i.seq.seq_id, i.num_new_tokens) for i in first.scheduled] == [(0, 32)]
    assert [(i.seq.seq_id, i.num_new_tokens) for i in second.scheduled] == [(0, 18), (1, 10)]
    assert [(i.seq.seq_id, i.num_new_tokens) for i in outs[2].scheduled] == [(0, 1), (1, 1)]
    assert long.output_token_ids == reference_output(range(50), long.params)
    assert short.output_token_ids == reference_output(range(100, 110), short.params)


def test_without_chunked_prefill_a_prompt_runs_whole_or_waits():
    sched = make_scheduler(max_num_tokens=32, chunked_prefill=False)
    a, b = make_seq(0, range(20), max_new_tokens=2), make_seq(1, range(5, 25), max_new_tokens=2)
    too_long = make_seq(2, range(40), max_new_tokens=2)
    outs, _ = drive(sched, [a, b, too_long])
    assert [(i.seq.seq_id, i.num_new_tokens) for i in outs[0].scheduled] == [(0, 20)]
    assert [(i.seq.seq_id, i.num_new_tokens) for i in outs[1].scheduled] == [(0, 1), (1, 20)]
    assert outs[0].errored == [too_long] and too_long.finish_reason is FinishReason.ERROR
    assert "40 tokens" in too_long.error and "chunked prefill" in too_long.error
    assert b.output_token_ids == reference_output(range(5, 25), b.params)


def test_decode_of_many_sequences_runs_them_all_in_every_step():
    sched = make_scheduler(max_num_tokens=64, max_num_seqs=8)
    seqs = [make_seq(i, [i, i + 1, i + 2, 7, 9], max_new_tokens=6) for i in range(8)]
    outs, _ = drive(sched, seqs)
    assert len(outs) == 6  # one prefill step (40 tokens) then 5 decode steps of 8 tokens
    assert outs[0].num_batched_tokens == 40
    for out in outs[1:]:
        assert [i.num_new_tokens for i in out.scheduled] == [1] * 8
    for seq in seqs:
        assert seq.output_token_ids == reference_output(seq.prompt_token_ids, seq.params)


# ---- admission -----------------------------------------------------------------------------------------------


def test_max_num_seqs_limits_the_running_sequences():
    sched = make_scheduler(max_num_seqs=2)
    seqs = [make_seq(i, [i] * 6, max_new_tokens=3) for i in range(5)]
    outs, _ = drive(sched, seqs)
    assert max(len(out.scheduled) for out in outs) == 2
    assert [s.output_token_ids for s in seqs] == [reference_output(s.prompt_token_ids, s.params) for s in seqs]


def test_admission_waits_for_kv_blocks():
    # 4 blocks of 4 tokens; each sequence needs 2 blocks for its whole life (7 prompt tokens + 1 decode).
    sched = make_scheduler(num_blocks=4, block_size=4)
    seqs = [make_seq(i, [10 + i] * 7, max_new_tokens=2) for i in range(3)]
    outs, _ = drive(sched, seqs)
    assert [i.seq.seq_id for i in outs[0].scheduled] == [0, 1]
    assert [i.seq.seq_id for i in outs[1].scheduled] == [0, 1]
    assert [i.seq.seq_id for i in outs[2].scheduled] == [2]
    assert not any(out.preempted for out in outs)
    assert all(s.finish_reason is FinishReason.LENGTH and len(s.output_token_ids) == 2 for s in seqs)


def test_reserve_admits_only_what_the_cache_can_grow_to():
    # 8 blocks of 4 tokens. Each sequence ends with 16 tokens of KV (4 prompt + 13 output - 1): 4 blocks. All
    # three prompts fit at once, and "watermark" admission takes them all and preempts as they grow; "reserve"
    # runs two and admits the third when one ends.
    def run(**kwargs):
        sched = make_scheduler(num_blocks=8, block_size=4, **kwargs)
        seqs = [make_seq(i, [30 + i] * 4, max_new_tokens=13, ignore_eos=True) for i in range(3)]
        outs, _ = drive(sched, seqs)
        for seq in seqs:
            assert seq.output_token_ids == reference_output(seq.prompt_token_ids, seq.params)
        return outs, seqs, sched.num_preemptions

    outs, seqs, preemptions = run()
    assert [i.seq.seq_id for i in outs[0].scheduled] == [0, 1] and preemptions == 0
    admitted_at = next(n for n, out in enumerate(outs) if seqs[2] in out.admitted)
    assert seqs[0].is_finished and all(seqs[0] not in [i.seq for i in out.scheduled] for out in outs[admitted_at:])
    greedy_outs, _, greedy_preemptions = run(**GREEDY)
    assert len(greedy_outs[0].scheduled) == 3 and greedy_preemptions > 0


def test_reserve_counts_the_blocks_that_sequences_ending_first_give_back():
    # 10 blocks of 4 tokens. a ends with 36 tokens of KV (9 blocks), b with 8 (2 blocks): 11 blocks if both were
    # at their ends at once, but b ends after 5 tokens, when a holds 8 tokens: the peak is a's 9 blocks alone.
    sched = make_scheduler(num_blocks=10, block_size=4)
    a = make_seq(0, [1] * 4, max_new_tokens=33, ignore_eos=True)
    b = make_seq(1, [2] * 4, max_new_tokens=5, ignore_eos=True)
    outs, _ = drive(sched, [a, b])
    assert outs[0].admitted == [a, b] and sched.num_preemptions == 0
    assert a.output_token_ids == reference_output(a.prompt_token_ids, a.params)
    assert b.output_token_ids == reference_output(b.prompt_token_ids, b.params)


def test_projected_peak_is_the_largest_total_at_an_ending_and_bounds_the_exact_one():
    rng = random.Random(7)
    for _ in range(50):
        block_size = rng.choice([1, 2, 4, 16])
        sched = make_scheduler(num_blocks=10_000, block_size=block_size, max_num_seqs=64, max_num_tokens=10_000,
                               max_model_len=500)
        seqs = [make_seq(i, [1] * rng.randrange(1, 60), max_new_tokens=rng.randrange(1, 90), ignore_eos=True)
                for i in range(rng.randrange(1, 12))]
        for seq in seqs:
            sched.add(seq)
        out = sched.schedule()
        sched.postprocess(out, {item.seq: 3 for item in out.scheduled})  # one output token each
        running = [seq for seq in seqs if not seq.is_finished]
        if not running:
            continue
        togo = {seq: sched.output_limit(seq) - len(seq.output_token_ids) for seq in running}
        exact = max(sum(-(-(seq.num_tokens - 1 + s) // block_size) for seq in running if togo[seq] >= s)
                    for s in range(1, max(togo.values()) + 1))
        assert exact <= sched.projected_peak_blocks() < exact + len(running)


def test_schedule_ahead_runs_on_while_reserve_holds_the_queue_back():
    # 8 blocks of 4 tokens: two running sequences reserve all 8; a seat is free but the waiting request
    # cannot be admitted until one of them ends, so steps are still scheduled ahead until then.
    sched = make_scheduler(num_blocks=8, block_size=4, max_num_seqs=4)
    running = _decoding(sched, [[1] * 4, [2] * 4], max_new_tokens=13, ignore_eos=True)
    waiting = make_seq(2, [3] * 4, max_new_tokens=13)
    sched.add(waiting)
    step = sched.schedule().scheduled
    assert [item.seq for item in step] == running and sched.num_waiting == 1
    ahead = sched.schedule_ahead(step)
    assert ahead is not None and [item.seq for item in ahead.scheduled] == running
    sched.finish(running[0], FinishReason.STOP)  # the running set changed: the head may fit now
    sched.postprocess(step, {running[1]: 4})
    assert sched.schedule_ahead(ahead.scheduled) is None
    sched.postprocess(ahead.scheduled, {running[1]: 5})
    assert sched.schedule().admitted == [waiting]


def test_watermark_admission_keeps_its_share_of_the_cache_free():
    # 10 blocks of 4 tokens, watermark 20%: an admission must leave 2 blocks free. One-block prompts: 8 run.
    sched = make_scheduler(num_blocks=10, block_size=4, admission="watermark", watermark=0.2)
    seqs = [make_seq(i, [40 + i] * 4, max_new_tokens=2, ignore_eos=True) for i in range(9)]
    outs, _ = drive(sched, seqs)
    assert len(outs[0].admitted) == 8 and outs[1].admitted == []
    assert all(seq.output_token_ids == reference_output(seq.prompt_token_ids, seq.params) for seq in seqs)


# ---- preemption --------------------------------------------------------------------------------------------------


class Stepper:
    """Drives a scheduler one step at a time with the fake model, checking every step."""

    def __init__(self, sched, seqs):
        self.sched, self.seqs, self.model = sched, seqs, FakeModel(sched.block_manager)
        for seq in seqs:
            sched.add(seq)

    def step(self):
        running_before = [s for s in self.seqs if s.status is SequenceStatus.RUNNING]
        out = self.sched.schedule()
        check_step(self.sched, out, self.seqs, running_before)
        self.sched.postprocess(out, self.model.run(out.scheduled))
        return out

    def finish_all(self):
        while self.sched.has_unfinished():
            self.step()
        for seq in self.seqs:
            assert seq.output_token_ids == reference_output(seq.prompt_token_ids, seq.params)


def test_preemption_takes_the_newest_running_sequence():
    # 6 blocks of 4 tokens, all used by the prompts; a and b need a new block in step 2, c does not.
    sched = make_scheduler(num_blocks=6, block_size=4, **GREEDY)
    a, b = make_seq(0, [20] * 8, max_new_tokens=4), make_seq(1, [21] * 8, max_new_tokens=4)
    c = make_seq(2, [22] * 5, max_new_tokens=4)
    run = Stepper(sched, [a, b, c])
    assert [i.num_new_tokens for i in run.step().scheduled] == [8, 8, 5]
    second = run.step()
    assert second.preempted == [c]
    assert [(i.seq, i.start_position) for i in second.scheduled] == [(a, 8), (b, 8)]
    assert c.status is SequenceStatus.WAITING and c.num_computed_tokens == 0 and c.block_table == []
    assert c.num_preemptions == 1 and sched.num_preemptions == 1
    assert c.output_token_ids == reference_output(c.prompt_token_ids, c.params)[:1]  # kept, not re-sampled
    run.finish_all()
    assert c.num_preemptions == 1


def test_a_sequence_preempts_itself_when_only_older_ones_hold_blocks():
    # 4 blocks of 4 tokens. In step 2 a (7 tokens) decodes into its own block but b (8 tokens) needs a
    # third block: the only other holder is a, which is older, so b yields.
    sched = make_scheduler(num_blocks=4, block_size=4, **GREEDY)
    a, b = make_seq(0, [20] * 7, max_new_tokens=3), make_seq(1, [21] * 8, max_new_tokens=3)
    run = Stepper(sched, [a, b])
    run.step()
    second = run.step()
    assert second.preempted == [b] and [i.seq for i in second.scheduled] == [a]
    # Step 3: a takes b's evicted tail block. b's head block is still cached, but b cannot get the 2 more
    # blocks it needs, so its admission is undone and it keeps waiting, holding nothing.
    third = run.step()
    assert [i.seq for i in third.scheduled] == [a] and a.is_finished
    assert b.status is SequenceStatus.WAITING and b.block_table == [] and b.num_computed_tokens == 0
    # Step 4: b comes back from its cached head block and recomputes positions 4..8 (prompt + 1 generated).
    fourth = run.step()
    assert [(i.seq, i.start_position, i.num_new_tokens) for i in fourth.scheduled] == [(b, 4, 5)]
    assert b.num_cached_prompt_tokens == 0  # the statistic is about the first admission only
    run.finish_all()


def test_a_step_that_preempts_admits_nobody():
    # 4 blocks of 2 tokens, 3 tokens a step. In step 3, b (mid-prefill) yields its 2 blocks to a; b could
    # restart with a 2-token chunk right away, but a step short of blocks must not admit anyone.
    sched = make_scheduler(num_blocks=4, block_size=2, max_num_tokens=3, prefix_caching=False, **GREEDY)
    a, b = make_seq(0, [1] * 3, max_new_tokens=6), make_seq(1, [2] * 3, max_new_tokens=6)
    run = Stepper(sched, [a, b])
    assert [(i.seq, i.num_new_tokens) for i in run.step().scheduled] == [(a, 3)]
    assert [(i.seq, i.num_new_tokens) for i in run.step().scheduled] == [(a, 1), (b, 2)]
    third = run.step()
    assert third.preempted == [b] and [i.seq for i in third.scheduled] == [a]
    assert [(i.seq, i.start_position) for i in run.step().scheduled] == [(a, 5), (b, 0)]
    run.finish_all()


def _workload(seed, n=10):
    rng = random.Random(seed)
    shared = [rng.randrange(VOCAB) for _ in range(9)]
    prompts = [(shared if i % 3 == 0 else []) + [rng.randrange(VOCAB) for _ in range(rng.randrange(1, 14))]
               for i in range(n)]
    params = [dict(max_new_tokens=rng.randrange(1, 16), ignore_eos=rng.random() < 0.5) for _ in range(n)]
    return prompts, params


@pytest.mark.parametrize("prefix_caching", [True, False])
def test_outputs_are_the_same_alone_batched_and_under_preemption(prefix_caching):
    prompts, params = _workload(seed=3)
    eos = (0, 1)

    def outputs(num_blocks, one_at_a_time=False, **kwargs):
        sched = make_scheduler(num_blocks, 4, prefix_caching=prefix_caching, eos_token_ids=eos, **kwargs)
        seqs = [make_seq(i, p, **kw) for i, (p, kw) in enumerate(zip(prompts, params))]
        if one_at_a_time:
            model = FakeModel(sched.block_manager)
            for seq in seqs:
                drive(sched, [seq], model=model)
        else:
            drive(sched, seqs)
        return [s.output_token_ids for s in seqs], [s.finish_reason for s in seqs], sched.num_preemptions

    expected = [reference_output(p, SamplingParams(**kw), eos) for p, kw in zip(prompts, params)]
    alone, _, _ = outputs(64, one_at_a_time=True)
    batched, reasons, batched_preemptions = outputs(64)
    pressured, pressured_reasons, preemptions = outputs(9, max_num_tokens=16, **GREEDY)
    reserved, reserved_reasons, reserved_preemptions = outputs(9, max_num_tokens=16)
    assert alone == batched == pressured == reserved == expected
    assert pressured_reasons == reserved_reasons == reasons
    assert batched_preemptions == 0 and preemptions > 0 and reserved_preemptions == 0


def test_a_preempted_sequence_recomputes_its_generated_tokens_in_chunks_when_prefill_is_not_chunked():
    # Generated tokens make a preempted sequence longer than a step's budget: it must still come back.
    sched = make_scheduler(num_blocks=8, block_size=2, max_num_tokens=6, chunked_prefill=False,
                           prefix_caching=False, **GREEDY)
    seqs = [make_seq(i, [3 + i] * 5, max_new_tokens=10, ignore_eos=True) for i in range(2)]
    outs, _ = drive(sched, seqs)
    assert sched.num_preemptions > 0
    for seq in seqs:
        assert seq.output_token_ids == reference_output(seq.prompt_token_ids, seq.params)
    chunked_restarts = [item for out in outs for item in out.scheduled
                        if item.start_position == 0 and not item.samples]
    assert chunked_restarts, "no resumption was longer than the budget"


# ---- prefix caching ---------------------------------------------------------------------------------------------


def test_a_second_request_with_the_same_prompt_reuses_three_blocks():
    sched = make_scheduler(num_blocks=32, block_size=16)
    prompt = [(5 * i) % VOCAB for i in range(50)]
    first = make_seq(0, prompt, max_new_tokens=20, ignore_eos=True)
    model = FakeModel(sched.block_manager)
    sched.add(first)
    out = sched.schedule()
    sched.postprocess(out, model.run(out.scheduled))  # first's prompt is computed, it keeps running

    second = make_seq(1, prompt, max_new_tokens=20, ignore_eos=True)
    sched.add(second)
    out = sched.schedule()
    assert [(i.seq, i.start_position, i.num_new_tokens) for i in out.scheduled] == [(first, 50, 1), (second, 48, 2)]
    assert second.num_cached_prompt_tokens == 48
    assert second.block_table[:3] == first.block_table[:3]
    assert [sched.block_manager.ref_count(b) for b in second.block_table] == [2, 2, 2, 1]
    sched.postprocess(out, model.run(out.scheduled))
    while sched.has_unfinished():
        out = sched.schedule()
        check_step(sched, out, [first, second], [first, second])
        sched.postprocess(out, model.run(out.scheduled))
    assert second.output_token_ids == first.output_token_ids == reference_output(prompt, first.params)
    assert sched.block_manager.num_free_blocks == 32

    # The blocks stay cached after both finished: a third request still hits them.
    third = make_seq(2, prompt + [1, 2, 3], max_new_tokens=2)
    drive(sched, [third], model=model)
    assert third.num_cached_prompt_tokens == 48


def test_requests_admitted_in_the_same_step_do_not_hit_each_other():
    sched = make_scheduler(num_blocks=32, block_size=4)
    prompt = list(range(20))
    a, b = make_seq(0, prompt, max_new_tokens=2), make_seq(1, prompt, max_new_tokens=2)
    drive(sched, [a, b])
    assert a.num_cached_prompt_tokens == b.num_cached_prompt_tokens == 0  # a's KV was not computed yet
    assert a.output_token_ids == b.output_token_ids


# ---- errors and limits -------------------------------------------------------------------------------------------


def test_prompts_that_can_never_run_error_while_others_proceed():
    sched = make_scheduler(num_blocks=8, block_size=4, max_model_len=40)
    too_long = make_seq(0, range(40), max_new_tokens=4)
    bigger_than_cache = make_seq(1, range(33), max_new_tokens=4)
    empty = make_seq(2, [], max_new_tokens=4)
    fine = make_seq(3, range(6), max_new_tokens=4, ignore_eos=True)
    for seq in (too_long, bigger_than_cache, empty, fine):
        sched.add(seq)
    assert sched.has_unfinished() and sched.num_waiting == 1
    out = sched.schedule()
    assert out.errored == [too_long, bigger_than_cache, empty]
    assert all(s.finish_reason is FinishReason.ERROR and s.is_finished for s in out.errored)
    assert "40 tokens" in too_long.error and "at most 39" in too_long.error and "--max-seq-len" in too_long.error
    assert "33 tokens" in bigger_than_cache.error and "holds only 32 tokens" in bigger_than_cache.error
    assert "empty" in empty.error
    assert [i.seq for i in out.scheduled] == [fine]
    model = FakeModel(sched.block_manager)
    sched.postprocess(out, model.run(out.scheduled))
    while sched.has_unfinished():
        out = sched.schedule()
        assert out.errored == []
        sched.postprocess(out, model.run(out.scheduled))
    assert fine.output_token_ids == reference_output(range(6), fine.params)


def test_max_new_tokens_is_clipped_at_max_model_len():
    sched = make_scheduler(max_model_len=16)
    seq = make_seq(0, range(10), max_new_tokens=100, ignore_eos=True)
    drive(sched, [seq])
    assert len(seq.output_token_ids) == 6 and seq.num_tokens == 16
    assert seq.finish_reason is FinishReason.LENGTH


def test_max_new_tokens_is_clipped_to_what_the_kv_cache_holds():
    # 3 blocks of 4 tokens hold 12 positions: a 5-token prompt can grow to 13 tokens (the last is never computed).
    sched = make_scheduler(num_blocks=3, block_size=4, max_model_len=100)
    seq = make_seq(0, range(5), max_new_tokens=50, ignore_eos=True)
    drive(sched, [seq])
    assert len(seq.output_token_ids) == 8
    assert seq.finish_reason is FinishReason.LENGTH


class ScriptedModel:
    """Samples a fixed script of tokens per sequence, to drive the stop conditions exactly."""

    def __init__(self, scripts):
        self.scripts = scripts

    def run(self, batch):
        return {i.seq: self.scripts[i.seq.seq_id][len(i.seq.output_token_ids)] for i in batch if i.samples}


def run_scripted(sched, seqs, scripts):
    model = ScriptedModel(scripts)
    for seq in seqs:
        sched.add(seq)
    finished_order = []
    while sched.has_unfinished():
        out = sched.schedule()
        finished_order += sched.postprocess(out, model.run(out.scheduled))
    return finished_order


def test_eos_stop_token_ids_and_ignore_eos():
    sched = make_scheduler(eos_token_ids=(2, 3))
    script = [5, 6, 3, 7, 8, 9, 10, 11]
    plain = make_seq(0, [1], max_new_tokens=8)
    ignoring = make_seq(1, [1], max_new_tokens=6, ignore_eos=True)
    stopping = make_seq(2, [1], max_new_tokens=8, stop_token_ids=(6,))
    stop_after_eos = make_seq(3, [1], max_new_tokens=8, ignore_eos=True, stop_token_ids=(8,))
    finished = run_scripted(sched, [plain, ignoring, stopping, stop_after_eos], [script] * 4)
    assert plain.output_token_ids == [5, 6, 3] and plain.finish_reason is FinishReason.EOS
    assert ignoring.output_token_ids == script[:6] and ignoring.finish_reason is FinishReason.LENGTH
    assert stopping.output_token_ids == [5, 6] and stopping.finish_reason is FinishReason.STOP
    assert stop_after_eos.output_token_ids == [5, 6, 3, 7, 8] and stop_after_eos.finish_reason is FinishReason.STOP
    assert finished == [stopping, plain, stop_after_eos, ignoring]


def test_finish_from_the_engine_frees_blocks_and_is_idempotent():
    sched = make_scheduler(num_blocks=16, block_size=4, max_num_seqs=1)
    running = make_seq(0, range(10), max_new_tokens=10)
    waiting = make_seq(1, range(10), max_new_tokens=10)
    model = FakeModel(sched.block_manager)
    sched.add(running)
    sched.add(waiting)
    out = sched.schedule()
    assert [i.seq for i in out.scheduled] == [running]
    sampled = model.run(out.scheduled)
    sched.finish(running, FinishReason.STOP)  # e.g. an abort between schedule and postprocess
    assert sched.postprocess(out, sampled) == []  # its result is dropped
    assert running.finish_reason is FinishReason.STOP and running.block_table == []
    assert sched.block_manager.num_free_blocks == 16 and sched.num_running == 0
    sched.finish(running, FinishReason.LENGTH)
    assert running.finish_reason is FinishReason.STOP
    sched.finish(waiting, FinishReason.STOP)
    assert sched.num_waiting == 0 and not sched.has_unfinished()


# ---- scheduling ahead ----------------------------------------------------------------------------------------


def _decoding(sched, prompts, **params):
    """Sequences added, prefilled and postprocessed once: each has one output token and decodes next."""
    seqs = [make_seq(i, p, **params) for i, p in enumerate(prompts)]
    for seq in seqs:
        sched.add(seq)
    out = sched.schedule()
    sched.postprocess(out.scheduled, {item.seq: 1 for item in out.scheduled})
    return seqs


def test_schedule_ahead_continues_every_sequence_one_position_further():
    sched = make_scheduler(num_blocks=16, block_size=4)
    seqs = _decoding(sched, [[1, 2, 3], [4, 5, 6, 7, 8, 9, 10]], max_new_tokens=10)
    step = sched.schedule().scheduled  # positions 3 and 7: the second sequence's block 1 is now full
    ahead = sched.schedule_ahead(step)
    assert [(item.seq, item.start_position, item.num_new_tokens, item.samples) for item in ahead.scheduled] == \
        [(seqs[0], 4, 1, True), (seqs[1], 8, 1, True)]
    assert [len(seq.block_table) for seq in seqs] == [2, 3]  # room for positions 4 and 8, allocated now
    sched.postprocess(step, {seqs[0]: 5, seqs[1]: 6})
    sched.postprocess(ahead.scheduled, {seqs[0]: 7, seqs[1]: 8})  # the ahead step applies like any other
    assert [seq.output_token_ids for seq in seqs] == [[1, 5, 7], [1, 6, 8]]


def test_schedule_ahead_drops_a_sequence_that_ends_by_length():
    sched = make_scheduler()
    seqs = [make_seq(0, [1, 2], max_new_tokens=2), make_seq(1, [3, 4], max_new_tokens=5)]
    for seq in seqs:
        sched.add(seq)
    out = sched.schedule()
    sched.postprocess(out.scheduled, {item.seq: 1 for item in out.scheduled})
    ahead = sched.schedule_ahead(sched.schedule().scheduled)
    assert [item.seq for item in ahead.scheduled] == [seqs[1]]  # seqs[0] gets its 2nd and last token now


def test_schedule_ahead_waits_when_a_request_could_be_admitted_or_a_chunk_ran():
    sched = make_scheduler(max_num_seqs=2)
    _decoding(sched, [[1, 2, 3]], max_new_tokens=10)
    step = sched.schedule().scheduled
    sched.add(make_seq(5, [9, 9]))  # arrives while the step runs; a seat is free: schedule() admits it next
    assert sched.schedule_ahead(step) is None
    # Seats full: the waiting request cannot run next step anyway, so the step is scheduled ahead...
    full = make_scheduler(max_num_seqs=1)
    _decoding(full, [[1, 2, 3]], max_new_tokens=10)
    step = full.schedule().scheduled
    full.add(make_seq(5, [9, 9]))
    assert full.schedule_ahead(step) is not None
    # ...unless the running sequence ends by length in this step and frees its seat.
    ending = make_scheduler(max_num_seqs=1)
    _decoding(ending, [[1, 2, 3]], max_new_tokens=2)
    step = ending.schedule().scheduled
    ending.add(make_seq(5, [9, 9]))
    assert ending.schedule_ahead(step) is None
    # A prompt chunk that does not reach the end of its prompt samples nothing to continue from.
    chunked = make_scheduler(max_num_tokens=4)
    chunked.add(make_seq(0, list(range(10))))
    assert chunked.schedule_ahead(chunked.schedule().scheduled) is None


def test_schedule_ahead_never_preempts():
    sched = make_scheduler(num_blocks=2, block_size=4)
    seqs = _decoding(sched, [[1, 2, 3, 4, 5, 6, 7]], max_new_tokens=20)
    step = sched.schedule().scheduled  # position 7 fills block 1; position 8 would need a third block
    assert sched.schedule_ahead(step) is None
    assert sched.num_preemptions == 0 and len(seqs[0].block_table) == 2


def test_postprocess_rejects_missing_or_unexpected_samples():
    sched = make_scheduler(max_num_tokens=4)
    seq = make_seq(0, range(6), max_new_tokens=3)
    sched.add(seq)
    out = sched.schedule()  # a 4-token chunk of 6: nothing to sample
    with pytest.raises(ValueError, match="sample exactly when"):
        sched.postprocess(out, {seq: 1})
    assert seq.num_computed_tokens == 0  # nothing was applied
    sched.postprocess(out, {})
    out = sched.schedule()
    with pytest.raises(ValueError, match="sample exactly when"):
        sched.postprocess(out, {})


def test_bad_construction_and_double_add():
    bm = BlockManager(8, 4)
    with pytest.raises(LlmxError, match="admission policy 'fifo'"):
        Scheduler(bm, max_num_seqs=4, max_num_tokens=16, max_model_len=64, block_size=4, admission="fifo")
    with pytest.raises(LlmxError, match="watermark"):
        Scheduler(bm, max_num_seqs=4, max_num_tokens=16, max_model_len=64, block_size=4, watermark=1.5)
    with pytest.raises(LlmxError, match="block_size"):
        Scheduler(bm, max_num_seqs=4, max_num_tokens=16, max_model_len=64, block_size=8)
    with pytest.raises(LlmxError, match="max_num_tokens"):
        Scheduler(bm, max_num_seqs=4, max_num_tokens=0, max_model_len=64, block_size=4)
    sched = Scheduler(bm, max_num_seqs=4, max_num_tokens=16, max_model_len=64, block_size=4)
    seq = make_seq(0, [1, 2])
    sched.add(seq)
    with pytest.raises(ValueError, match="already added"):
        sched.add(seq)


# ---- everything at once ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("admission", ["reserve", "watermark"])
@pytest.mark.parametrize("ahead", [False, True], ids=["in-step", "ahead"])
@pytest.mark.parametrize("seed", range(6))
def test_random_traffic_under_pressure_loses_nothing_and_matches_the_reference(seed, ahead, admission):
    rng = random.Random(100 + seed)
    block_size = rng.choice([2, 4, 8])
    max_model_len = 48
    num_blocks = rng.randrange(max_model_len // block_size + 1, 3 * max_model_len // block_size)
    chunked = rng.random() < 0.7
    sched = make_scheduler(num_blocks, block_size, max_num_seqs=rng.randrange(1, 8),
                           max_num_tokens=rng.randrange(20 if not chunked else 1, 40), max_model_len=max_model_len,
                           eos_token_ids=(0,), chunked_prefill=chunked, prefix_caching=rng.random() < 0.8,
                           admission=admission, watermark=rng.choice([0.0, 0.1]))
    prefixes = [[rng.randrange(VOCAB) for _ in range(rng.randrange(3, 20))] for _ in range(3)]
    seqs, arrivals = [], {}
    for i in range(24):
        prompt = rng.choice(prefixes + [[]]) + [rng.randrange(VOCAB) for _ in range(rng.randrange(1, 12))]
        seq = make_seq(i, prompt, max_new_tokens=rng.randrange(1, 30), ignore_eos=rng.random() < 0.7)
        seqs.append(seq)
        arrivals.setdefault(rng.randrange(40) if i else 0, []).append(seq)
    arrivals = {step: sorted(batch, key=lambda s: s.seq_id) for step, batch in arrivals.items()}
    # Arrival order must follow seq_id for check_step's FCFS test: renumber in arrival order.
    ordered = [s for step in sorted(arrivals) for s in arrivals[step]]
    for new_id, seq in enumerate(ordered):
        seq.seq_id = new_id
    seqs.sort(key=lambda s: s.seq_id)
    if ahead:
        _, model, ahead_steps = drive_ahead(sched, seqs, arrivals)
        assert ahead_steps > 0
    else:
        _, model = drive(sched, seqs, arrivals)
    assert sum(s.num_preemptions for s in seqs) == sched.num_preemptions
    for seq in seqs:
        limit = max_model_len - seq.num_prompt_tokens
        if not chunked and seq.num_prompt_tokens > sched.max_num_tokens:
            assert seq.finish_reason is FinishReason.ERROR
            continue
        assert seq.is_finished and seq.finish_reason is not FinishReason.ERROR
        assert seq.output_token_ids == reference_output(seq.prompt_token_ids, seq.params, (0,), limit)
        # Positions run in order, restarting (from a cached prefix) only after a preemption, and end just
        # before the last token, which is sampled and never computed; except that, scheduled ahead, a
        # sequence ending on an EOS may have run one step for nothing.
        positions = model.positions[seq.seq_id]
        last = {seq.num_tokens - 2}
        if ahead and seq.finish_reason is not FinishReason.LENGTH:
            last.add(seq.num_tokens - 1)
        assert positions[0] == seq.num_cached_prompt_tokens and positions[-1] in last
        restarts = sum(1 for p, q in zip(positions, positions[1:]) if q != p + 1)
        if sched.block_manager.enable_prefix_caching:
            assert restarts <= seq.num_preemptions  # a resumption may hit all it had computed
        else:
            assert restarts == seq.num_preemptions
