"""kernels/_triton_util.py: process-wide Triton settings made when the kernels are imported."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

CHECK = """
import os, warnings
warnings.simplefilter("error")  # triton 3.9 warns when the fusion default is left unset
import llmx.kernels._triton_util as util
print(os.environ["TRITON_DEFAULT_FP_FUSION"])
knobs = getattr(util.triton, "knobs", None)
language = getattr(knobs, "language", None)
if hasattr(language, "fp_fusion_enabled"):
    print(language.fp_fusion_enabled(None))
"""


def _run(env_value: str | None) -> list[str]:
    env = {k: v for k, v in os.environ.items() if k != "TRITON_DEFAULT_FP_FUSION"}
    if env_value is not None:
        env["TRITON_DEFAULT_FP_FUSION"] = env_value
    done = subprocess.run([sys.executable, "-c", CHECK], env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    return done.stdout.split()


def test_fused_multiply_adds_are_pinned_on_without_a_warning():
    pytest.importorskip("triton")
    out = _run(None)
    assert out[0] == "1"
    assert out[1:] in ([], ["True"])


def test_a_users_fusion_choice_is_kept():
    pytest.importorskip("triton")
    assert _run("0")[0] == "0"
