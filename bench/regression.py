"""Regression gates: compare a bench report or a perplexity with a baseline and say what got worse.

A throughput metric regresses when it is lower than the baseline by more than the tolerance (percent of
the baseline); a latency metric when it is higher by more than the tolerance. Perplexity regresses when
it rose by more than the allowed percentage. A measurement that is NaN or infinite, or missing where the
baseline has it, always regresses (exit 1): it is a broken run, never a pass. A baseline file is checked
whole when it is loaded, before anything is measured: a missing, non-numeric, negative or non-finite
value in it is an input error (exit 2), not a verdict.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from llmx.bench.metrics import LATENCY_METRICS, THROUGHPUT_METRICS
from llmx.bench.report import load_report
from llmx.common.errors import LlmxError
from llmx.common.jsonio import non_finite_fields, read_json_object

# Latency statistics the bench gate checks. p90 is left out: between the median and the tail, it adds
# noise without adding a kind of regression that p50 and p99 miss.
GATED_LATENCY_STATS = ("mean", "p50", "p99")

# Config keys that define the workload: reports whose workloads differ measure different things.
WORKLOAD_KEYS = ("isl", "osl", "num_requests", "concurrency", "request_rate", "dataset_hash", "seed")

BENCH_SCHEMA = "llmx-bench/1"
EVAL_SCHEMA = "llmx-eval/1"


def is_number(value: Any) -> bool:
    """A JSON number (int or float, not a bool), finite or not."""
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def describe_value(value: float) -> str:
    """"NaN", "Infinity", or the number with 4 decimals: how a measurement reads in a verdict."""
    if math.isnan(value):
        return "NaN"
    return f"{value:.4f}" if math.isfinite(value) else ("Infinity" if value > 0 else "-Infinity")


@dataclass(frozen=True)
class Comparison:
    metric: str
    baseline: float
    current: float
    higher_is_better: bool
    tolerance_pct: float

    @property
    def measured(self) -> bool:
        """Whether the current value is a finite number (NaN stands for "not measured" too)."""
        return math.isfinite(self.current)

    @property
    def change_pct(self) -> float:
        return (self.current - self.baseline) / self.baseline * 100.0

    @property
    def change_text(self) -> str:
        """"+3.2%", or why there is no change to show ("NaN", "Infinity": the run is broken)."""
        return f"{self.change_pct:+.1f}%" if self.measured else describe_value(self.current)

    @property
    def regressed(self) -> bool:
        if not self.measured:  # NaN compares false with everything: without this it would pass
            return True
        worse_by = -self.change_pct if self.higher_is_better else self.change_pct
        return worse_by > self.tolerance_pct

    def to_dict(self) -> dict[str, Any]:
        return {"metric": self.metric, "baseline": self.baseline, "current": self.current,
                "change_pct": self.change_pct, "higher_is_better": self.higher_is_better, "regressed": self.regressed}


def gated_metrics(metrics: dict[str, Any]) -> dict[str, tuple[float | None, bool]]:
    """metric path -> (value, higher_is_better) for every metric the bench gate checks."""
    gated: dict[str, tuple[float | None, bool]] = {name: (metrics.get(name), True) for name in THROUGHPUT_METRICS}
    for name in LATENCY_METRICS:
        dist = metrics.get(name) or {}
        for stat in GATED_LATENCY_STATS:
            gated[f"{name}.{stat}"] = (dist.get(stat), False)
    return gated


def check_same_workload(config: dict[str, Any], baseline: dict[str, Any], baseline_name: str) -> None:
    """Refuse a baseline measured on another workload (`config`: this run's report config, known before it runs)."""
    differing = [k for k in WORKLOAD_KEYS if config.get(k) != baseline["config"].get(k)]
    if differing:
        details = ", ".join(f"{k} {baseline['config'].get(k)!r} -> {config.get(k)!r}" for k in differing)
        raise LlmxError(f"{baseline_name}: was measured on another workload ({details}); rerun the baseline with "
                        "the same options or compare against a matching report.")


def check_percent(value: float, option: str) -> float:
    """A tolerance in percent from a flag or recipe: a finite number >= 0 (NaN would let every run pass)."""
    if not is_number(value) or not math.isfinite(value) or value < 0:
        raise LlmxError(f"{option} must be a finite number of percent >= 0, got {value!r}.")
    return float(value)


def compare_bench(current: dict[str, Any], baseline: dict[str, Any], tolerance_pct: float, *,
                  baseline_name: str = "baseline") -> list[Comparison]:
    """Compare two `llmx-bench/1` reports metric by metric.

    Metrics null or zero in the baseline are skipped; one the baseline has but this run did not measure
    (null, NaN) regresses.
    """
    check_percent(tolerance_pct, "--tolerance")
    check_bench_baseline(baseline, baseline_name)
    check_same_workload(current["config"], baseline, baseline_name)
    now, before = gated_metrics(current["metrics"]), gated_metrics(baseline["metrics"])
    comparisons = []
    for name, (value, higher_is_better) in now.items():
        base = before[name][0]
        if not base:  # not measured in the baseline (e.g. TPOT of 1-token outputs), or zero: no percentage
            continue
        current_value = float("nan") if value is None else float(value)  # measured before, not now: regressed
        comparisons.append(Comparison(name, float(base), current_value, higher_is_better, tolerance_pct))
    return comparisons


def check_metric_names(names: list[str] | None, baseline: dict[str, Any], baseline_name: str) -> None:
    """Refuse a --baseline-metric that the baseline's gated metrics do not include (checked before the run)."""
    known = gated_metrics(baseline["metrics"])
    unknown = [name for name in names or () if name not in known]
    if unknown:
        raise LlmxError(f"--baseline-metric {unknown[0]!r} is not a gated metric of {baseline_name}; choose from "
                        f"{', '.join(sorted(known))}.")


def compare_perplexity(current: dict[str, Any], baseline: dict[str, Any], max_increase_pct: float, *,
                       baseline_name: str = "baseline") -> Comparison:
    """Perplexity against a previous `llmx eval --json` result measured on the same windows of the same text."""
    check_percent(max_increase_pct, "--max-increase")
    check_eval_baseline(baseline, baseline_name)
    for key in ("data_hash", "seq_len", "num_windows"):
        if baseline.get(key) != current.get(key):
            raise LlmxError(f"{baseline_name}: was measured with {key} {baseline.get(key)!r}, this run with "
                            f"{current.get(key)!r}; compare perplexities over the same text, --seq-len and --windows.")
    measured = current.get("perplexity")
    value = float(measured) if is_number(measured) else float("nan")
    return Comparison("perplexity", float(baseline["perplexity"]), value, False, max_increase_pct)


def check_eval_baseline(doc: dict[str, Any], name: str) -> None:
    """Refuse (exit 2) an `llmx eval --json` result that cannot serve as a baseline, naming the field."""
    remedy = "measure it again with `llmx eval ENGINE --data FILE --json`"
    if doc.get("schema") != EVAL_SCHEMA:
        raise LlmxError(f"{name}: is not an `llmx eval --json` result (schema {EVAL_SCHEMA}, found "
                        f"{doc.get('schema')!r}); {remedy}.")
    _check_number(doc, "perplexity", name, remedy, positive=True)
    for key in ("seq_len", "num_windows"):
        value = doc.get(key)
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise LlmxError(f"{name}: field `{key}` must be a positive integer, got {value!r}; {remedy}.")
    if not isinstance(doc.get("data_hash"), str):
        raise LlmxError(f"{name}: field `data_hash` is missing or not a string; {remedy}.")


def check_bench_baseline(doc: dict[str, Any], name: str) -> None:
    """Refuse (exit 2) an `llmx bench --json` report that cannot serve as a baseline, naming the field.

    Every gated metric must be present; a throughput may be null (a run too short to time) and a latency
    distribution null (TPOT of 1-token outputs): those are skipped by the gate. A null that stands for a
    NaN (listed in `non_finite`) is refused: that baseline run was broken.
    """
    remedy = "measure it again with `llmx bench ENGINE --json FILE`"
    if doc.get("schema") != BENCH_SCHEMA:
        raise LlmxError(f"{name}: is not an `llmx bench --json` report (schema {BENCH_SCHEMA}, found "
                        f"{doc.get('schema')!r}); {remedy}.")
    for section in ("config", "metrics"):
        if not isinstance(doc.get(section), dict):
            raise LlmxError(f"{name}: field `{section}` is missing or not an object; {remedy}.")
    missing = [key for key in WORKLOAD_KEYS if key not in doc["config"]]
    if missing:
        raise LlmxError(f"{name}: field `config.{missing[0]}` is missing; {remedy}.")
    metrics = doc["metrics"]
    for metric in THROUGHPUT_METRICS:
        _check_number(metrics, metric, name, remedy, prefix="metrics.", nullable=True, non_finite=doc)
    for metric in LATENCY_METRICS:
        if metric not in metrics:
            raise LlmxError(f"{name}: field `metrics.{metric}` is missing; {remedy}.")
        dist = metrics[metric]
        if dist is None:
            continue
        if not isinstance(dist, dict):
            raise LlmxError(f"{name}: field `metrics.{metric}` must be an object of statistics or null, got "
                            f"{dist!r}; {remedy}.")
        for stat in GATED_LATENCY_STATS:
            _check_number(dist, stat, name, remedy, prefix=f"metrics.{metric}.", non_finite=doc)


def _check_number(container: dict[str, Any], key: str, name: str, remedy: str, *, prefix: str = "",
                  positive: bool = False, nullable: bool = False, non_finite: dict[str, Any] | None = None) -> None:
    field = f"{prefix}{key}"
    if key not in container:
        raise LlmxError(f"{name}: field `{field}` is missing; {remedy}.")
    value = container[key]
    was = non_finite_fields(non_finite if non_finite is not None else container).get(field)
    if value is None and was is not None:
        raise LlmxError(f"{name}: field `{field}` was {was} when that run measured it (written as null); "
                        f"a broken run is no baseline: {remedy}.")
    if value is None and nullable:
        return
    if not is_number(value):
        raise LlmxError(f"{name}: field `{field}` must be a number, got {value!r}; {remedy}.")
    if not math.isfinite(value) or value < 0 or (positive and value == 0):
        allowed = "a finite number > 0" if positive else "a finite number >= 0"
        raise LlmxError(f"{name}: field `{field}` must be {allowed}, got {value!r}; {remedy}.")


def load_bench_baseline(path: Path) -> dict[str, Any]:
    """Read and check a bench baseline report before anything is measured (exit 2 when it is unusable)."""
    doc = load_report(path)
    check_bench_baseline(doc, str(path))
    return doc


def load_eval_baseline(path: Path) -> dict[str, Any]:
    """Read and check an eval baseline result before anything is measured (exit 2 when it is unusable)."""
    doc = read_json_object(path, what="baseline result",
                           remedy=f"write one with `llmx eval ENGINE --data FILE --json > {path}`")
    check_eval_baseline(doc, str(path))
    return doc
