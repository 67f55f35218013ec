"""`llmx bench`: throughput and latency of an engine under a seeded workload, with a regression gate."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any, Optional

import typer

from llmx.bench.regression import (check_metric_names, check_percent, check_same_workload, compare_bench,
                                   load_bench_baseline)
from llmx.bench.report import print_report, write_report
from llmx.cli._console import emit_json, out, print_info, progress_bars, stage_callback
from llmx.cli._options import KvCacheFractionOption, PrintConfigOption, RecipeOption, SyncStepsOption
from llmx.cli._settings import resolve_settings
from llmx.common import env
from llmx.common.errors import GateFailure, LlmxError

# Library modules that `llmx --help` does not need are imported inside the commands that use them: --help
# imports every command module and must stay under 0.6 s (torch, transformers and pydantic alone take more).

DEFAULTS: dict[str, Any] = {
    "isl": 2048,
    "osl": 256,
    "num_requests": 64,
    "concurrency": None,
    "request_rate": None,
    "warmup": 2,
    "dataset": None,
    "seed": 0,
    "tolerance": 5.0,
    "kv_cache_tokens": None,
    "kv_cache_fraction": 0.9,
}


def bench_command(
    engine: Annotated[Path, typer.Argument(metavar="ENGINE", show_default=False, help=(
        "Engine directory (from `llmx build`); with --endpoint, the engine whose tokenizer and limits make the "
        "prompts (weights are not loaded)."))],
    isl: Annotated[Optional[int], typer.Option(
        min=1, show_default=False, help=f"Input (prompt) tokens per synthetic request [default: {DEFAULTS['isl']}].")] = None,
    osl: Annotated[Optional[int], typer.Option(
        min=1, show_default=False,
        help=f"Output tokens per request, exact: EOS is ignored [default: {DEFAULTS['osl']}].")] = None,
    num_requests: Annotated[Optional[int], typer.Option(
        min=1, show_default=False,
        help=f"Measured requests [default: {DEFAULTS['num_requests']}; with --dataset: every line].")] = None,
    concurrency: Annotated[Optional[int], typer.Option(
        min=1, show_default=False,
        help="Keep this many requests in flight [default: all at once = maximum load, offline throughput].")] = None,
    request_rate: Annotated[Optional[float], typer.Option(
        show_default=False,
        help="Instead of --concurrency: Poisson arrivals at this many requests per second (seeded).")] = None,
    warmup: Annotated[Optional[int], typer.Option(
        min=0, show_default=False,
        help=f"Requests run before measuring, not counted [default: {DEFAULTS['warmup']}].")] = None,
    dataset: Annotated[Optional[Path], typer.Option(
        metavar="FILE.jsonl", show_default=False,
        help="Real prompts instead of synthetic ones: {\"prompt\": str, \"output_len\" or \"max_tokens\": int} per "
             "line (output length defaults to --osl).")] = None,
    sweep: Annotated[Optional[Path], typer.Option(
        metavar="FILE.yaml", show_default=False,
        help="Run every ISL/OSL cell the file lists (requests all at once, optional max batch per cell), each next to "
             "the peer figure it gives, with the ratio; --json writes an llmx-bench-sweep/1 report. Example: "
             "measurements/peers/tensorrt-llm-1.0-h100-fp8.yaml.")] = None,
    endpoint: Annotated[Optional[str], typer.Option(
        metavar="URL", show_default=False,
        help="Benchmark an OpenAI-compatible server at URL (e.g. http://127.0.0.1:8000/v1, `llmx serve` or another) "
             "with the same requests, timed from its streamed chunks, instead of running ENGINE here.")] = None,
    model: Annotated[Optional[str], typer.Option(
        show_default=False, help="With --endpoint: the model name to send [default: the first /v1/models lists].")] = None,
    api_key: Annotated[Optional[str], typer.Option(
        envvar=env.LLMX_API_KEY.name, show_default=False,
        help="With --endpoint: the server's API key (also $LLMX_API_KEY).")] = None,
    seed: Annotated[Optional[int], typer.Option(
        min=0, show_default=False, help=f"Seed for synthetic prompts and arrivals [default: {DEFAULTS['seed']}].")] = None,
    json_path: Annotated[Optional[Path], typer.Option(
        "--json", metavar="OUT", show_default=False,
        help="Write the JSON report (schema llmx-bench/1) to OUT; `-` prints it to stdout instead of the tables.")] = None,
    baseline: Annotated[Optional[Path], typer.Option(
        metavar="FILE", show_default=False,
        help="A previous --json report of the same workload: exit 1 if any metric regressed beyond --tolerance.")] = None,
    tolerance: Annotated[Optional[float], typer.Option(
        min=0.0, show_default=False,
        help=f"Allowed regression in percent of the baseline [default: {DEFAULTS['tolerance']}].")] = None,
    baseline_metrics: Annotated[Optional[list[str]], typer.Option(
        "--baseline-metric", metavar="METRIC", show_default=False,
        help="Gate only this metric of the baseline (repeat for several), e.g. output_throughput_tok_s or "
             "ttft_ms.p50 [default: every throughput and every latency mean/p50/p99].")] = None,
    kv_cache_tokens: Annotated[Optional[int], typer.Option(
        min=1, show_default=False, help="KV-cache size in tokens (sizing on CPU) [default: the runtime's].")] = None,
    kv_cache_fraction: KvCacheFractionOption = None,
    sync_steps: SyncStepsOption = False,
    recipe: RecipeOption = None,
    print_config: PrintConfigOption = False,
) -> None:
    """Benchmark an engine: request and token throughput, TTFT, TPOT, ITL and end-to-end latency, memory.

    What is timed: host wall clock (time.perf_counter) from the first measured request's arrival to the last
    finish. Token timestamps are read right after each runtime step returns, so all tokens of a step share
    one time. TTFT = first token - arrival; TPOT = (E2E - TTFT) / (output tokens - 1); ITL = gaps between
    consecutive tokens; E2E = finish - arrival. With --request-rate, arrival is the scheduled Poisson time.
    Not timed: loading the engine, building and tokenizing the prompts, the warmup requests.

    Synthetic prompts are seeded random token ids (special tokens excluded) of exactly --isl tokens; every
    request produces exactly its output length (EOS ignored).

    Examples:

      llmx bench engines/llama8b --isl 2048 --osl 256 --num-requests 256 --json bench.json

      llmx bench engines/llama8b --isl 128 --osl 128 --concurrency 1

      llmx bench engines/llama8b --request-rate 4 --num-requests 100 --baseline bench.json --tolerance 5

      llmx bench engines/llama8b --baseline bench.json --baseline-metric output_throughput_tok_s --tolerance 10

      llmx bench engines/llama8b --sweep measurements/peers/tensorrt-llm-1.0-h100-fp8.yaml --json sweep.json
    """
    flags = {"isl": isl, "osl": osl, "num_requests": num_requests, "concurrency": concurrency,
             "request_rate": request_rate, "warmup": warmup, "dataset": str(dataset) if dataset else None,
             "seed": seed, "tolerance": tolerance, "kv_cache_tokens": kv_cache_tokens,
             "kv_cache_fraction": kv_cache_fraction}
    settings = resolve_settings("bench", recipe=recipe, flags=flags, defaults=DEFAULTS)
    if print_config:
        emit_json(settings.to_dict())
        return
    values = dict(settings.values)
    if baseline_metrics and baseline is None:
        raise LlmxError("--baseline-metric names what --baseline gates; add --baseline FILE (a previous --json "
                        "report).")
    if endpoint is not None:
        from llmx.cli.bench_endpoint import endpoint_command

        endpoint_command(engine, endpoint, model, api_key, values, settings, json_path=json_path, baseline=baseline,
                         baseline_metrics=baseline_metrics, sweep=sweep)
        return
    if sweep is not None:
        from llmx.cli.bench_sweep import sweep_command

        sweep_command(engine, sweep, values, settings.sources, json_path=json_path, baseline=baseline,
                      sync_steps=sync_steps)
        return
    if values["dataset"] is not None and settings.sources["num_requests"] == "default":
        values["num_requests"] = None  # a dataset runs whole unless a count is asked for
    from llmx.bench.runner import BenchOptions, run_benchmark

    baseline_report = None
    if baseline is not None:  # checked whole before the benchmark runs, not after
        check_percent(values["tolerance"], "--tolerance")
        baseline_report = load_bench_baseline(baseline)
        check_metric_names(baseline_metrics, baseline_report, str(baseline))
    options = BenchOptions(isl=values["isl"], osl=values["osl"], num_requests=values["num_requests"],
                           concurrency=values["concurrency"], request_rate=values["request_rate"],
                           warmup=values["warmup"], dataset=Path(values["dataset"]) if values["dataset"] else None,
                           seed=values["seed"], kv_cache_tokens=values["kv_cache_tokens"])
    if baseline_report is not None:  # a baseline of another workload is refused before the engine loads
        from llmx.bench.runner import report_config

        check_same_workload(report_config(options, settings.recipe), baseline_report, str(baseline))
    from llmx.runtime.engine import LLM

    llm = LLM(engine, kv_cache_tokens=options.kv_cache_tokens, kv_cache_fraction=values["kv_cache_fraction"],
              async_steps=not sync_steps)
    print_info(f"benchmarking {engine} on {llm.stats()['device_name']}: {options.describe()}")
    with progress_bars() as bars:
        report = run_benchmark(llm, options, recipe=settings.recipe, progress=stage_callback(bars))
    to_stdout = json_path is not None and str(json_path) == "-"
    if json_path is not None:
        write_report(report, json_path)
    if not to_stdout:
        print_report(out(), report)
        if json_path is not None:
            print_info(f"report written to {json_path}")
    if baseline_report is not None:
        _gate(report, baseline_report, values["tolerance"], baseline, baseline_metrics, show_table=not to_stdout)


def _gate(report: dict, baseline_report: dict, tolerance: float, baseline: Path, metrics: list[str] | None = None,
          *, show_table: bool) -> None:
    comparisons = compare_bench(report, baseline_report, tolerance, baseline_name=str(baseline))
    if metrics:
        comparisons = [c for c in comparisons if c.metric in metrics]
    regressed = [c for c in comparisons if c.regressed]
    if show_table:
        from rich.table import Table

        table = Table(title=f"against {baseline} (tolerance {tolerance}%)", title_justify="left")
        for column in ("metric", "baseline", "now", "change", ""):
            table.add_column(column, justify="left" if column == "metric" else "right")
        for c in comparisons:
            verdict = "[bold red]REGRESSED[/]" if c.regressed else "[green]ok[/]"
            table.add_row(c.metric, f"{c.baseline:,.2f}", f"{c.current:,.2f}", c.change_text, verdict)
        out().print(table)
    if regressed:
        listed = ", ".join(f"{c.metric} {c.change_text}" for c in regressed)
        raise GateFailure(f"{len(regressed)} metric(s) regressed beyond {tolerance}% against {baseline}: {listed}.")
    print_info(f"no regression beyond {tolerance}% against {baseline} ({len(comparisons)} metrics compared).")
