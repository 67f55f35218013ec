"""Damaged text and tokenizer files: invalid UTF-8 names the file (or option) and the byte offset; tokenizer files
that parse but lack a required part are refused in one sentence, at build and at load."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from llmx.cli.main import run_cli
from llmx.common.text import check_utf8_argument, decode_utf8, utf8_error_offset

BAD = "caf\u00e9 ok\n".encode("latin-1")  # é as one Latin-1 byte (e9) at offset 3: not UTF-8


def test_the_offset_is_the_first_bad_byte():
    assert utf8_error_offset(b"abc") is None
    assert utf8_error_offset("\u00e9t\u00e9".encode("utf-8") + b"\xff") == 5
    assert decode_utf8("d\u00e9j\u00e0".encode("utf-8"), source="x") == "d\u00e9j\u00e0"


def test_eval_text_that_is_not_utf8_is_named_before_the_engine_loads(tmp_path, fails):
    text = tmp_path / "heldout.txt"
    text.write_bytes(BAD)
    line = fails(["eval", tmp_path / "no-engine", "--data", text], f"{text}: byte 3 (e9) is not valid UTF-8")
    assert "text to score must be UTF-8 text" in line


def test_a_prompts_file_that_is_not_utf8_is_named(tmp_path, fails):
    prompts = tmp_path / "prompts.txt"
    prompts.write_bytes(b"first prompt\n" + BAD)
    fails(["run", tmp_path / "no-engine", "--prompts-file", prompts], f"{prompts}: byte 16 (e9) is not valid UTF-8")


def test_a_prompt_argument_with_bytes_that_are_not_utf8_is_named(tmp_path, fails):
    # What Python makes of `llmx run E --prompt $'caf\xe9'` under a UTF-8 locale (PEP 383 surrogateescape).
    prompt = BAD.decode("utf-8", "surrogateescape")
    fails(["run", tmp_path / "no-engine", "--prompt", prompt], "--prompt: byte 3 of the text given on the command "
                                                               "line is not valid UTF-8")
    assert check_utf8_argument("plain", option="--prompt") == "plain"


def test_a_bench_dataset_that_is_not_utf8_is_named(tiny_engine, tmp_path, fails):
    dataset = tmp_path / "prompts.jsonl"
    dataset.write_bytes(b'{"prompt": "hello"}\n{"prompt": "' + BAD.strip() + b'"}\n')
    fails(["bench", tiny_engine, "--dataset", dataset, "--osl", "2", "--warmup", "0"],
          f"{dataset}: byte 35 (e9) is not valid UTF-8")


def edit_tokenizer(doc: dict, **changes) -> dict:
    doc = json.loads(json.dumps(doc))
    for key, value in changes.items():
        if value is KeyError:
            del doc[key]
        else:
            doc[key] = value
    return doc


TOKENIZER_FAULTS = [
    ("tokenizer.json", lambda d: edit_tokenizer(d, model=KeyError), "field `model` is missing or not an object"),
    ("tokenizer.json", lambda d: edit_tokenizer(d, added_tokens=KeyError), "field `added_tokens` is missing"),
    ("tokenizer.json", lambda d: edit_tokenizer(d, added_tokens={}), "field `added_tokens` must be a list"),
    ("tokenizer.json", lambda d: edit_tokenizer(d, model={"type": "Magic"}), "`model.type` 'Magic' is not"),
    ("tokenizer.json", lambda d: edit_tokenizer(d, model={"type": "BPE", "merges": []}),
     "field `model.vocab` is missing from this BPE tokenizer"),
    ("tokenizer.json", lambda d: [d], "holds a JSON list, not the object a tokenizer file is"),
    # passes the structural check; the tokenizers library refuses its contents
    ("tokenizer.json", lambda d: edit_tokenizer(d, model={"type": "BPE", "vocab": 7, "merges": []}),
     "could not load the tokenizer"),
    ("tokenizer.json", b'{"model": ', "is not valid JSON (line 1 column 11"),
    ("tokenizer_config.json", b"\xff\xfe{}", "byte 0 (ff) is not valid UTF-8"),
    ("tokenizer_config.json", b"[]", "holds a JSON list"),
    ("special_tokens_map.json", b"", "is not valid JSON"),
]


def damage(directory: Path, name: str, change) -> None:
    path = directory / name
    if isinstance(change, bytes):
        path.write_bytes(change)
    else:
        path.write_text(json.dumps(change(json.loads(path.read_text()))))


@pytest.mark.parametrize("name, change, fragment", TOKENIZER_FAULTS)
def test_loading_an_engine_with_a_damaged_tokenizer_is_one_sentence(tiny_engine, tmp_path, fails, name, change,
                                                                    fragment):
    engine = tmp_path / "engine"
    shutil.copytree(tiny_engine, engine)
    if not (engine / name).exists():
        (engine / name).write_text("{}")
    damage(engine, name, change)
    line = fails(["run", engine, "--prompt", "hello", "--max-new-tokens", "2"], fragment)
    assert str(engine / name) in line


def test_building_from_a_checkpoint_with_a_damaged_tokenizer_is_refused(tiny_engine, tmp_path, fails):
    ckpt = Path(json.loads((tiny_engine / "engine.json").read_text())["checkpoint_dir"])
    copy = tmp_path / "ckpt"
    shutil.copytree(ckpt, copy)
    damage(copy, "tokenizer.json", lambda d: edit_tokenizer(d, model=KeyError))
    fails(["build", copy, "-o", tmp_path / "engine", "--device", "cpu", "--max-seq-len", "64"],
          "field `model` is missing")
    assert not (tmp_path / "engine").exists()
    assert run_cli(["build", str(ckpt), "-o", str(tmp_path / "engine"), "--device", "cpu", "--max-seq-len", "64"]) == 0
