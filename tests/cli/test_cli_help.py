"""Every command explains itself, and --help never pays for torch/transformers imports."""

from __future__ import annotations

import subprocess
import sys

import pytest

from llmx.cli.main import run_cli

COMMANDS = {
    "convert": ["--dtype", "--dummy-weights", "--trust-remote-code", "--force", "--recipe", "--print-config", "--json"],
    "quantize": ["--algo", "--kv-cache-dtype", "--calib-data", "--calib-size", "--calib-seq-len", "--batch-size",
                 "--group-size", "--exclude", "--device", "--seed", "--export-format", "--quantize-lm-head", "--recipe",
                 "--json"],
    "build": ["--tp", "--pp", "--max-batch-size", "--max-seq-len", "--max-num-tokens", "--kv-block-size",
              "--device", "--recipe", "--force", "--json"],
    "run": ["--prompt", "--prompts-file", "--chat", "--max-new-tokens", "--temperature", "--top-k", "--top-p",
            "--seed", "--stop", "--stream", "--json", "--kv-cache-tokens"],
    "bench": ["--isl", "--osl", "--num-requests", "--concurrency", "--request-rate", "--warmup", "--dataset",
              "--json", "--baseline", "--tolerance", "--seed"],
    "eval": ["--data", "--seq-len", "--windows", "--json", "--baseline", "--max-increase"],
    "quickstart": ["--model", "--workdir", "--device", "--random-model", "--json"],
    "pipeline": ["--recipe", "--model", "--workdir", "--only", "--json", "--junit"],
}


def flat(text: str) -> str:
    """Help text with rich's box borders and line wrapping removed."""
    return " ".join(text.replace("│", " ").split())


@pytest.mark.parametrize("command", sorted(COMMANDS))
def test_command_help_lists_its_options_and_examples(command, capsys):
    assert run_cli([command, "--help"]) == 0
    text = capsys.readouterr().out
    assert f"llmx {command}" in text
    for option in COMMANDS[command]:
        assert option in text, f"{command} --help does not mention {option}"
    assert "Examples" in text


def test_top_level_help_lists_every_command(capsys):
    assert run_cli(["--help"]) == 0
    text = capsys.readouterr().out
    for command in COMMANDS:
        assert command in text


def test_bench_help_says_what_is_timed(capsys):
    run_cli(["bench", "--help"])
    text = flat(capsys.readouterr().out)
    assert "What is timed" in text and "Not timed" in text
    assert "TPOT = (E2E - TTFT) / (output tokens - 1)" in text


def test_defaults_are_shown_in_help(capsys):
    run_cli(["build", "--help"])
    text = flat(capsys.readouterr().out)
    assert "[default: 64]" in text and "[default: 4096]" in text


HEAVY = ("torch", "transformers", "modelopt", "triton", "safetensors", "numpy", "yaml")


def test_help_imports_nothing_heavy():
    code = (
        "import sys\n"
        "from llmx.cli.main import run_cli\n"
        f"for argv in [['--help']] + [[c, '--help'] for c in {sorted(COMMANDS)!r}]:\n"
        "    assert run_cli(argv) == 0\n"
        f"print(sorted(m for m in {HEAVY!r} if m in sys.modules))\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip().splitlines()[-1] == "[]"


def test_python_dash_m_llmx_works():
    result = subprocess.run([sys.executable, "-m", "llmx", "--help"], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert "quickstart" in result.stdout
