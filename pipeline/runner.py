"""Run a planned pipeline: each stage runs, is reused, is skipped, or fails; then the gates are judged.

    convert -> quantize -> build -> eval
                                 -> bench

A stage is reused when its record's key equals the key of its current inputs and its output files are
still there; otherwise it runs and its record is rewritten after its output is complete. A failed stage
stops only the stages that read from it (a failed eval does not stop bench). With `only`, the other
stages neither run nor get reused: those whose output a selected stage reads must already be in the
workdir for the current inputs, which is checked before anything runs.
"""

from __future__ import annotations

import datetime
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable

from llmx.common.errors import LlmxError, describe_exception
from llmx.pipeline import stages as stage_fns
from llmx.pipeline.gates import Gate, bench_gates, eval_gates
from llmx.pipeline.hash_cache import HashCache
from llmx.pipeline.keys import StageKeys, compute_keys
from llmx.pipeline.plan import STAGES, PipelinePlan
from llmx.pipeline.records import read_record, write_record
from llmx.pipeline.workdir import Workdir

# The stage each one reads its input from.
UPSTREAM: dict[str, str | None] = {"convert": None, "quantize": "convert", "build": "quantize", "eval": "build",
                                   "bench": "build"}
STATUSES = ("ran", "reused", "skipped", "failed", "not run")


@dataclass
class StageResult:
    name: str
    status: str  # one of STATUSES
    seconds: float = 0.0
    key: str | None = None
    output: str | None = None
    message: str | None = None  # why it was skipped, not run, or failed
    summary: dict[str, Any] = field(default_factory=dict)
    traceback: str | None = None  # for failures that are not LlmxError (a bug, shown in full)

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "status": self.status, "seconds": round(self.seconds, 3), "key": self.key,
                "output": self.output, "message": self.message, "summary": self.summary}


@dataclass
class PipelineResult:
    plan: PipelinePlan
    stages: list[StageResult]
    gates: list[Gate]
    seconds: float
    started_at: str

    @property
    def failed_stages(self) -> list[StageResult]:
        return [s for s in self.stages if s.status == "failed"]

    @property
    def failed_gates(self) -> list[Gate]:
        return [g for g in self.gates if not g.passed]

    @property
    def exit_code(self) -> int:
        """0: every stage completed and every gate passed; 1: a gate failed; 2: a stage failed."""
        if self.failed_stages:
            return 2
        return 1 if self.failed_gates else 0

    @property
    def passed(self) -> bool:
        return self.exit_code == 0


def parse_only(values: Iterable[str] | None) -> tuple[str, ...] | None:
    """`--only eval --only bench` or `--only eval,bench` -> ("eval", "bench"), in pipeline order."""
    if not values:
        return None
    names = {part.strip() for value in values for part in value.split(",") if part.strip()}
    unknown = sorted(names - set(STAGES))
    if unknown:
        raise LlmxError(f"--only {', '.join(unknown)}: not a stage; choose from {', '.join(STAGES)}.")
    return tuple(s for s in STAGES if s in names)


def run_pipeline(plan: PipelinePlan, *, only: tuple[str, ...] | None = None,
                 progress: Callable[[str, int, int], None] | None = None,
                 on_stage: Callable[[StageResult], None] | None = None) -> PipelineResult:
    """Run the stages of `plan` (all, or `only` those) in its workdir and judge the gates.

    Stage failures are reported in the result (exit_code 2), not raised, so the caller can still write
    its reports; problems found before any stage runs (a busy workdir, `only` without the outputs it
    needs) raise LlmxError.
    """
    started = time.perf_counter()
    started_at = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
    work = Workdir(plan.workdir)
    work.create()
    with work.lock():
        hashes = HashCache(work.hash_cache_file, progress=progress)
        keys = compute_keys(plan, hashes)
        hashes.save()
        selected = only or STAGES
        _check_inputs_of_selection(plan, work, keys, selected)
        results: dict[str, StageResult] = {}
        for stage in STAGES:
            if stage not in selected:
                continue
            result = _run_stage(stage, plan, work, keys, results, progress)
            results[stage] = result
            if on_stage is not None:
                on_stage(result)
        gates = _judge(plan, work, results)
    return PipelineResult(plan=plan, stages=list(results.values()), gates=gates,
                          seconds=time.perf_counter() - started, started_at=started_at)


def skip_reason(stage: str, plan: PipelinePlan) -> str | None:
    """Why a stage has nothing to do for this plan, or None."""
    if stage == "convert" and plan.model_is_checkpoint:
        return "the model is already an llmx checkpoint, used as is"
    if stage == "quantize" and plan.quantize is None:
        return plan.quantize_skip_reason
    if stage == "eval" and not plan.datasets:
        return "the recipe has no eval.datasets (or eval.data)"
    if stage == "bench" and not plan.scenarios:
        return "the recipe has no bench.scenarios"
    return None


def stage_output(stage: str, plan: PipelinePlan, work: Workdir) -> Path:
    """Where the stage's output is, following skipped stages to what later stages read instead."""
    if stage == "convert" and plan.model_is_checkpoint:
        return plan.model
    if stage == "quantize" and plan.quantize is None:
        return stage_output("convert", plan, work)
    return work.output(stage)


def _check_inputs_of_selection(plan: PipelinePlan, work: Workdir, keys: StageKeys, selected: tuple[str, ...]) -> None:
    """Every unselected stage a selected one reads from must have a current, intact output in the workdir."""
    needed: set[str] = set()
    for stage in selected:
        upstream = UPSTREAM[stage]
        while upstream is not None:
            needed.add(upstream)
            upstream = UPSTREAM[upstream]
    problems = []
    for stage in STAGES:
        if stage not in needed or stage in selected or skip_reason(stage, plan) is not None:
            continue
        record = read_record(work, stage)
        if record is None or not record.intact(work):
            problems.append((stage, "missing"))
        elif record.key != keys.of(stage):
            problems.append((stage, "out of date (its inputs changed since it ran)"))
    if problems:
        first, why = problems[0]
        stages = ",".join(s for s, _ in problems)
        raise LlmxError(f"--only {','.join(selected)} needs the output of {first}, which is {why} in {work.root}; "
                        f"run {stages} first (`--only {stages}`, or the pipeline without --only).")


def _run_stage(stage: str, plan: PipelinePlan, work: Workdir, keys: StageKeys, done: dict[str, StageResult],
               progress: Callable[[str, int, int], None] | None) -> StageResult:
    key = keys.of(stage)
    reason = skip_reason(stage, plan)
    if reason is not None:
        output = stage_output(stage, plan, work) if stage in ("convert", "quantize") else None
        return StageResult(stage, "skipped", key=key, output=str(output) if output else None, message=reason)
    blocked = _blocked_by(stage, done)
    if blocked is not None:
        return StageResult(stage, "not run", key=key, message=f"{blocked} did not complete")
    start = time.perf_counter()
    record = read_record(work, stage)
    output = str(work.output(stage))
    if record is not None and record.key == key and record.intact(work):
        return StageResult(stage, "reused", time.perf_counter() - start, key, output, summary=record.summary)
    try:
        summary = _execute(stage, plan, work, keys, progress)
        seconds = time.perf_counter() - start
        write_record(work, stage, key, seconds, summary)
    except LlmxError as exc:
        return StageResult(stage, "failed", time.perf_counter() - start, key, output, message=exc.message)
    except Exception as exc:  # an environment failure (one sentence) or a bug (reported with its traceback)
        explained = describe_exception(exc)
        if explained is not None:
            return StageResult(stage, "failed", time.perf_counter() - start, key, output, message=explained)
        return StageResult(stage, "failed", time.perf_counter() - start, key, output,
                           message=f"{type(exc).__name__}: {exc}", traceback=traceback.format_exc())
    return StageResult(stage, "ran", seconds, key, output, summary=summary)


def _blocked_by(stage: str, done: dict[str, StageResult]) -> str | None:
    """The upstream stage that failed or did not run in this invocation, if any (unselected ones were checked)."""
    upstream = UPSTREAM[stage]
    while upstream is not None:
        result = done.get(upstream)
        if result is not None and result.status in ("failed", "not run"):
            return upstream
        upstream = UPSTREAM[upstream]
    return None


def _execute(stage: str, plan: PipelinePlan, work: Workdir, keys: StageKeys,
             progress: Callable[[str, int, int], None] | None) -> dict[str, Any]:
    if stage == "convert":
        return stage_fns.run_convert(plan, work, progress)
    if stage == "quantize":
        return stage_fns.run_quantize(plan, work, stage_output("convert", plan, work), progress)
    if stage == "build":
        return stage_fns.run_build(plan, work, stage_output("quantize", plan, work), progress)
    engine = stage_output("build", plan, work)
    if stage == "eval":
        return stage_fns.run_eval(plan, work, engine, stage_output("convert", plan, work), keys.references,
                                  progress)
    return stage_fns.run_bench(plan, work, engine, progress)


def _judge(plan: PipelinePlan, work: Workdir, results: dict[str, StageResult]) -> list[Gate]:
    gates: list[Gate] = []
    for stage, judge in (("eval", eval_gates), ("bench", bench_gates)):
        result = results.get(stage)
        if result is None or result.status not in ("ran", "reused"):
            continue
        try:
            gates.extend(judge(plan, work.output(stage)))
        except (OSError, ValueError, KeyError, TypeError) as exc:  # results edited or damaged by hand
            gates.append(Gate(f"{stage}.results", stage, None, None, "<=", False,
                              f"the {stage} results in {work.output(stage)} could not be read ({exc}); "
                              f"delete the folder to measure again"))
    return gates
