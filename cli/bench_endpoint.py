"""`llmx bench ENGINE --endpoint URL`: the benchmark run against a server instead of in this process."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from llmx.bench.regression import check_metric_names, check_percent, load_bench_baseline
from llmx.bench.report import print_report, write_report
from llmx.cli._console import out, print_info
from llmx.cli._settings import Settings
from llmx.common.errors import LlmxError

# Library modules that `llmx --help` does not need are imported inside the commands that use them: --help
# imports every command module and must stay under 0.6 s (torch, transformers and pydantic alone take more).


def endpoint_command(engine: Path, url: str, model: str | None, api_key: str | None, values: dict[str, Any],
                     settings: Settings, *, json_path: Path | None, baseline: Path | None,
                     baseline_metrics: list[str] | None, sweep: Path | None) -> None:
    from llmx.bench.endpoint import Endpoint, run_endpoint_benchmark
    from llmx.bench.runner import BenchOptions

    if sweep is not None:
        raise LlmxError("--sweep runs engines in this process; drop --endpoint, or run the cells one by one.")
    if values["dataset"] is not None and settings.sources["num_requests"] == "default":
        values["num_requests"] = None  # a dataset runs whole unless a count is asked for
    baseline_report = None
    if baseline is not None:
        check_percent(values["tolerance"], "--tolerance")
        baseline_report = load_bench_baseline(baseline)
        check_metric_names(baseline_metrics, baseline_report, str(baseline))
    options = BenchOptions(isl=values["isl"], osl=values["osl"], num_requests=values["num_requests"],
                           concurrency=values["concurrency"], request_rate=values["request_rate"],
                           warmup=values["warmup"], dataset=Path(values["dataset"]) if values["dataset"] else None,
                           seed=values["seed"])
    server = Endpoint(url, model, api_key)
    print_info(f"benchmarking {url}: {options.describe()}")
    report = run_endpoint_benchmark(server, engine, options, recipe=settings.recipe)
    to_stdout = json_path is not None and str(json_path) == "-"
    if json_path is not None:
        write_report(report, json_path)
    if not to_stdout:
        print_report(out(), report)
    if baseline_report is not None:
        from llmx.cli.bench import _gate

        _gate(report, baseline_report, values["tolerance"], baseline, baseline_metrics, show_table=not to_stdout)
