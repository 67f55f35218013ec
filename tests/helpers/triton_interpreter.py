"""Running a kernel test file's `test_interpreted_*` tests under Triton's CPU interpreter.

Triton decides at import time whether it compiles or interprets, so the interpreted tests run in a
fresh child process with TRITON_INTERPRET=1; the parent process only reports the child's result.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from llmx.kernels._triton_util import interpreter_active, triton_available

IN_INTERPRETER = interpreter_active()
interpreted = pytest.mark.skipif(
    not IN_INTERPRETER, reason="Triton-interpreter test: runs in test_kernels_in_triton_interpreter's child process")
needs_cuda = pytest.mark.skipif(IN_INTERPRETER or not torch.cuda.is_available(),
                                reason="needs a CUDA GPU (compiled Triton kernels)")
runs_children = pytest.mark.skipif(
    IN_INTERPRETER or not triton_available(),
    reason="this process already runs the interpreter tests directly (or triton is missing)")


def run_interpreted_tests(test_file: str) -> None:
    """Run `test_file`'s test_interpreted_* tests with TRITON_INTERPRET=1 and assert they all passed."""
    path = Path(test_file).resolve()
    child = subprocess.run(
        [sys.executable, "-m", "pytest", str(path), "-q", "-x", "-k", "test_interpreted_", "-p", "no:cacheprovider"],
        cwd=path.parents[2], env={**os.environ, "TRITON_INTERPRET": "1"}, capture_output=True, text=True,
        timeout=600)
    report = child.stdout[-8000:] + child.stderr[-2000:]
    assert child.returncode == 0, report
    assert " passed" in child.stdout and "skipped" not in child.stdout, report


def dispatch_as_without_wgmma(monkeypatch) -> None:
    """Make w4a16_gemm's dispatch choose as on a GPU without wgmma (not Hopper): decode rows go to the CUDA-core
    GEMV (M <= 4) and the tensor-core GEMM, never to the tensor-core decode kernel (w4a16_mma_decode.py)."""
    from llmx.kernels import w4a16_mma_decode

    monkeypatch.setattr(w4a16_mma_decode, "_hopper", lambda index: False)


@pytest.fixture
def without_mma_decode(monkeypatch):
    """Keep w4a16_gemm's decode rows on the CUDA-core GEMV: on Hopper the dispatch sends 16-bit ones to the
    tensor-core decode kernel (kernels/w4a16_mma_decode.py), which has its own tests."""
    dispatch_as_without_wgmma(monkeypatch)
