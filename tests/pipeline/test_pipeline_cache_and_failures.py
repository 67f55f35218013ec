"""`llmx pipeline` end to end on a tiny Llama: what runs, what is reused, and what a failure leaves behind."""

from __future__ import annotations

import os

import pytest

ALL_STAGES = ("convert", "quantize", "build", "eval", "bench")


def test_second_run_reuses_every_stage_and_calibration_content_decides(project):
    recipe = project.recipe()
    code, summary, err = project.run(recipe)
    assert code == 0, err
    assert project.statuses(summary) == dict.fromkeys(ALL_STAGES, "ran")
    assert summary["passed"] is True and summary["exit_code"] == 0
    for stage in ALL_STAGES:
        assert f"{stage:<9} ran" in err
    before = project.output_mtimes()
    assert {"convert/llmx.json", "quantize/llmx.json", "build/engine.json", "eval/heldout.json",
            "eval/reference-heldout.json", "bench/tiny.json"} <= set(before)

    code, again, err = project.run(recipe)
    assert code == 0, err
    assert project.statuses(again) == dict.fromkeys(ALL_STAGES, "reused")
    assert "convert   reused" in err and "(key " in err
    assert project.output_mtimes() == before  # nothing was rewritten
    assert [s["key"] for s in again["stages"]] == [s["key"] for s in summary["stages"]]
    assert again["gates"] == summary["gates"]  # judged again from the stored results

    # A new timestamp on unchanged text: the content hash is the same, so nothing runs.
    later = project.calib.stat().st_mtime + 60
    os.utime(project.calib, (later, later))
    code, touched, err = project.run(recipe)
    assert code == 0, err
    assert project.statuses(touched) == dict.fromkeys(ALL_STAGES, "reused")

    # Other calibration text: quantize and everything after it run again; convert is reused.
    project.calib.write_text(project.calib.read_text()[5_000:])
    code, changed, err = project.run(recipe)
    assert code == 0, err
    assert project.statuses(changed) == {"convert": "reused", "quantize": "ran", "build": "ran", "eval": "ran",
                                         "bench": "ran"}
    after = project.output_mtimes()
    assert after["convert/llmx.json"] == before["convert/llmx.json"]
    assert after["quantize/llmx.json"] != before["quantize/llmx.json"]
    # The reference (unquantized engine) does not depend on calibration: its score is carried over.
    eval_stage = next(s for s in changed["stages"] if s["name"] == "eval")
    assert eval_stage["summary"]["datasets"]["heldout"]["reference"] == "reused"


def test_deleted_output_is_rebuilt_even_with_a_matching_record(project):
    recipe = project.recipe(quantize={"algo": "int8_wo", "device": "cpu"}, bench=None)
    assert project.run(recipe)[0] == 0
    (project.workdir / "build" / "rank0.safetensors").unlink()
    code, summary, err = project.run(recipe)
    assert code == 0, err
    # The engine is rebuilt from the same inputs, so the perplexity measured on it still stands.
    assert project.statuses(summary) == {"convert": "reused", "quantize": "reused", "build": "ran",
                                         "eval": "reused", "bench": "skipped"}
    assert (project.workdir / "build" / "rank0.safetensors").is_file()


def test_a_failing_build_keeps_earlier_outputs_and_leaves_none_of_its_own(project):
    # tp 3 passes the recipe schema but cannot split the tiny model's 4 attention heads: build refuses it.
    build = {"tp": 3, "max_batch_size": 4, "max_seq_len": 64, "max_num_tokens": 64, "device": "cpu"}
    recipe = project.recipe(quantize={"algo": "int8_wo", "device": "cpu"}, build=build)
    junit = project.root / "report.xml"
    code, summary, err = project.run(recipe, "--junit", str(junit))
    assert code == 2
    assert project.statuses(summary) == {"convert": "ran", "quantize": "ran", "build": "failed",
                                         "eval": "not run", "bench": "not run"}
    failed = next(s for s in summary["stages"] if s["name"] == "build")
    assert "tp" in failed["message"] and "Traceback" not in err
    assert err.strip().splitlines()[-1].startswith("error: stage build failed")
    assert summary["exit_code"] == 2 and summary["passed"] is False
    assert junit.is_file()  # CI still gets its report
    assert (project.workdir / "convert" / "llmx.json").is_file()
    assert (project.workdir / ".llmx-pipeline" / "convert.json").is_file()
    assert not (project.workdir / "build").exists()
    assert not (project.workdir / ".llmx-pipeline" / "build.json").exists()
    assert not [p.name for p in project.workdir.iterdir() if ".tmp-" in p.name]

    fixed = project.recipe(quantize={"algo": "int8_wo", "device": "cpu"})
    code, summary, err = project.run(fixed)
    assert code == 0, err
    assert project.statuses(summary) == {"convert": "reused", "quantize": "reused", "build": "ran", "eval": "ran",
                                         "bench": "ran"}


def test_eval_failing_on_its_second_dataset_leaves_no_partial_results(project, monkeypatch):
    import llmx.pipeline.stages as stages
    from llmx.common.errors import LlmxError

    datasets = [{"name": "first", "data": "heldout.txt", "seq_len": 32, "windows": 1},
                {"name": "second", "data": "calib.txt", "seq_len": 32, "windows": 1}]
    recipe = project.recipe(quantize=None, eval={"datasets": datasets})
    real = stages.evaluate_perplexity

    def fail_on_calib(engine, data, **kwargs):
        if data.name == "calib.txt":
            raise LlmxError("calib.txt: scoring interrupted on purpose.")
        return real(engine, data, **kwargs)

    monkeypatch.setattr(stages, "evaluate_perplexity", fail_on_calib)
    code, summary, err = project.run(recipe)
    assert code == 2
    statuses = project.statuses(summary)
    assert statuses["eval"] == "failed" and statuses["bench"] == "ran"  # bench reads build, not eval
    assert statuses["quantize"] == "skipped"
    assert not (project.workdir / "eval").exists()  # first.json was written, then thrown away with the stage
    assert not (project.workdir / ".llmx-pipeline" / "eval.json").exists()


def test_only_runs_the_named_stages_and_needs_their_inputs(project):
    recipe = project.recipe(quantize={"algo": "int8_wo", "device": "cpu"})
    code, summary, err = project.run(recipe, "--only", "bench")
    assert code == 2 and summary is None
    [line] = err.strip().splitlines()[-1:]
    assert line.startswith("error: --only bench needs the output of convert, which is missing")
    assert "run convert,quantize,build first" in line

    assert project.run(recipe, "--only", "convert,quantize", "--only", "build")[0] == 0
    code, summary, err = project.run(recipe, "--only", "eval")
    assert code == 0, err
    assert project.statuses(summary) == {"eval": "ran"}
    assert [g["stage"] for g in summary["gates"]] == ["eval"]

    # A changed upstream input makes the stored build stale for `--only bench`.
    project.calib.write_text("different calibration text " * 200)
    stale = project.recipe(quantize={"algo": "int8_sq", "calib_data": "calib.txt", "calib_size": 4,
                                     "calib_seq_len": 32, "batch_size": 4, "device": "cpu"})
    code, summary, err = project.run(stale, "--only", "bench")
    assert code == 2
    assert "needs the output of quantize, which is out of date" in err


def test_only_refuses_unknown_stage_names(project):
    code, summary, err = project.run(project.recipe(), "--only", "evl")
    assert code == 2 and summary is None
    assert "error: --only evl: not a stage; choose from convert, quantize, build, eval, bench." in err


def test_a_given_llmx_checkpoint_skips_convert(project, tmp_path):
    from llmx.ingest.convert import convert

    ckpt = convert(project.model, tmp_path / "ckpt")
    recipe = project.recipe(quantize=None, bench=None)
    code, summary, err = project.run(recipe, model=ckpt)
    assert code == 0, err
    assert project.statuses(summary) == {"convert": "skipped", "quantize": "skipped", "build": "ran",
                                         "eval": "ran", "bench": "skipped"}
    assert not (project.workdir / "convert").exists()
    # Unquantized: the engine is its own reference, so no increase gate and no reference score.
    assert summary["gates"] == []
    assert not (project.workdir / "eval" / "reference-heldout.json").exists()


@pytest.mark.parametrize("content", ["not json", '{"format": "llmx-pipeline-record/1", "stage": "build"}'])
def test_a_damaged_record_only_costs_a_rerun(project, content):
    recipe = project.recipe(quantize=None, bench=None, eval=None)
    assert project.run(recipe)[0] == 0
    (project.workdir / ".llmx-pipeline" / "build.json").write_text(content)
    code, summary, _ = project.run(recipe)
    assert code == 0
    assert project.statuses(summary)["build"] == "ran"
