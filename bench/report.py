"""The benchmark report: a JSON document (`llmx-bench/1`) and the tables people read.

    {"schema": "llmx-bench/1",
     "engine": {path, architecture, family, dtype, quantization, build, mapping, target},
     "config": {workload and load settings: isl, osl, num_requests, concurrency, request_rate, warmup, ...},
     "metrics": {throughputs, ttft_ms/tpot_ms/itl_ms/e2e_ms distributions, memory, kv_cache, ...},
     "environment": {device, device_name, torch, llmx, python, platform, cpu_count, created}}
"""

from __future__ import annotations

import dataclasses
import os
import platform
import sys
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import llmx
from llmx.bench.metrics import LATENCY_METRICS, PERCENTILES
from llmx.common.errors import LlmxError
from llmx.common.jsonio import dumps, read_json_object

SCHEMA = "llmx-bench/1"


def engine_description(engine: Any) -> dict[str, Any]:
    """What was benchmarked, from the runtime's Engine record (model, quantization, build, mapping, target)."""

    def plain(obj: Any) -> Any:
        if obj is None or isinstance(obj, (str, int, float, bool, dict, list)):
            return obj
        if hasattr(obj, "to_dict"):
            return obj.to_dict()
        return dataclasses.asdict(obj) if dataclasses.is_dataclass(obj) else str(obj)

    model = engine.model
    return {
        "path": str(engine.path),
        "architecture": model.architecture,
        "family": model.family,
        "num_layers": model.num_layers,
        "hidden_size": model.hidden_size,
        "dtype": plain(getattr(engine, "dtype", None)),
        "quantization": plain(engine.quant),
        "build": plain(engine.build),
        "mapping": plain(engine.mapping),
        "target": plain(engine.target),
    }


def environment_description(stats: dict[str, Any]) -> dict[str, Any]:
    import torch

    return {
        "device": stats.get("device"),
        "device_name": stats.get("device_name"),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "llmx": llmx.__version__,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "cpu_count": os.cpu_count(),
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }


def build_report(*, engine: dict, config: dict, metrics: dict, environment: dict) -> dict[str, Any]:
    return {"schema": SCHEMA, "engine": engine, "config": config, "metrics": metrics, "environment": environment}


def write_report(report: dict[str, Any], path: Path) -> None:
    """Write the report as JSON; `-` means stdout. A file is written whole or not at all.

    A NaN or infinite metric is written as null and listed under `non_finite` (llmx.common.jsonio).
    """
    text = dumps(report) + "\n"
    if str(path) == "-":
        sys.stdout.write(text)
        sys.stdout.flush()
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(text)
    os.replace(tmp, path)


def load_report(path: Path) -> dict[str, Any]:
    """Read a previous report (a baseline), refusing anything that is not an `llmx-bench/1` document."""
    report = read_json_object(path, what="baseline report", remedy=f"write one with `llmx bench ENGINE --json {path}`")
    if report.get("schema") != SCHEMA:
        raise LlmxError(f"{path}: is not an {SCHEMA} report (schema: {report.get('schema')}); write one with "
                        "`llmx bench --json`.")
    return report


def _number(value: float | None, digits: int = 2) -> str:
    return "n/a" if value is None else f"{value:,.{digits}f}"


def print_report(console: Any, report: dict[str, Any]) -> None:
    """Three tables: throughput, latency distributions, memory."""
    from rich.table import Table

    m, config = report["metrics"], report["config"]
    load = (f"{config['request_rate']} req/s (Poisson)" if config.get("request_rate")
            else f"concurrency {config.get('concurrency') or 'all at once'}")
    summary = Table(title=f"llmx bench: {report['engine']['path']} ({load})", show_header=False, title_justify="left")
    summary.add_column(style="bold")
    summary.add_column(justify="right")
    summary.add_row("requests (ok / failed)", f"{m['completed_requests']} / {m['failed_requests']}")
    summary.add_row("input / output tokens", f"{m['total_input_tokens']:,} / {m['total_output_tokens']:,}")
    summary.add_row("duration", f"{_number(m['duration_s'], 3)} s")
    summary.add_row("request throughput", f"{_number(m['request_throughput_rps'])} req/s")
    summary.add_row("output throughput", f"{_number(m['output_throughput_tok_s'])} tok/s")
    summary.add_row("total throughput", f"{_number(m['total_throughput_tok_s'])} tok/s")
    if m.get("world_size", 1) > 1:
        summary.add_row(f"output throughput per device ({m['world_size']} ranks)",
                        f"{_number(m['output_throughput_per_device_tok_s'])} tok/s")
    console.print(summary)

    latency = Table(title="latency (ms)", title_justify="left")
    latency.add_column("metric", style="bold")
    for name in ["mean"] + [f"p{q}" for q in PERCENTILES]:
        latency.add_column(name, justify="right")
    for metric in LATENCY_METRICS:
        dist = m.get(metric)
        label = metric.removesuffix("_ms").upper()
        latency.add_row(label, *([_number(dist[k]) for k in ("mean", *[f"p{q}" for q in PERCENTILES])]
                                 if dist else ["n/a"] * (1 + len(PERCENTILES))))
    console.print(latency)

    if "kv_cache" not in m:  # a server measured from outside (--endpoint): its memory is not seen
        return
    kv = m["kv_cache"]
    memory = Table(title="memory", show_header=False, title_justify="left")
    memory.add_column(style="bold")
    memory.add_column(justify="right")
    memory.add_row("peak device memory", _bytes(m.get("peak_device_memory_bytes")))
    memory.add_row("peak process RSS", _bytes(m.get("peak_process_rss_bytes")))
    fraction = kv.get("peak_use_fraction")
    memory.add_row("KV cache peak use", f"{kv.get('blocks_peak_used')} / {kv.get('blocks_total')} blocks"
                   + (f" ({fraction:.0%})" if fraction is not None else ""))
    memory.add_row("preemptions", str(m.get("num_preemptions")))
    console.print(memory)


def _bytes(n: int | None) -> str:
    return "n/a" if n is None else f"{n / 2**30:.2f} GiB"
