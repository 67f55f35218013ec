"""llmx's own regression job (ci/smollm2-cpu.yaml): the recipe plans, and its committed baselines still describe
the workload it runs, so a change to one without the other fails here in seconds instead of in the job."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
RECIPE = REPO / "ci" / "smollm2-cpu.yaml"
CORPUS = REPO.parent / "shared" / "data" / "corpus"

pytestmark = pytest.mark.skipif(not CORPUS.is_dir(), reason=f"the shared corpus is not at {CORPUS}")


@pytest.fixture(scope="module")
def plan(tmp_path_factory):
    from llmx.cli.pipeline import stage_defaults
    from llmx.pipeline.plan import make_plan

    model = tmp_path_factory.mktemp("smollm2")  # planning only checks that the model folder exists
    return make_plan(str(RECIPE), defaults=stage_defaults(), model=model)


def test_the_ci_recipe_calibrates_and_gates_every_stage(plan):
    assert plan.quantize["algo"] == "int8_sq" and Path(plan.quantize["calib_data"]).is_file()
    assert {d.name for d in plan.datasets} == {"persuasion", "emma"}
    assert all(d.max_increase is not None for d in plan.datasets)
    assert any(d.baseline is not None for d in plan.datasets) and any(d.needs_reference for d in plan.datasets)
    assert [s.name for s in plan.scenarios] == ["short"] and plan.scenarios[0].baseline is not None


def test_eval_baselines_match_the_text_and_windows(plan):
    from llmx.common.hashing import hash_files

    for dataset in plan.datasets:
        if dataset.baseline is None:
            continue
        baseline = json.loads(dataset.baseline.read_text())
        assert baseline["schema"] == "llmx-eval/1"
        assert baseline["data_hash"] == hash_files([dataset.data])
        assert (baseline["seq_len"], baseline["num_windows"]) == (dataset.seq_len, dataset.windows)
        assert baseline["num_tokens"] == dataset.windows * (dataset.seq_len - 1)


def test_bench_baselines_match_the_workload(plan):
    from llmx.bench.regression import WORKLOAD_KEYS

    for scenario in plan.scenarios:
        baseline = json.loads(scenario.baseline.read_text())
        assert baseline["schema"] == "llmx-bench/1"
        expected = {"isl": scenario.isl, "osl": scenario.osl, "num_requests": scenario.num_requests,
                    "concurrency": scenario.concurrency, "request_rate": scenario.request_rate,
                    "dataset_hash": None, "seed": scenario.seed}
        assert {k: baseline["config"].get(k) for k in WORKLOAD_KEYS} == expected
        assert baseline["engine"]["quantization"]["algo"] == plan.quantize["algo"]
        for metric in scenario.baseline_metrics:
            assert baseline["metrics"][metric] > 0
