"""Every bad input to `convert` raises one LlmxError naming the file/field, and leaves no output behind."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from llmx.ingest.convert import convert
from llmx.common.errors import LlmxError


def _assert_no_output(out: Path) -> None:
    assert not out.exists(), f"{out} was created"
    leftovers = [p.name for p in out.parent.iterdir() if p.name.startswith(f".{out.name}.")]
    assert leftovers == [], f"temporary output left behind: {leftovers}"


def _convert_fails(hf_dir, out, *needles, **kwargs) -> str:
    with pytest.raises(LlmxError) as info:
        convert(hf_dir, out, **kwargs)
    msg = info.value.message
    for needle in needles:
        assert needle in msg, f"{needle!r} not in {msg!r}"
    assert "\n" not in msg
    return msg


def _edit_config(hf_dir: Path, **changes) -> None:
    path = hf_dir / "config.json"
    cfg = json.loads(path.read_text())
    for k, v in changes.items():
        if v is None:
            cfg.pop(k, None)
        else:
            cfg[k] = v
    path.write_text(json.dumps(cfg))


def test_missing_dir_file_and_config(tmp_path):
    out = tmp_path / "out"
    _convert_fails(tmp_path / "nope", out, "nope", "does not exist")
    (tmp_path / "file").write_text("x")
    _convert_fails(tmp_path / "file", out, "is not a directory")
    (tmp_path / "empty").mkdir()
    _convert_fails(tmp_path / "empty", out, "empty/config.json", "is missing")
    _assert_no_output(out)


def test_bad_config(tiny_model_dir, tmp_path):
    out = tmp_path / "out"
    hf = tiny_model_dir("llama")
    _edit_config(hf, architectures=None)
    _convert_fails(hf, out, "config.json", "`architectures`")
    _edit_config(hf, architectures=["FalconForCausalLM"])
    _convert_fails(hf, out, "config.json", "FalconForCausalLM is not supported", "LlamaForCausalLM")
    (hf / "config.json").write_text("{not json")
    _convert_fails(hf, out, "config.json", "not valid JSON")
    _assert_no_output(out)


def test_pickle_only_and_missing_weights(tiny_model_dir, tmp_path):
    out = tmp_path / "out"
    hf = tiny_model_dir("llama")
    (hf / "model.safetensors").unlink()
    _convert_fails(hf, out, "has no model.safetensors", "--dummy-weights")
    (hf / "pytorch_model.bin").write_bytes(b"\x80\x02 pickle bytes that must never be loaded")
    _convert_fails(hf, out, "pytorch_model.bin", "never unpickles", "safetensors")
    _assert_no_output(out)


def test_shards_without_index_and_index_with_missing_shard(tiny_model_dir, tmp_path):
    out = tmp_path / "out"
    hf = tiny_model_dir("llama", multi_shard=True)
    shards = sorted(hf.glob("model-*.safetensors"))
    shards[1].unlink()
    _convert_fails(hf, out, "model.safetensors.index.json", shards[1].name, "is missing")
    (hf / "model.safetensors.index.json").unlink()
    _convert_fails(hf, out, "model.safetensors.index.json", shards[0].name)
    _assert_no_output(out)


def test_truncated_and_corrupt_safetensors(tiny_model_dir, tmp_path):
    out = tmp_path / "out"
    hf = tiny_model_dir("qwen2")
    weights = hf / "model.safetensors"
    data = weights.read_bytes()
    weights.write_bytes(data[: len(data) // 2])
    _convert_fails(hf, out, str(weights), "truncated")
    weights.write_bytes(b"\x00" * 5)
    _convert_fails(hf, out, str(weights), "not a valid safetensors file")
    weights.write_bytes((40).to_bytes(8, "little") + b"{" * 40)
    _convert_fails(hf, out, str(weights), "not JSON")
    _assert_no_output(out)


def test_truncated_shard_of_multi_shard_checkpoint(tiny_model_dir, tmp_path):
    out = tmp_path / "out"
    hf = tiny_model_dir("mistral", multi_shard=True)
    last = sorted(hf.glob("model-*.safetensors"))[-1]
    last.write_bytes(last.read_bytes()[:-10])
    _convert_fails(hf, out, last.name, "truncated")
    _assert_no_output(out)


def test_shape_mismatch_missing_and_unexpected_tensor(tiny_model_dir, tmp_path):
    out = tmp_path / "out"
    hf = tiny_model_dir("llama")
    _edit_config(hf, intermediate_size=96)
    msg = _convert_fails(hf, out, "model.safetensors", "but config.json implies")
    assert re.search(r"model\.layers\.\d\.mlp\.(gate|up|down)_proj\.weight` has shape "
                     r"\((128, 64|64, 128)\) but config.json implies \((96, 64|64, 96)\)", msg), msg

    _edit_config(hf, intermediate_size=128)
    weights = load_file(str(hf / "model.safetensors"))
    removed = weights.pop("model.layers.1.self_attn.v_proj.weight")
    save_file(weights, str(hf / "model.safetensors"), metadata={"format": "pt"})
    _convert_fails(hf, out, "model.layers.1.self_attn.v_proj.weight", "is missing", "model.safetensors")

    weights["model.layers.1.self_attn.v_proj.weight"] = removed
    weights["model.layers.0.self_attn.o_proj.bias"] = torch.zeros(64)
    save_file(weights, str(hf / "model.safetensors"), metadata={"format": "pt"})
    _convert_fails(hf, out, "model.layers.0.self_attn.o_proj.bias", "not expected")

    weights.pop("model.layers.0.self_attn.o_proj.bias")
    weights["transformer.wte.weight"] = torch.zeros(4)
    save_file(weights, str(hf / "model.safetensors"), metadata={"format": "pt"})
    _convert_fails(hf, out, "transformer.wte.weight", "LlamaForCausalLM")

    weights.pop("transformer.wte.weight")
    weights["model.norm.weight"] = torch.ones(64, dtype=torch.int32)
    save_file(weights, str(hf / "model.safetensors"), metadata={"format": "pt"})
    _convert_fails(hf, out, "model.norm.weight", "int32")
    _assert_no_output(out)


def test_output_path_holding_other_data_is_refused_unless_forced(tiny_model_dir, tmp_path):
    hf = tiny_model_dir("llama")
    out = tmp_path / "precious"
    out.mkdir()
    (out / "thesis.tex").write_text("years of work")
    _convert_fails(hf, out, "precious", "--force")
    assert (out / "thesis.tex").read_text() == "years of work"
    convert(hf, out, force=True)
    assert (out / "llmx.json").exists() and not (out / "thesis.tex").exists()

    a_file = tmp_path / "a_file"
    a_file.write_text("x")
    _convert_fails(hf, a_file, "is a file")


def test_output_over_the_input_is_refused_even_with_force(tiny_model_dir):
    hf = tiny_model_dir("llama")
    _convert_fails(hf, hf, "would replace the input folder", force=True)
    _convert_fails(hf, hf.parent, "would replace the input folder", force=True)
    assert (hf / "model.safetensors").exists()


def test_bad_dtype_and_custom_tokenizer_code(tiny_model_dir, tmp_path):
    out = tmp_path / "out"
    hf = tiny_model_dir("llama")
    _convert_fails(hf, out, "--dtype 'int4'", "bfloat16", dtype="int4")
    cfg = json.loads((hf / "tokenizer_config.json").read_text())
    cfg["auto_map"] = {"AutoTokenizer": ["tokenization_custom.CustomTokenizer", None]}
    (hf / "tokenizer_config.json").write_text(json.dumps(cfg))
    (hf / "tokenization_custom.py").write_text("import json\nfrom .vocab_helpers import load\n"
                                               "raise SystemExit('never imported by convert')\n")
    (hf / "vocab_helpers.py").write_text("from . import normalizers\n")
    (hf / "normalizers.py").write_text("import unicodedata\n")
    (hf / "modeling_custom.py").write_text("raise SystemExit('model code: llmx runs its own')\n")
    (hf / "configuration_custom.py").write_text("raise SystemExit('model code: llmx runs its own')\n")
    _convert_fails(hf, out, "tokenizer_config.json", "auto_map", "--trust-remote-code")
    _assert_no_output(out)
    convert(hf, out, trust_remote_code=True)
    assert sorted(p.name for p in out.glob("*.py")) == ["normalizers.py", "tokenization_custom.py",
                                                         "vocab_helpers.py"]
    cfg["auto_map"] = {"AutoTokenizer": ["other-org/repo--tokenization_custom.CustomTokenizer", None]}
    (hf / "tokenizer_config.json").write_text(json.dumps(cfg))
    _convert_fails(hf, tmp_path / "out2", "loads code from another repository", trust_remote_code=True)
    cfg["auto_map"] = {"AutoTokenizer": ["tokenization_gone.CustomTokenizer", None]}
    (hf / "tokenizer_config.json").write_text(json.dumps(cfg))
    _convert_fails(hf, tmp_path / "out2", "tokenization_gone.py is missing", trust_remote_code=True)


def test_failure_while_streaming_leaves_no_partial_directory(tiny_model_dir, tmp_path, monkeypatch):
    """A failure after writing has started (here: the disk 'fills up') removes the temporary directory."""
    import llmx.ingest.convert as convert_module

    hf = tiny_model_dir("llama")
    out = tmp_path / "out"

    def explode(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(convert_module, "write_checkpoint_meta", explode)
    with pytest.raises(OSError):
        convert(hf, out)
    _assert_no_output(out)
