"""JSON outputs never hold NaN/Infinity (invalid JSON): they hold null and say why; strict reads refuse them."""

from __future__ import annotations

import json
import math

import pytest

from llmx.common.errors import LlmxError
from llmx.common.jsonio import NonFiniteJson, dumps, loads, read_json_object, restore_non_finite


def strict_json(text: str):
    return json.loads(text, parse_constant=lambda word: pytest.fail(f"{word} written into JSON"))


def test_non_finite_floats_become_null_and_are_listed():
    doc = {"perplexity": math.nan, "metrics": {"ttft_ms": {"mean": math.inf, "p50": 1.5}}, "list": [-math.inf, 2]}
    parsed = strict_json(dumps(doc))
    assert parsed["perplexity"] is None and parsed["metrics"]["ttft_ms"] == {"mean": None, "p50": 1.5}
    assert parsed["list"] == [None, 2]
    assert parsed["non_finite"] == {"perplexity": "NaN", "metrics.ttft_ms.mean": "Infinity", "list[0]": "-Infinity"}


def test_finite_documents_are_written_unchanged():
    doc = {"a": 1.5, "b": [1, 2], "c": None}
    assert strict_json(dumps(doc)) == doc


def test_restore_gives_back_what_was_measured():
    doc = {"perplexity": math.nan, "rate": math.inf, "ok": 2.0, "missing": None}
    back = restore_non_finite(loads(dumps(doc)))
    assert math.isnan(back["perplexity"]) and back["rate"] == math.inf
    assert back["ok"] == 2.0 and back["missing"] is None


@pytest.mark.parametrize("word", ["NaN", "Infinity", "-Infinity"])
def test_strict_loads_refuses_the_bare_words(word):
    with pytest.raises(NonFiniteJson, match=f"{word} is not a JSON number"):
        loads(f'{{"perplexity": {word}}}')


@pytest.mark.parametrize("content, fragment", [
    (None, "no such baseline result"),
    (b'{"perplexity": NaN}', "NaN is not a JSON number"),
    (b"{oops", "is not valid JSON (line 1 column 2"),
    (b'"text"', "holds a JSON str, not the object"),
    (b'{"a": "caf\xe9"}', "byte 10 (e9) is not valid UTF-8"),
])
def test_read_json_object_names_the_file_and_the_fault(tmp_path, content, fragment):
    path = tmp_path / "base.json"
    if content is not None:
        path.write_bytes(content)
    with pytest.raises(LlmxError) as caught:
        read_json_object(path, what="baseline result", remedy="write it again")
    assert str(path) in caught.value.message and fragment in caught.value.message


def test_a_directory_is_not_a_json_file(tmp_path):
    with pytest.raises(LlmxError, match="is a directory, not a baseline result"):
        read_json_object(tmp_path, what="baseline result", remedy="write it again")


def test_emit_json_prints_valid_json(capsys):
    from llmx.cli._console import emit_json

    emit_json({"perplexity": math.nan})
    assert strict_json(capsys.readouterr().out) == {"perplexity": None, "non_finite": {"perplexity": "NaN"}}


def test_bench_report_file_is_valid_json(tmp_path):
    from llmx.bench.report import write_report

    path = tmp_path / "bench.json"
    write_report({"schema": "llmx-bench/1", "metrics": {"output_throughput_tok_s": math.nan}}, path)
    parsed = strict_json(path.read_text())
    assert parsed["metrics"]["output_throughput_tok_s"] is None
    assert parsed["non_finite"] == {"metrics.output_throughput_tok_s": "NaN"}
