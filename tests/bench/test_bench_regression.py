"""Regression gates: throughput falls and latency rises beyond the tolerance regress; other workloads are refused."""

from __future__ import annotations

import copy

import pytest

from llmx.bench.regression import Comparison, compare_bench, compare_perplexity, gated_metrics
from llmx.common.errors import LlmxError


def dist(value):
    return {"mean": value, "p50": value, "p90": value, "p99": value}


def report(throughput=100.0, ttft=50.0, config=None):
    return {
        "schema": "llmx-bench/1",
        "config": config or {"isl": 128, "osl": 32, "num_requests": 16, "concurrency": None, "request_rate": None,
                             "dataset_hash": None, "seed": 0},
        "metrics": {"request_throughput_rps": throughput / 10, "output_throughput_tok_s": throughput,
                    "total_throughput_tok_s": throughput * 5, "ttft_ms": dist(ttft), "tpot_ms": dist(10.0),
                    "itl_ms": dist(10.0), "e2e_ms": dist(400.0)},
    }


def regressed(comparisons):
    return sorted(c.metric for c in comparisons if c.regressed)


def test_identical_reports_do_not_regress():
    comparisons = compare_bench(report(), report(), 5.0)
    assert len(comparisons) == len(gated_metrics(report()["metrics"])) == 15
    assert regressed(comparisons) == []


def test_throughput_drop_beyond_tolerance_regresses_and_within_does_not():
    assert regressed(compare_bench(report(throughput=94.0), report(), 5.0)) == [
        "output_throughput_tok_s", "request_throughput_rps", "total_throughput_tok_s"]
    assert regressed(compare_bench(report(throughput=96.0), report(), 5.0)) == []


def test_higher_throughput_and_lower_latency_are_improvements():
    assert regressed(compare_bench(report(throughput=300.0, ttft=1.0), report(), 0.0)) == []


def test_latency_rise_beyond_tolerance_regresses():
    assert regressed(compare_bench(report(ttft=52.0), report(), 5.0)) == []  # +4%
    assert regressed(compare_bench(report(ttft=53.0), report(), 5.0)) == ["ttft_ms.mean", "ttft_ms.p50", "ttft_ms.p99"]


def test_change_is_a_percentage_of_the_baseline():
    c = Comparison("ttft_ms.p50", baseline=50.0, current=60.0, higher_is_better=False, tolerance_pct=10.0)
    assert c.change_pct == pytest.approx(20.0)
    assert c.regressed
    assert c.to_dict()["regressed"] is True


def test_metrics_missing_or_zero_in_the_baseline_are_skipped():
    baseline = report()
    baseline["metrics"]["tpot_ms"] = None  # e.g. osl 1: no TPOT
    baseline["metrics"]["itl_ms"] = dist(0.0)
    names = {c.metric for c in compare_bench(report(), baseline, 5.0)}
    assert not any(n.startswith(("tpot", "itl")) for n in names)
    assert "ttft_ms.p50" in names


def test_a_baseline_of_another_workload_is_refused():
    other = copy.deepcopy(report())
    other["config"]["isl"] = 2048
    with pytest.raises(LlmxError, match=r"base.json: was measured on another workload \(isl 2048 -> 128\)"):
        compare_bench(report(), other, 5.0, baseline_name="base.json")


def test_negative_tolerance_is_refused():
    with pytest.raises(LlmxError, match="--tolerance"):
        compare_bench(report(), report(), -1.0)


def ppl(value, **overrides):
    return {"schema": "llmx-eval/1", "perplexity": value, "data_hash": "sha256:ab", "seq_len": 512, "num_windows": 8,
            **overrides}


def test_perplexity_gate():
    assert not compare_perplexity(ppl(10.4), ppl(10.0), 5.0).regressed
    assert compare_perplexity(ppl(10.6), ppl(10.0), 5.0).regressed
    assert not compare_perplexity(ppl(9.0), ppl(10.0), 0.0).regressed
    assert compare_perplexity(ppl(10.6), ppl(10.0), 5.0).change_pct == pytest.approx(6.0)


@pytest.mark.parametrize("key, value", [("data_hash", "sha256:cd"), ("seq_len", 1024), ("num_windows", 4)])
def test_perplexity_of_other_windows_is_not_compared(key, value):
    with pytest.raises(LlmxError, match=rf"was measured with {key}"):
        compare_perplexity(ppl(10.0), ppl(10.0, **{key: value}), 5.0)
