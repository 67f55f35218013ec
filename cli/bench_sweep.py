"""`llmx bench --sweep FILE`: every cell of a sweep file in one invocation, each next to its peer figure."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from llmx.bench.report import write_report
from llmx.cli._console import out, print_info, progress_bars, stage_callback
from llmx.common.errors import LlmxError

# Library modules that `llmx --help` does not need are imported inside the commands that use them: --help
# imports every command module and must stay under 0.6 s (torch, transformers and pydantic alone take more).

# Options that describe one workload: a sweep file describes its own, so these cannot come with it.
_WORKLOAD_FLAGS = ("isl", "osl", "num_requests", "concurrency", "request_rate", "dataset")


def sweep_command(engine: Path, sweep_path: Path, values: dict[str, Any], sources: dict[str, str], *,
                  json_path: Path | None, baseline: Path | None, sync_steps: bool) -> None:
    """Load and check the sweep file, run its cells on one loaded engine, print the table, write the report."""
    given = [f"--{name.replace('_', '-')}" for name in _WORKLOAD_FLAGS if sources.get(name) == "flag"]
    if given:
        raise LlmxError(f"--sweep runs the cells {sweep_path} lists, so {', '.join(given)} cannot come with it; "
                        "drop them or run one cell without --sweep.")
    if baseline is not None:
        raise LlmxError("--baseline compares one workload's report; it cannot come with --sweep. Compare sweep "
                        "reports cell by cell, or run a cell alone with --baseline.")
    from llmx.bench.sweep import cell_line, load_sweep, print_sweep, run_sweep
    from llmx.runtime.engine import LLM

    sweep = load_sweep(sweep_path)  # before the engine loads: a bad file costs no GPU time
    llm = LLM(engine, kv_cache_tokens=values["kv_cache_tokens"], kv_cache_fraction=values["kv_cache_fraction"],
              async_steps=not sync_steps)
    cells = ", ".join(f"{c.name} x{c.num_requests}" for c in sweep.cells)
    print_info(f"benchmarking {engine} on {llm.stats()['device_name']}: {len(sweep.cells)} cells ({cells}) "
               f"against {sweep.peer}, {values['warmup']} warmup each")
    to_stdout = json_path is not None and str(json_path) == "-"

    def cell_done(partial: dict[str, Any]) -> None:  # a stopped sweep keeps the cells it finished
        print_info(cell_line(partial))
        if json_path is not None and not to_stdout:
            write_report(partial, json_path)

    with progress_bars() as bars:
        report = run_sweep(llm, sweep, warmup=values["warmup"], seed=values["seed"], progress=stage_callback(bars),
                           on_cell=cell_done)
    if json_path is not None:
        write_report(report, json_path)
    if not to_stdout:
        print_sweep(out(), report)
        if json_path is not None:
            print_info(f"report written to {json_path}")
