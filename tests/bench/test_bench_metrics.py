"""Metric math on hand-made timestamps: percentiles, TTFT/TPOT/ITL/E2E definitions, throughput, memory."""

from __future__ import annotations

import pytest

from llmx.bench.driver import RequestRecord
from llmx.bench.metrics import compute_metrics, distribution, memory_metrics, percentile, request_latencies


def test_percentile_interpolates_linearly_between_ranks():
    values = [4.0, 1.0, 3.0, 2.0]  # unsorted on purpose
    assert percentile(values, 0) == 1.0
    assert percentile(values, 100) == 4.0
    assert percentile(values, 50) == pytest.approx(2.5)
    assert percentile(values, 90) == pytest.approx(3.7)  # rank 2.7: 3 + 0.7 * (4 - 3)
    assert percentile([7.0], 99) == 7.0
    with pytest.raises(ValueError):
        percentile([], 50)


def test_percentile_matches_numpy_default():
    np = pytest.importorskip("numpy")
    values = [0.3, 9.1, 2.2, 5.5, 5.5, 1.0, 8.8, 4.1, 6.6, 0.0, 3.3]
    for q in (1, 10, 33, 50, 90, 99):
        assert percentile(values, q) == pytest.approx(float(np.percentile(values, q)))


def test_distribution_reports_mean_and_percentiles_or_none():
    dist = distribution([1.0, 2.0, 3.0, 4.0, 5.0])
    assert dist == {"mean": 3.0, "p50": 3.0, "p90": pytest.approx(4.6), "p99": pytest.approx(4.96)}
    assert distribution([]) is None


def record(arrival, token_times, input_len=10, error=None):
    return RequestRecord(input_len=input_len, arrival=arrival, token_times=list(token_times),
                         finish=token_times[-1] if token_times else arrival + 0.5, output_len=len(token_times),
                         error=error)


def test_request_latencies_follow_the_definitions():
    # Arrives at 1.0, tokens at 1.5, 1.6, 1.8, 2.1 (finish 2.1).
    ttft, tpot, gaps, e2e = request_latencies(record(1.0, [1.5, 1.6, 1.8, 2.1]))
    assert ttft == pytest.approx(0.5)
    assert e2e == pytest.approx(1.1)
    assert tpot == pytest.approx((1.1 - 0.5) / 3)  # (E2E - TTFT) / (output tokens - 1)
    assert gaps == pytest.approx([0.1, 0.2, 0.3])


def test_single_token_request_has_no_tpot_and_no_gaps():
    ttft, tpot, gaps, e2e = request_latencies(record(0.0, [0.25]))
    assert (ttft, tpot, gaps, e2e) == (0.25, None, [], 0.25)


def test_compute_metrics_over_a_run():
    records = [
        record(0.0, [1.0, 2.0, 3.0], input_len=8),  # ttft 1, tpot 1, e2e 3
        record(1.0, [1.5, 2.5], input_len=4),  # ttft 0.5, tpot 1, e2e 1.5
        record(2.0, [4.0], input_len=6),  # ttft 2, no tpot, e2e 2
    ]
    m = compute_metrics(records)
    assert m["completed_requests"] == 3 and m["failed_requests"] == 0
    assert m["duration_s"] == pytest.approx(4.0)  # first arrival 0.0 -> last finish 4.0
    assert m["total_input_tokens"] == 18 and m["total_output_tokens"] == 6
    assert m["request_throughput_rps"] == pytest.approx(3 / 4)
    assert m["output_throughput_tok_s"] == pytest.approx(6 / 4)
    assert m["total_throughput_tok_s"] == pytest.approx(24 / 4)
    assert m["ttft_ms"]["mean"] == pytest.approx(3500 / 3)
    assert m["ttft_ms"]["p50"] == pytest.approx(1000)
    assert m["tpot_ms"] == {"mean": pytest.approx(1000), "p50": pytest.approx(1000), "p90": pytest.approx(1000),
                            "p99": pytest.approx(1000)}
    assert m["itl_ms"]["mean"] == pytest.approx(1000)  # gaps pooled: 1, 1, 1
    assert m["e2e_ms"]["p50"] == pytest.approx(2000)


def test_failed_requests_are_counted_not_timed():
    ok = record(0.0, [0.5, 1.0], input_len=3)
    failed = RequestRecord(input_len=5000, arrival=0.1, finish=0.1, error="prompt too long")
    m = compute_metrics([ok, failed])
    assert (m["completed_requests"], m["failed_requests"]) == (1, 1)
    assert m["total_input_tokens"] == 3
    assert m["ttft_ms"]["mean"] == pytest.approx(500)


def test_zero_duration_gives_no_throughput_instead_of_dividing_by_zero():
    m = compute_metrics([RequestRecord(input_len=1, arrival=1.0, token_times=[1.0], finish=1.0, output_len=1)])
    assert m["output_throughput_tok_s"] is None


def test_memory_metrics_report_kv_use_and_subtract_warmup_counters():
    stats = {"kv_cache_blocks": 200, "kv_blocks_peak_used": 50, "kv_block_size": 16, "kv_cache_tokens": 3200,
             "kv_cache_bytes": 1 << 20, "kv_cache_dtype": "bfloat16", "peak_device_memory_bytes": 123,
             "num_preemptions": 7, "prefix_cache_hit_tokens": 64}
    before = {"num_preemptions": 2, "prefix_cache_hit_tokens": 64}
    m = memory_metrics(stats, stats_before=before, peak_process_rss_bytes=999)
    assert m["kv_cache"]["peak_use_fraction"] == pytest.approx(0.25)
    assert m["kv_cache"]["blocks_total"] == 200 and m["kv_cache"]["tokens"] == 3200
    assert m["num_preemptions"] == 5
    assert m["prefix_cache_hit_tokens"] == 0
    assert m["peak_device_memory_bytes"] == 123 and m["peak_process_rss_bytes"] == 999


def test_per_device_throughput_divides_the_total_by_the_ranks():
    from llmx.bench.metrics import per_device_throughput

    assert per_device_throughput({"output_throughput_tok_s": 900.0}, 3) == {
        "world_size": 3, "output_throughput_per_device_tok_s": 300.0}
    assert per_device_throughput({"output_throughput_tok_s": None}, 2)["output_throughput_per_device_tok_s"] is None
