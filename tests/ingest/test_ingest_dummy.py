"""Random-weight checkpoints from config.json alone (`llmx convert --dummy-weights`)."""

from __future__ import annotations

import itertools
import json

import pytest
import torch
from safetensors import safe_open

from llmx.formats.checkpoint import checkpoint_tensor_specs, read_checkpoint, verify_checkpoint
from llmx.ingest.convert import convert
from llmx.ingest.dummy import SLAB_ELEMENTS, random_slabs, write_dummy_checkpoint
from llmx.common.errors import LlmxError
from llmx.common.hashing import hash_files
from llmx.formats.weights import TensorSpec


def _tensors(ckpt):
    with safe_open(str(ckpt / "rank0.safetensors"), framework="pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}


def test_dummy_checkpoint_has_the_real_shapes_and_sane_values(tiny_model_dir, tmp_path):
    hf = tiny_model_dir("qwen3")
    real = _tensors(convert(hf, tmp_path / "real"))
    out = convert(hf, tmp_path / "dummy", dummy_weights=True)
    dummy = _tensors(out)
    assert {k: (v.shape, v.dtype) for k, v in dummy.items()} == {k: (v.shape, v.dtype) for k, v in real.items()}
    for name, t in dummy.items():
        if name.endswith("norm.weight"):
            assert torch.all(t == 1), name
        else:
            assert abs(t.float().std().item() - 0.02) < 0.004, name
            assert abs(t.float().mean().item()) < 0.005, name

    ckpt = read_checkpoint(out)
    verify_checkpoint(ckpt)
    assert ckpt.provenance["dummy_weights"] is True and ckpt.provenance["seed"] == 0
    assert ckpt.provenance["source_hash"] == hash_files([hf / "config.json"])
    assert (out / "tokenizer.json").exists()


def test_seed_determines_values_and_config_file_path_works(tiny_model_dir, tmp_path):
    hf = tiny_model_dir("llama")
    a = _tensors(write_dummy_checkpoint(hf / "config.json", tmp_path / "a", "float32", seed=1))
    b = _tensors(write_dummy_checkpoint(hf, tmp_path / "b", "float32", seed=1))
    c = _tensors(write_dummy_checkpoint(hf, tmp_path / "c", "float32", seed=2))
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not torch.equal(a["embed.weight"], c["embed.weight"])
    # Different tensors get different values (seeded per name).
    assert not torch.equal(a["layers.0.mlp.gate_proj.weight"], a["layers.0.mlp.up_proj.weight"])


def test_dummy_needs_no_weights_but_validates_the_config(tiny_model_dir, tmp_path):
    hf = tiny_model_dir("mistral")
    (hf / "model.safetensors").unlink()
    out = convert(hf, tmp_path / "out", dummy_weights=True, dtype="float16")
    assert read_checkpoint(out).dtype == "float16"

    cfg = json.loads((hf / "config.json").read_text())
    cfg["architectures"] = ["BertModel"]
    (hf / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(LlmxError, match="config.json: architecture BertModel is not supported"):
        write_dummy_checkpoint(hf, tmp_path / "out2")
    assert not (tmp_path / "out2").exists()
    with pytest.raises(LlmxError, match="nowhere does not exist; pass a config.json"):
        write_dummy_checkpoint(tmp_path / "nowhere", tmp_path / "out3")
    (tmp_path / "no_config").mkdir()
    with pytest.raises(LlmxError, match="no_config/config.json is missing"):
        write_dummy_checkpoint(tmp_path / "no_config", tmp_path / "out3")


def test_llama31_8b_embedding_is_generated_in_bounded_slabs():
    """The 1 GB embedding of Llama-3.1-8B is produced in slabs of at most SLAB_ELEMENTS elements."""
    spec = TensorSpec((128256, 4096), "bfloat16")
    slabs = list(itertools.islice(random_slabs("embed.weight", spec, seed=0), 3))
    for s in slabs:
        assert s.numel() <= SLAB_ELEMENTS and s.shape[1] == 4096 and s.dtype == torch.bfloat16
    rows = spec.shape[0]
    per_slab = slabs[0].shape[0]
    assert per_slab < rows and -(-rows // per_slab) > 30


def test_8b_config_plans_16_gb_without_allocating(tmp_path):
    from llmx.formats.families import model_config_from_hf

    cfg = {"architectures": ["LlamaForCausalLM"], "hidden_size": 4096, "intermediate_size": 14336,
           "num_hidden_layers": 32, "num_attention_heads": 32, "num_key_value_heads": 8, "vocab_size": 128256,
           "max_position_embeddings": 131072, "rope_theta": 500000.0}
    specs = checkpoint_tensor_specs(model_config_from_hf(cfg, tmp_path / "config.json"), "bfloat16", None)
    assert max(torch.Size(s.shape).numel() for s in specs.values()) * 2 == 1_050_673_152  # embed / lm_head
