"""Reports: written whole as JSON, read back only when they are llmx-bench/1, rendered as tables."""

from __future__ import annotations

import json

import pytest
from rich.console import Console

from llmx.bench.report import SCHEMA, build_report, load_report, print_report, write_report
from llmx.common.errors import LlmxError


def sample_report():
    dist = {"mean": 12.5, "p50": 12.0, "p90": 15.0, "p99": 19.9}
    metrics = {"completed_requests": 4, "failed_requests": 0, "duration_s": 2.0, "total_input_tokens": 512,
               "total_output_tokens": 128, "request_throughput_rps": 2.0, "output_throughput_tok_s": 64.0,
               "total_throughput_tok_s": 320.0, "ttft_ms": dist, "tpot_ms": None, "itl_ms": dist, "e2e_ms": dist,
               "peak_device_memory_bytes": 3 << 30, "peak_process_rss_bytes": None,
               "kv_cache": {"blocks_total": 100, "blocks_peak_used": 25, "peak_use_fraction": 0.25},
               "num_preemptions": 0}
    return build_report(engine={"path": "engines/x"}, config={"isl": 128, "osl": 32, "concurrency": 2,
                                                                "request_rate": None},
                        metrics=metrics, environment={"device": "cpu"})


def test_write_then_load_round_trips(tmp_path):
    report = sample_report()
    path = tmp_path / "sub" / "bench.json"
    write_report(report, path)
    assert load_report(path) == report
    assert not list(path.parent.glob(".*tmp*"))  # the temporary file was renamed, not left behind


def test_dash_writes_the_report_to_stdout(capsys):
    write_report(sample_report(), "-")
    assert json.loads(capsys.readouterr().out)["schema"] == SCHEMA


@pytest.mark.parametrize("content, fragment", [
    (None, "no such baseline report"),
    ("{oops", "is not valid JSON (line 1 column 2"),
    ('{"schema": "something-else/2"}', "is not an llmx-bench/1 report (schema: something-else/2)"),
    ("[1, 2]", "holds a JSON list, not the object a baseline report is"),
    ('{"schema": "llmx-bench/1", "metrics": {"ttft_ms": NaN}}', "NaN is not a JSON number"),
    (b"\xff{}", "byte 0 (ff) is not valid UTF-8"),
])
def test_load_refuses_what_is_not_a_report(tmp_path, content, fragment):
    path = tmp_path / "base.json"
    if isinstance(content, bytes):
        path.write_bytes(content)
    elif content is not None:
        path.write_text(content)
    with pytest.raises(LlmxError, match=fragment.replace("(", r"\(").replace(")", r"\)")):
        load_report(path)


def test_tables_show_throughput_latency_and_memory():
    console = Console(record=True, width=120)
    print_report(console, sample_report())
    text = console.export_text()
    assert "concurrency 2" in text
    assert "64.00 tok/s" in text and "2.00 req/s" in text
    assert "TTFT" in text and "19.90" in text
    assert "TPOT" in text and "n/a" in text  # a missing distribution renders, not crashes
    assert "25 / 100 blocks (25%)" in text and "3.00 GiB" in text
