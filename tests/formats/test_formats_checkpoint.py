"""The checkpoint format: llmx.json validation, expected tensor specs, header-only verification."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import save_file

from llmx.formats.checkpoint import (CHECKPOINT_FILE, SCHEMA_VERSION, checkpoint_tensor_specs, make_provenance,
                                     open_rank, rank_file, read_checkpoint, verify_checkpoint, verify_tensors,
                                     write_checkpoint_meta)
from llmx.ingest.convert import convert
from llmx.common.errors import LlmxError
from llmx.formats.config import Mapping, ModelConfig, QuantConfig


def _model(**kw) -> ModelConfig:
    base = dict(architecture="Qwen3ForCausalLM", family="qwen3", vocab_size=256, hidden_size=64,
                intermediate_size=128, num_layers=2, num_heads=4, num_kv_heads=2, head_dim=32,
                max_position_embeddings=512, rms_norm_eps=1e-6, rope_theta=1e6, qk_norm=True)
    return ModelConfig(**{**base, **kw})


@pytest.fixture(scope="module")
def ckpt_dir(tmp_path_factory):
    from helpers.tiny_models import make_tiny_hf_model

    root = tmp_path_factory.mktemp("ckpt")
    return convert(make_tiny_hf_model("llama", root / "hf"), root / "ckpt")


def _copy(src, dst):
    import shutil

    shutil.copytree(src, dst)
    return dst


def test_specs_cover_every_tensor_with_shapes():
    m = _model()
    specs = checkpoint_tensor_specs(m, "bfloat16", None)
    assert specs["embed.weight"].shape == (256, 64)
    assert specs["layers.1.attn.q_proj.weight"].shape == (128, 64)  # head_dim 32 * 4 heads
    assert specs["layers.1.attn.k_proj.weight"].shape == (64, 64)
    assert specs["layers.1.attn.o_proj.weight"].shape == (64, 128)
    assert specs["layers.0.attn.q_norm.weight"].shape == (32,)
    assert specs["layers.0.mlp.down_proj.weight"].shape == (64, 128)
    assert specs["lm_head.weight"].shape == (256, 64)
    assert all(s.dtype == "bfloat16" for s in specs.values())
    per_layer = 4 + 3 + 2 + 2  # 7 linears + 2 norms + q/k norms
    assert len(specs) == 1 + 2 * per_layer + 1 + 1

    tied_bias = checkpoint_tensor_specs(_model(tie_word_embeddings=True, qkv_bias=True, qk_norm=False,
                                               family="qwen2", architecture="Qwen2ForCausalLM"), "float16", None)
    assert "lm_head.weight" not in tied_bias and "layers.0.attn.q_norm.weight" not in tied_bias
    assert tied_bias["layers.0.attn.k_proj.bias"].shape == (64,) and "layers.0.attn.o_proj.bias" not in tied_bias

    kv = checkpoint_tensor_specs(m, "bfloat16", QuantConfig(algo="none", kv_cache_dtype="fp8"))
    assert kv["layers.1.attn.k_scale"].shape == () and kv["layers.1.attn.v_scale"].dtype == "float32"


def test_llama31_8b_specs_total_16_gb():
    m = ModelConfig(architecture="LlamaForCausalLM", family="llama", vocab_size=128256, hidden_size=4096,
                    intermediate_size=14336, num_layers=32, num_heads=32, num_kv_heads=8, head_dim=128,
                    max_position_embeddings=131072, rms_norm_eps=1e-5, rope_theta=5e5)
    total = sum(2 * torch.Size(s.shape).numel() for s in checkpoint_tensor_specs(m, "bfloat16", None).values())
    assert total == 16_060_522_496  # 8.03 B parameters in bf16: the 16.06 GB of BENCHMARKS.md's bf16 roofline


def test_read_checkpoint_round_trip_and_open_rank(ckpt_dir):
    ckpt = read_checkpoint(ckpt_dir)
    assert ckpt.meta["format"] == "llmx-checkpoint" and ckpt.meta["schema_version"] == SCHEMA_VERSION
    assert ckpt.rank_path(0) == rank_file(ckpt_dir, 0)
    verify_checkpoint(ckpt)
    with open_rank(ckpt_dir, 0) as f:
        assert f.get_tensor("embed.weight").shape == (256, 64)
    with pytest.raises(LlmxError, match="rank1.safetensors is missing"):
        with open_rank(ckpt_dir, 1):
            pass


def test_write_meta_and_provenance(tmp_path):
    prov = make_provenance("/src", "sha256:abc", modelopt_version="0.47", calib_data_hash="sha256:def")
    assert prov["source"] == "/src" and prov["modelopt_version"] == "0.47" and prov["recipe"] is None
    q = QuantConfig(algo="int4_awq", group_size=128, exclude=("lm_head",))
    meta = write_checkpoint_meta(tmp_path, _model(), "bfloat16", q, Mapping(), prov)
    assert json.loads((tmp_path / CHECKPOINT_FILE).read_text()) == meta
    assert meta["quantization"]["exclude"] == ["lm_head"] and meta["mapping"] == {"tp": 1, "pp": 1}


@pytest.mark.parametrize("edit, message", [
    (lambda m: m.update(format="something-else"), "`format` is 'something-else'"),
    (lambda m: m.update(schema_version=99), "`schema_version` is 99 but this llmx reads version 1"),
    (lambda m: m.update(dtype="int3"), "field `dtype` is 'int3'"),
    (lambda m: m.pop("model"), "field `model` is missing"),
    (lambda m: m["model"].update(bogus=1), "field `model` is malformed"),
    (lambda m: m["model"].update(num_heads=0), "`model.num_heads` must be an integer from 1 to 1,024, got 0"),
    (lambda m: m["model"].update(architecture="GPTJForCausalLM"), "'GPTJForCausalLM' is not supported"),
    (lambda m: m.update(mapping={"tp": 2, "pp": 1}), "rank1.safetensors is missing"),
    (lambda m: m.update(mapping={"tp": "two"}), "field `mapping` must hold positive integers"),
    (lambda m: m.update(provenance=None), "field `provenance` is missing"),
])
def test_read_checkpoint_errors_name_file_and_field(ckpt_dir, tmp_path, edit, message):
    bad = _copy(ckpt_dir, tmp_path / "bad")
    meta = json.loads((bad / CHECKPOINT_FILE).read_text())
    edit(meta)
    (bad / CHECKPOINT_FILE).write_text(json.dumps(meta))
    with pytest.raises(LlmxError, match=message.replace("(", r"\(")) as info:
        read_checkpoint(bad)
    assert str(bad) in info.value.message


def test_read_checkpoint_path_errors(ckpt_dir, tmp_path):
    with pytest.raises(LlmxError, match="does not exist"):
        read_checkpoint(tmp_path / "nope")
    (tmp_path / "f").write_text("x")
    with pytest.raises(LlmxError, match="is not a directory"):
        read_checkpoint(tmp_path / "f")
    (tmp_path / "empty").mkdir()
    with pytest.raises(LlmxError, match="no llmx.json; run `llmx convert"):
        read_checkpoint(tmp_path / "empty")
    hf = tmp_path / "hf"
    hf.mkdir()
    (hf / "config.json").write_text("{}")
    with pytest.raises(LlmxError, match="Hugging Face folder.*llmx convert"):
        read_checkpoint(hf)
    engine = tmp_path / "engine"
    engine.mkdir()
    (engine / "engine.json").write_text("{}")
    with pytest.raises(LlmxError, match="is an engine"):
        read_checkpoint(engine)
    bad = _copy(ckpt_dir, tmp_path / "badjson")
    (bad / CHECKPOINT_FILE).write_text("{oops")
    with pytest.raises(LlmxError, match="llmx.json is not valid JSON"):
        read_checkpoint(bad)
    (bad / CHECKPOINT_FILE).write_text((ckpt_dir / CHECKPOINT_FILE).read_text())
    (bad / "rank0.safetensors").unlink()
    with pytest.raises(LlmxError, match="rank0.safetensors is missing"):
        read_checkpoint(bad)


def test_verify_tensors_names_file_tensor_and_shapes(tmp_path):
    m = _model(num_layers=1)
    specs = checkpoint_tensor_specs(m, "float32", None)
    tensors = {n: torch.zeros(s.shape) for n, s in specs.items()}
    path = tmp_path / "rank0.safetensors"
    save_file(tensors, str(path))
    verify_tensors(path, specs)

    wrong = dict(tensors, **{"layers.0.attn.k_proj.weight": torch.zeros(32, 64)})
    save_file(wrong, str(path))
    with pytest.raises(LlmxError, match=r"rank0.safetensors: tensor `layers.0.attn.k_proj.weight` has shape "
                                        r"\(32, 64\) float32, expected \(64, 64\) float32"):
        verify_tensors(path, specs)

    wrong = dict(tensors, **{"final_norm.weight": torch.zeros(64, dtype=torch.float16)})
    save_file(wrong, str(path))
    with pytest.raises(LlmxError, match=r"`final_norm.weight` has shape \(64,\) float16, expected \(64,\) float32"):
        verify_tensors(path, specs)

    missing = {n: t for n, t in tensors.items() if n != "lm_head.weight"}
    save_file(missing, str(path))
    with pytest.raises(LlmxError, match=r"`lm_head.weight` is missing \(expected shape \(256, 64\) float32\)"):
        verify_tensors(path, specs)

    save_file(dict(tensors, extra=torch.zeros(1)), str(path))
    with pytest.raises(LlmxError, match="holds tensor `extra`"):
        verify_tensors(path, specs)
