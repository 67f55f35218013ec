"""Tokenizer files that parse but lack what transformers needs are refused in one sentence, before loading.

`AutoTokenizer.from_pretrained` meets a tokenizer.json without its `model` with a bare `Exception("Model
missing")` from the Rust library, and one without `added_tokens` with a KeyError, deep inside transformers.
Checking the structure first turns each into a sentence naming the file and the missing part. What is
checked is what every fast tokenizer file has (ARCHITECTURE.md: tokenizer files copied from the source).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from llmx.common.errors import LlmxError
from llmx.common.jsonio import read_json_object

# tokenizer.json `model.type` values the tokenizers library reads, and the part each one cannot do without.
_MODEL_VOCAB = {"BPE": "vocab", "WordPiece": "vocab", "WordLevel": "vocab", "Unigram": "vocab"}
# Small JSON files next to it that must be objects when present.
_JSON_OBJECTS = ("tokenizer_config.json", "special_tokens_map.json", "generation_config.json")


def check_tokenizer_files(directory: Path, remedy: str) -> None:
    """Refuse damaged tokenizer files in `directory` (those present; an engine may have none)."""
    directory = Path(directory)
    fast = directory / "tokenizer.json"
    if fast.is_file():
        _check_fast_tokenizer(fast, read_json_object(fast, what="tokenizer file", remedy=remedy), remedy)
    for name in _JSON_OBJECTS:
        path = directory / name
        if path.is_file():
            read_json_object(path, what="tokenizer file", remedy=remedy)
    sentencepiece = directory / "tokenizer.model"
    if sentencepiece.is_file() and sentencepiece.stat().st_size == 0:
        raise LlmxError(f"{sentencepiece} is empty; {remedy}.")


def _check_fast_tokenizer(path: Path, doc: dict[str, Any], remedy: str) -> None:
    model = doc.get("model")
    if not isinstance(model, dict):
        raise LlmxError(f"{path}: field `model` is missing or not an object (the vocabulary and merges live "
                        f"there); {remedy}.")
    kind = model.get("type")
    if kind is not None and kind not in _MODEL_VOCAB:
        raise LlmxError(f"{path}: `model.type` {kind!r} is not a tokenizer model the tokenizers library reads "
                        f"({', '.join(_MODEL_VOCAB)}); {remedy}.")
    if kind is not None and _MODEL_VOCAB[kind] not in model:
        raise LlmxError(f"{path}: field `model.{_MODEL_VOCAB[kind]}` is missing from this {kind} tokenizer; "
                        f"{remedy}.")
    if not isinstance(doc.get("added_tokens", []), list):
        raise LlmxError(f"{path}: field `added_tokens` must be a list; {remedy}.")
    if "added_tokens" not in doc:
        raise LlmxError(f"{path}: field `added_tokens` is missing (an empty list when there are none); {remedy}.")
