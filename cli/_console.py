"""Output helpers shared by the commands: where text goes, how errors look, JSON, progress bars.

Conventions: results for people go to stdout as rich tables; with `--json`, stdout carries exactly one
JSON document and nothing else. Progress bars, warnings and errors always go to stderr, so they never
mix with machine output.
"""

from __future__ import annotations

import contextlib
import functools
import sys
from typing import TYPE_CHECKING, Any, Iterator

from llmx.common.jsonio import dumps
from llmx.common.progress import Progress

# Library modules that `llmx --help` does not need are imported inside the commands that use them: --help
# imports every command module and must stay under 0.6 s (torch, transformers and pydantic alone take more).

if TYPE_CHECKING:
    from rich.console import Console
    from rich.progress import Progress as RichProgress


@functools.cache
def out() -> "Console":
    from rich.console import Console

    return Console(soft_wrap=True)


@functools.cache
def err() -> "Console":
    from rich.console import Console

    return Console(stderr=True, soft_wrap=True)


def print_error(message: str) -> None:
    from rich.markup import escape

    err().print(f"[bold red]error:[/] {escape(message)}", highlight=False)


def print_warning(message: str) -> None:
    from rich.markup import escape

    err().print(f"[yellow]warning:[/] {escape(message)}", highlight=False)


def print_info(message: str) -> None:
    """A status line for people (stderr, so `--json` output stays clean)."""
    from rich.markup import escape

    err().print(escape(message), highlight=False)


def emit_json(obj: Any) -> None:
    """Write one JSON document to stdout (plain, not through rich, so nothing is wrapped or coloured).

    Non-finite floats are written as null and listed under `non_finite` (llmx.common.jsonio).
    """
    sys.stdout.write(dumps(obj) + "\n")
    sys.stdout.flush()


@contextlib.contextmanager
def progress_bars() -> Iterator["RichProgress"]:
    """A rich Progress on stderr for the duration of the block.

    Library calls accept it directly (they add one task per stage) or through `stage_callback`. On a
    terminal the bars animate and stay; elsewhere (CI logs, pipes) they are not drawn, because a bar that
    cannot move is noise: `stage_callback` prints plain progress lines there instead (cli/_progress_lines).
    """
    from rich.progress import (BarColumn, Progress, SpinnerColumn, TaskProgressColumn, TextColumn,
                               TimeElapsedColumn, TimeRemainingColumn)

    console = err()
    with Progress(SpinnerColumn(), TextColumn("{task.description:<24}"), BarColumn(), TaskProgressColumn(),
                  TimeElapsedColumn(), TimeRemainingColumn(), console=console,
                  disable=not console.is_terminal) as progress:
        yield progress


def stage_callback(progress: "RichProgress") -> Progress:
    """Adapt a rich Progress to the `(stage, done, total)` callback protocol: one bar per stage name.

    total 0 means "unknown" (a spinner with a count). When the bars are not drawn (stderr is not a terminal),
    plain lines report each stage at a modest interval instead.
    """
    if progress.disable:
        from llmx.cli._progress_lines import ProgressLines

        return ProgressLines(err().file)
    tasks: dict[str, Any] = {}

    def update(stage: str, done: int, total: int) -> None:
        if stage not in tasks:
            tasks[stage] = progress.add_task(stage, total=total or None)
        progress.update(tasks[stage], completed=done, total=total or None)

    return update


def format_bytes(n: int | float | None) -> str:
    if n is None:
        return "n/a"
    value = float(n)
    for unit in ("B", "KiB", "MiB"):
        if abs(value) < 1024:
            return f"{value:.0f} B" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    return f"{value:.2f} GiB"


def resolve_device(name: str | None) -> str:
    """"auto" (or None) -> "cuda" when a GPU is visible, else "cpu"; explicit names pass through."""
    if name not in (None, "auto"):
        return name
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"
