"""Gates: each threshold of the recipe judged against what the eval and bench stages measured.

Every gate is a (measured, threshold, comparison) triple with a verdict and one sentence of detail.
Increases over a baseline or reference are expressed as absolute thresholds (baseline x (1 + pct/100)),
so the table reads "measured 30.1 <= 30.2"; the verdict itself comes from llmx.bench.regression, the
same rule `llmx eval --baseline` and `llmx bench --baseline` apply. A baseline measured on another
workload or other windows fails its gate with the reason, rather than stopping the report.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from llmx.bench.regression import compare_bench, compare_perplexity
from llmx.common.errors import LlmxError
from llmx.common.jsonio import loads, restore_non_finite
from llmx.pipeline.plan import DatasetPlan, PipelinePlan, ScenarioPlan


@dataclass(frozen=True)
class Gate:
    name: str  # "eval.<dataset>.<check>" or "bench.<scenario>.<check>"
    stage: str
    measured: float | None
    threshold: float | None
    comparison: str  # "<=" or ">=": measured <comparison> threshold passes
    passed: bool
    detail: str
    unit: str = ""

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def verdict(self) -> str:
        """One line: "measured 30.1 <= threshold 30.2: <detail>"."""
        unit = f" {self.unit}" if self.unit else ""
        return (f"measured {format_number(self.measured)}{unit} {self.comparison} threshold "
                f"{format_number(self.threshold)}{unit}: {self.detail}")


def format_number(value: float | None) -> str:
    """Enough digits to tell a measurement from a threshold near it: 13,862 / 146.25 / 29.9020."""
    if value is None:
        return "n/a"
    if not math.isfinite(value):
        return "NaN" if math.isnan(value) else ("Infinity" if value > 0 else "-Infinity")
    if abs(value) >= 1000:
        return f"{value:,.0f}"
    return f"{value:.2f}" if abs(value) >= 100 else f"{value:.4f}"


def eval_gates(plan: PipelinePlan, eval_dir: Path) -> list[Gate]:
    gates: list[Gate] = []
    for dataset in plan.datasets:
        result = _read(eval_dir / f"{dataset.name}.json")
        ppl = _number(result.get("perplexity"))
        prefix = f"eval.{dataset.name}"
        first = len(gates)
        if dataset.max_perplexity is not None:
            gates.append(_absolute(f"{prefix}.max_perplexity", "eval", ppl, dataset.max_perplexity, "<=", "",
                                   f"perplexity on {dataset.data.name}, {result['num_windows']} windows of "
                                   f"{result['seq_len']} tokens"))
        if dataset.baseline is not None:
            gates.append(_against_baseline(prefix, dataset, result))
        elif dataset.needs_reference and plan.quantize is not None:
            # Without quantization the engine is its own reference: no increase to judge.
            reference = eval_dir / f"reference-{dataset.name}.json"
            if not reference.is_file():
                gates.append(Gate(f"{prefix}.max_increase", "eval", ppl, None, "<=", False,
                                  f"{reference.name} is missing from {eval_dir}; run the eval stage again"))
            else:
                gates.append(_against_reference(prefix, dataset, result, _read(reference)))
        if len(gates) == first and not math.isfinite(ppl):  # no threshold asked for, yet the model is broken
            gates.append(Gate(f"{prefix}.perplexity", "eval", ppl, None, "<=", False,
                              f"perplexity on {dataset.data.name} is {format_number(ppl)}: the model's "
                              "log-probabilities are not finite numbers"))
    return gates


def bench_gates(plan: PipelinePlan, bench_dir: Path) -> list[Gate]:
    gates: list[Gate] = []
    for scenario in plan.scenarios:
        report = _read(bench_dir / f"{scenario.name}.json")
        metrics = report["metrics"]
        prefix = f"bench.{scenario.name}"
        what = f"{scenario.isl}/{scenario.osl}, {scenario.num_requests} requests"
        if scenario.min_output_tok_s is not None:
            gates.append(_absolute(f"{prefix}.min_output_tok_s", "bench", metrics.get("output_throughput_tok_s"),
                                   scenario.min_output_tok_s, ">=", "tok/s", f"output throughput, {what}"))
        for key, metric in (("max_ttft_ms", "ttft_ms"), ("max_tpot_ms", "tpot_ms"), ("max_e2e_ms", "e2e_ms")):
            threshold = getattr(scenario, key)
            if threshold is not None:
                mean = (metrics.get(metric) or {}).get("mean")
                gates.append(_absolute(f"{prefix}.{key}", "bench", mean, threshold, "<=", "ms",
                                       f"mean {metric.removesuffix('_ms').upper()}, {what}"))
        if scenario.baseline is not None:
            gates.extend(_bench_baseline(prefix, scenario, report))
    return gates


def _absolute(name: str, stage: str, measured: float | None, threshold: float, comparison: str, unit: str,
              detail: str) -> Gate:
    if measured is None:
        return Gate(name, stage, None, threshold, comparison, False, f"{detail}: not measured", unit)
    value = float(measured)
    if not math.isfinite(value):  # NaN compares false both ways; Infinity is never a pass either
        return Gate(name, stage, value, threshold, comparison, False, f"{detail}: not a finite number", unit)
    passed = value >= threshold if comparison == ">=" else value <= threshold
    return Gate(name, stage, value, threshold, comparison, passed, detail, unit)


def _against_baseline(prefix: str, dataset: DatasetPlan, result: dict[str, Any]) -> Gate:
    name = f"{prefix}.max_increase"
    assert dataset.baseline is not None and dataset.max_increase is not None
    try:
        c = compare_perplexity(result, _read(dataset.baseline), dataset.max_increase,
                               baseline_name=str(dataset.baseline))
    except LlmxError as exc:
        return Gate(name, "eval", _number(result.get("perplexity")), None, "<=", False, exc.message)
    return Gate(name, "eval", c.current, c.baseline * (1 + dataset.max_increase / 100), "<=", not c.regressed,
                f"baseline {dataset.baseline.name} {c.baseline:.4f}, {_change(c)} "
                f"(allowed +{dataset.max_increase:g}%)")


def _against_reference(prefix: str, dataset: DatasetPlan, result: dict[str, Any], reference: dict[str, Any]) -> Gate:
    assert dataset.max_increase is not None
    name = f"{prefix}.max_increase"
    try:
        c = compare_perplexity(result, reference, dataset.max_increase, baseline_name="the unquantized engine's result")
    except LlmxError as exc:  # e.g. the unquantized engine itself scored NaN: nothing to compare against
        return Gate(name, "eval", _number(result.get("perplexity")), None, "<=", False, exc.message)
    return Gate(name, "eval", c.current, c.baseline * (1 + dataset.max_increase / 100), "<=",
                not c.regressed, f"unquantized engine {c.baseline:.4f}, {_change(c)} "
                                 f"(allowed +{dataset.max_increase:g}%)")


def _change(c: Any) -> str:
    """"+1.23%", or what the measurement was when it is not a finite number."""
    return f"{c.change_pct:+.2f}%" if c.measured else f"measured {c.change_text}"


def _number(value: Any) -> float:
    """A measured value as a float; anything that is not a number (null, text) reads as NaN and fails."""
    return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else math.nan


def _bench_baseline(prefix: str, scenario: ScenarioPlan, report: dict[str, Any]) -> list[Gate]:
    assert scenario.baseline is not None
    tolerance = scenario.tolerance
    try:
        comparisons = compare_bench(report, _read(scenario.baseline), tolerance,
                                    baseline_name=str(scenario.baseline))
    except LlmxError as exc:
        return [Gate(f"{prefix}.baseline", "bench", None, None, "<=", False, exc.message)]
    gates = []
    if scenario.baseline_metrics is not None:
        comparisons = [c for c in comparisons if c.metric in scenario.baseline_metrics]
        compared = {c.metric for c in comparisons}
        # A metric asked for but absent from either report (e.g. TPOT with 1-token outputs) fails visibly.
        gates += [Gate(f"{prefix}.baseline.{m}", "bench", None, None, "<=", False,
                       f"{m} is missing or zero in this report or in {scenario.baseline.name}")
                  for m in scenario.baseline_metrics if m not in compared]
    for c in comparisons:
        factor = 1 - tolerance / 100 if c.higher_is_better else 1 + tolerance / 100
        unit = "ms" if "_ms" in c.metric else ("req/s" if c.metric.endswith("_rps") else "tok/s")
        gates.append(Gate(f"{prefix}.baseline.{c.metric}", "bench", c.current, c.baseline * factor,
                          ">=" if c.higher_is_better else "<=", not c.regressed,
                          f"baseline {scenario.baseline.name} {c.baseline:,.2f}, {c.change_text} "
                          f"(tolerance {tolerance:g}%)", unit))
    return gates


def _read(path: Path) -> dict[str, Any]:
    """A result written by the eval/bench stage, with its NaN/Infinity measurements restored (common.jsonio)."""
    return restore_non_finite(loads(Path(path).read_text(encoding="utf-8")))
