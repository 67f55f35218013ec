"""convert and build for mixtures of experts: both expert layouts on disk (the hub's tensor per expert, and
transformers 5's 3-D `experts.gate_up_proj` / `experts.down_proj`) give the same checkpoint; --dummy-weights
from a config alone builds and runs; bad inputs (top-k above the expert count, a missing expert tensor, a tp
that does not divide the experts' intermediate size) are refused in one sentence."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from helpers.tiny_models import make_tiny_hf_model
from llmx.ingest.convert import convert
from llmx.build.engine import build_engine
from llmx.formats.families import hf_to_llmx_name, llmx_to_hf_name
from llmx.common.errors import LlmxError
from llmx.formats.config import BuildConfig, Mapping
from llmx.runtime.engine import LLM
from llmx.runtime.sequence import SamplingParams

BUILD = BuildConfig(max_batch_size=4, max_seq_len=64, max_num_tokens=64, kv_block_size=4, device="cpu")


def _tensors(ckpt) -> dict[str, torch.Tensor]:
    with safe_open(str(ckpt / "rank0.safetensors"), "pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}


def _fused_layout_copy(hf_dir, out):
    """The folder as transformers 5 holds the model in memory: each layer's experts as two 3-D tensors."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32)
    shutil.copytree(hf_dir, out)
    (out / "model.safetensors").unlink()
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(out / "model.safetensors"))
    with safe_open(str(out / "model.safetensors"), "pt") as f:
        assert any(k.endswith("mlp.experts.gate_up_proj") for k in f.keys())
    return out


@pytest.mark.parametrize("family", ["mixtral", "qwen2_moe"])
def test_fused_and_per_expert_layouts_convert_alike(family, tmp_path):
    hf = make_tiny_hf_model(family, tmp_path / "hf")
    per_expert = _tensors(convert(hf, tmp_path / "a", dtype="float32"))
    fused = _tensors(convert(_fused_layout_copy(hf, tmp_path / "fused"), tmp_path / "b", dtype="float32"))
    assert per_expert.keys() == fused.keys()
    assert all(torch.equal(per_expert[k], fused[k]) for k in per_expert)
    assert "layers.1.mlp.experts.3.down_proj.weight" in per_expert


def test_mixtral_names_read_and_write_back():
    pairs = {"model.layers.2.block_sparse_moe.experts.7.w1.weight": "layers.2.mlp.experts.7.gate_proj.weight",
             "model.layers.2.block_sparse_moe.experts.7.w2.weight": "layers.2.mlp.experts.7.down_proj.weight",
             "model.layers.2.block_sparse_moe.experts.7.w3.weight_scale": "layers.2.mlp.experts.7.up_proj.weight_scale",
             "model.layers.2.block_sparse_moe.gate.weight": "layers.2.mlp.router.weight"}
    for hf, llmx in pairs.items():
        assert hf_to_llmx_name(hf, "mixtral") == llmx and llmx_to_hf_name(llmx, "mixtral") == hf
    assert hf_to_llmx_name("model.layers.2.mlp.gate.weight", "mixtral") == "layers.2.mlp.router.weight"
    assert llmx_to_hf_name("layers.0.mlp.shared_expert_gate.weight", "qwen2_moe") == \
        "model.layers.0.mlp.shared_expert_gate.weight"


def test_dummy_weights_from_config_alone_build_and_run(tmp_path):
    hf = make_tiny_hf_model("qwen3_moe", tmp_path / "hf")
    config_only = tmp_path / "config"
    config_only.mkdir()
    shutil.copy(hf / "config.json", config_only / "config.json")
    ckpt = convert(config_only, tmp_path / "ckpt", dtype="float32", dummy_weights=True)
    names = _tensors(ckpt)
    assert names["layers.0.mlp.experts.7.gate_proj.weight"].shape == (32, 64)
    assert names["layers.1.mlp.gate_proj.weight"].shape == (128, 64)  # the dense layer
    assert names["layers.2.mlp.router.weight"].shape == (8, 64)
    engine = build_engine(ckpt, tmp_path / "engine", BUILD, Mapping(tp=2)).path
    with LLM(engine) as llm:
        out = llm.generate([[5, 6, 7]], SamplingParams(max_new_tokens=4, ignore_eos=True))
    assert len(out[0].output_token_ids) == 4


def test_top_k_above_the_expert_count_is_refused(tmp_path):
    hf = make_tiny_hf_model("mixtral", tmp_path / "hf")
    config = json.loads((hf / "config.json").read_text())
    config["num_experts_per_tok"] = 5
    (hf / "config.json").write_text(json.dumps(config))
    with pytest.raises(LlmxError, match=r"`num_experts_per_tok` is 5 but the model has 4 experts "
                                        r"\(`num_local_experts`"):
        convert(hf, tmp_path / "ckpt")


def test_missing_expert_tensor_is_refused(tmp_path):
    hf = make_tiny_hf_model("mixtral", tmp_path / "hf")
    with safe_open(str(hf / "model.safetensors"), "pt") as f:
        tensors = {k: f.get_tensor(k) for k in f.keys() if k != "model.layers.1.block_sparse_moe.experts.2.w2.weight"}
    save_file(tensors, str(hf / "model.safetensors"))
    with pytest.raises(LlmxError, match=r"tensor `model.layers.1.block_sparse_moe.experts.2.w2.weight` is missing"):
        convert(hf, tmp_path / "ckpt")


def test_tp_not_dividing_the_expert_intermediate_size_is_refused(tmp_path):
    hf = make_tiny_hf_model("qwen3_moe", tmp_path / "hf", moe_intermediate_size=30)
    ckpt = convert(hf, tmp_path / "ckpt", dtype="float32")
    with pytest.raises(LlmxError, match=r"tp 4 does not divide moe_intermediate_size 30 \(30 / 4 = 7.50\)"):
        build_engine(ckpt, tmp_path / "engine", BUILD, Mapping(tp=4))



def test_expert_parallel_layouts_that_cannot_split_are_refused(tmp_path):
    qwen2 = convert(make_tiny_hf_model("qwen2_moe", tmp_path / "hf"), tmp_path / "ckpt", dtype="float32")
    with pytest.raises(LlmxError, match=r"over --tp 4 ranks does not divide the 6 experts \(6 / 4 = 1.5\)"):
        build_engine(qwen2, tmp_path / "e1", BUILD, Mapping(tp=4, ep=4))
    with pytest.raises(LlmxError, match=r"must span the 2 tensor-parallel ranks"):
        build_engine(qwen2, tmp_path / "e2", BUILD, Mapping(tp=2, ep=4))
    dense = convert(make_tiny_hf_model("llama", tmp_path / "hf-dense"), tmp_path / "dense", dtype="float32")
    with pytest.raises(LlmxError, match=r"LlamaForCausalLM has none; build without it"):
        build_engine(dense, tmp_path / "e3", BUILD, Mapping(tp=2, ep=2))


def test_cli_build_expert_parallel(tmp_path, capsys):
    """`llmx build --expert-parallel` records ep = tp; experts that do not divide over the ranks are one line."""
    from llmx.cli.main import run_cli

    qwen2 = convert(make_tiny_hf_model("qwen2_moe", tmp_path / "hf"), tmp_path / "ckpt", dtype="float32")
    base = ["build", str(qwen2), "--device", "cpu", "--max-seq-len", "64", "--max-num-tokens", "64",
            "--expert-parallel"]
    assert run_cli([*base, "-o", str(tmp_path / "bad"), "--tp", "4"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "does not divide the 6 experts" in err[0], err
    assert run_cli([*base, "-o", str(tmp_path / "good"), "--tp", "2", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["mapping"] == {"tp": 2, "pp": 1, "ep": 2}
