"""The real pipeline through the CLI on a tiny Llama: convert -> build -> run -> bench -> eval, and quickstart."""

from __future__ import annotations

import json

import pytest

from llmx.cli.main import run_cli

BUILD = ["--device", "cpu", "--max-seq-len", "96", "--max-batch-size", "4", "--max-num-tokens", "96"]


def cli_json(capsys, *argv):
    code = run_cli(list(argv))
    captured = capsys.readouterr()
    assert code == 0, captured.err
    return json.loads(captured.out)


@pytest.fixture(scope="module")
def engine(tmp_path_factory):
    """One converted and built tiny model for the whole module (building is the slow part)."""
    from helpers.tiny_models import make_tiny_hf_model

    root = tmp_path_factory.mktemp("e2e")
    hf = make_tiny_hf_model("llama", root / "hf")
    assert run_cli(["convert", str(hf), "-o", str(root / "ckpt")]) == 0
    assert run_cli(["build", str(root / "ckpt"), "-o", str(root / "engine"), *BUILD]) == 0
    return root


def test_convert_and_build_report_json(tmp_path, capsys):
    from helpers.tiny_models import make_tiny_hf_model

    hf = make_tiny_hf_model("qwen3", tmp_path / "hf")
    converted = cli_json(capsys, "convert", str(hf), "-o", str(tmp_path / "ckpt"), "--dtype", "float32", "--json")
    assert converted["model"]["family"] == "qwen3" and converted["dtype"] == "float32"
    assert converted["size_bytes"] > 0
    built = cli_json(capsys, "build", str(tmp_path / "ckpt"), "-o", str(tmp_path / "engine"), *BUILD, "--json")
    assert built["reused"] is False and built["build"]["max_seq_len"] == 96
    again = cli_json(capsys, "build", str(tmp_path / "ckpt"), "-o", str(tmp_path / "engine"), *BUILD, "--json")
    assert again["reused"] is True
    assert run_cli(["build", str(tmp_path / "ckpt"), "-o", str(tmp_path / "engine"), *BUILD]) == 0
    assert "reused" in capsys.readouterr().out


def test_dummy_weights_convert(tmp_path, capsys):
    from helpers.tiny_models import make_tiny_hf_model

    hf = make_tiny_hf_model("mistral", tmp_path / "hf")
    assert run_cli(["convert", str(hf), "-o", str(tmp_path / "ckpt"), "--dummy-weights"]) == 0
    captured = capsys.readouterr()
    assert "converted" in captured.out and "random" in captured.err


def test_run_one_prompt_json_and_stream_agree(engine, capsys):
    args = ["run", str(engine / "engine"), "--prompt", "It was a truth", "--max-new-tokens", "6"]
    result = cli_json(capsys, *args, "--json")
    [output] = result["outputs"]
    assert output["error"] is None and 1 <= output["num_output_tokens"] <= 6
    assert output["finish_reason"] in ("length", "eos")
    assert run_cli([*args, "--stream"]) == 0
    streamed = capsys.readouterr().out
    assert streamed.strip() == output["text"].strip()
    assert run_cli(args) == 0
    assert capsys.readouterr().out.strip() == output["text"].strip()


def test_run_many_prompts_with_one_too_long(engine, tmp_path, capsys):
    prompts = tmp_path / "prompts.jsonl"
    too_long = "word " * 400
    prompts.write_text("\n".join(json.dumps({"prompt": p}) for p in ["Emma Woodhouse", too_long, "Mr. Knightley"]))
    code = run_cli(["run", str(engine / "engine"), "--prompts-file", str(prompts), "--max-new-tokens", "4"])
    captured = capsys.readouterr()
    assert code == 2
    assert "[0]" in captured.out and "[2]" in captured.out and "[1]" not in captured.out
    assert "error: prompt 1:" in captured.err
    assert "Traceback" not in captured.err


def test_bench_json_report_and_baseline_gate(engine, tmp_path, capsys):
    report_path = tmp_path / "bench.json"
    args = ["bench", str(engine / "engine"), "--isl", "16", "--osl", "4", "--num-requests", "4", "--warmup", "1"]
    assert run_cli([*args, "--json", str(report_path)]) == 0
    table = capsys.readouterr().out
    assert "output throughput" in table and "TTFT" in table
    report = json.loads(report_path.read_text())
    assert report["schema"] == "llmx-bench/1"
    m = report["metrics"]
    assert m["completed_requests"] == 4 and m["failed_requests"] == 0
    assert m["total_input_tokens"] == 64 and m["total_output_tokens"] == 16  # exact lengths: EOS ignored
    assert m["output_throughput_tok_s"] > 0 and m["ttft_ms"]["p50"] > 0 and m["tpot_ms"]["p50"] > 0
    assert 0 < m["kv_cache"]["blocks_peak_used"] <= m["kv_cache"]["blocks_total"]
    assert report["engine"]["family"] == "llama" and report["config"]["isl"] == 16
    assert report["environment"]["device"] == "cpu"

    impossible = json.loads(report_path.read_text())
    impossible["metrics"]["output_throughput_tok_s"] *= 1000  # a baseline nobody can match
    impossible_path = tmp_path / "impossible.json"
    impossible_path.write_text(json.dumps(impossible))
    code = run_cli([*args, "--json", "-", "--baseline", str(impossible_path), "--tolerance", "50"])
    captured = capsys.readouterr()
    assert code == 1
    assert json.loads(captured.out)["schema"] == "llmx-bench/1"  # `--json -`: stdout holds only the report
    assert "regressed beyond 50.0%" in captured.err and "output_throughput_tok_s" in captured.err

    # --baseline-metric gates only the named metrics: the impossible throughput alone fails, a latency alone passes
    only = ["--baseline", str(impossible_path), "--tolerance", "50"]
    assert run_cli([*args, *only, "--baseline-metric", "output_throughput_tok_s"]) == 1
    assert "1 metric(s) regressed" in capsys.readouterr().err
    slow = json.loads(report_path.read_text())
    slow["metrics"]["ttft_ms"]["p50"] *= 1000  # a baseline far slower in TTFT: no regression there
    slow_path = tmp_path / "slow.json"
    slow_path.write_text(json.dumps(slow))
    assert run_cli([*args, "--baseline", str(slow_path), "--tolerance", "1000", "--baseline-metric", "ttft_ms.p50"]) == 0
    assert "1 metrics compared" in capsys.readouterr().err
    assert run_cli([*args, *only, "--baseline-metric", "tokens_per_joule"]) == 2
    assert "--baseline-metric 'tokens_per_joule' is not a gated metric" in capsys.readouterr().err
    assert run_cli([*args, "--baseline-metric", "output_throughput_tok_s"]) == 2
    assert "--baseline-metric names what --baseline gates" in capsys.readouterr().err


def test_bench_refuses_requests_longer_than_the_engine(engine, capsys):
    assert run_cli(["bench", str(engine / "engine"), "--isl", "90", "--osl", "10", "--num-requests", "2"]) == 2
    assert "max_seq_len is 96" in capsys.readouterr().err


def test_eval_states_windows_and_gates_on_a_baseline(engine, tmp_path, capsys):
    from llmx.cli._quickstart_model import TOKENIZER_CORPUS

    text = tmp_path / "heldout.txt"
    text.write_text(TOKENIZER_CORPUS * 3)
    args = ["eval", str(engine / "engine"), "--data", str(text), "--seq-len", "32", "--windows", "3"]
    result = cli_json(capsys, *args, "--json")
    assert result["num_windows"] == 3 and result["seq_len"] == 32 and result["perplexity"] > 1
    assert run_cli(args) == 0
    assert "3 windows of 32 tokens" in capsys.readouterr().out

    baseline = tmp_path / "base.json"
    baseline.write_text(json.dumps(result))
    assert run_cli([*args, "--baseline", str(baseline), "--max-increase", "0"]) == 0
    capsys.readouterr()
    better = dict(result, perplexity=result["perplexity"] / 2)
    baseline.write_text(json.dumps(better))
    assert run_cli([*args, "--baseline", str(baseline), "--max-increase", "5"]) == 1
    assert "regressed" in capsys.readouterr().err


def test_quickstart_with_the_random_model(tmp_path, capsys):
    summary = cli_json(capsys, "quickstart", "--random-model", "--workdir", str(tmp_path / "qs"), "--device", "cpu",
                       "--max-new-tokens", "4", "--json")
    assert summary["random_weights"] is True and summary["device"] == "cpu"
    assert list(summary["stages"]) == ["model", "convert", "build", "load", "run", "bench"]
    assert len(summary["outputs"]) == 2 and all(o["tokens"] >= 1 for o in summary["outputs"])
    assert summary["bench"]["completed_requests"] == 4
    # A second run reuses the engine.
    again = cli_json(capsys, "quickstart", "--random-model", "--workdir", str(tmp_path / "qs"), "--device", "cpu",
                     "--max-new-tokens", "4", "--json")
    assert "reused" in again["stages"]["build"]["detail"]
