"""Regression gates: compare a bench report or a perplexity with a baseline and say what got worse.

A throughput metric regresses when it is lower than the baseline by more than the tolerance (percent of
the baseline); a latency metric when it is higher by more than the tolerance. Perplexity regresses when
it rose by more than the allowed percentage.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from llmx.bench.metrics import LATENCY_METRICS, THROUGHPUT_METRICS
from llmx.common.errors import LlmxError

# Latency statistics the bench gate checks. p90 is left out: between the median and the tail, it adds
# noise without adding a kind of regression that p50 and p99 miss.
GATED_LATENCY_STATS = ("mean", "p50", "p99")

# Config keys that define the workload: reports whose workloads differ measure different things.
WORKLOAD_KEYS = ("isl", "osl", "num_requests", "concurrency", "request_rate", "dataset_hash", "seed")


@dataclass(frozen=True)
class Comparison:
    metric: str
    baseline: float
    current: float
    higher_is_better: bool
    tolerance_pct: float

    @property
    def change_pct(self) -> float:
        return (self.current - self.baseline) / self.baseline * 100.0

    @property
    def regressed(self) -> bool:
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


def compare_bench(current: dict[str, Any], baseline: dict[str, Any], tolerance_pct: float, *,
                  baseline_name: str = "baseline") -> list[Comparison]:
    """Compare two `llmx-bench/1` reports metric by metric (those missing or zero in either are skipped)."""
    if tolerance_pct < 0:
        raise LlmxError(f"--tolerance must be >= 0 percent, got {tolerance_pct}.")
    differing = [k for k in WORKLOAD_KEYS if current["config"].get(k) != baseline["config"].get(k)]
    if differing:
        details = ", ".join(f"{k} {baseline['config'].get(k)!r} -> {current['config'].get(k)!r}" for k in differing)
        raise LlmxError(f"{baseline_name}: was measured on another workload ({details}); rerun the baseline with "
                        "the same options or compare against a matching report.")
    now, before = gated_metrics(current["metrics"]), gated_metrics(baseline["metrics"])
    comparisons = []
    for name, (value, higher_is_better) in now.items():
        base = before[name][0]
        if value is None or not base:
            continue
        comparisons.append(Comparison(name, float(base), float(value), higher_is_better, tolerance_pct))
    return comparisons


def compare_perplexity(current: dict[str, Any], baseline: dict[str, Any], max_increase_pct: float, *,
                       baseline_name: str = "baseline") -> Comparison:
    """Perplexity against a previous `llmx eval --json` result measured on the same windows of the same text."""
    if max_increase_pct < 0:
        raise LlmxError(f"--max-increase must be >= 0 percent, got {max_increase_pct}.")
    for key in ("data_hash", "seq_len", "num_windows"):
        if baseline.get(key) != current.get(key):
            raise LlmxError(f"{baseline_name}: was measured with {key} {baseline.get(key)!r}, this run with "
                            f"{current.get(key)!r}; compare perplexities over the same text, --seq-len and --windows.")
    base = baseline.get("perplexity")
    if not isinstance(base, (int, float)) or base <= 0:
        raise LlmxError(f"{baseline_name}: has no positive `perplexity`; write it with `llmx eval --json`.")
    return Comparison("perplexity", float(base), float(current["perplexity"]), False, max_increase_pct)
