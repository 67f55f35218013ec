"""One benchmark run end to end: make the requests, warm up, drive the measured requests, build the report."""

from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from llmx.bench.driver import drive
from llmx.bench.metrics import compute_metrics, memory_metrics, per_device_throughput
from llmx.bench.report import build_report, engine_description, environment_description
from llmx.bench.workload import (BenchRequest, check_fits, dataset_requests, sampleable_token_ids, synthetic_requests,
                                 warmup_requests)
from llmx.common.errors import LlmxError
from llmx.common.hashing import hash_files


@dataclass(frozen=True)
class BenchOptions:
    isl: int
    osl: int
    num_requests: int | None  # None with a dataset: all of its lines
    concurrency: int | None = None  # None (and no request_rate): every request at once
    request_rate: float | None = None
    warmup: int = 2
    dataset: Path | None = None
    seed: int = 0
    kv_cache_tokens: int | None = None

    def __post_init__(self):
        if self.concurrency is not None and self.request_rate is not None:
            raise LlmxError("--concurrency and --request-rate are two ways to offer load; choose one.")
        if self.request_rate is not None and not self.request_rate > 0:
            raise LlmxError(f"--request-rate must be a positive number of requests per second, got {self.request_rate}.")

    def describe(self) -> str:
        work = f"dataset {self.dataset}" if self.dataset else f"isl {self.isl}, osl {self.osl}"
        load = (f"{self.request_rate} req/s Poisson" if self.request_rate
                else f"concurrency {self.concurrency}" if self.concurrency else "all requests at once")
        count = self.num_requests if self.num_requests is not None else "all"
        return f"{count} requests ({work}), {load}, {self.warmup} warmup"


def make_requests(llm: Any, options: BenchOptions) -> tuple[list[BenchRequest], list[BenchRequest]]:
    """(measured, warmup) requests for `llm`, checked against its max_seq_len before anything runs."""
    tokenizer = llm.tokenizer
    model = llm.engine.model
    if tokenizer is None:  # a --dummy-weights engine made from a bare config.json: ids only
        special = [i for i in (model.bos_token_id, *model.eos_token_ids) if i is not None]
        token_ids = sampleable_token_ids(model.vocab_size, special)
    else:
        token_ids = sampleable_token_ids(min(model.vocab_size, len(tokenizer)), tokenizer.all_special_ids)
    if options.dataset is not None:
        if tokenizer is None:
            raise LlmxError(f"{llm.engine.path} has no tokenizer, so --dataset prompts cannot be tokenized; "
                            "use synthetic requests (--isl/--osl) or an engine built from a model with tokenizer files.")
        requests = dataset_requests(options.dataset, tokenizer.encode, default_output_len=options.osl,
                                    num_requests=options.num_requests)
        source = str(options.dataset)
    else:
        requests = synthetic_requests(num_requests=options.num_requests, isl=options.isl, osl=options.osl,
                                      token_ids=token_ids, seed=options.seed)
        source = f"--isl {options.isl} --osl {options.osl}"
    check_fits(requests, llm.max_seq_len, source)
    # A different seed than the measured prompts, so warmup never pre-fills their prefix cache.
    warmup = warmup_requests(requests, options.warmup, token_ids=token_ids, seed=options.seed + 1_000_003)
    return requests, warmup


def run_benchmark(llm: Any, options: BenchOptions, *, recipe: str | None = None,
                  progress: Callable[[str, int, int], None] | None = None) -> dict[str, Any]:
    """Warm up, measure, and return the `llmx-bench/1` report. progress: (stage, finished, total)."""
    metrics = measure(llm, options, progress=progress)
    return build_report(engine=engine_description(llm.engine), config=report_config(options, recipe), metrics=metrics,
                        environment=environment_description(llm.stats()))


def measure(llm: Any, options: BenchOptions, *, progress: Callable[[str, int, int], None] | None = None,
            stage: str = "") -> dict[str, Any]:
    """Warm up, drive the measured requests, and return their metrics. progress: (stage, finished, total),
    the stage named "warmup requests" / "measured requests", after `stage` when one is given."""

    def report(what: str) -> Callable[[int, int], None] | None:
        label = f"{stage} {what}" if stage else what
        return (lambda done, total: progress(label, done, total)) if progress is not None else None

    requests, warmup = make_requests(llm, options)
    if warmup:
        drive(llm, warmup, concurrency=options.concurrency, on_progress=report("warmup requests"))
    stats_before = llm.stats()
    records = drive(llm, requests, concurrency=options.concurrency, request_rate=options.request_rate,
                    seed=options.seed, on_progress=report("measured requests"))
    failed = [r for r in records if r.error]
    if failed:
        raise LlmxError(f"{len(failed)} of {len(records)} benchmark requests failed (first: {failed[0].error}); "
                        "the figures would be wrong, so none are reported.")
    metrics = compute_metrics(records)
    metrics.update(memory_metrics(llm.stats(), stats_before=stats_before, peak_process_rss_bytes=_peak_rss_bytes()))
    metrics.update(per_device_throughput(metrics, llm.engine.mapping.world_size))
    return metrics


def report_config(options: BenchOptions, recipe: str | None) -> dict[str, Any]:
    """The report's `config`: what the workload is (a baseline's must match it, checked before running)."""
    synthetic = options.dataset is None
    return {
        "isl": options.isl if synthetic else None,
        "osl": options.osl,
        "num_requests": options.num_requests,
        "concurrency": options.concurrency,
        "request_rate": options.request_rate,
        "warmup": options.warmup,
        "dataset": None if synthetic else str(options.dataset),
        "dataset_hash": None if synthetic else hash_files([options.dataset]),
        "seed": options.seed,
        "ignore_eos": True,
        "kv_cache_tokens": options.kv_cache_tokens,
        "recipe": recipe,
    }


def _peak_rss_bytes() -> int | None:
    try:
        import resource
    except ImportError:  # Windows
        return None
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if sys.platform == "darwin" else peak * 1024  # Linux reports KiB, macOS bytes
