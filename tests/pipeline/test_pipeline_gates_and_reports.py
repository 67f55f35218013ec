"""Gates against committed baselines and absolute thresholds, the JUnit report read back, the --json summary."""

from __future__ import annotations

import json
import xml.etree.ElementTree as ET

import pytest

SCENARIO = {"name": "tiny", "isl": 16, "osl": 4, "num_requests": 4}
# What the `measured` fixture's workdir was made with (conftest.WEIGHT_ONLY).
WEIGHT_ONLY = {"algo": "int8_wo", "device": "cpu"}


def committed(project, name: str, doc: dict):
    path = project.root / "baselines" / name
    path.parent.mkdir(exist_ok=True)
    path.write_text(json.dumps(doc))
    return path


def test_worse_baselines_fail_their_gates_exit_1_and_show_in_junit(measured):
    project = measured
    eval_result = json.loads((project.workdir / "eval" / "heldout.json").read_text())
    bench_report = json.loads((project.workdir / "bench" / "tiny.json").read_text())
    # Baselines from a "better" past: perplexity 20% lower, throughput 1000x higher.
    eval_result["perplexity"] *= 0.8
    bench_report["metrics"]["output_throughput_tok_s"] *= 1000
    committed(project, "eval.json", eval_result)
    committed(project, "bench.json", bench_report)
    recipe = project.recipe(
        quantize=WEIGHT_ONLY,
        eval={"datasets": [{"name": "heldout", "data": "heldout.txt", "seq_len": 32, "windows": 2,
                            "baseline": "baselines/eval.json", "max_increase": 1.0}]},
        bench={"warmup": 1, "scenarios": [{**SCENARIO, "baseline": "baselines/bench.json", "tolerance": 50.0}]})
    junit = project.root / "junit.xml"
    code, summary, err = project.run(recipe, "--junit", str(junit))
    assert code == 1
    # Baselines are not stage inputs: bench's stored report is judged again, not re-measured. Eval runs
    # because a baseline replaces the reference score it no longer needs.
    assert project.statuses(summary) == {"convert": "reused", "quantize": "reused", "build": "reused",
                                         "eval": "ran", "bench": "reused"}
    gates = {g["name"]: g for g in summary["gates"]}
    ppl = gates["eval.heldout.max_increase"]
    assert ppl["passed"] is False and ppl["comparison"] == "<="
    assert ppl["threshold"] == pytest.approx(eval_result["perplexity"] * 1.01)
    assert "+25.00%" in ppl["detail"]  # 1 / 0.8 - 1
    throughput = gates["bench.tiny.baseline.output_throughput_tok_s"]
    assert throughput["passed"] is False and throughput["comparison"] == ">="
    assert err.strip().splitlines()[-1].startswith("error: ") and "gates failed" in err
    assert "eval.heldout.max_increase" in err.strip().splitlines()[-1]

    suite = ET.parse(junit).getroot().find("testsuite")
    cases = {(c.get("classname"), c.get("name")): c for c in suite.iter("testcase")}
    assert suite.get("name") == "llmx pipeline"
    assert int(suite.get("tests")) == len(cases) == 5 + len(summary["gates"])
    failed = {name for (kind, name), case in cases.items() if case.find("failure") is not None}
    assert failed == {g["name"] for g in summary["gates"] if not g["passed"]}
    assert int(suite.get("failures")) == len(failed) and suite.get("errors") == "0"
    message = cases[("gate", "eval.heldout.max_increase")].find("failure").get("message")
    assert message.startswith("measured ") and "<= threshold" in message
    assert all(cases[("stage", s)].find("failure") is None for s in ("convert", "build", "bench"))
    assert float(cases[("stage", "convert")].get("time")) >= 0


def test_a_baseline_from_another_workload_fails_with_the_reason(measured):
    project = measured
    report = json.loads((project.workdir / "bench" / "tiny.json").read_text())
    report["config"]["isl"] = 32
    committed(project, "other.json", report)
    recipe = project.recipe(quantize=WEIGHT_ONLY,
                            bench={"warmup": 1, "scenarios": [{**SCENARIO, "baseline": "baselines/other.json"}]})
    code, summary, _ = project.run(recipe)
    assert code == 1
    [gate] = [g for g in summary["gates"] if g["stage"] == "bench"]
    assert gate["name"] == "bench.tiny.baseline" and not gate["passed"]
    assert "another workload (isl 32 -> 16)" in gate["detail"]


def test_absolute_gates_pass_and_fail_on_the_measured_values(measured):
    project = measured
    bench_report = json.loads((project.workdir / "bench" / "tiny.json").read_text())
    eval_result = json.loads((project.workdir / "eval" / "heldout.json").read_text())
    ttft = bench_report["metrics"]["ttft_ms"]["mean"]
    recipe = project.recipe(
        quantize=WEIGHT_ONLY,
        eval={"datasets": [{"name": "heldout", "data": "heldout.txt", "seq_len": 32, "windows": 2,
                            "max_perplexity": eval_result["perplexity"] * 0.5}]},
        bench={"warmup": 1, "scenarios": [{**SCENARIO, "max_ttft_ms": ttft * 100, "max_tpot_ms": 1e6,
                                           "max_e2e_ms": 1e-3, "min_output_tok_s": 0.001}]})
    code, summary, err = project.run(recipe)
    assert code == 1, err
    verdicts = {g["name"]: g["passed"] for g in summary["gates"]}
    assert verdicts == {"eval.heldout.max_perplexity": False, "bench.tiny.min_output_tok_s": True,
                        "bench.tiny.max_ttft_ms": True, "bench.tiny.max_tpot_ms": True,
                        "bench.tiny.max_e2e_ms": False}
    gates = {g["name"]: g for g in summary["gates"]}
    assert gates["bench.tiny.max_ttft_ms"]["measured"] == pytest.approx(ttft)
    assert gates["bench.tiny.max_ttft_ms"]["unit"] == "ms"


def test_json_summary_schema(measured):
    project = measured
    code, summary, _ = project.run(project.recipe(quantize=WEIGHT_ONLY))
    assert code == 0
    assert summary["schema"] == "llmx-pipeline/1"
    assert set(summary) == {"schema", "recipe", "model", "workdir", "llmx", "started_at", "seconds", "stages",
                            "gates", "passed", "exit_code"}
    assert summary["workdir"] == str(project.workdir.resolve())
    for stage in summary["stages"]:
        assert set(stage) == {"name", "status", "seconds", "key", "output", "message", "summary"}
        assert stage["key"].startswith("sha256:")
    for gate in summary["gates"]:
        assert set(gate) == {"name", "stage", "measured", "threshold", "comparison", "passed", "detail", "unit"}
    assert {g["name"]: g["passed"] for g in summary["gates"]} == {"eval.heldout.max_increase": True,
                                                                   "bench.tiny.min_output_tok_s": True}
    assert project.statuses(summary) == dict.fromkeys(("convert", "quantize", "build", "eval", "bench"), "reused")


def test_table_and_stage_lines_without_json(measured, capsys):
    from llmx.cli.main import run_cli

    project = measured
    recipe = project.recipe(quantize=WEIGHT_ONLY)
    junit = project.root / "out" / "junit.xml"
    argv = ["pipeline", "--recipe", str(recipe), "--model", str(project.model), "--workdir", str(project.workdir),
            "--junit", str(junit)]
    assert run_cli(argv) == 0
    captured = capsys.readouterr()
    assert "eval.heldout.max_increase" in captured.out and "pass" in captured.out
    assert "bench     reused" in captured.err and "pipeline passed: 2 gates" in captured.err
    root = ET.parse(junit).getroot()
    assert root.tag == "testsuites" and root.get("failures") == "0" and root.get("errors") == "0"


def test_junit_marks_failed_and_skipped_stages(project):
    from llmx.pipeline.junit import junit_xml
    from llmx.pipeline.plan import make_plan
    from llmx.pipeline.runner import PipelineResult, StageResult
    from llmx.cli.pipeline import stage_defaults

    recipe = project.recipe()
    plan = make_plan(str(recipe), defaults=stage_defaults(), model=project.model, workdir=project.workdir)
    stages = [StageResult("convert", "reused", 0.01, "sha256:ab"),
              StageResult("quantize", "skipped", message="no algo"),
              StageResult("build", "failed", 1.5, "sha256:cd", message="9 heads do not divide by tp 2"),
              StageResult("eval", "not run", message="build did not complete")]
    root = ET.fromstring(junit_xml(PipelineResult(plan, stages, [], 1.6, "2026-01-01T00:00:00+00:00")))
    suite = root.find("testsuite")
    counts = (suite.get("tests"), suite.get("errors"), suite.get("skipped"), suite.get("failures"))
    assert counts == ("4", "1", "2", "0")
    cases = {c.get("name"): c for c in suite.iter("testcase")}
    assert cases["build"].find("error").get("message") == "9 heads do not divide by tp 2"
    assert cases["quantize"].find("skipped").get("message") == "skipped: no algo"
    assert cases["eval"].find("skipped") is not None
    assert cases["build"].get("time") == "1.500"
    props = {p.get("name"): p.get("value") for p in suite.find("properties")}
    assert props["recipe"] == str(recipe) and props["model"] == str(project.model)
