"""`convert`: every family's tensors equal the transformers state dict; shards, tying, tokenizer, provenance."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from helpers.tiny_models import TINY_FAMILIES
from llmx.formats.checkpoint import read_checkpoint, verify_checkpoint
from llmx.ingest.convert import convert
from llmx.formats.families import hf_to_llmx_name, split_parts
from llmx.common.hashing import hash_files


def _hf_state_dict(hf_dir):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32).state_dict()


def _ckpt_tensors(ckpt_dir):
    with safe_open(str(ckpt_dir / "rank0.safetensors"), framework="pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}


@pytest.mark.parametrize("family", TINY_FAMILIES)
def test_every_tensor_equals_transformers_state_dict(family, tiny_model_dir, tmp_path):
    hf_dir = tiny_model_dir(family)
    out = convert(hf_dir, tmp_path / "ckpt", dtype="bfloat16")

    ref = _hf_state_dict(hf_dir)
    got = _ckpt_tensors(out)
    model = read_checkpoint(out).model
    expected = {}
    for k, v in ref.items():
        name = hf_to_llmx_name(k, model.family)
        if name == "lm_head.weight" and model.tie_word_embeddings:
            continue  # tied (Gemma): the runtime reads the embedding
        # Phi-3's fused qkv_proj / gate_up_proj are stored as their row ranges, transformers 5's 3-D experts per expert.
        for part, index in split_parts(name, model) or [(name, ())]:
            expected[part] = v[index]
    assert set(got) == set(expected)
    for name, t in got.items():
        assert t.dtype == torch.bfloat16, name
        assert torch.equal(t, expected[name].to(torch.bfloat16)), name

    ckpt = read_checkpoint(out)
    verify_checkpoint(ckpt)
    assert ckpt.dtype == "bfloat16" and ckpt.quant is None and ckpt.mapping.world_size == 1
    assert ckpt.model.architecture == json.loads((hf_dir / "config.json").read_text())["architectures"][0]
    prov = ckpt.provenance
    assert prov["source"] == str(hf_dir.resolve())
    assert prov["source_hash"] == hash_files([hf_dir / "config.json", hf_dir / "model.safetensors"], root=hf_dir)
    assert prov["torch_version"] and prov["llmx_version"] and prov["created"].endswith("+00:00")
    assert prov["modelopt_version"] is None


def test_multi_shard_input_gives_the_same_checkpoint_and_hashes_every_file(tiny_model_dir, tmp_path):
    single = convert(tiny_model_dir("qwen3", seed=3), tmp_path / "single", dtype="float32")
    sharded_dir = tiny_model_dir("qwen3", seed=3, multi_shard=True)
    shards = sorted(sharded_dir.glob("model-*.safetensors"))
    assert len(shards) >= 3
    sharded = convert(sharded_dir, tmp_path / "sharded", dtype="float32")

    a, b = _ckpt_tensors(single), _ckpt_tensors(sharded)
    assert set(a) == set(b)
    for name in a:
        assert torch.equal(a[name], b[name]), name
    hashed = [sharded_dir / "config.json", sharded_dir / "model.safetensors.index.json", *shards]
    assert read_checkpoint(sharded).provenance["source_hash"] == hash_files(hashed, root=sharded_dir)


def test_tied_embeddings_store_no_lm_head(tiny_model_dir, tmp_path):
    hf_dir = tiny_model_dir("qwen2", tie=True)
    out = convert(hf_dir, tmp_path / "tied")
    got = _ckpt_tensors(out)
    assert "lm_head.weight" not in got and "embed.weight" in got
    assert read_checkpoint(out).model.tie_word_embeddings

    # Some exporters store the tied head anyway: it is dropped, the embedding is what the model uses.
    weights = load_file(str(hf_dir / "model.safetensors"))
    weights["lm_head.weight"] = weights["model.embed_tokens.weight"].clone()
    save_file(weights, str(hf_dir / "model.safetensors"), metadata={"format": "pt"})
    got = _ckpt_tensors(convert(hf_dir, tmp_path / "tied2"))
    assert "lm_head.weight" not in got


def test_untied_stores_lm_head(tiny_model_dir, tmp_path):
    hf_dir = tiny_model_dir("llama", tie=False)
    got = _ckpt_tensors(convert(hf_dir, tmp_path / "untied"))
    ref = load_file(str(hf_dir / "model.safetensors"))
    assert torch.equal(got["lm_head.weight"], ref["lm_head.weight"].to(torch.bfloat16))


def test_tokenizer_files_are_copied_and_load(tiny_model_dir, tmp_path):
    from transformers import AutoTokenizer

    hf_dir = tiny_model_dir("llama")
    out = convert(hf_dir, tmp_path / "ckpt")
    for name in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja", "generation_config.json"):
        assert (out / name).read_bytes() == (hf_dir / name).read_bytes(), name
    assert not (out / "config.json").exists() and not (out / "model.safetensors").exists()
    a, b = AutoTokenizer.from_pretrained(hf_dir), AutoTokenizer.from_pretrained(out)
    text = "Emma Woodhouse, handsome, clever, and rich"
    assert a(text).input_ids == b(text).input_ids
    assert b.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False) == \
        a.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False)


def test_progress_reports_every_input_byte(tiny_model_dir, tmp_path):
    hf_dir = tiny_model_dir("mistral", multi_shard=True)
    calls = []
    convert(hf_dir, tmp_path / "ckpt", progress=lambda stage, done, total: calls.append((stage, done, total)))
    assert {stage for stage, _, _ in calls} == {"convert"}
    totals = {t for _, _, t in calls}
    assert len(totals) == 1
    done = [d for _, d, _ in calls]
    assert done == sorted(done)  # running totals
    data_bytes = 0
    for shard in hf_dir.glob("model-*.safetensors"):
        header_len = int.from_bytes(shard.read_bytes()[:8], "little")
        data_bytes += shard.stat().st_size - 8 - header_len
    assert done[-1] == totals.pop() == data_bytes


def test_reconvert_replaces_a_previous_checkpoint_without_force(tiny_model_dir, tmp_path):
    hf_dir = tiny_model_dir("llama")
    out = convert(hf_dir, tmp_path / "ckpt", dtype="float32")
    convert(hf_dir, out, dtype="float16")
    assert read_checkpoint(out).dtype == "float16"
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []


def test_modelopt_quantized_folder_is_handed_to_the_importer(tiny_model_dir, tmp_path, monkeypatch):
    """A folder with hf_quant_config.json keeps its quantization: convert delegates to ingest.hf_import."""
    import llmx.ingest.convert as convert_module

    hf_dir = tiny_model_dir("llama")
    (hf_dir / "hf_quant_config.json").write_text(json.dumps({"quantization": {"quant_algo": "FP8"}}))
    calls = []
    monkeypatch.setattr(convert_module, "import_checkpoint", lambda *a, **kw: calls.append((a, kw)) or a[1])
    out = convert(hf_dir, tmp_path / "ckpt", dtype="float16", force=True)
    assert out == tmp_path / "ckpt"
    assert calls == [((hf_dir, tmp_path / "ckpt"), {"dtype": "float16", "force": True, "trust_remote_code": False,
                                                    "progress": None, "provenance_extra": {}})]
