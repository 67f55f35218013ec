"""The pipeline's parts of a recipe (model, eval.datasets, bench.scenarios): shipped recipes are complete and
plan cleanly, and mistakes inside the lists are refused naming the dotted field."""

from __future__ import annotations

import textwrap

import pytest

from llmx.common.errors import LlmxError
from llmx.formats.presets import fp8_algos
from llmx.recipes import load_recipe, shipped_recipes
from llmx.recipes.schema import TARGETS

GPU_WORKLOADS = {(128, 128), (2048, 128)}


def write(tmp_path, body: str, name: str = "recipe.yaml"):
    path = tmp_path / name
    path.write_text(textwrap.dedent(body))
    return path


def refused(path) -> str:
    with pytest.raises(LlmxError) as info:
        load_recipe(path)
    assert "\n" not in info.value.message
    return info.value.message


@pytest.mark.parametrize("name", shipped_recipes())
def test_shipped_recipes_have_the_complete_form(name):
    recipe, _ = load_recipe(name)
    target = TARGETS[recipe.target]
    assert recipe.model.source is None  # users pass --model
    assert recipe.eval.datasets and recipe.bench.scenarios
    for dataset in recipe.eval.datasets:
        assert dataset.baseline is None
        if target.device == "cpu":
            assert dataset.max_perplexity is not None
    workloads = {(s.isl, s.osl) for s in recipe.bench.scenarios}
    gated = [s for s in recipe.bench.scenarios
             if s.min_output_tok_s is not None or s.max_tpot_ms is not None or s.max_ttft_ms is not None]
    assert gated == list(recipe.bench.scenarios)  # every scenario has a threshold
    if target.device == "cuda":
        assert GPU_WORKLOADS <= workloads
        assert recipe.eval.max_increase is not None and recipe.quantize.calib_data == "calib.txt"
    if recipe.target == "a100":
        assert recipe.quantize.algo in ("int4_awq", "int8_sq") and recipe.quantize.kv_cache_dtype != "fp8"
    if recipe.target in ("h100", "h200"):
        assert recipe.quantize.algo in fp8_algos() and recipe.quantize.kv_cache_dtype == "fp8"


@pytest.mark.parametrize("name", shipped_recipes())
def test_shipped_recipes_plan_with_their_data_in_the_current_directory(name, tmp_path, monkeypatch):
    from llmx.cli.pipeline import stage_defaults
    from llmx.pipeline.plan import make_plan

    model = tmp_path / "model"
    model.mkdir()
    (tmp_path / "calib.txt").write_text("calibration text")
    (tmp_path / "heldout.txt").write_text("held-out text")
    monkeypatch.chdir(tmp_path)
    plan = make_plan(name, defaults=stage_defaults(), model=model)
    assert plan.build["device"] == TARGETS[plan.target].device
    assert plan.datasets[0].data == tmp_path / "heldout.txt"
    assert all(s.isl + s.osl <= plan.build["max_seq_len"] for s in plan.scenarios)
    if plan.target != "cpu":
        assert plan.quantize["calib_data"] == str(tmp_path / "calib.txt")
        assert plan.datasets[0].needs_reference  # the increase is gated against the unquantized engine


@pytest.mark.parametrize("body, fragment", [
    ("bench:\n  scenarios:\n    - {name: a, isll: 16, isl: 16, osl: 4, num_requests: 2}\n",
     "unknown key `bench.scenarios.0.isll`; allowed: name, isl, osl, num_requests, concurrency, request_rate,"),
    ("eval:\n  datasets:\n    - {name: a, data: a.txt}\n    - {name: b, data: b.txt, maxincrease: 1}\n",
     "unknown key `eval.datasets.1.maxincrease`; allowed: name, data, seq_len, windows, max_increase,"),
    ("model: {sources: ./hf}\n", "unknown key `model.sources`; allowed: source, dummy_weights."),
    ("bench:\n  scenarios:\n    - {name: a, osl: 4, num_requests: 2}\n", "`bench.scenarios.0.isl` is required"),
    ("bench:\n  scenarios:\n    - {name: a b, isl: 4, osl: 4, num_requests: 2}\n",
     "`bench.scenarios.0.name`: String should match pattern"),
    ("eval:\n  datasets:\n    - {name: a, data: a.txt, max_increase: -1}\n",
     "`eval.datasets.0.max_increase`: Input should be greater than or equal to 0"),
    ("eval:\n  datasets: {name: a, data: a.txt}\n", "`eval.datasets`: Input should be a valid list"),
    ("eval:\n  datasets:\n    - {name: a, data: a.txt}\n    - {name: a, data: b.txt}\n",
     "`eval.datasets.1.name` 'a' is used twice"),
    ("bench:\n  scenarios:\n    - {name: a, isl: 4, osl: 4, num_requests: 2, concurrency: 2, request_rate: 1.0}\n",
     "`bench.scenarios.0` sets both concurrency and request_rate"),
])
def test_mistakes_inside_the_pipeline_lists_name_the_dotted_field(tmp_path, body, fragment):
    path = write(tmp_path, "family: llama\ntarget: cpu\n" + body)
    message = refused(path)
    assert message.startswith(f"{path}: ")
    assert fragment in message


def test_impossible_combinations_stay_refused_with_the_new_sections(tmp_path):
    body = """
        family: qwen3
        target: a100
        quantize: {algo: fp8, calib_data: calib.txt}
        eval:
          datasets: [{name: heldout, data: heldout.txt, max_increase: 1.0}]
    """
    assert "`quantize.algo` fp8: fp8 needs FP8 support" in refused(write(tmp_path, body))
    assert "`build.device` cuda: target cpu runs engines on cpu" in refused(
        write(tmp_path, "family: llama\ntarget: cpu\nbuild: {device: cuda, tp: 2, pp: 2}\n", "b.yaml"))
    load_recipe(write(tmp_path, "family: llama\ntarget: cpu\nbuild: {device: cpu, tp: 2, pp: 2}\n", "c.yaml"))


def test_commands_see_only_their_own_flags(tmp_path):
    path = write(tmp_path, """
        family: llama
        target: cpu
        model: {source: hf}
        eval:
          seq_len: 64
          datasets: [{name: a, data: a.txt}]
        bench:
          isl: 8
          scenarios: [{name: s, isl: 8, osl: 2, num_requests: 1}]
    """)
    recipe, _ = load_recipe(path)
    assert recipe.section("eval") == {"seq_len": 64}
    assert recipe.section("bench") == {"isl": 8}
    assert recipe.eval.datasets[0].name == "a" and recipe.bench.scenarios[0].osl == 2
