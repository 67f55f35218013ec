"""Calibration data: every source type, seeded determinism, sample shapes, and the errors for bad data."""

from __future__ import annotations

import json

import pytest

from llmx.common.errors import LlmxError
from llmx.quant.calibrate import build_calibration_set, load_texts

from helpers.corpus import CORPUS


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    from transformers import AutoTokenizer

    from helpers.tiny_models import write_tiny_tokenizer

    path = tmp_path_factory.mktemp("tok")
    write_tiny_tokenizer(path)
    return AutoTokenizer.from_pretrained(str(path))


@pytest.fixture(scope="module")
def paragraphs():
    text = (CORPUS / "austen_emma.txt").read_text()[:60_000]
    return [p for p in text.split("\n\n") if p.strip()]


def _calib(spec, tokenizer, **kw):
    args = dict(calib_size=8, seq_len=32, batch_size=3, seed=0)
    args.update(kw)
    return build_calibration_set(str(spec), tokenizer, **args)


def test_txt_file(tmp_path, tokenizer, paragraphs):
    path = tmp_path / "calib.txt"
    path.write_text("\n\n".join(paragraphs))
    calib = _calib(path, tokenizer)
    assert [tuple(b.shape) for b in calib.batches] == [(3, 32), (3, 32), (2, 32)]
    assert calib.num_samples == 8 and calib.warnings == []
    assert calib.data_hash.startswith("sha256:")
    assert load_texts(str(path)) == ["\n\n".join(paragraphs)]  # one document per file


@pytest.mark.parametrize("kind", ["json", "jsonl", "parquet", "saved"])
def test_record_sources_hold_one_document_per_row(tmp_path, tokenizer, paragraphs, kind):
    import datasets

    rows = paragraphs[:50]
    if kind == "json":
        path = tmp_path / "calib.json"
        path.write_text(json.dumps([{"text": t, "id": i} for i, t in enumerate(rows)]))
    elif kind == "jsonl":
        path = tmp_path / "calib.jsonl"
        path.write_text("\n".join(json.dumps({"content": t}) for t in rows))  # the only string column
    elif kind == "parquet":
        path = tmp_path / "calib.parquet"
        datasets.Dataset.from_dict({"text": rows}).to_parquet(str(path))
    else:
        path = tmp_path / "saved"
        datasets.DatasetDict({"train": datasets.Dataset.from_dict({"text": rows})}).save_to_disk(str(path))
    assert load_texts(str(path)) == rows
    calib = _calib(path, tokenizer)
    assert calib.num_samples == 8


def test_same_seed_same_samples_other_seed_other_samples(tmp_path, tokenizer, paragraphs):
    path = tmp_path / "calib.jsonl"
    path.write_text("\n".join(json.dumps({"text": t}) for t in paragraphs))
    a, b, c = (_calib(path, tokenizer, seed=s) for s in (7, 7, 8))
    assert a.data_hash == b.data_hash
    assert all((x == y).all() for x, y in zip(a.batches, b.batches))
    assert a.data_hash != c.data_hash


def test_short_data_uses_what_there_is_with_a_warning(tmp_path, tokenizer, paragraphs):
    path = tmp_path / "calib.txt"
    path.write_text("\n\n".join(paragraphs[5:15]))
    calib = _calib(path, tokenizer, calib_size=1000)
    assert 0 < calib.num_samples < 1000
    assert "instead of --calib-size 1000" in calib.warnings[0]


def test_too_short_for_one_sample_says_how_much_is_needed(tmp_path, tokenizer):
    path = tmp_path / "calib.txt"
    path.write_text("Only a few words.")
    with pytest.raises(LlmxError, match=r"fewer than one sample of --calib-seq-len 512.*8 x 512 = 4096 tokens"):
        _calib(path, tokenizer, seq_len=512)


@pytest.mark.parametrize("content, match", [("", "is empty"), ("   \n\n  ", "holds no text")])
def test_empty_data(tmp_path, tokenizer, content, match):
    path = tmp_path / "calib.txt"
    path.write_text(content)
    with pytest.raises(LlmxError, match=match):
        _calib(path, tokenizer)


def test_missing_file(tmp_path, tokenizer):
    with pytest.raises(LlmxError, match="does not exist"):
        _calib(tmp_path / "nope.jsonl", tokenizer)


def test_unsupported_file_type(tmp_path, tokenizer):
    path = tmp_path / "calib.csv"
    path.write_text("a,b\n1,2\n")
    with pytest.raises(LlmxError, match="unsupported type '.csv'"):
        _calib(path, tokenizer)


def test_rows_without_a_text_column(tmp_path, tokenizer):
    path = tmp_path / "calib.jsonl"
    path.write_text("\n".join(json.dumps({"a": "x", "b": "y"}) for _ in range(3)))
    with pytest.raises(LlmxError, match="no `text` column"):
        _calib(path, tokenizer)


def test_folder_that_is_not_a_dataset(tmp_path, tokenizer):
    with pytest.raises(LlmxError, match="not a saved dataset"):
        _calib(tmp_path, tokenizer)


def test_bad_sizes(tmp_path, tokenizer):
    with pytest.raises(LlmxError, match="--calib-size must be a positive integer"):
        _calib(tmp_path / "x.txt", tokenizer, calib_size=0)
