"""Benchmark metrics from per-request host timestamps.

Definitions (per successful request; times in milliseconds in the report):
- TTFT = first token time - arrival
- TPOT = (E2E - TTFT) / (output tokens - 1), for requests with at least 2 output tokens
- ITL  = gaps between consecutive token times, pooled over all requests
- E2E  = finish time - arrival
Duration is the wall clock from the first measured arrival to the last finish; throughputs divide token
and request counts of successful requests by it. Distributions report mean and the 50/90/99th
percentiles (linear interpolation between order statistics, as numpy's default).
"""

from __future__ import annotations

import math
from typing import Any, Iterable

from llmx.bench.driver import RequestRecord

LATENCY_METRICS = ("ttft_ms", "tpot_ms", "itl_ms", "e2e_ms")
THROUGHPUT_METRICS = ("request_throughput_rps", "output_throughput_tok_s", "total_throughput_tok_s")
PERCENTILES = (50, 90, 99)


def percentile(values: list[float], q: float) -> float:
    """The q-th percentile (0..100) of non-empty `values`, interpolating linearly between ranks."""
    if not values:
        raise ValueError("percentile of no values")
    ordered = sorted(values)
    rank = (len(ordered) - 1) * q / 100.0
    low = math.floor(rank)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (rank - low)


def distribution(values: Iterable[float]) -> dict[str, float] | None:
    """mean, p50, p90, p99 of `values` (None when there are none, e.g. TPOT with 1-token outputs)."""
    values = list(values)
    if not values:
        return None
    summary = {"mean": sum(values) / len(values)}
    summary.update({f"p{q}": percentile(values, q) for q in PERCENTILES})
    return summary


def _scaled(dist: dict[str, float] | None, factor: float) -> dict[str, float] | None:
    return None if dist is None else {k: v * factor for k, v in dist.items()}


def request_latencies(record: RequestRecord) -> tuple[float, float | None, list[float], float]:
    """(TTFT, TPOT or None, ITL gaps, E2E) of one finished request, in seconds."""
    ttft = record.token_times[0] - record.arrival
    e2e = record.finish - record.arrival
    tpot = (e2e - ttft) / (record.output_len - 1) if record.output_len > 1 else None
    gaps = [b - a for a, b in zip(record.token_times, record.token_times[1:])]
    return ttft, tpot, gaps, e2e


def compute_metrics(records: list[RequestRecord]) -> dict[str, Any]:
    """Throughput and latency metrics over a measured run (failed requests counted, not timed)."""
    if not records:
        raise ValueError("no requests were measured")
    ok = [r for r in records if r.error is None and r.token_times]
    duration = max(r.finish for r in records) - min(r.arrival for r in records)
    ttfts, tpots, itls, e2es = [], [], [], []
    for record in ok:
        ttft, tpot, gaps, e2e = request_latencies(record)
        ttfts.append(ttft)
        e2es.append(e2e)
        itls.extend(gaps)
        if tpot is not None:
            tpots.append(tpot)
    input_tokens = sum(r.input_len for r in ok)
    output_tokens = sum(r.output_len for r in ok)

    def rate(count: int) -> float | None:
        return count / duration if duration > 0 else None

    return {
        "completed_requests": len(ok),
        "failed_requests": len(records) - len(ok),
        "duration_s": duration,
        "total_input_tokens": input_tokens,
        "total_output_tokens": output_tokens,
        "request_throughput_rps": rate(len(ok)),
        "output_throughput_tok_s": rate(output_tokens),
        "total_throughput_tok_s": rate(input_tokens + output_tokens),
        "ttft_ms": _scaled(distribution(ttfts), 1e3),
        "tpot_ms": _scaled(distribution(tpots), 1e3),
        "itl_ms": _scaled(distribution(itls), 1e3),
        "e2e_ms": _scaled(distribution(e2es), 1e3),
    }


def per_device_throughput(metrics: dict[str, Any], world_size: int) -> dict[str, Any]:
    """Throughput per rank (GPU, or CPU process) of a multi-rank engine: totals / world size."""
    total = metrics["output_throughput_tok_s"]
    return {"world_size": world_size,
            "output_throughput_per_device_tok_s": total / world_size if total is not None else None}


def memory_metrics(stats: dict[str, Any], *, stats_before: dict[str, Any] | None = None,
                   peak_process_rss_bytes: int | None = None) -> dict[str, Any]:
    """Peak memory and KV-cache use from `LLM.stats()` (peak blocks used / blocks allocated).

    The runtime's counters (preemptions, prefix-cache hits) run over the LLM's whole life; `stats_before`,
    read after the warmup, is subtracted so they cover the measured requests only.
    """
    blocks = stats.get("kv_cache_blocks")
    peak_used = stats.get("kv_blocks_peak_used")

    def measured(key: str) -> int | None:
        value, before = stats.get(key), (stats_before or {}).get(key)
        return value - before if value is not None and before is not None else value

    return {
        "peak_device_memory_bytes": stats.get("peak_device_memory_bytes"),
        "peak_process_rss_bytes": peak_process_rss_bytes,
        "kv_cache": {
            "blocks_total": blocks,
            "blocks_peak_used": peak_used,
            "peak_use_fraction": peak_used / blocks if blocks and peak_used is not None else None,
            "block_size": stats.get("kv_block_size"),
            "tokens": stats.get("kv_cache_tokens"),
            "bytes": stats.get("kv_cache_bytes"),
            "dtype": stats.get("kv_cache_dtype"),
        },
        "num_preemptions": measured("num_preemptions"),
        "prefix_cache_hit_tokens": measured("prefix_cache_hit_tokens"),
    }
