"""No gate passes a broken model: NaN/infinite measurements fail (exit 1) in `llmx eval`, `llmx bench` and the
pipeline's gates, and a malformed baseline is refused (exit 2) before anything is measured."""

from __future__ import annotations

import copy
import json
import math
from pathlib import Path
from types import SimpleNamespace

import pytest

from llmx.bench.regression import compare_bench, compare_perplexity
from llmx.common.errors import LlmxError
from llmx.pipeline.gates import bench_gates, eval_gates
from llmx.pipeline.plan import DatasetPlan, ScenarioPlan
from llmx.pipeline.stages import _write_json

EVAL_RESULT = {"schema": "llmx-eval/1", "path": "engine", "perplexity": 12.5, "mean_nll": 2.53, "num_tokens": 62,
               "num_windows": 2, "seq_len": 32, "data_hash": "sha256:ab", "data": "heldout.txt"}


def bench_report(throughput: float = 100.0) -> dict:
    dist = {"mean": 10.0, "p50": 10.0, "p90": 11.0, "p99": 12.0}
    return {"schema": "llmx-bench/1",
            "config": {"isl": 16, "osl": 4, "num_requests": 4, "concurrency": None, "request_rate": None,
                       "dataset_hash": None, "seed": 0},
            "metrics": {"request_throughput_rps": throughput / 10, "output_throughput_tok_s": throughput,
                        "total_throughput_tok_s": throughput * 5, "ttft_ms": dict(dist), "tpot_ms": dict(dist),
                        "itl_ms": dict(dist), "e2e_ms": dict(dist)}}


def write(path: Path, doc) -> Path:
    path.write_text(doc if isinstance(doc, str) else json.dumps(doc))
    return path


# ---- malformed baselines: exit 2, before the engine is even opened (its path does not exist) ----

def with_field(doc: dict, dotted: str, value) -> dict:
    doc = copy.deepcopy(doc)
    *parents, last = dotted.split(".")
    target = doc
    for key in parents:
        target = target[key]
    if value is KeyError:
        del target[last]
    else:
        target[last] = value
    return doc


EVAL_BASELINE_FAULTS = [
    ('{"schema": "llmx-eval/1", "perplexity": NaN}', "NaN is not a JSON number"),
    ('{"schema": "llmx-eval/1", "perplexity": Infinity}', "Infinity is not a JSON number"),
    (json.dumps(EVAL_RESULT).replace("12.5", "1e999"), "must be a finite number > 0, got inf"),
    (with_field(EVAL_RESULT, "perplexity", None), "`perplexity` must be a number, got None"),
    ({**with_field(EVAL_RESULT, "perplexity", None), "non_finite": {"perplexity": "NaN"}},
     "`perplexity` was NaN when that run measured it"),
    (with_field(EVAL_RESULT, "perplexity", "12.5"), "`perplexity` must be a number, got '12.5'"),
    (with_field(EVAL_RESULT, "perplexity", True), "`perplexity` must be a number, got True"),
    (with_field(EVAL_RESULT, "perplexity", KeyError), "field `perplexity` is missing"),
    (with_field(EVAL_RESULT, "perplexity", 0), "must be a finite number > 0, got 0"),
    (with_field(EVAL_RESULT, "perplexity", -3.0), "must be a finite number > 0, got -3.0"),
    (with_field(EVAL_RESULT, "seq_len", "32"), "`seq_len` must be a positive integer, got '32'"),
    (with_field(EVAL_RESULT, "num_windows", 0), "`num_windows` must be a positive integer, got 0"),
    (with_field(EVAL_RESULT, "data_hash", KeyError), "`data_hash` is missing or not a string"),
    (with_field(EVAL_RESULT, "schema", "llmx-bench/1"), "is not an `llmx eval --json` result"),
    ("[12.5]", "holds a JSON list, not the object"),
    ("", "is not valid JSON (line 1 column 1"),
]


@pytest.mark.parametrize("content, fragment", EVAL_BASELINE_FAULTS)
def test_eval_refuses_a_malformed_baseline_before_scoring(tmp_path, fails, content, fragment):
    baseline = write(tmp_path / "base.json", content)
    text = write(tmp_path / "heldout.txt", "some text")
    line = fails(["eval", tmp_path / "no-engine", "--data", text, "--baseline", baseline], fragment, code=2)
    assert str(baseline) in line


BENCH_BASELINE_FAULTS = [
    (json.dumps(bench_report()).replace("100.0", "NaN"), "NaN is not a JSON number"),
    (with_field(bench_report(), "metrics.output_throughput_tok_s", "fast"),
     "`metrics.output_throughput_tok_s` must be a number, got 'fast'"),
    (with_field(bench_report(), "metrics.output_throughput_tok_s", KeyError),
     "`metrics.output_throughput_tok_s` is missing"),
    ({**with_field(bench_report(), "metrics.ttft_ms.p99", None), "non_finite": {"metrics.ttft_ms.p99": "Infinity"}},
     "`metrics.ttft_ms.p99` was Infinity when that run measured it"),
    (with_field(bench_report(), "metrics.ttft_ms.mean", -1.0), "`metrics.ttft_ms.mean` must be a finite number >= 0"),
    (with_field(bench_report(), "metrics.e2e_ms", [1, 2]), "`metrics.e2e_ms` must be an object of statistics or null"),
    (with_field(bench_report(), "metrics.tpot_ms", KeyError), "`metrics.tpot_ms` is missing"),
    (with_field(bench_report(), "config.seed", KeyError), "`config.seed` is missing"),
    (with_field(bench_report(), "metrics", KeyError), "`metrics` is missing or not an object"),
    (with_field(bench_report(), "schema", "llmx-eval/1"), "is not an llmx-bench/1 report"),
]


@pytest.mark.parametrize("content, fragment", BENCH_BASELINE_FAULTS)
def test_bench_refuses_a_malformed_baseline_before_running(tmp_path, fails, content, fragment):
    baseline = write(tmp_path / "base.json", content)
    line = fails(["bench", tmp_path / "no-engine", "--baseline", baseline], fragment, code=2)
    assert str(baseline) in line


@pytest.mark.parametrize("argv, fragment", [
    (["eval", "E", "--data", "D", "--baseline", "B", "--max-increase", "nan"], "Invalid value for '--max-increase'"),
    (["eval", "E", "--data", "D", "--baseline", "B", "--max-increase", "inf"], "--max-increase must be a finite"),
    (["bench", "E", "--baseline", "B", "--tolerance", "nan"], "Invalid value for '--tolerance'"),
    (["bench", "E", "--baseline", "B", "--tolerance", "inf"], "--tolerance must be a finite"),
])
def test_a_non_finite_tolerance_is_refused(fails, argv, fragment):
    fails(argv, fragment, code=2)


# ---- measured NaN: exit 1 ----

def test_a_nan_perplexity_fails_eval_with_valid_json(nan_engine, heldout, fails):
    fails(["eval", nan_engine, "--data", heldout, "--seq-len", "32", "--windows", "2", "--json"],
          "is NaN: the model's log-probabilities are not finite", code=1)
    result = json.loads(fails.out, parse_constant=lambda word: pytest.fail(f"{word} in the JSON output"))
    assert result["perplexity"] is None and result["non_finite"]["perplexity"] == "NaN"


def test_a_nan_perplexity_fails_the_baseline_gate(tiny_engine, nan_engine, heldout, tmp_path, capsys, fails):
    from llmx.cli.main import run_cli

    window = ["--data", str(heldout), "--seq-len", "32", "--windows", "2"]
    assert run_cli(["eval", str(tiny_engine), *window, "--json"]) == 0
    baseline = write(tmp_path / "base.json", capsys.readouterr().out)
    assert run_cli(["eval", str(tiny_engine), *window, "--baseline", str(baseline), "--max-increase", "1"]) == 0
    assert "ok." in capsys.readouterr().err
    fails(["eval", nan_engine, *window, "--baseline", baseline, "--max-increase", "1"], "is NaN", code=1)


def test_comparisons_with_a_nan_measurement_regress():
    c = compare_perplexity({**EVAL_RESULT, "perplexity": math.nan}, EVAL_RESULT, 1000.0)
    assert c.regressed and c.change_text == "NaN"
    assert compare_perplexity({**EVAL_RESULT, "perplexity": None}, EVAL_RESULT, 1000.0).regressed
    now = bench_report()
    now["metrics"]["output_throughput_tok_s"] = math.nan
    now["metrics"]["ttft_ms"]["p99"] = math.inf
    now["metrics"]["tpot_ms"] = None  # measured in the baseline, not now
    regressed = {c.metric for c in compare_bench(now, bench_report(), 1000.0) if c.regressed}
    assert regressed == {"output_throughput_tok_s", "ttft_ms.p99", "tpot_ms.mean", "tpot_ms.p50", "tpot_ms.p99"}


def test_a_baseline_handed_to_compare_directly_is_still_checked():
    with pytest.raises(LlmxError, match="must be a finite number > 0, got nan"):
        compare_perplexity(EVAL_RESULT, {**EVAL_RESULT, "perplexity": math.nan}, 1.0)
    with pytest.raises(LlmxError, match="must be a finite number >= 0, got nan"):
        compare_bench(bench_report(), with_field(bench_report(), "metrics.itl_ms.p50", math.nan), 5.0)


# ---- the pipeline's gates, on results the eval and bench stages wrote ----

def dataset(tmp_path: Path, **gates) -> DatasetPlan:
    options = dict(max_increase=None, max_perplexity=None, baseline=None) | gates
    return DatasetPlan(name="heldout", field="eval.datasets.0", data=tmp_path / "heldout.txt", seq_len=32,
                       windows=2, **options)


def scenario(**gates) -> ScenarioPlan:
    options = dict(min_output_tok_s=None, max_ttft_ms=None, max_tpot_ms=None, max_e2e_ms=None, baseline=None,
                   tolerance=5.0, baseline_metrics=None) | gates
    return ScenarioPlan(name="tiny", field="bench.scenarios.0", isl=16, osl=4, num_requests=4, concurrency=None,
                        request_rate=None, warmup=1, seed=0, dataset=None, kv_cache_tokens=None,
                        kv_cache_fraction=0.9, **options)


@pytest.mark.parametrize("gates", [
    {"max_perplexity": 1e9},
    {"max_increase": 1000.0},  # against the unquantized engine's result
    {"max_increase": 1000.0, "baseline": "committed"},
    {},  # no threshold at all: a NaN perplexity still fails
])
def test_pipeline_eval_gates_fail_a_nan_perplexity(tmp_path, gates):
    if gates.get("baseline"):
        gates["baseline"] = write(tmp_path / "committed.json", EVAL_RESULT)
    _write_json(tmp_path / "heldout.json", {**EVAL_RESULT, "perplexity": math.nan})
    _write_json(tmp_path / "reference-heldout.json", EVAL_RESULT)
    plan = SimpleNamespace(datasets=[dataset(tmp_path, **gates)], quantize={"algo": "int8_wo"})
    [gate] = eval_gates(plan, tmp_path)
    assert not gate.passed and math.isnan(gate.measured)
    assert "NaN" in gate.verdict()


def test_pipeline_gate_fails_when_the_reference_itself_is_nan(tmp_path):
    _write_json(tmp_path / "heldout.json", EVAL_RESULT)
    _write_json(tmp_path / "reference-heldout.json", {**EVAL_RESULT, "perplexity": math.nan})
    plan = SimpleNamespace(datasets=[dataset(tmp_path, max_increase=5.0)], quantize={"algo": "int8_wo"})
    [gate] = eval_gates(plan, tmp_path)
    assert not gate.passed and "`perplexity` must be a finite number > 0, got nan" in gate.detail


def test_pipeline_eval_gates_pass_a_finite_perplexity(tmp_path):
    _write_json(tmp_path / "heldout.json", EVAL_RESULT)
    _write_json(tmp_path / "reference-heldout.json", EVAL_RESULT)
    plan = SimpleNamespace(datasets=[dataset(tmp_path, max_increase=1.0, max_perplexity=20.0)],
                           quantize={"algo": "int8_wo"})
    assert [g.passed for g in eval_gates(plan, tmp_path)] == [True, True]


def test_pipeline_bench_gates_fail_nan_metrics(tmp_path):
    from llmx.bench.report import write_report

    report = bench_report()
    report["metrics"]["output_throughput_tok_s"] = math.nan
    report["metrics"]["ttft_ms"]["mean"] = math.inf
    write_report(report, tmp_path / "tiny.json")
    baseline = write(tmp_path / "committed.json", bench_report())
    plan = SimpleNamespace(scenarios=[scenario(min_output_tok_s=0.01, max_ttft_ms=1e9, baseline=baseline,
                                               baseline_metrics=("output_throughput_tok_s", "ttft_ms.mean"))])
    gates = {g.name: g for g in bench_gates(plan, tmp_path)}
    for name in ("bench.tiny.min_output_tok_s", "bench.tiny.max_ttft_ms",
                 "bench.tiny.baseline.output_throughput_tok_s", "bench.tiny.baseline.ttft_ms.mean"):
        assert not gates[name].passed, name
    assert "not a finite number" in gates["bench.tiny.min_output_tok_s"].detail


def test_pipeline_summary_json_stays_valid_with_nan_gates(tmp_path, capsys):
    from llmx.cli._console import emit_json

    _write_json(tmp_path / "heldout.json", {**EVAL_RESULT, "perplexity": math.nan})
    plan = SimpleNamespace(datasets=[dataset(tmp_path, max_perplexity=20.0)], quantize=None)
    emit_json({"gates": [g.to_dict() for g in eval_gates(plan, tmp_path)]})
    parsed = json.loads(capsys.readouterr().out, parse_constant=lambda word: pytest.fail(word))
    assert parsed["gates"][0]["measured"] is None and parsed["non_finite"] == {"gates[0].measured": "NaN"}


def test_a_baseline_with_nan_in_a_recipe_is_refused_before_any_stage(tmp_path):
    from llmx.pipeline.plan import _check_schema

    baseline = write(tmp_path / "b.json", {**with_field(EVAL_RESULT, "perplexity", None),
                                           "non_finite": {"perplexity": "NaN"}})
    with pytest.raises(LlmxError, match=r"^r: `eval.datasets.0.baseline`: .*b.json: field `perplexity` was NaN"):
        _check_schema(baseline, "llmx-eval/1", "r: `eval.datasets.0.baseline`")


# ---- end to end: `llmx pipeline` on a checkpoint whose weights are NaN ----

@pytest.mark.parametrize("dataset_gates", [{"max_perplexity": 1e9}, {}])
def test_the_pipeline_fails_a_nan_model_with_exit_1(nan_checkpoint, heldout, tmp_path, capsys, dataset_gates):
    import yaml

    from llmx.cli.main import run_cli

    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(yaml.safe_dump({
        "family": "llama", "target": "cpu",
        "build": {"max_batch_size": 2, "max_seq_len": 64, "max_num_tokens": 64, "device": "cpu"},
        "eval": {"datasets": [{"name": "heldout", "data": str(heldout), "seq_len": 32, "windows": 2,
                               **dataset_gates}]}}))
    code = run_cli(["pipeline", "--recipe", str(recipe), "--model", str(nan_checkpoint), "--workdir",
                    str(tmp_path / "work"), "--json"])
    out = capsys.readouterr().out
    assert code == 1
    summary = json.loads(out, parse_constant=lambda word: pytest.fail(f"{word} in the pipeline's JSON"))
    assert {s["name"]: s["status"] for s in summary["stages"]}["eval"] == "ran"
    [gate] = summary["gates"]
    assert gate["passed"] is False and gate["measured"] is None
    assert summary["non_finite"]["gates[0].measured"] == "NaN" and summary["exit_code"] == 1


def test_bench_refuses_a_baseline_of_another_workload_before_running(tmp_path, fails):
    baseline = write(tmp_path / "base.json", bench_report())  # isl 16, osl 4, 4 requests, seed 0
    fails(["bench", tmp_path / "no-engine", "--baseline", baseline, "--isl", "16", "--osl", "4", "--num-requests",
           "4", "--seed", "1"], "was measured on another workload (seed 0 -> 1)")


def test_bench_accepts_its_own_report_as_a_baseline(tiny_engine, tmp_path, capsys):
    from llmx.cli.main import run_cli

    workload = ["--isl", "8", "--osl", "4", "--num-requests", "2", "--warmup", "0", "--kv-cache-tokens", "128"]
    report = tmp_path / "bench.json"
    assert run_cli(["bench", str(tiny_engine), *workload, "--json", str(report)]) == 0
    # A CPU under load makes two runs' timings differ by more than any sane tolerance: the gate is not the point.
    assert run_cli(["bench", str(tiny_engine), *workload, "--baseline", str(report), "--tolerance", "1000000"]) == 0
    assert "no regression beyond" in capsys.readouterr().err
