"""Puts tests/ on sys.path so test files can `from helpers.tiny_models import make_tiny_hf_model`, and on CI
(CI=true) turns a test skipped for a missing package or file into a failure."""

from __future__ import annotations

import itertools
import sys
from pathlib import Path

import pytest

TESTS_DIR = Path(__file__).resolve().parent
if str(TESTS_DIR) not in sys.path:
    sys.path.insert(0, str(TESTS_DIR))

pytest_plugins = ["helpers.ci_skips"]


@pytest.fixture
def tiny_model_dir(tmp_path):
    """Factory: tiny_model_dir("qwen2", tie=True, ...) -> a fresh tiny HF folder under tmp_path."""
    from helpers.tiny_models import make_tiny_hf_model

    counter = itertools.count()

    def make(family: str = "llama", **kwargs) -> Path:
        return make_tiny_hf_model(family, tmp_path / f"hf-{family}-{next(counter)}", **kwargs)

    return make


@pytest.fixture
def offline_cache(tmp_path, monkeypatch):
    """huggingface_hub's cache in tmp_path/hf/hub, with HF_HUB_OFFLINE on (its constants are read per call)."""
    from huggingface_hub import constants

    cache = tmp_path / "hf" / "hub"
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    return cache
