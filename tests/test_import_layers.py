"""Imports run one way: a module imports only from its own layer or the layers below it (docs/ARCHITECTURE.md,
"Layers"), function-local imports included. The contract is import-linter's layers contract in pyproject.toml
(`[tool.importlinter]`); this runs it on the llmx of this checkout and fails with its report of every import
that points up."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import llmx

REPO = Path(__file__).resolve().parents[1]


def test_every_import_points_down_the_layers():
    assert Path(llmx.__file__).resolve().parent == REPO, (
        f"llmx is imported from {llmx.__file__}, not from this checkout ({REPO}); install it with `pip install -e .`")
    lint_imports = Path(sys.executable).parent / "lint-imports"
    assert lint_imports.is_file(), f"{lint_imports} is missing; install the dev extra: pip install -e '.[dev]'"
    # --no-cache: nothing is written into the checkout.
    result = subprocess.run([str(lint_imports), "--config", str(REPO / "pyproject.toml"), "--no-cache", "--no-logo"],
                            cwd=REPO, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, f"an import points up the layers:\n{result.stdout}{result.stderr}"
    assert "llmx layers KEPT" in result.stdout, result.stdout
