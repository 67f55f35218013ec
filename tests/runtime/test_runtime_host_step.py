"""The host side of a step: step tensors built by whole-batch operations equal the per-token definition,
WorkItems and ScheduledSeqs hold what the step needs, the scheduler reports admissions, and the
host-overhead benchmark runs."""

from __future__ import annotations

import copy
import json
import pickle
import random
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from llmx.runtime.block_manager import BlockManager
from llmx.formats.config import BuildConfig
from llmx.runtime.engine import LLM
from llmx.runtime.model_runner import StepInputsBuilder, WorkItem
from llmx.runtime.scheduler import ScheduledSeq, Scheduler
from llmx.runtime.sequence import SamplingParams, Sequence

GREEDY = SamplingParams(max_new_tokens=4)


def reference_inputs(work: list[WorkItem], block_size: int) -> dict:
    """The step tensors token by token, from their definition (docs/ARCHITECTURE.md, Runtime)."""
    ids, positions, slots, seq_lens, starts, rows = [], [], [], [], [0], []
    for w in work:
        for i, token in enumerate(w.tokens):
            p = w.start + i
            ids.append(token)
            positions.append(p)
            slots.append(w.block_table[p // block_size] * block_size + p % block_size)
        seq_lens.append(w.start + len(w.tokens))
        starts.append(starts[-1] + len(w.tokens))
        if w.sample:
            rows.append(starts[-1] - 1)
    width = max(len(w.block_table) for w in work)
    tables = [w.block_table + [0] * (width - len(w.block_table)) for w in work]
    return {"input_ids": (ids, torch.int64), "positions": (positions, torch.int64),
            "slot_mapping": (slots, torch.int64), "block_tables": (tables, torch.int32),
            "seq_lens": (seq_lens, torch.int32), "query_start_loc": (starts, torch.int32),
            "logits_rows": (rows, torch.int64), "max_query_len": max(len(w.tokens) for w in work),
            "max_seq_len": max(seq_lens)}


def random_work(rng: random.Random, block_size: int, decode_only: bool) -> list[WorkItem]:
    work = []
    for seq_id in range(rng.randrange(1, 12)):
        start = rng.randrange(0, 90)
        n = 1 if decode_only else rng.choice([1, 1, rng.randrange(1, 40)])
        blocks = -(-(start + n) // block_size) + rng.randrange(0, 3)  # tables may run past the step
        table = rng.sample(range(500), blocks)
        work.append(WorkItem(seq_id, [rng.randrange(1000) for _ in range(n)], start, table, rng.random() < 0.7,
                             GREEDY))
    return work


def check_inputs(inputs, work, block_size):
    expected = reference_inputs(work, block_size)
    tensors = {"input_ids": inputs.input_ids, "positions": inputs.positions, "logits_rows": inputs.logits_rows,
               **{k: getattr(inputs.meta, k) for k in ("slot_mapping", "block_tables", "seq_lens", "query_start_loc")}}
    lens = [len(item.tokens) for item in work]
    leading = next((i for i, n in enumerate(lens) if n != 1), len(lens))  # one-token sequences at the front
    assert inputs.meta.num_leading_decodes == leading
    for name, tensor in tensors.items():
        values, dtype = expected[name]
        assert tensor.dtype == dtype, name
        assert tensor.cpu().tolist() == values, name
    assert inputs.meta.max_query_len == expected["max_query_len"]
    assert inputs.meta.max_seq_len == expected["max_seq_len"]
    assert inputs.sampling == [w for w in work if w.sample]


@pytest.mark.parametrize("decode_only", [True, False])
@pytest.mark.parametrize("block_size", [1, 4, 16])
def test_step_tensors_equal_their_per_token_definition(decode_only, block_size):
    rng = random.Random(block_size * 2 + decode_only)
    builder = StepInputsBuilder(block_size, torch.device("cpu"))
    for _ in range(30):
        work = random_work(rng, block_size, decode_only)
        check_inputs(builder.build(work), work, block_size)


def test_a_block_table_too_short_for_the_step_is_refused():
    builder = StepInputsBuilder(4, torch.device("cpu"))
    with pytest.raises(ValueError, match="sequence 3: its 2 KV blocks hold 8 positions but the step reaches "
                                         "position 8"):
        builder.build([WorkItem(1, [5], 0, [0], True, GREEDY), WorkItem(3, [5, 6], 7, [1, 2], True, GREEDY)])
    with pytest.raises(ValueError, match="at least one"):
        builder.build([])


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (run on the device)")
def test_step_tensors_on_cuda_equal_the_cpu_ones_step_after_step():
    rng = random.Random(5)
    builder = StepInputsBuilder(16, torch.device("cuda"))
    with torch.inference_mode():
        for decode_only in [True, False] * 10:  # the pinned buffers are reused and grown between steps
            work = random_work(rng, 16, decode_only)
            inputs = builder.build(work)
            assert inputs.input_ids.is_cuda and inputs.meta.block_tables.is_cuda
            check_inputs(inputs, work, 16)


def test_token_slice_is_a_slice_of_token_ids():
    seq = Sequence(0, [10, 11, 12, 13], GREEDY, output_token_ids=[20, 21, 22])
    for start in range(9):
        for end in range(start, 10):
            assert seq.token_slice(start, end) == seq.token_ids[start:end], (start, end)


def test_a_work_item_holds_the_step_of_its_sequence():
    seq = Sequence(9, [10, 11, 12, 13], GREEDY, output_token_ids=[20, 21], block_table=[3, 7])
    seq.num_computed_tokens = 3
    item = WorkItem.from_sequence(seq, 3)
    assert item == WorkItem(9, [13, 20, 21], 3, [3, 7], True, GREEDY)
    assert item.block_table is seq.block_table  # read (or pickled for other ranks) before the next schedule
    assert not WorkItem.from_sequence(seq, 2).sample
    assert pickle.loads(pickle.dumps(item)) == item


def test_a_scheduled_entry_keeps_its_positions_after_the_sequence_advances():
    seq = Sequence(4, [1, 2, 3], GREEDY)
    seq.num_computed_tokens = 1
    item = ScheduledSeq(seq, 2)
    assert (item.seq, item.num_new_tokens, item.start_position, item.end_position, item.samples) == (seq, 2, 1, 3, True)
    with pytest.raises(AttributeError):
        item.num_new_tokens = 5
    seq.num_computed_tokens = 3
    seq.output_token_ids.append(9)
    for kept in (copy.copy(item), pickle.loads(pickle.dumps(item))):
        assert (kept.start_position, kept.samples) == (1, True) and kept.seq.seq_id == 4
    assert "seq_id=4" in repr(item)


def test_the_scheduler_reports_the_sequences_it_admits_including_resumed_ones():
    bm = BlockManager(num_blocks=6, block_size=4)
    # "watermark" admission with no watermark admits both and preempts one ("reserve" would admit one).
    sched = Scheduler(bm, max_num_seqs=4, max_num_tokens=64, max_model_len=64, block_size=4, admission="watermark",
                      watermark=0.0)
    first, second = Sequence(0, [1] * 8, SamplingParams(max_new_tokens=30)), Sequence(1, [2] * 8, SamplingParams(
        max_new_tokens=30))
    sched.add(first)
    sched.add(second)
    out = sched.schedule()
    assert out.admitted == [first, second]
    sched.postprocess(out, {first: 5, second: 5})
    admitted, preempted = [], []
    for _ in range(30):
        if not sched.has_unfinished():
            break
        out = sched.schedule()
        admitted += out.admitted
        preempted += out.preempted
        sched.postprocess(out, {item.seq: 5 for item in out.scheduled if item.samples})
    assert preempted == [second] and admitted == [second]  # 6 blocks cannot hold both: second waits, resumes


def test_an_llm_over_a_stand_in_runner_sets_scheduled_time_once():
    class Echo:
        num_blocks, block_size = 64, 4

        def execute(self, work):
            return {w.seq_id: 3 for w in StepInputsBuilder(4, torch.device("cpu")).build(work).sampling}

        def release(self, seq_id):
            pass

    llm = LLM.over_runner(Echo(), BuildConfig(max_batch_size=4, max_seq_len=64, max_num_tokens=16, kv_block_size=4))
    request = llm.add_request([1, 2, 3], SamplingParams(max_new_tokens=3, ignore_eos=True))
    first = llm.step()[0]
    scheduled = first.metrics.scheduled_time
    assert first.request_id == request and scheduled is not None and scheduled <= first.metrics.token_times[0]
    while llm.has_unfinished():
        last = llm.step()
    assert last[0].finished and last[0].output_token_ids == [3, 3, 3] and first.output_token_ids == [3]
    assert first.metrics.scheduled_time == scheduled
    with pytest.raises(Exception, match="LLM.over_runner has no tokenizer"):
        llm.add_request("text needs a tokenizer")


def test_the_host_overhead_benchmark_runs_every_mode():
    from helpers.smollm2 import smollm2_dir

    script = Path(__file__).resolve().parents[2] / "measurements" / "host_overhead.py"
    done = subprocess.run([sys.executable, str(script), "--batch", "6", "--steps", "3", "--tokenizer",
                           str(smollm2_dir()), "--json", "-"], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    results = json.loads(done.stdout)["results"]
    assert [(r["mode"], r["batch"]) for r in results] == [("tokens", 6), ("stream", 6), ("stop", 6)]
    for figures in results:
        pieces = {k: v for k, v in figures.items() if k not in ("mode", "batch")}
        assert set(pieces) == {"total", "schedule+postprocess", "work items", "prepare", "outputs", "read text"}
        assert pieces["total"] > 0 and all(v >= 0 for v in pieces.values())
