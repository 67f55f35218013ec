"""llmx.bench.steps and measurements/step_breakdown.py: steps classified by type and timed from their tokens'
return, the synthetic step of a type's median shape, and a whole run on a tiny CPU engine (step types, op groups,
JSON)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from llmx.runtime.model_runner import WorkItem
from llmx.runtime.sequence import SamplingParams

SCRIPTS = Path(__file__).resolve().parents[2] / "measurements"


@pytest.fixture(scope="module")
def breakdown():
    from llmx.bench import steps

    return steps


class Clock:
    def __init__(self):
        self.now = 0.0

    def __call__(self):
        return self.now


class Runner:
    """A runner that cannot queue steps: each execute takes `cost(work)` seconds on the clock."""

    can_launch = False

    def __init__(self, clock, cost):
        self.clock, self.cost = clock, cost

    def execute(self, work):
        self.clock.now += self.cost(work)
        return {w.seq_id: 1 for w in work if w.sample}


def item(seq_id, tokens, start, sample=True):
    return WorkItem(seq_id, [5] * tokens, start, [0], sample, SamplingParams())


def test_steps_are_typed_by_their_rows_and_timed_between_returns(breakdown):
    clock = Clock()
    runner = Runner(clock, cost=lambda work: 0.001 * sum(len(w.tokens) for w in work))
    recorder = breakdown.StepRecorder(runner, clock=clock)
    runner.execute([item(0, 64, 0, sample=False), item(1, 30, 0)])  # a chunk and a whole prompt: prefill
    runner.execute([item(0, 16, 64), item(1, 1, 30)])  # the rest of a prompt and a decode row: mixed
    clock.now += 0.5  # the host idles the device between two steps: counted in the next step
    runner.execute([item(0, 1, 80), item(1, 1, 31)])  # decode
    runner.execute([item(0, 1, 81), item(1, 1, 32)])  # decode
    assert [s.kind for s in recorder.steps] == ["prefill", "mixed", "decode", "decode"]
    summary = breakdown.summarize(recorder.steps)
    assert summary["prefill"]["steps"] == 1 and summary["prefill"]["seconds"] == pytest.approx(0.094)
    assert summary["prefill"]["median_prompt_chunks"] == 2
    assert summary["mixed"]["median_decode_rows"] == 1 and summary["mixed"]["median_prompt_tokens"] == 16
    assert summary["mixed"]["median_decode_kv_len"] == 31
    assert summary["decode"]["steps"] == 2 and summary["decode"]["seconds"] == pytest.approx(0.504)
    assert summary["decode"]["median_decode_kv_len"] == pytest.approx(57.0)  # means 56.5 and 57.5
    assert sum(s["share"] for s in summary.values()) == pytest.approx(1.0)
    assert summary["decode"]["tokens_per_s"] == pytest.approx(4 / 0.504)


def test_the_synthetic_step_has_the_median_shape_on_distinct_blocks(breakdown):
    shape = {"median_decode_rows": 3, "median_decode_kv_len": 40, "median_prompt_tokens": 50,
             "median_prompt_chunks": 4}
    work = breakdown.synthetic_step(shape, block_size=16, num_blocks=1000)
    decode, prompts = work[:3], work[3:]
    assert all(len(w.tokens) == 1 and w.start == 39 and len(w.block_table) == 3 for w in decode)
    assert [len(w.tokens) for w in prompts] == [13, 13, 12, 12]
    tables = [b for w in work for b in w.block_table]
    assert len(tables) == len(set(tables)) == 3 * 3 + 4 * 1
    wrapped = breakdown.synthetic_step(shape, block_size=16, num_blocks=5)
    assert max(b for w in wrapped for b in w.block_table) < 5


def test_kernel_and_op_names_fall_into_groups(breakdown):
    assert breakdown.group_of("sm90_xmma_gemm_e4m3bf16_e4m3f32_f32_tn_n_tilesize128x128x128") == "gemm"
    assert breakdown.group_of("_decode_kernel") == "attention"
    assert breakdown.group_of("_rms_norm_kernel") == "norm"
    assert breakdown.group_of("aten::addmm") == "gemm"
    assert breakdown.group_of("aten::bmm") == "attention"
    assert breakdown.group_of("aten::argmax") == "sampling"
    assert breakdown.group_of("cudaStreamSynchronize_something") == "other"


def test_a_cell_is_written_isl_osl_requests_then_max_batch_and_admission(breakdown):
    assert breakdown.parse_cell("2048/128/512") == {"isl": 2048, "osl": 128, "num_requests": 512, "max_batch": None,
                                                    "admission": "reserve", "watermark": None}
    assert breakdown.parse_cell("128/128/4096/1024:watermark") == {
        "isl": 128, "osl": 128, "num_requests": 4096, "max_batch": 1024, "admission": "watermark", "watermark": None}
    assert breakdown.parse_cell("1/2/3:watermark=0")["watermark"] == 0.0
    assert breakdown.parse_cell("1/2/3/4:watermark=.05")["watermark"] == 0.05
    for bad in ("128/128", "128/0/5", "1/1/1/0", "1/1/1:fifo", "a/b/c", "1/1/1:reserve=0.1", "1/1/1:watermark=2"):
        with pytest.raises(ValueError, match="ISL/OSL/REQUESTS"):
            breakdown.parse_cell(bad)


@pytest.mark.slow
def test_the_script_breaks_cpu_cells_down_by_step_type_and_op_group(tmp_path):
    from helpers.tiny_models import make_tiny_hf_model
    from llmx.ingest.convert import convert
    from llmx.build.engine import build_engine
    from llmx.formats.config import BuildConfig

    hf = make_tiny_hf_model("llama", tmp_path / "hf", dtype=torch.float32)
    ckpt = convert(hf, tmp_path / "ckpt", dtype="float32")
    engine = build_engine(ckpt, tmp_path / "engine", BuildConfig(max_batch_size=4, max_seq_len=128, max_num_tokens=64,
                                                                 kv_block_size=16, device="cpu")).path
    # 40-token prompts under a 64-token budget: prompt chunks share steps with decodes, then decodes run alone.
    out = tmp_path / "breakdown.json"
    done = subprocess.run([sys.executable, str(SCRIPTS / "step_breakdown.py"), str(engine), "--cell", "40/6/6/3",
                           "--cell", "8/2/2:watermark=0", "--profile-steps", "1", "--json", str(out)],
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(out.read_text())
    assert result["device"] == "cpu" and len(result["cells"]) == 2
    first, second = result["cells"]
    assert "max batch 3, reserve admission" in first["cell"] and "max batch 4, watermark admission (watermark 0.0)" in second["cell"]
    assert set(first["step_types"]) == {"prefill", "mixed", "decode"}
    assert sum(s["steps"] for s in first["step_types"].values()) == first["total_steps"] == len(first["steps"])
    assert max(s["decode_rows"] for s in first["steps"]) <= 3
    assert sum(s["decode_rows"] for s in first["steps"]) == 6 * 5  # the first token of each comes from its prompt
    assert sum(s["prompt_tokens"] for s in first["steps"]) == 6 * 40  # no preemption: each prompt once
    assert sum(s["prompt_tokens"] for s in second["steps"]) == 2 * 8  # not the first cell's steps, nor profiled ones
    for kind, profile in first["profile"].items():
        assert profile["kernel_ms"] > 0 and profile["groups_ms"]["gemm"] > 0, kind
    assert "decode step of the median shape" in done.stdout
    bad = subprocess.run([sys.executable, str(SCRIPTS / "step_breakdown.py"), str(engine), "--cell", "4/2/1/9"],
                         capture_output=True, text=True, timeout=300)
    assert bad.returncode == 2 and "exceeds the engine's max batch size 4" in bad.stderr
