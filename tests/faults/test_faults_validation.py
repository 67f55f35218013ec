"""Numbers are checked where they enter: config.json at convert, llmx.json at build, engine.json at load, flags and
recipe values; each refusal is one sentence naming the file (or flag), the field and what is allowed."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from llmx.cli.main import run_cli


def edited_json(src: Path, dst: Path, name: str, edit) -> Path:
    shutil.copytree(src, dst)
    path = dst / name
    doc = json.loads(path.read_text())
    edit(doc)
    # json.dumps writes float("nan") as NaN, which Python's reader (and so a malformed export) accepts
    path.write_text(json.dumps(doc))
    return dst


def setter(**values):
    return lambda doc: doc.update(values)


HF_CONFIG_FAULTS = [
    (setter(rms_norm_eps=float("nan")), "field `rms_norm_eps` must be a finite number > 0 and <= 1, got nan"),
    (setter(rms_norm_eps=float("inf")), "field `rms_norm_eps` must be a finite number > 0 and <= 1, got inf"),
    (setter(rms_norm_eps=-1e-6), "field `rms_norm_eps` must be a positive number"),
    (setter(rms_norm_eps=5.0), "field `rms_norm_eps` must be a finite number > 0 and <= 1, got 5.0"),
    (setter(rope_parameters={"rope_type": "default", "rope_theta": float("nan")}),
     "field `rope_parameters.rope_theta` must be a finite number > 0 and <= 1e+12, got nan"),
    (setter(rope_parameters=None, rope_theta=float("inf")),
     "field `rope_theta` must be a finite number > 0 and <= 1e+12, got inf"),
    (setter(vocab_size=10**12), "field `vocab_size` must be an integer from 1 to 4,194,304"),
    (setter(max_position_embeddings=10**10), "field `max_position_embeddings` must be an integer from 1 to 16,777,216"),
    (setter(num_hidden_layers=5000), "field `num_hidden_layers` must be an integer from 1 to 1,024, got 5000"),
    (setter(vocab_size=4_000_000, hidden_size=65_536, num_attention_heads=512, num_key_value_heads=512,
            intermediate_size=200_000, num_hidden_layers=1000),
     "the model's sizes describe 4.2e+13 parameters (84 TB in bfloat16), more than the 1e+12 llmx accepts"),
    (setter(head_dim=33), "field `head_dim` must be even (RoPE rotates pairs of dimensions), got 33"),
    (setter(bos_token_id=300), "field `bos_token_id` must hold token ids from 0 to vocab_size - 1 (255), got 300"),
    (setter(eos_token_id=[2, 256]), "field `eos_token_id` must hold token ids from 0 to vocab_size - 1 (255), got 256"),
    (setter(rope_scaling={"rope_type": "linear", "factor": float("nan")}),
     "`rope_scaling.factor` must be a"),
    (setter(rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 4.0, "high_freq_factor": 4.0,
                          "original_max_position_embeddings": 128}),
     "field `rope_scaling.high_freq_factor` must be greater than low_freq_factor 4.0, got 4.0"),
]


@pytest.mark.parametrize("edit, fragment", HF_CONFIG_FAULTS)
def test_convert_refuses_a_config_json_the_runtime_could_not_run(tiny_hf, tmp_path, fails, edit, fragment):
    hf = edited_json(tiny_hf, tmp_path / "hf", "config.json", edit)
    line = fails(["convert", hf, "-o", tmp_path / "ckpt"], fragment)
    assert str(hf / "config.json") in line
    assert not (tmp_path / "ckpt").exists()


@pytest.fixture(scope="module")
def checkpoint(tiny_hf, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("faults-ckpt") / "ckpt"
    assert run_cli(["convert", str(tiny_hf), "-o", str(out)]) == 0
    return out


@pytest.mark.parametrize("edit, fragment", [
    (lambda m: m["model"].update(rms_norm_eps=float("nan")), "field `model.rms_norm_eps` must be a finite number"),
    (lambda m: m["model"].update(hidden_size=-64), "field `model.hidden_size` must be an integer from 1 to 65,536"),
    (lambda m: m["model"].update(vocab_size=2**40), "field `model.vocab_size` must be an integer from 1 to 4,194,304"),
    (lambda m: m["model"].update(qkv_bias="yes"), "field `model.qkv_bias` must be true or false, got 'yes'"),
    (lambda m: m["model"].update(rope_scaling={"type": "su", "factor": 2.0}),
     "field `model.rope_scaling.type` must be one of linear, dynamic, yarn, llama3, longrope, got 'su'"),
    (lambda m: m["model"].update(rope_scaling={"type": "yarn", "factor": 2.0, "attention_factor": float("nan")}),
     "field `model.rope_scaling.attention_factor` must be a positive number below 1e6, got nan"),
    (lambda m: m["model"].update(layer_types=["full_attention"]), "field `model.layer_types` must name"),
    (lambda m: m["model"].update(hidden_act="relu"), "field `model.hidden_act` must be one of silu, gelu_pytorch_tanh"),
    (lambda m: m.update(quantization={"algo": "int4_awq", "group_size": -128}),
     "field `quantization.group_size` must be null or an integer from 1 to 65,536, got -128"),
    (lambda m: m.update(quantization={"algo": "none", "kv_cache_dtype": "fp4"}),
     "field `quantization.kv_cache_dtype` must be null, \"fp8\" or \"int8\", got 'fp4'"),
])
def test_build_refuses_a_damaged_llmx_json(checkpoint, tmp_path, fails, edit, fragment):
    ckpt = edited_json(checkpoint, tmp_path / "ckpt", "llmx.json", edit)
    line = fails(["build", ckpt, "-o", tmp_path / "engine", "--device", "cpu"], fragment)
    assert str(ckpt / "llmx.json") in line and not (tmp_path / "engine").exists()


@pytest.mark.parametrize("argv, fragment", [
    (["--max-seq-len", "100000000"], "--max-seq-len must be an integer from 1 to 16,777,216, got 100000000"),
    (["--max-batch-size", "1000000"], "--max-batch-size must be an integer from 1 to 65,536, got 1000000"),
])
def test_build_refuses_absurd_sizes(checkpoint, tmp_path, fails, argv, fragment):
    fails(["build", checkpoint, "-o", tmp_path / "engine", "--device", "cpu", *argv], fragment)


ENGINE_JSON_FAULTS = [
    (lambda m: m["checkpoint"]["model"].update(rms_norm_eps=float("nan")),
     "field `checkpoint.model.rms_norm_eps` must be a finite number > 0 and <= 1, got nan"),
    (lambda m: m["build"].update(max_seq_len=-1), "field `build.max_seq_len` must be an integer from 1 to 16,777,216"),
    (lambda m: m["build"].update(kv_block_size=0), "field `build.kv_block_size` must be an integer from 1 to 1,024"),
    (lambda m: m["mapping"].update(tp=0), "field `mapping.tp` must be an integer from 1 to 1,024, got 0"),
    (lambda m: m["files"].update({"rank0.safetensors": 1}), "holds"),
    (lambda m: m.update(versions=["llmx", "0.1"]), "field `versions` is missing or not an object"),
    (lambda m: m["checkpoint"].update(quantization={"algo": "int8_wo", "exclude": [3]}),
     "field `checkpoint.quantization.exclude` must be a list of module names, got [3]"),
]


@pytest.mark.parametrize("edit, fragment", ENGINE_JSON_FAULTS)
def test_loading_refuses_a_damaged_engine_json(tiny_engine, heldout, tmp_path, fails, edit, fragment):
    engine = edited_json(tiny_engine, tmp_path / "engine", "engine.json", edit)
    line = fails(["eval", engine, "--data", heldout, "--seq-len", "32"], fragment)
    assert str(engine) in line


def test_a_truncated_rank_file_is_named(tiny_engine, heldout, tmp_path, fails):
    engine = tmp_path / "engine"
    shutil.copytree(tiny_engine, engine)
    rank = engine / "rank0.safetensors"
    size = rank.stat().st_size
    with open(rank, "r+b") as f:
        f.truncate(size // 2)
    fails(["eval", engine, "--data", heldout, "--seq-len", "32"],
          f"rank0.safetensors holds {size // 2:,} bytes but the build wrote {size:,}")


def test_a_missing_rank_file_is_named(tiny_engine, heldout, tmp_path, fails):
    engine = tmp_path / "engine"
    shutil.copytree(tiny_engine, engine)
    (engine / "rank0.safetensors").unlink()
    fails(["run", engine, "--prompt", "hello"], "rank0.safetensors is missing (engine.json declares 1 rank file(s))")


@pytest.mark.parametrize("argv, fragment", [
    (["bench", "E", "--seed", str(2**64)], "--seed must be an integer from 0 to 2^64 - 1 (18,446,744,073,709,551,615)"),
    (["bench", "E", "--request-rate", "inf"], "--request-rate must be a finite number > 0 and <= 1,000,000,000"),
    (["bench", "E", "--isl", "100000000"], "--isl must be an integer from 1 to 16,777,216"),
    (["bench", "E", "--kv-cache-tokens", str(2**40)], "--kv-cache-tokens must be an integer from 1 to 4,294,967,296"),
    (["run", "E", "--prompt", "x", "--temperature", "inf"], "--temperature must be a finite number from 0 to 10,000"),
    (["run", "E", "--prompt", "x", "--seed", str(2**70)], "--seed must be an integer from 0 to 2^64 - 1"),
    (["quantize", "C", "-o", "Q", "--algo", "int8_wo", "--seed", str(2**64)], "--seed must be an integer from 0"),
    (["eval", "E", "--data", "D", "--seq-len", str(10**9)], "--seq-len must be an integer from 2 to 16,777,216"),
])
def test_flags_out_of_range_are_refused(fails, argv, fragment):
    fails(argv, fragment)


def test_recipe_values_out_of_range_are_refused(tmp_path, fails):
    recipe = tmp_path / "r.yaml"
    recipe.write_text("family: llama\ntarget: cpu\nbench:\n  tolerance: .inf\n")
    fails(["bench", "E", "--recipe", recipe], "r.yaml: `bench.tolerance` must be a finite number from 0 to 1,000,000")


def test_pipeline_recipe_values_out_of_range_are_refused_before_any_stage(tiny_hf, tmp_path, fails):
    recipe = tmp_path / "r.yaml"
    recipe.write_text("family: llama\ntarget: cpu\nbuild: {max_seq_len: 64}\n"
                      "bench:\n  scenarios: [{name: a, isl: 8, osl: 4, num_requests: 1, max_ttft_ms: .inf}]\n")
    fails(["pipeline", "--recipe", recipe, "--model", tiny_hf, "--workdir", tmp_path / "w"],
          "`bench.scenarios.0.max_ttft_ms` must be a finite number > 0 and <= 1e+12, got inf")
    assert not (tmp_path / "w").exists()


def test_build_refuses_an_engine_whose_one_sequence_cannot_fit(checkpoint, tmp_path, monkeypatch, fails):
    import llmx.build.engine as engine_module

    # 2 layers x 2 KV heads x 16 dims x K and V x 2 bytes = 256 bytes per token: 4,096 tokens take 1 MiB
    monkeypatch.setattr(engine_module, "device_memory_bytes", lambda target: 1 << 20)
    fails(["build", checkpoint, "-o", tmp_path / "engine", "--device", "cpu", "--max-seq-len", "4096"],
          "max_seq_len 4,096: one sequence's KV cache takes 1.0 MiB and the weights 0.2 MiB per rank, more than the "
          "1.0 MiB of cpu")
    assert run_cli(["build", str(checkpoint), "-o", str(tmp_path / "engine"), "--device", "cpu",
                    "--max-seq-len", "64"]) == 0
