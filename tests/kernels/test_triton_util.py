"""kernels/_triton_util.py: the Triton setting llmx makes before a kernel first compiles, and only then."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

CHECK = """
import os, warnings
warnings.simplefilter("error")  # triton 3.9 warns when the fusion default is left unset
import torch
import llmx.kernels._triton_util as util
from llmx.common.errors import LlmxError
from llmx.kernels import rms_norm
print(os.environ.get("TRITON_DEFAULT_FP_FUSION", "unset"))
try:  # a wrapper's launch checks run before the launch that would compile; CPU tensors are then refused
    rms_norm.rms_norm(torch.ones(1, 8), torch.ones(8), 1e-6)
except LlmxError:
    pass
print(os.environ["TRITON_DEFAULT_FP_FUSION"])
knobs = getattr(util.triton, "knobs", None)
language = getattr(knobs, "language", None)
if hasattr(language, "fp_fusion_enabled"):
    print(language.fp_fusion_enabled(None))
"""


def _run(env_value: str | None) -> list[str]:
    env = {k: v for k, v in os.environ.items() if k not in ("TRITON_DEFAULT_FP_FUSION", "TRITON_INTERPRET")}
    if env_value is not None:
        env["TRITON_DEFAULT_FP_FUSION"] = env_value
    done = subprocess.run([sys.executable, "-c", CHECK], env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    return done.stdout.split()


def test_importing_leaves_the_variable_alone_and_the_first_launch_pins_fusion_on_without_a_warning():
    pytest.importorskip("triton")
    out = _run(None)
    assert out[:2] == ["unset", "1"]
    assert out[2:] in ([], ["True"])


def test_a_users_fusion_choice_is_kept():
    pytest.importorskip("triton")
    assert _run("0")[:2] == ["0", "0"]
