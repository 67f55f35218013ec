"""Calibration data: every source type and document shape (text, article, chat messages), the known sets read
through huggingface_hub's cache (offline) and a stand-in hub, the default set, seeded determinism, sample shapes,
and the errors for bad data."""

from __future__ import annotations

import json

import pytest

from helpers.corpus import CORPUS
from helpers.fake_hub import FakeHub
from helpers.hub_cache import add_to_hub_cache
from llmx.common.errors import LlmxError
from llmx.quant.calibrate import CALIBRATION_SETS, DEFAULT_CALIBRATION_SET, build_calibration_set, load_texts


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
    with pytest.raises(LlmxError, match=r"no `text`, `messages` or `article` column \(columns: a, b\)"):
        _calib(path, tokenizer)


def test_folder_that_is_not_a_dataset(tmp_path, tokenizer):
    with pytest.raises(LlmxError, match="not a saved dataset"):
        _calib(tmp_path, tokenizer)


def test_bad_sizes(tmp_path, tokenizer):
    with pytest.raises(LlmxError, match="--calib-size must be a positive integer"):
        _calib(tmp_path / "x.txt", tokenizer, calib_size=0)


# Document shapes -------------------------------------------------------------------------------------------

def _rows(shape, paragraphs, n=30):
    """n rows whose document is in `shape`: a `text`, an `article` (with cnn_dailymail's other columns) or a chat."""
    if shape == "text":
        return [{"text": p, "id": i} for i, p in enumerate(paragraphs[:n])]
    if shape == "article":
        return [{"article": p, "highlights": "A summary.", "id": str(i)} for i, p in enumerate(paragraphs[:n])]
    return [{"prompt": paragraphs[2 * i], "prompt_id": str(i),
             "messages": [{"content": paragraphs[2 * i], "role": "user"},
                          {"content": paragraphs[2 * i + 1], "role": "assistant"}]} for i in range(n)]


def _expected(shape, rows, tokenizer):
    if shape == "messages":
        return [tokenizer.apply_chat_template(r["messages"], tokenize=False) for r in rows]
    return [r[shape] for r in rows]


@pytest.mark.parametrize("kind", ["jsonl", "saved"])
@pytest.mark.parametrize("shape", ["text", "article", "messages"])
def test_local_rows_in_each_shape(tmp_path, tokenizer, paragraphs, shape, kind):
    import datasets

    rows = _rows(shape, paragraphs)
    if kind == "jsonl":
        path = tmp_path / "calib.jsonl"
        path.write_text("\n".join(json.dumps(r) for r in rows))
    else:  # a saved DatasetDict whose split is named as the hub set of that shape names it
        path = tmp_path / "saved"
        split = {"text": "validation", "article": "train", "messages": "train_sft"}[shape]
        datasets.DatasetDict({split: datasets.Dataset.from_list(rows),
                              "test_gen": datasets.Dataset.from_list(rows[:2])}).save_to_disk(str(path))
    texts = load_texts(str(path), tokenizer)
    assert texts == _expected(shape, rows, tokenizer)
    if shape == "messages":  # rendered as the model is prompted: the template's role markers, each turn closed
        assert texts[0].startswith("<|user|>\n") and "</s>\n<|assistant|>\n" in texts[0]
    calib = _calib(path, tokenizer)
    assert calib.num_samples == 8 and calib.source == str(path)


def test_chats_need_a_chat_template(tmp_path, tokenizer, paragraphs):
    import copy

    path = tmp_path / "chats.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in _rows("messages", paragraphs, 3)))
    plain = copy.deepcopy(tokenizer)
    plain.chat_template = None
    with pytest.raises(LlmxError, match=r"holds chats \(`messages`\), but the model's tokenizer has no chat template"):
        _calib(path, plain)


def test_a_malformed_chat_row_is_named(tmp_path, tokenizer):
    path = tmp_path / "chats.jsonl"
    path.write_text(json.dumps({"messages": []}) + "\n")
    with pytest.raises(LlmxError, match=r"row 0 `messages` is not a list of"):
        _calib(path, tokenizer)


# Known sets through huggingface_hub's cache -------------------------------------------------------------------

# Each set's first shard of its split (as named in its hub repository) and a file calibration must not read.
HUB_FILES = {
    "cnn_dailymail": ("3.0.0/train-00000-of-00003.parquet", "3.0.0/train-00001-of-00003.parquet", "article"),
    "ultrachat_200k": ("data/train_sft-00000-of-00003-a3ecf92756993583.parquet",
                       "data/test_sft-00000-of-00001-f7dfac4afe5b93f4.parquet", "messages"),
    "pile_val": ("val.jsonl.zst", "test.jsonl.zst", "text"),
    "wikitext": ("wikitext-2-raw-v1/train-00000-of-00001.parquet", "wikitext-103-raw-v1/train-00000-of-00002.parquet",
                 "text"),
}


def _write(path, rows):
    import datasets
    import zstandard

    path.parent.mkdir(parents=True, exist_ok=True)
    if path.name.endswith(".jsonl.zst"):
        path.write_bytes(zstandard.ZstdCompressor().compress("\n".join(json.dumps(r) for r in rows).encode()))
    else:
        datasets.Dataset.from_list(rows).to_parquet(str(path))


def _hub_dataset(root, name, paragraphs):
    """A folder laid out as `name`'s hub repository; returns (folder, the rows of the shard calibration reads)."""
    shard, other, shape = HUB_FILES[name]
    rows = _rows(shape, paragraphs)
    if name == "wikitext":  # WikiText keeps the empty lines between paragraphs as rows
        rows = [r for row in rows for r in ({"text": ""}, row)]
    if name == "pile_val":
        rows = [{"text": r["text"], "meta": {"pile_set_name": "Pile-CC"}} for r in rows]
    _write(root / shard, rows)
    _write(root / other, [{k: ("NOT THIS FILE" if isinstance(v, str) else v) for k, v in r.items()} for r in rows])
    return root, rows


@pytest.mark.parametrize("name", list(CALIBRATION_SETS))
def test_known_sets_read_their_split_and_field_from_the_hub_cache(name, tmp_path, tokenizer, paragraphs,
                                                                  offline_cache):
    folder, rows = _hub_dataset(tmp_path / "repo", name, paragraphs)
    entry = CALIBRATION_SETS[name]
    snapshot = add_to_hub_cache(offline_cache, entry.repo_id, folder, repo_type="dataset")
    texts = load_texts(name, tokenizer)
    assert texts == _expected(HUB_FILES[name][2], rows, tokenizer)
    calib = _calib(name, tokenizer)
    assert calib.num_samples == 8 and calib.warnings == []
    assert calib.source == f"{name} ({entry.repo_id}@{snapshot.name} {HUB_FILES[name][0]})"
    assert _calib(entry.repo_id, tokenizer).data_hash == calib.data_hash  # the repository names the set too


def test_without_calib_data_the_default_set_is_used_and_said(tmp_path, tokenizer, paragraphs, offline_cache):
    folder, _ = _hub_dataset(tmp_path / "repo", DEFAULT_CALIBRATION_SET, paragraphs)
    add_to_hub_cache(offline_cache, CALIBRATION_SETS[DEFAULT_CALIBRATION_SET].repo_id, folder, repo_type="dataset")
    calib = build_calibration_set(None, tokenizer, calib_size=8, seq_len=32, batch_size=3, seed=0)
    assert calib.data_hash == _calib(DEFAULT_CALIBRATION_SET, tokenizer).data_hash
    assert calib.warnings == ["no --calib-data given: calibrated on the cnn_dailymail set (abisee/cnn_dailymail, "
                              "split train)."]


def test_offline_without_the_default_set_is_one_sentence_naming_the_flag(tokenizer, offline_cache):
    with pytest.raises(LlmxError) as info:
        build_calibration_set(None, tokenizer, calib_size=8, seq_len=32, batch_size=3, seed=0)
    message = info.value.message
    assert message.startswith("hub dataset cnn_dailymail (abisee/cnn_dailymail; the default without --calib-data) "
                              "is not in the hub cache")
    assert "HF_HUB_OFFLINE" in message and message.endswith("or pass --calib-data with a local .txt/.jsonl/.parquet "
                                                            "file.")
    assert "\n" not in message


def test_a_known_set_is_downloaded_as_its_first_shard_only(tmp_path, tokenizer, paragraphs, monkeypatch):
    from huggingface_hub import constants

    folder, rows = _hub_dataset(tmp_path / "repo", "ultrachat_200k", paragraphs)
    with FakeHub() as hub:
        hub.add("HuggingFaceH4/ultrachat_200k", folder, repo_type="dataset")
        monkeypatch.setattr(constants, "ENDPOINT", hub.url)
        monkeypatch.setattr(constants, "HUGGINGFACE_CO_URL_TEMPLATE",
                            hub.url + "/{repo_id}/resolve/{revision}/{filename}")
        monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hf" / "hub"))
        monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
        assert load_texts("ultrachat_200k", tokenizer) == _expected("messages", rows, tokenizer)
        assert hub.downloaded == [HUB_FILES["ultrachat_200k"][0]]


def test_quantize_without_calib_data_calibrates_on_the_default_set(tmp_path, paragraphs, offline_cache,
                                                                    tiny_model_dir):
    from llmx.formats.checkpoint import read_checkpoint
    from llmx.ingest.convert import convert
    from llmx.quant.api import quantize

    folder, _ = _hub_dataset(tmp_path / "repo", "cnn_dailymail", paragraphs)
    snapshot = add_to_hub_cache(offline_cache, "abisee/cnn_dailymail", folder, repo_type="dataset")
    ckpt = convert(tiny_model_dir("llama"), tmp_path / "ckpt")
    result = quantize(ckpt, tmp_path / "q", algo="int8_sq", calib_size=4, calib_seq_len=32, batch_size=4)
    assert result.warnings[-1].startswith("no --calib-data given: calibrated on the cnn_dailymail set")
    calibration = read_checkpoint(tmp_path / "q").provenance["calibration"]
    shard = HUB_FILES["cnn_dailymail"][0]
    assert calibration["data"] == f"cnn_dailymail (abisee/cnn_dailymail@{snapshot.name} {shard})"
    assert calibration["samples"] == 4


def test_chats_render_with_smollm2s_own_template(tmp_path, paragraphs):
    from transformers import AutoTokenizer

    from helpers.smollm2 import smollm2_dir

    smollm2 = AutoTokenizer.from_pretrained(str(smollm2_dir()))
    path = tmp_path / "chats.jsonl"
    rows = _rows("messages", paragraphs, 20)
    path.write_text("\n".join(json.dumps({"messages": r["messages"]}) for r in rows))
    texts = load_texts(str(path), smollm2)
    assert texts[0].count("<|im_start|>user\n" + rows[0]["messages"][0]["content"] + "<|im_end|>") == 1
    assert texts[0].rstrip().endswith(rows[0]["messages"][1]["content"] + "<|im_end|>")
    calib = build_calibration_set(str(path), smollm2, calib_size=4, seq_len=64, batch_size=2, seed=0)
    im_start = smollm2.convert_tokens_to_ids("<|im_start|>")
    assert any((batch == im_start).any() for batch in calib.batches)  # the template's special tokens are tokens
