"""The one progress protocol of every long library call (convert, quantize, build, tuning, eval, bench).

A progress sink is a callable `progress(stage, done, total)`: `stage` names the step ("convert",
"calibrate", "tune GEMM tiles", ...), `done` counts what is finished in the unit of that stage (bytes,
batches, requests), `total` is the amount to reach, 0 when unknown. Stages report independently; the CLI
draws one bar per stage name (cli/_console.stage_callback) and `llmx pipeline` prefixes the stage names.
"""

from __future__ import annotations

from typing import Callable

Progress = Callable[[str, int, int], None]


def relabel(progress: Progress | None, prefix: str) -> Progress | None:
    """A sink that reports to `progress` with "prefix: stage" as the stage name (None stays None)."""
    if progress is None:
        return None
    return lambda stage, done, total: progress(f"{prefix}: {stage}", done, total)
