"""Fixtures shared by the quantization tests that quantize a tiny model end to end. A module provides
`workdir` (its temporary folder) and `hf_dir` (its HF model); these build on them, once per module."""

from __future__ import annotations

import pytest

from helpers.corpus import CORPUS


@pytest.fixture(scope="module")
def ckpt(workdir, hf_dir):
    """The module's HF model converted to an unquantized llmx checkpoint."""
    from llmx.ingest.convert import convert

    return convert(hf_dir, workdir / "ckpt")


@pytest.fixture(scope="module")
def calib_file(workdir):
    """Calibration text: the first 60,000 characters of Emma."""
    path = workdir / "calib.txt"
    path.write_text((CORPUS / "austen_emma.txt").read_text()[:60_000])
    return path
