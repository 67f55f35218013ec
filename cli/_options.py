"""Options every command shares, declared once so their names and help read the same everywhere."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from llmx.common.errors import LlmxError

RecipeOption = Annotated[Optional[str], typer.Option(
    "--recipe", metavar="FILE|FAMILY/TARGET", show_default=False,
    help="Recipe with settings for this command: a YAML file or a shipped one such as llama/h100 "
         "(families llama, mistral, qwen2, qwen3; targets cpu, a100, h100, h200). Flags given here override it.")]

PrintConfigOption = Annotated[bool, typer.Option(
    "--print-config", help="Print the resolved settings (and where each came from) as JSON, then exit.")]

JsonOption = Annotated[bool, typer.Option("--json", help="Print one JSON document to stdout instead of tables.")]

KvCacheFractionOption = Annotated[Optional[float], typer.Option(
    "--kv-cache-fraction", min=0.01, max=1.0, show_default=False,
    help="GPU: fraction of the device memory free after loading the weights, less the measured activation "
         "peak, that the KV cache takes [default: 0.9].")]

SyncStepsOption = Annotated[bool, typer.Option(
    "--sync-steps",
    help="Read each step's tokens back before scheduling the next one. By default the next decode step is "
         "queued on the device while the host applies this one's tokens (same outputs, less idle device time); "
         "this switch measures what that overlap buys or isolates a problem.")]

ForceOption = Annotated[bool, typer.Option(
    "--force", help="Replace the output directory even if it holds something else.")]


def require_out(out: Path | None, example: str) -> Path:
    """-o is optional in the signature only so that --print-config works without it."""
    if out is None:
        raise LlmxError(f"-o/--out is required: say where to write the result, e.g. `{example}`.")
    return out
