"""The machine-readable summary of a pipeline run (`llmx pipeline --json`), schema `llmx-pipeline/1`:

    {"schema": "llmx-pipeline/1", "recipe", "model", "workdir", "llmx", "started_at", "seconds",
     "stages": [{name, status: ran|reused|skipped|failed|"not run", seconds, key, output, message, summary}],
     "gates": [{name, stage, measured, threshold, comparison, passed, detail, unit}],
     "passed": bool, "exit_code": 0|1|2}
"""

from __future__ import annotations

from typing import Any

import llmx
from llmx.pipeline.runner import PipelineResult

SCHEMA = "llmx-pipeline/1"


def summary_dict(result: PipelineResult) -> dict[str, Any]:
    plan = result.plan
    return {
        "schema": SCHEMA,
        "recipe": plan.recipe,
        "model": str(plan.model),
        "workdir": str(plan.workdir),
        "llmx": llmx.__version__,
        "started_at": result.started_at,
        "seconds": round(result.seconds, 3),
        "stages": [s.to_dict() for s in result.stages],
        "gates": [g.to_dict() for g in result.gates],
        "passed": result.passed,
        "exit_code": result.exit_code,
    }
