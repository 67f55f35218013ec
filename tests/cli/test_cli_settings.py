"""Settings resolution: command defaults < recipe < flags, shown by --print-config; recipes and CLI agree."""

from __future__ import annotations

import dataclasses
import json

import pytest

from llmx.cli import bench, build, convert, eval as eval_cmd, quantize, run
from llmx.cli.main import run_cli
from llmx.recipes.schema import SECTIONS
from llmx.formats.config import BuildConfig

CLI_DEFAULTS = {"convert": convert.DEFAULTS, "quantize": quantize.DEFAULTS, "build": build.DEFAULTS,
                "run": run.DEFAULTS, "bench": bench.DEFAULTS, "eval": eval_cmd.DEFAULTS}


def print_config(capsys, *argv) -> dict:
    assert run_cli([*argv, "--print-config"]) == 0
    captured = capsys.readouterr()
    return json.loads(captured.out)


def test_every_recipe_key_is_a_command_option_and_back():
    for section, model in SECTIONS.items():
        assert set(model.model_fields) == set(CLI_DEFAULTS[section]), section


def test_build_defaults_are_buildconfigs():
    config = BuildConfig()
    for key in ("max_batch_size", "max_seq_len", "max_num_tokens", "kv_block_size"):
        assert build.DEFAULTS[key] == getattr(config, key)
    assert {f.name for f in dataclasses.fields(BuildConfig)} >= set(build.DEFAULTS) - {"tp", "pp"}


def test_defaults_without_a_recipe(capsys):
    config = print_config(capsys, "build", "ckpt")
    assert config["recipe"] is None
    assert config["settings"] == build.DEFAULTS
    assert set(config["sources"].values()) == {"default"}


def test_recipe_values_then_flags_override_them(capsys):
    config = print_config(capsys, "build", "ckpt", "--recipe", "llama/h200", "--max-batch-size", "7", "--tp", "2")
    assert config["recipe"] == "recipes/llama/h200.yaml"
    assert config["settings"]["max_batch_size"] == 7 and config["sources"]["max_batch_size"] == "flag"
    assert config["settings"]["tp"] == 2 and config["sources"]["tp"] == "flag"
    assert config["settings"]["max_num_tokens"] == 16384 and config["sources"]["max_num_tokens"] == "recipe"
    assert config["settings"]["device"] == "cuda" and config["sources"]["device"] == "recipe"


def test_recipe_file_with_partial_section_falls_back_to_defaults(tmp_path, capsys):
    recipe = tmp_path / "mine.yaml"
    recipe.write_text("family: qwen3\ntarget: cpu\nrun: {max_new_tokens: 9, stop: ['END']}\n")
    config = print_config(capsys, "run", "engine", "--recipe", str(recipe), "--temperature", "0.5")
    assert config["settings"]["max_new_tokens"] == 9 and config["sources"]["max_new_tokens"] == "recipe"
    assert config["settings"]["stop"] == ["END"]
    assert config["settings"]["temperature"] == 0.5 and config["sources"]["temperature"] == "flag"
    assert config["settings"]["top_p"] == 1.0 and config["sources"]["top_p"] == "default"


def test_list_flags_override_recipe_lists(capsys):
    config = print_config(capsys, "quantize", "ckpt", "--recipe", "qwen2/h100", "--exclude", "layers.0.*",
                          "--exclude", "lm_head")
    assert config["settings"]["exclude"] == ["layers.0.*", "lm_head"]
    assert config["settings"]["algo"] == "fp8" and config["sources"]["algo"] == "recipe"


def test_every_command_prints_its_config(capsys):
    for argv in (["convert", "hf"], ["quantize", "ckpt"], ["build", "ckpt"], ["run", "engine"],
                 ["bench", "engine"], ["eval", "engine"]):
        config = print_config(capsys, *argv, "--recipe", "mistral/cpu")
        assert config["command"] == argv[0]
        assert set(config["settings"]) == set(CLI_DEFAULTS[argv[0]])


def test_a_flag_that_contradicts_the_recipes_hardware_is_refused(capsys):
    assert run_cli(["quantize", "ckpt", "--recipe", "llama/a100", "--algo", "fp8", "--print-config"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: --algo fp8 does not fit recipe recipes/llama/a100.yaml:")
    assert "compute capability 8.9+" in err


def test_an_alias_flag_is_checked_in_canonical_form(capsys):
    assert run_cli(["quantize", "ckpt", "--recipe", "llama/a100", "--algo", "w4a8", "--print-config"]) == 2
    assert "does not fit recipe" in capsys.readouterr().err


def test_the_recipe_for_another_target_device_is_refused(capsys):
    assert run_cli(["build", "ckpt", "--recipe", "llama/cpu", "--device", "cuda", "--print-config"]) == 2
    assert "target cpu runs engines on cpu, not cuda" in capsys.readouterr().err


@pytest.mark.parametrize("argv", [["run", "engine", "--top-p", "0.9"], ["bench", "engine", "--osl", "3"]])
def test_print_config_needs_no_model_files(argv, capsys):
    config = print_config(capsys, *argv)
    assert config["sources"][argv[2].lstrip("-").replace("-", "_")] == "flag"


def test_kv_cache_fraction_comes_from_recipe_then_flag(tmp_path, capsys):
    recipe = tmp_path / "gpu.yaml"
    recipe.write_text("family: llama\ntarget: h100\nbench: {kv_cache_fraction: 0.5}\n")
    assert print_config(capsys, "bench", "engine", "--recipe", str(recipe))["settings"]["kv_cache_fraction"] == 0.5
    config = print_config(capsys, "bench", "engine", "--recipe", str(recipe), "--kv-cache-fraction", "0.7")
    assert config["settings"]["kv_cache_fraction"] == 0.7 and config["sources"]["kv_cache_fraction"] == "flag"
    assert print_config(capsys, "run", "engine")["settings"]["kv_cache_fraction"] == 0.9
    assert run_cli(["run", "engine", "--kv-cache-fraction", "1.5", "--print-config"]) == 2
