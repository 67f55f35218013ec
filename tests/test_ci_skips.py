"""On CI a test skipped because a package or file is missing fails (tests/helpers/ci_skips.py), while a GPU-only test
still skips: a fresh clone cannot go green by skipping what its set-up should have installed."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

TESTS_DIR = Path(__file__).resolve().parent

CASES = '''
import pytest

def test_needs_a_package_that_is_absent():
    pytest.importorskip("llmx_no_such_package")

def test_needs_a_gpu():
    pytest.skip("needs a CUDA GPU")
'''


def _run(tmp_path: Path, ci: str) -> subprocess.CompletedProcess:
    (tmp_path / "test_cases.py").write_text(CASES)
    env = {**os.environ, "CI": ci}
    # -c /dev/null: none of the repository's settings; -p loads the plugin alone, as tests/conftest.py does.
    return subprocess.run([sys.executable, "-m", "pytest", "-q", "-c", os.devnull, "--rootdir", str(tmp_path),
                           "-p", "no:cacheprovider", "-p", "helpers.ci_skips", "test_cases.py"],
                          env={**env, "PYTHONPATH": str(TESTS_DIR)}, capture_output=True, text=True,
                          cwd=tmp_path, timeout=120)


def test_on_ci_a_missing_package_fails_and_a_gpu_test_skips(tmp_path):
    result = _run(tmp_path, "true")
    assert result.returncode == 1, result.stdout + result.stderr
    assert "1 failed, 1 skipped" in result.stdout, result.stdout
    assert "missing input" in result.stdout


def test_off_ci_both_skip(tmp_path):
    result = _run(tmp_path, "")
    assert result.returncode == 0, result.stdout + result.stderr
    assert "2 skipped" in result.stdout, result.stdout
