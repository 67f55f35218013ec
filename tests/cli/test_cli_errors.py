"""Bad input: one line on stderr naming the problem, a non-zero exit code, no traceback, no output left behind."""

from __future__ import annotations

import subprocess
import sys

import pytest

from llmx.cli.main import run_cli


def fails_with(capsys, argv, fragment, code=2):
    assert run_cli(argv) == code
    captured = capsys.readouterr()
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1, captured.err
    assert lines[0].startswith("error: ")
    assert fragment in lines[0], lines[0]
    assert captured.out == ""
    return lines[0]


def test_missing_checkpoint_for_build_leaves_no_output(tmp_path, capsys):
    out = tmp_path / "engine"
    fails_with(capsys, ["build", str(tmp_path / "nope"), "-o", str(out), "--device", "cpu"], str(tmp_path / "nope"))
    assert not out.exists()


def test_missing_output_flag(capsys):
    fails_with(capsys, ["build", "ckpt"], "-o/--out is required")
    fails_with(capsys, ["convert", "hf"], "-o/--out is required")


def test_quantize_needs_an_algorithm(capsys):
    fails_with(capsys, ["quantize", "ckpt", "-o", "q"], "--algo is required")


def test_unknown_algorithm_from_a_flag_is_refused_before_any_work(tmp_path, capsys):
    fails_with(capsys, ["quantize", str(tmp_path), "-o", str(tmp_path / "q"), "--algo", "int3", "--recipe",
                        "llama/h100"], "--algo 'int3' is not a quantization algorithm")


@pytest.mark.parametrize("argv, fragment", [
    (["build", "ckpt", "--tp", "0"], "Invalid value for '--tp'"),
    (["build", "ckpt", "--bogus"], "No such option: --bogus"),
    (["convert", "hf", "--dtype", "float8"], "'float8' is not one of 'bfloat16', 'float16', 'float32'"),
    (["run", "engine", "--max-new-tokens", "zero"], "Invalid value for '--max-new-tokens'"),
    (["frobnicate"], "No such command 'frobnicate'"),
])
def test_usage_errors_are_one_line(capsys, argv, fragment):
    fails_with(capsys, argv, fragment)


def test_run_needs_exactly_one_prompt_source(tmp_path, capsys):
    fails_with(capsys, ["run", "engine"], "exactly one of --prompt TEXT or --prompts-file FILE")
    fails_with(capsys, ["run", "engine", "--prompt", "a", "--prompts-file", "f"], "exactly one of")


def test_run_refuses_stream_with_json(capsys):
    fails_with(capsys, ["run", "engine", "--prompt", "a", "--stream", "--json"], "--stream and --json do not mix")


def test_run_prompts_file_problems(tmp_path, capsys):
    fails_with(capsys, ["run", "engine", "--prompts-file", str(tmp_path / "none.txt")], "none.txt: no such file")
    bad = tmp_path / "p.jsonl"
    bad.write_text('{"prompt": "ok"}\n{"text": "no prompt"}\n')
    fails_with(capsys, ["run", "engine", "--prompts-file", str(bad)], 'p.jsonl:2: needs a string field "prompt"')
    empty = tmp_path / "p.txt"
    empty.write_text("\n\n")
    fails_with(capsys, ["run", "engine", "--prompts-file", str(empty)], "holds no prompts")


def test_run_on_something_that_is_not_an_engine(tmp_path, capsys):
    fails_with(capsys, ["run", str(tmp_path), "--prompt", "hi"], str(tmp_path))


def test_bench_load_options(tmp_path, capsys):
    fails_with(capsys, ["bench", "engine", "--concurrency", "2", "--request-rate", "1"], "choose one")
    fails_with(capsys, ["bench", "engine", "--request-rate", "-1"], "--request-rate must be a finite number > 0")
    fails_with(capsys, ["bench", "engine", "--baseline", str(tmp_path / "b.json")], "no such baseline report")


def test_eval_needs_data_and_a_real_baseline(tmp_path, capsys):
    fails_with(capsys, ["eval", "engine"], "--data is required")
    baseline = tmp_path / "b.json"
    baseline.write_text('{"schema": "llmx-bench/1"}')
    fails_with(capsys, ["eval", "engine", "--data", "t.txt", "--baseline", str(baseline)], "is not an `llmx eval --json` result")


def test_recipe_problems(tmp_path, capsys):
    fails_with(capsys, ["build", "ckpt", "--recipe", "llama/h900"], "recipe llama/h900 not found")
    recipe = tmp_path / "r.yaml"
    recipe.write_text("family: llama\ntarget: h100\nbuild: {max_batch: 8}\n")
    fails_with(capsys, ["build", "ckpt", "--recipe", str(recipe)], f"{recipe}: unknown key `build.max_batch`; allowed:")


def test_quickstart_model_choice_is_exclusive(capsys):
    fails_with(capsys, ["quickstart", "--model", "x", "--random-model"], "--model and --random-model")


def test_installed_entry_point_exits_non_zero_without_traceback(tmp_path):
    result = subprocess.run([sys.executable, "-m", "llmx", "build", str(tmp_path / "nope"), "-o", str(tmp_path / "e")],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    assert result.stderr.startswith("error: ")
