"""Every environment variable llmx reads, in one table: name, type, default and one line of meaning.

A variable is read when the code that needs it runs (`VAR.read()`), never when a module is imported, so
setting one in a running process (a test's monkeypatch, a notebook) takes effect at the next use. A value that
does not parse is refused with one sentence naming the variable and what it accepts.

`VARIABLES` is the table the README's "Environment variables" section is generated from
(`python -m llmx.common.env` prints it; tests/test_env.py checks that the README matches).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from llmx.common.errors import LlmxError

_TRUE = ("1", "true", "yes", "on")
_FALSE = ("0", "false", "no", "off")


@dataclass(frozen=True)
class EnvVar:
    """One variable: `kind` is "bool", "int", "float", "str" or "path"; `default` is what an unset (or empty)
    variable means, written as a user would write the value; `set_by` says who sets it."""

    name: str
    kind: str
    default: str | None
    meaning: str
    set_by: str = "user"

    def is_set(self) -> bool:
        return bool(os.environ.get(self.name, ""))

    def read(self) -> Any:
        """The variable's value now, parsed by `kind` (the default when unset or empty; None when it has none)."""
        raw = os.environ.get(self.name, "")
        if raw == "":
            raw = self.default
        if raw is None:
            return None
        return self._parse(raw.strip())

    def _parse(self, raw: str) -> Any:
        if self.kind == "bool":
            if raw.lower() in _TRUE:
                return True
            if raw.lower() in _FALSE:
                return False
            return self._refuse(raw, "1 or 0")
        if self.kind == "int":
            try:
                return int(raw)
            except ValueError:
                return self._refuse(raw, "a whole number")
        if self.kind == "float":
            try:
                value = float(raw)
            except ValueError:
                return self._refuse(raw, "a number")
            if not value > 0 or value == float("inf"):
                return self._refuse(raw, "a positive, finite number")
            return value
        if self.kind == "path":
            return Path(raw).expanduser()
        return raw

    def _refuse(self, raw: str, accepted: str):
        default = "" if self.default is None else f" ({self.default})"
        raise LlmxError(f"Environment variable {self.name}={raw!r} is not valid: set it to {accepted}, or unset it "
                        f"for the default{default}.")


LLMX_API_KEY = EnvVar(
    "LLMX_API_KEY", "str", None, "the key `llmx serve` requires as `Authorization: Bearer KEY` on its /v1 routes "
    "(as --api-key)")
LLMX_DEBUG = EnvVar(
    "LLMX_DEBUG", "bool", "0", "1 prints the full traceback before the one-line error message (as --debug)")
LLMX_CACHE_DIR = EnvVar(
    "LLMX_CACHE_DIR", "path", "~/.cache/llmx",
    "per-user cache folder; `llmx build` keeps its GEMM tile timings in its gemm-tiles/ subfolder")
LLMX_COLLECTIVE_TIMEOUT = EnvVar(
    "LLMX_COLLECTIVE_TIMEOUT", "float", "120",
    "seconds a multi-GPU collective may wait for a rank before the job ends with an error naming it")
LLMX_RANK_STALL_TIMEOUT = EnvVar(
    "LLMX_RANK_STALL_TIMEOUT", "float", "10",
    "seconds a rank llmx started may stop responding (no heartbeat) before the job ends with an error naming it")
LLMX_FUSED_MLP = EnvVar(
    "LLMX_FUSED_MLP", "bool", "1",
    "0 keeps the MLP's silu(gate) * up out of the int4 gate_up GEMV (a separate activation kernel instead)")
LLMX_PDL = EnvVar(
    "LLMX_PDL", "bool", "1",
    "0 turns off programmatic dependent launch of the decode kernels on Hopper (each then launches only "
    "after the previous one finished)")
TRITON_DEFAULT_FP_FUSION = EnvVar(
    "TRITON_DEFAULT_FP_FUSION", "bool", "1",
    "Triton's fused multiply-adds, which the kernels are written for; read by Triton when it compiles",
    set_by="user, else llmx before its first kernel launch")
RANK = EnvVar("RANK", "int", None, "this process's rank in a job launched by torchrun", set_by="torchrun")
LOCAL_RANK = EnvVar("LOCAL_RANK", "int", None, "this process's rank on its host (picks its GPU)", set_by="torchrun")
WORLD_SIZE = EnvVar("WORLD_SIZE", "int", None, "number of processes in a torchrun job", set_by="torchrun")
MASTER_ADDR = EnvVar("MASTER_ADDR", "str", None, "host of rank 0 in a torchrun job", set_by="torchrun")
MASTER_PORT = EnvVar("MASTER_PORT", "int", None, "rendezvous port of a torchrun job; llmx uses the next port "
                     "for its own control group", set_by="torchrun")

VARIABLES: tuple[EnvVar, ...] = (LLMX_API_KEY, LLMX_CACHE_DIR, LLMX_COLLECTIVE_TIMEOUT, LLMX_DEBUG, LLMX_FUSED_MLP,
                                 LLMX_PDL, LLMX_RANK_STALL_TIMEOUT, TRITON_DEFAULT_FP_FUSION, RANK, LOCAL_RANK, WORLD_SIZE, MASTER_ADDR,
                                 MASTER_PORT)


def set_default(var: EnvVar) -> None:
    """Give `var` its default in this process's environment unless the user set it (for a variable another
    library reads, such as Triton's)."""
    if not var.is_set():
        os.environ[var.name] = var.default


def markdown_table() -> str:
    """The README's table of VARIABLES (one row each, in declaration order)."""
    rows = ["| variable | type | default | set by | meaning |", "| --- | --- | --- | --- | --- |"]
    for var in VARIABLES:
        default = "-" if var.default is None else f"`{var.default}`"
        rows.append(f"| `{var.name}` | {var.kind} | {default} | {var.set_by} | {var.meaning} |")
    return "\n".join(rows)


if __name__ == "__main__":
    print(markdown_table())
