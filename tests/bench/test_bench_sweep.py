"""`llmx bench --sweep`: the sweep file's checks, a sweep of cells on a tiny CPU engine (each cell on a fresh
scheduler, its own max batch, the ratio to the peer), and the command end to end with its refusals."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from llmx.bench.sweep import SCHEMA, SweepCell, check_sweep_fits, load_sweep, run_sweep
from llmx.cli.main import run_cli
from llmx.common.errors import LlmxError

REPO = Path(__file__).resolve().parents[2]


def write(tmp_path, text: str) -> Path:
    path = tmp_path / "sweep.yaml"
    path.write_text(text)
    return path


def test_the_shipped_peer_file_holds_tensorrt_llms_four_cells():
    sweep = load_sweep(REPO / "measurements" / "peers" / "tensorrt-llm-1.0-h100-fp8.yaml")
    assert sweep.peer.startswith("TensorRT-LLM 1.0") and sweep.source
    assert [(c.isl, c.osl, c.num_requests, c.peer_output_tok_s) for c in sweep.cells] == [
        (128, 128, 30000, 28312), (128, 2048, 3000, 22714), (2048, 128, 3000, 3450), (2048, 2048, 1500, 9305)]


def test_a_sweep_file_reads_optional_fields_and_json(tmp_path):
    sweep = load_sweep(write(tmp_path, "peer: P\ncells:\n  - {isl: 8, osl: 4, num_requests: 3, max_batch: 2, "
                                       "peer_output_tok_s: 10.5, peer_num_requests: 30}\n"))
    assert sweep.cells == (SweepCell(8, 4, 3, 10.5, max_batch=2, peer_num_requests=30),) and sweep.source is None
    as_json = tmp_path / "sweep.json"
    as_json.write_text(json.dumps({"peer": "P", "cells": [{"isl": 8, "osl": 4, "num_requests": 3,
                                                           "peer_output_tok_s": 7}]}))
    assert load_sweep(as_json).cells[0].name == "8/4"


@pytest.mark.parametrize("text, fragment", [
    ("cells: [{isl: 8, osl: 4, num_requests: 3, peer_output_tok_s: 1}]", "`peer` must name"),
    ("peer: P\ncells: []", "`cells` must be a non-empty list"),
    ("peer: P\nrows: []\ncells: [{isl: 8}]", "unknown top-level field(s) rows"),
    ("peer: P\ncells: [{isl: 8, osl: 4, num_requests: 3, peer_output_tok_s: 1, concurrency: 4}]",
     "cell 1: unknown field(s) concurrency"),
    ("peer: P\ncells: [{isl: 8, osl: 4, num_requests: 0, peer_output_tok_s: 1}]",
     "cell 1: `num_requests` must be a positive integer, got 0"),
    ("peer: P\ncells: [{isl: 8, osl: 4, num_requests: 2, peer_output_tok_s: 1},\n"
     "        {isl: 8, osl: 4.5, num_requests: 2, peer_output_tok_s: 1}]", "cell 2: `osl` must be a positive integer"),
    ("peer: P\ncells: [{isl: 8, osl: 4, num_requests: 3, peer_output_tok_s: .nan}]", "`peer_output_tok_s` must be"),
    ("peer: P\ncells: [{isl: 8, osl: 4, num_requests: 3}]", "`peer_output_tok_s` must be"),
    ("peer: P\ncells: [7]", "cell 1 must be a mapping"),
    ("- just a list", "a sweep file is a mapping"),
    ("peer: [unclosed", "not a readable YAML/JSON sweep file"),
])
def test_a_bad_sweep_file_is_refused_in_one_sentence_naming_the_field(tmp_path, text, fragment):
    path = write(tmp_path, text)
    with pytest.raises(LlmxError, match=None) as err:
        load_sweep(path)
    assert fragment in str(err.value) and str(path) in str(err.value)


def test_a_missing_sweep_file_and_cells_the_engine_cannot_run(tmp_path):
    with pytest.raises(LlmxError, match="no such sweep file"):
        load_sweep(tmp_path / "nope.yaml")
    sweep = load_sweep(write(tmp_path, "peer: P\ncells:\n  - {isl: 8, osl: 4, num_requests: 3, peer_output_tok_s: 1}\n"
                                       "  - {isl: 8, osl: 4, num_requests: 3, max_batch: 9, peer_output_tok_s: 1}\n"))
    with pytest.raises(LlmxError, match=r"cell 2 \(8/4\) asks for max_batch 9 but the engine's max batch size is 4"):
        check_sweep_fits(sweep, max_batch_size=4, max_seq_len=64)
    with pytest.raises(LlmxError, match="cell 1 .* needs 12 tokens per sequence but the engine's max_seq_len is 10"):
        check_sweep_fits(sweep, max_batch_size=16, max_seq_len=10)


@pytest.fixture(scope="module")
def tiny_engine(tmp_path_factory):
    from helpers.tiny_models import make_tiny_hf_model
    from llmx.ingest.convert import convert
    from llmx.build.engine import build_engine
    from llmx.formats.config import BuildConfig

    tmp = tmp_path_factory.mktemp("sweep")
    ckpt = convert(make_tiny_hf_model("llama", tmp / "hf", dtype=torch.float32), tmp / "ckpt", dtype="float32")
    return build_engine(ckpt, tmp / "engine", BuildConfig(max_batch_size=4, max_seq_len=64, max_num_tokens=64,
                                                          kv_block_size=16, device="cpu")).path


def test_a_sweep_runs_each_cell_on_a_fresh_scheduler_with_its_own_max_batch(tiny_engine, tmp_path):
    from llmx.runtime.engine import LLM

    llm = LLM(tiny_engine)
    rows_per_step = []
    launch = llm.runner.launch
    llm.runner.launch = lambda work, after=None: rows_per_step.append(len(work)) or launch(work, after)
    # The same prompts twice (same ISL and seed): the second cell would hit the first's prefix cache if it kept it.
    sweep = load_sweep(write(tmp_path, "peer: P\nsource: somewhere\ncells:\n"
                                       "  - {isl: 40, osl: 3, num_requests: 5, max_batch: 2, peer_output_tok_s: 2000}\n"
                                       "  - {isl: 40, osl: 3, num_requests: 5, peer_output_tok_s: 1000, "
                                       "peer_num_requests: 50}\n"))
    stages = set()
    report = run_sweep(llm, sweep, warmup=0, progress=lambda stage, done, total: stages.add(stage))
    assert report["schema"] == SCHEMA and report["peer"] == {"name": "P", "source": "somewhere", "file": str(sweep.path)}
    first, second = report["cells"]
    assert (first["max_batch"], second["max_batch"]) == (2, 4)
    assert (first["peer_num_requests"], second["peer_num_requests"]) == (5, 50)
    for cell in report["cells"]:
        m = cell["metrics"]
        assert m["completed_requests"] == 5 and m["total_output_tokens"] == 15
        assert cell["ratio"] == pytest.approx(m["output_throughput_tok_s"] / cell["peer_output_tok_s"])
        assert m["prefix_cache_hit_tokens"] == 0
    assert max(rows_per_step) == 4 and stages == {"cell 1/2 40/3: measured requests", "cell 2/2 40/3: measured requests"}
    assert llm.scheduler.max_num_seqs == 4 and llm.scheduler.admission == "reserve"


def test_bench_sweep_end_to_end_and_its_refusals(tiny_engine, tmp_path, capsys):
    sweep = write(tmp_path, "peer: Peer X\ncells:\n  - {isl: 8, osl: 3, num_requests: 3, peer_output_tok_s: 1000}\n"
                            "  - {isl: 16, osl: 2, num_requests: 2, max_batch: 1, peer_output_tok_s: 500}\n")
    out = tmp_path / "sweep.json"
    assert run_cli(["bench", str(tiny_engine), "--sweep", str(sweep), "--warmup", "1", "--json", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "against Peer X" in printed and "16/2" in printed and "1,000" in printed
    report = json.loads(out.read_text())
    assert [(c["isl"], c["osl"], c["max_batch"], c["warmup"]) for c in report["cells"]] == [(8, 3, 4, 1), (16, 2, 1, 1)]
    assert report["cells"][1]["metrics"]["total_output_tokens"] == 4

    def refused(argv, fragment):
        assert run_cli(argv) == 2
        err = capsys.readouterr().err
        assert fragment in err, err

    refused(["bench", str(tiny_engine), "--sweep", str(sweep), "--isl", "8"], "--isl cannot come with it")
    refused(["bench", str(tiny_engine), "--sweep", str(sweep), "--baseline", str(out)], "--baseline compares one")
    too_big = write(tmp_path, "peer: P\ncells: [{isl: 8, osl: 3, num_requests: 3, max_batch: 8, "
                              "peer_output_tok_s: 1}]")
    refused(["bench", str(tiny_engine), "--sweep", str(too_big)], "asks for max_batch 8")


def test_a_sweep_stopped_in_its_second_cell_keeps_the_first_in_its_report(tiny_engine, tmp_path, capsys,
                                                                           monkeypatch):
    import llmx.bench.sweep as sweep_module

    measure = sweep_module.measure
    calls = []

    def stopped_in_the_second(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return measure(*args, **kwargs)

    monkeypatch.setattr(sweep_module, "measure", stopped_in_the_second)
    sweep = write(tmp_path, "peer: P\ncells:\n  - {isl: 8, osl: 3, num_requests: 3, peer_output_tok_s: 1000}\n"
                            "  - {isl: 16, osl: 2, num_requests: 2, peer_output_tok_s: 500}\n")
    out = tmp_path / "sweep.json"
    assert run_cli(["bench", str(tiny_engine), "--sweep", str(sweep), "--warmup", "0", "--json", str(out)]) == 130
    report = json.loads(out.read_text())
    assert report["cells_planned"] == 2 and [(c["isl"], c["osl"]) for c in report["cells"]] == [(8, 3)]
    assert report["cells"][0]["metrics"]["total_output_tokens"] == 9
    assert "cell 1/2 8/3 x3:" in capsys.readouterr().err
