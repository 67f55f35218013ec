"""The public-domain novels the tests calibrate on, score and prompt with (tests/data/corpus, see its README)."""

from __future__ import annotations

from pathlib import Path

CORPUS = Path(__file__).resolve().parents[1] / "data" / "corpus"
