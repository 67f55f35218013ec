"""Planning: a recipe becomes each stage's options with paths resolved, and bad recipes are refused naming the field."""

from __future__ import annotations

import json
import os

import pytest

from llmx.cli.pipeline import stage_defaults
from llmx.common.errors import LlmxError
from llmx.pipeline.plan import make_plan


def plan_of(project, recipe, **kwargs):
    kwargs.setdefault("model", project.model)
    return make_plan(str(recipe), defaults=stage_defaults(), workdir=project.workdir, **kwargs)


def refused(project, recipe, **kwargs) -> str:
    with pytest.raises(LlmxError) as info:
        plan_of(project, recipe, **kwargs)
    message = info.value.message
    assert "\n" not in message
    return message


def one_line_cli_error(project, recipe, *extra) -> str:
    code, summary, err = project.run(recipe, *extra)
    assert code == 2 and summary is None
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    return lines[0]


def test_recipe_paths_resolve_against_the_recipe_folder(project, tmp_path):
    sub = tmp_path / "ci"
    sub.mkdir()
    recipe = project.recipe("ci/recipe.yaml", model={"source": os.path.relpath(project.model, sub)},
                            quantize={**project_quantize(), "calib_data": "../calib.txt"},
                            eval={"datasets": [{"name": "heldout", "data": "../heldout.txt", "seq_len": 32}]})
    plan = make_plan(str(recipe), defaults=stage_defaults())  # no --model: model.source is used
    assert plan.model == project.model.resolve() and not plan.model_is_checkpoint
    assert plan.quantize["calib_data"] == str(project.calib.resolve())
    assert plan.datasets[0].data == project.heldout.resolve()
    assert plan.workdir.name == "recipe" and plan.workdir.parent.name == "pipeline"


def project_quantize():
    return {"algo": "int8_sq", "calib_data": "calib.txt", "calib_size": 4, "calib_seq_len": 32, "device": "cpu"}


def test_model_flag_overrides_model_source(project, tmp_path):
    other = tmp_path / "elsewhere"
    other.mkdir()
    plan = plan_of(project, project.recipe(model={"source": "elsewhere"}), model=project.model)
    assert plan.model == project.model.resolve()


def test_missing_model_names_both_ways_to_give_one(project, capsys):
    recipe = project.recipe()
    code, summary, err = project.run(recipe, model=project.root / "nowhere")
    assert code == 2 and "--model" in err and "nowhere is not a directory" in err
    from llmx.cli.main import run_cli

    assert run_cli(["pipeline", "--recipe", str(recipe), "--workdir", str(project.workdir)]) == 2
    message = capsys.readouterr().err.strip()
    assert message == (f"error: no model to run: pass --model PATH (a Hugging Face folder, a hub model ID ORG/NAME or "
                       f"an llmx checkpoint) or set `model.source` in {recipe}.")


def test_unknown_scenario_key_is_refused_naming_the_field_and_the_allowed_keys(project):
    recipe = project.recipe(bench={"scenarios": [{"name": "x", "isll": 16, "isl": 16, "osl": 4, "num_requests": 2}]})
    line = one_line_cli_error(project, recipe)
    assert f"error: {recipe}: unknown key `bench.scenarios.0.isll`; allowed: name, isl, osl, num_requests," in line


def test_fp8_on_an_a100_recipe_is_refused_naming_the_field(project):
    recipe = project.recipe(target="a100", quantize={"algo": "fp8", "calib_data": "calib.txt"},
                            build={"device": "cuda"})
    line = one_line_cli_error(project, recipe)
    assert f"{recipe}: `quantize.algo` fp8: fp8 needs FP8 support" in line


def test_tensor_and_pipeline_parallel_on_cpu_are_accepted(project):
    plan = plan_of(project, project.recipe(build={"tp": 2, "pp": 2, "max_seq_len": 64, "device": "cpu"}))
    assert (plan.build["tp"], plan.build["pp"], plan.build["device"]) == (2, 2, "cpu")


@pytest.mark.parametrize("sections, fragment", [
    ({"eval": {"datasets": [{"name": "long", "data": "heldout.txt", "seq_len": 128}]}},
     "`eval.datasets.0` scores windows of 128 tokens but `build.max_seq_len` is 64"),
    ({"bench": {"scenarios": [{"name": "long", "isl": 60, "osl": 8, "num_requests": 1}]}},
     "`bench.scenarios.0` needs 60 input + 8 output tokens per request but `build.max_seq_len` is 64"),
    ({"bench": {"scenarios": [{"name": "one", "isl": 8, "osl": 1, "num_requests": 1, "max_tpot_ms": 5.0}]}},
     "`bench.scenarios.0.max_tpot_ms` needs osl >= 2"),
    ({"quantize": {"algo": "int4_awq"}}, "`quantize.algo` int4_awq calibrates on data; set `quantize.calib_data`"),
    ({"quantize": {"algo": "none", "kv_cache_dtype": "int8"}},
     "`quantize.kv_cache_dtype` int8 calibrates on data; set `quantize.calib_data`"),
    ({"quantize": {"algo": "int8_sq", "calib_data": "missing.txt"}}, "`quantize.calib_data` missing.txt:"),
    ({"quantize": {"algo": "int8_wo", "export_format": "hf"}}, "`quantize.export_format` hf writes a Hugging Face"),
    ({"eval": {"datasets": [{"name": "gone", "data": "gone.txt", "seq_len": 32}]}}, "`eval.datasets.0.data` gone.txt:"),
    ({"eval": {"datasets": [{"name": "h", "data": "heldout.txt", "seq_len": 32, "baseline": "no.json"}]}},
     "`eval.datasets.0.baseline` no.json:"),
    ({"bench": {"dataset": "prompts.jsonl", "scenarios": [{"name": "a", "isl": 8, "osl": 4, "num_requests": 1}]}},
     "`bench.dataset` is for `llmx bench --recipe`"),
])
def test_inconsistent_recipes_are_refused_before_anything_runs(project, sections, fragment):
    message = refused(project, project.recipe(**sections))
    assert fragment in message


def test_a_baseline_of_the_wrong_kind_is_refused(project):
    (project.root / "bench.json").write_text(json.dumps({"schema": "llmx-bench/1"}))
    recipe = project.recipe(eval={"datasets": [{"name": "h", "data": "heldout.txt", "seq_len": 32,
                                                "baseline": "bench.json"}]})
    assert "is not an `llmx eval --json` result (schema llmx-eval/1, found 'llmx-bench/1')" in refused(project, recipe)


def test_dummy_weights_need_a_hugging_face_folder(project, tmp_path):
    ckpt = tmp_path / "ckpt"
    ckpt.mkdir()
    (ckpt / "llmx.json").write_text("{}")
    message = refused(project, project.recipe(model={"dummy_weights": True}), model=ckpt)
    assert "`model.dummy_weights` makes random weights" in message


def test_weight_only_quantization_ignores_calibration_data(project):
    plan = plan_of(project, project.recipe(quantize={"algo": "int8_wo", "calib_data": "calib.txt"}))
    assert plan.quantize["calib_data"] is None and plan.quantize["algo"] == "int8_wo"


def test_the_recipes_lm_head_choice_reaches_the_quantize_stage(project):
    assert plan_of(project, project.recipe()).quantize["quantize_lm_head"] is False
    recipe = project.recipe(quantize={**project_quantize(), "quantize_lm_head": True})
    assert plan_of(project, recipe).quantize["quantize_lm_head"] is True


def test_a_hub_dataset_name_is_kept_as_written(project):
    plan = plan_of(project, project.recipe(quantize={"algo": "int8_sq", "calib_data": "cnn_dailymail:3.0.0"}))
    assert plan.quantize["calib_data"] == "cnn_dailymail:3.0.0"


def test_sections_fill_in_what_datasets_and_scenarios_leave_out(project):
    recipe = project.recipe(eval={"seq_len": 16, "windows": 3, "max_increase": 2.0,
                                  "datasets": [{"name": "a", "data": "heldout.txt"},
                                               {"name": "b", "data": "heldout.txt", "windows": 1,
                                                "max_increase": 7.0, "max_perplexity": 500.0}]},
                            bench={"warmup": 0, "seed": 3, "tolerance": 12.0,
                                   "scenarios": [{"name": "s", "isl": 8, "osl": 4, "num_requests": 2}]})
    plan = plan_of(project, recipe)
    a, b = plan.datasets
    assert (a.seq_len, a.windows, a.max_increase, a.max_perplexity, a.needs_reference) == (16, 3, 2.0, None, True)
    assert (b.windows, b.max_increase, b.max_perplexity) == (1, 7.0, 500.0)
    [s] = plan.scenarios
    assert (s.warmup, s.seed, s.tolerance, s.kv_cache_fraction) == (0, 3, 12.0, 0.9)


def test_without_max_increase_no_reference_is_scored(project):
    recipe = project.recipe(eval={"datasets": [{"name": "a", "data": "heldout.txt", "seq_len": 32}]})
    [dataset] = plan_of(project, recipe).datasets
    assert dataset.max_increase is None and not dataset.needs_reference


def test_command_style_sections_become_one_dataset_and_one_scenario(project):
    recipe = project.recipe(eval={"data": "heldout.txt", "seq_len": 32, "windows": 2},
                            bench={"isl": 8, "osl": 4, "num_requests": 2})
    plan = plan_of(project, recipe)
    [dataset] = plan.datasets
    assert (dataset.name, dataset.field, dataset.seq_len, dataset.windows) == ("heldout", "eval.data", 32, 2)
    [scenario] = plan.scenarios
    assert (scenario.name, scenario.isl, scenario.osl, scenario.num_requests) == ("default", 8, 4, 2)
    assert scenario.min_output_tok_s is None and scenario.baseline is None


def test_nothing_to_quantize_score_or_measure(project):
    plan = plan_of(project, project.recipe(quantize=None, eval=None, bench=None))
    assert plan.quantize is None and plan.quantize_skip_reason == "the recipe sets no quantize.algo"
    assert plan.datasets == () and plan.scenarios == ()
    plan = plan_of(project, project.recipe(quantize={"algo": "none"}, eval=None, bench=None))
    assert plan.quantize is None and "no kv_cache_dtype" in plan.quantize_skip_reason


def test_a_shipped_recipe_reads_its_data_from_the_current_directory(project, monkeypatch):
    monkeypatch.chdir(project.root)
    plan = make_plan("llama/cpu", defaults=stage_defaults(), model=project.model)
    assert plan.recipe == "recipes/llama/cpu.yaml"
    assert plan.datasets and all(d.data.parent == project.root for d in plan.datasets)
    assert plan.workdir == project.root / ".llmx-work" / "pipeline" / "llama-cpu"


def test_help_documents_every_option_with_examples(capsys):
    from llmx.cli.main import run_cli

    assert run_cli(["pipeline", "--help"]) == 0
    text = " ".join(capsys.readouterr().out.replace("│", " ").split())
    for option in ("--recipe", "--model", "--workdir", "--only", "--json", "--junit"):
        assert option in text
    assert "Examples" in text
    assert "Exit code: 0 every gate passed, 1 a gate failed, 2 bad input or a stage failed" in text
    assert run_cli(["--help"]) == 0
    assert "pipeline" in capsys.readouterr().out


def test_the_command_module_imports_no_torch():
    import subprocess
    import sys

    code = "import sys, llmx.cli.main, llmx.cli.pipeline; print('torch' in sys.modules)"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "False"
