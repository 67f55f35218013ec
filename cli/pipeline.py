"""`llmx pipeline`: convert -> quantize -> build -> eval -> bench from one recipe, cached per stage, gated for CI."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, Optional

import typer

from llmx.cli._console import emit_json, err, out, print_info, print_warning, progress_bars, stage_callback
from llmx.cli._options import JsonOption
from llmx.common.errors import GateFailure, LlmxError

# Library modules that `llmx --help` does not need are imported inside the commands that use them: --help
# imports every command module and must stay under 0.6 s (torch, transformers and pydantic alone take more).

if TYPE_CHECKING:
    from llmx.pipeline.runner import PipelineResult, StageResult


def pipeline_command(
    recipe: Annotated[str, typer.Option(
        "--recipe", metavar="FILE|FAMILY/TARGET", show_default=False,
        help="The recipe: every stage's settings, the eval datasets and bench scenarios with their gates "
             "(a YAML file, or a shipped one such as llama/h100).")],
    model: Annotated[Optional[str], typer.Option(
        "--model", metavar="PATH|ORG/NAME", show_default=False,
        help="Hugging Face model folder, hub model ID ORG/NAME[@REVISION] (fetched into the Hugging Face cache), "
             "or an llmx checkpoint (convert is then skipped) [default: the recipe's model.source].")] = None,
    workdir: Annotated[Optional[Path], typer.Option(
        "--workdir", metavar="DIR", show_default=False,
        help="Where the stages write and remember their inputs; reuse it to skip unchanged stages "
             "[default: .llmx-work/pipeline/NAME, NAME from the recipe].")] = None,
    only: Annotated[Optional[list[str]], typer.Option(
        "--only", metavar="STAGE", show_default=False,
        help="Run just these stages (convert, quantize, build, eval, bench; repeat or comma-separate). The "
             "stages they read from must already be in the workdir for the current inputs.")] = None,
    json_output: JsonOption = False,
    junit: Annotated[Optional[Path], typer.Option(
        "--junit", metavar="FILE", show_default=False,
        help="Also write a JUnit XML report (a testcase per stage and per gate) for CI to display; written "
             "even when a stage fails.")] = None,
) -> None:
    """Run the whole pipeline from one recipe and gate the results: the CI regression job in one command.

    Stages: convert -> quantize -> build -> eval -> bench. A stage whose inputs (content hashes of the model,
    calibration and eval data, its options, the llmx version, and the stages before it) are unchanged since
    its last run in --workdir is reused, not rerun; each prints one line: ran, reused, skipped or failed,
    with its time. A failing stage leaves every earlier stage's output intact for the next run, and none of
    its own.

    Gates (the recipe's eval.datasets and bench.scenarios): perplexity increase over the unquantized engine
    or a committed baseline, absolute perplexity, minimum throughput, maximum mean TTFT/TPOT/E2E, or a
    committed bench baseline with a tolerance. A table shows each gate's measured value, threshold and
    verdict. Exit code: 0 every gate passed, 1 a gate failed, 2 bad input or a stage failed.

    Relative paths in a recipe file are relative to its folder; in a shipped recipe, to the current directory.

    Examples:

      llmx pipeline --recipe llama/h100 --model ./Llama-3.1-8B-Instruct --junit pipeline.xml

      llmx pipeline --recipe regression/smollm2-cpu.yaml --model "$SMOLLM2" --workdir .llmx-work/ci

      llmx pipeline --recipe my.yaml --model ckpt/llama8b --only eval,bench --json > summary.json
    """
    from llmx.pipeline.plan import make_plan
    from llmx.pipeline.runner import parse_only, run_pipeline

    selected = parse_only(only)
    plan = make_plan(recipe, defaults=stage_defaults(), model=model, workdir=workdir)
    print_info(f"pipeline {plan.recipe} ({plan.family} on {plan.target}): model {plan.model}, workdir {plan.workdir}")
    with progress_bars() as bars:
        result = run_pipeline(plan, only=selected, progress=stage_callback(bars), on_stage=_print_stage)
    for stage in result.failed_stages:
        if stage.traceback:  # not an LlmxError: a bug, whose traceback is what a report needs
            err().print(stage.traceback, markup=False, highlight=False)
    if junit is not None:
        from llmx.pipeline.junit import write_junit

        write_junit(result, junit)
        print_info(f"JUnit report written to {junit}")
    if json_output:
        from llmx.pipeline.summary import summary_dict

        emit_json(summary_dict(result))
    else:
        _print_gates(result)
    _finish(result)


def stage_defaults() -> dict[str, dict[str, Any]]:
    """Each command's defaults: a stage run by the pipeline gets the same settings as the command would."""
    from llmx.cli import bench, build, convert, quantize
    from llmx.cli import eval as eval_

    return {"convert": convert.DEFAULTS, "quantize": quantize.DEFAULTS, "build": build.DEFAULTS,
            "eval": eval_.DEFAULTS, "bench": bench.DEFAULTS}


def _stage_tail(stage: "StageResult") -> str:
    """What follows the stage's name and status: `0.0 s  (key 3f2a9c1d0b7e…)`, `1.2 s: <why it failed>`."""
    time = f"{stage.seconds:6.1f} s"
    if stage.status == "reused" and stage.key:
        return f"{time}  (key {stage.key.removeprefix('sha256:')[:12]}…)"
    if stage.status == "failed":
        return f"{time}: {stage.message}"
    if stage.status in ("skipped", "not run"):
        return f"{time}  ({stage.message})"
    return time


def _print_stage(stage: "StageResult") -> None:
    """One line per stage as it finishes: `convert   reused     0.0 s  (key 3f2a9c1d0b7e…)`."""
    from rich.markup import escape

    colour = {"ran": "green", "reused": "cyan", "skipped": "dim", "failed": "bold red", "not run": "yellow"}
    err().print(f"{stage.name:<9} [{colour[stage.status]}]{stage.status:<8}[/] {escape(_stage_tail(stage))}",
                highlight=False)
    if stage.status == "ran":
        for warning in stage.summary.get("warnings", ()):  # quantize: e.g. degenerate calibration of a layer
            print_warning(warning)


def _print_gates(result: "PipelineResult") -> None:
    from rich.markup import escape
    from rich.table import Table

    from llmx.pipeline.gates import format_number

    if not result.gates:
        out().print("no gates judged: the stages run set no thresholds or baselines", highlight=False)
        return
    table = Table(title="gates", title_justify="left")
    # Numbers and verdicts never wrap; the gate column (name, then its detail dimmed) takes what is left,
    # so the table stays readable in an 80-column CI log.
    table.add_column("gate", ratio=1, overflow="fold")
    for column in ("measured", "", "threshold", "verdict"):
        table.add_column(column, justify="right" if column in ("measured", "threshold") else "left", no_wrap=True)
    for gate in result.gates:
        unit = f" {gate.unit}" if gate.unit else ""
        verdict = "[green]pass[/]" if gate.passed else "[bold red]FAIL[/]"
        table.add_row(f"{escape(gate.name)}\n[dim]{escape(gate.detail)}[/]", format_number(gate.measured) + unit,
                      gate.comparison, format_number(gate.threshold) + unit, verdict)
    out().print(table)


def _finish(result: "PipelineResult") -> None:
    workdir = result.plan.workdir
    if result.failed_stages:
        names = ", ".join(s.name for s in result.failed_stages)
        raise LlmxError(f"stage {names} failed ({result.failed_stages[0].message}); the outputs of the stages "
                        f"before it are kept in {workdir} and will be reused.")
    if result.failed_gates:
        names = ", ".join(g.name for g in result.failed_gates)
        raise GateFailure(f"{len(result.failed_gates)} of {len(result.gates)} gates failed: {names}.")
    count = len(result.gates)
    print_info(f"pipeline passed: {count} gate{'' if count == 1 else 's'} in {result.seconds:.1f} s.")
