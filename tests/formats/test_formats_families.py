"""HF config.json -> ModelConfig (both transformers spellings), the inverse, and the tensor-name maps."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch

from helpers.tiny_models import ROPE_VARIANTS, TINY_FAMILIES, tiny_hf_config
from llmx.formats.families import (fused_parts, hf_config_from_model_config, hf_to_llmx_name, llmx_to_hf_name,
                                 model_config_from_hf, split_parts)
from llmx.common.errors import LlmxError
from llmx.formats.config import RopeScaling

SRC = Path("some/model/config.json")


def _llama31_v4_spelling() -> dict:
    """Llama-3.1-8B's config.json as published (transformers 4.x spelling)."""
    return {
        "architectures": ["LlamaForCausalLM"], "model_type": "llama", "attention_bias": False, "mlp_bias": False,
        "bos_token_id": 128000, "eos_token_id": [128001, 128008, 128009], "hidden_act": "silu",
        "hidden_size": 4096, "intermediate_size": 14336, "max_position_embeddings": 131072,
        "num_attention_heads": 32, "num_hidden_layers": 32, "num_key_value_heads": 8, "rms_norm_eps": 1e-05,
        "rope_scaling": {"factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                         "original_max_position_embeddings": 8192, "rope_type": "llama3"},
        "rope_theta": 500000.0, "tie_word_embeddings": False, "torch_dtype": "bfloat16", "vocab_size": 128256,
    }


def test_llama31_config_in_both_spellings():
    v4 = _llama31_v4_spelling()
    m = model_config_from_hf(v4, SRC)
    assert (m.family, m.num_layers, m.num_heads, m.num_kv_heads, m.head_dim) == ("llama", 32, 32, 8, 128)
    assert m.rope_theta == 500000.0
    assert m.rope_scaling == RopeScaling("llama3", 8.0, 1.0, 4.0, 8192)
    assert m.eos_token_ids == (128001, 128008, 128009) and m.bos_token_id == 128000
    assert not (m.qkv_bias or m.o_bias or m.mlp_bias or m.qk_norm or m.tie_word_embeddings)

    # What transformers 5 writes for the same model: rope fields folded into rope_parameters.
    v5 = {k: v for k, v in v4.items() if k not in ("rope_scaling", "rope_theta")}
    v5["rope_parameters"] = {**v4["rope_scaling"], "rope_theta": 500000.0}
    v5["eos_token_id"] = 128001
    m5 = model_config_from_hf(v5, SRC)
    assert m5.rope_scaling == m.rope_scaling and m5.rope_theta == m.rope_theta
    assert m5.eos_token_ids == (128001,)


@pytest.mark.parametrize("family", TINY_FAMILIES)
def test_transformers_configs_and_round_trip(family, tmp_path):
    """Configs written by transformers 5.x parse; hf_config_from_model_config inverts the parse and
    transformers builds the same parameter shapes from it."""
    from transformers import AutoConfig, AutoModelForCausalLM

    hf = tiny_hf_config(family)
    hf.architectures = [type(hf).__name__.replace("TextConfig", "Config").replace("Config", "ForCausalLM")]
    hf.save_pretrained(tmp_path)
    model = model_config_from_hf(json.loads((tmp_path / "config.json").read_text()), tmp_path / "config.json")
    expect = {"llama3": "llama", **{v: "llama" for v in ROPE_VARIANTS}}.get(family, family)
    assert model.family == expect
    assert model.qkv_bias == (family in ("qwen2", "qwen2_moe")) and not model.o_bias
    assert model.qk_norm == (family in ("qwen3", "gemma3", "qwen3_moe"))
    assert model.sliding_window == {"mistral": 32, "gemma2": 8, "gemma3": 8}.get(family)
    assert model.head_dim == (32 if family in ("qwen3", "qwen3_moe") else 16)
    assert model.sparse_layers == {"mixtral": (0, 1), "qwen3_moe": (0, 2), "qwen2_moe": (1,)}.get(family, ())
    assert model.rotary_dim == (8 if family == "phi3" else None)
    assert (model.rope_scaling is not None) == (family in ("llama3", "phi3", "gemma3", *ROPE_VARIANTS))
    gemma = family in ("gemma2", "gemma3")
    assert model.layer_types == (("sliding_attention", "full_attention", "sliding_attention") if gemma else ())
    assert model.hidden_act == ("gelu_pytorch_tanh" if gemma else "silu")
    assert model.attn_logit_softcapping == model.final_logit_softcapping == (5.0 if family == "gemma2" else None)
    assert model.local_rope_theta == (1e4 if family == "gemma3" else None)
    assert model.query_pre_attn_scalar == (24 if gemma else None)

    inverse = hf_config_from_model_config(model, "float32")
    assert model_config_from_hf(inverse, SRC) == model
    rebuilt = AutoConfig.for_model(inverse.pop("model_type"), **inverse)
    ref = AutoModelForCausalLM.from_config(hf)
    new = AutoModelForCausalLM.from_config(rebuilt)
    assert {k: v.shape for k, v in ref.state_dict().items()} == {k: v.shape for k, v in new.state_dict().items()}
    # Same rotary frequencies and attention factor (the written dict spells out what transformers derives).
    ref_buffers = {k: v for k, v in ref.model.rotary_emb.named_buffers()}
    assert ref_buffers and all(torch.equal(v, ref_buffers[k]) for k, v in new.model.rotary_emb.named_buffers())
    for attr in ("attention_scaling", "full_attention_attention_scaling", "sliding_attention_attention_scaling"):
        if hasattr(ref.model.rotary_emb, attr):
            assert getattr(new.model.rotary_emb, attr) == pytest.approx(getattr(ref.model.rotary_emb, attr), rel=1e-12)
    if gemma:
        assert new.config.layer_types == ref.config.layer_types
    if family == "mistral":
        assert rebuilt.sliding_window == 32


def test_qwen_sliding_window_rules():
    base = {"architectures": ["Qwen2ForCausalLM"], "hidden_size": 64, "intermediate_size": 128,
            "num_hidden_layers": 4, "num_attention_heads": 4, "num_key_value_heads": 2, "vocab_size": 256,
            "max_position_embeddings": 512}
    # Published Qwen2 configs carry a window that is switched off.
    assert model_config_from_hf({**base, "sliding_window": 32768, "use_sliding_window": False}, SRC).sliding_window is None
    on_all = {**base, "sliding_window": 64, "use_sliding_window": True, "max_window_layers": 0}
    assert model_config_from_hf(on_all, SRC).sliding_window == 64
    mixed = {**base, "sliding_window": 64, "use_sliding_window": True, "max_window_layers": 2}
    with pytest.raises(LlmxError, match="mix sliding-window and full attention"):
        model_config_from_hf(mixed, SRC)
    past_end = {**base, "sliding_window": 64, "use_sliding_window": True, "max_window_layers": 28}
    assert model_config_from_hf(past_end, SRC).sliding_window is None


@pytest.mark.parametrize("change, message", [
    ({"architectures": None}, "config.json: field `architectures` is missing"),
    ({"architectures": ["GPT2LMHeadModel"]}, "GPT2LMHeadModel is not supported; llmx supports LlamaForCausalLM"),
    ({"hidden_act": "gelu"}, "`hidden_act` is 'gelu'"),
    ({"rope_scaling": {"rope_type": "su", "factor": 4.0}}, "type 'su' is not supported; llmx supports default, "
     "linear, dynamic, yarn, llama3, longrope"),
    ({"rope_scaling": {"rope_type": "longrope", "factor": 4.0, "short_factor": [1.0], "long_factor": [1.0]}},
     "`rope_scaling.short_factor` must list 64 numbers"),
    ({"rope_scaling": {"rope_type": "llama3", "factor": 8.0}}, "`rope_scaling.low_freq_factor` must be"),
    ({"num_key_value_heads": 5}, "not a multiple of `num_key_value_heads` 5"),
    ({"hidden_size": "4096"}, "`hidden_size` must be a positive integer"),
    ({"vocab_size": None}, "field `vocab_size` is missing"),
    ({"eos_token_id": "x"}, "`eos_token_id` must be a token id"),
])
def test_config_errors_name_the_file_and_field(change, message):
    cfg = _llama31_v4_spelling()
    for k, v in change.items():
        if v is None:
            cfg.pop(k)
        else:
            cfg[k] = v
    with pytest.raises(LlmxError, match=message.replace("(", r"\(").replace("[", r"\[")) as info:
        model_config_from_hf(cfg, SRC)
    assert str(SRC) in str(info.value)


def test_linear_rope_and_attention_bias():
    cfg = _llama31_v4_spelling()
    cfg["rope_scaling"] = {"type": "linear", "factor": 2.0}
    cfg["attention_bias"] = True
    m = model_config_from_hf(cfg, SRC)
    assert m.rope_scaling.type == "linear" and m.rope_scaling.factor == 2.0
    assert m.qkv_bias and m.o_bias
    assert hf_config_from_model_config(m, "bfloat16")["attention_bias"] is True


def test_name_maps_are_inverse():
    pairs = {
        "model.embed_tokens.weight": "embed.weight",
        "model.norm.weight": "final_norm.weight",
        "lm_head.weight": "lm_head.weight",
        "model.layers.3.input_layernorm.weight": "layers.3.attn_norm.weight",
        "model.layers.3.post_attention_layernorm.weight": "layers.3.mlp_norm.weight",
        "model.layers.10.self_attn.q_proj.bias": "layers.10.attn.q_proj.bias",
        "model.layers.0.self_attn.o_proj.weight": "layers.0.attn.o_proj.weight",
        "model.layers.0.self_attn.k_norm.weight": "layers.0.attn.k_norm.weight",
        "model.layers.1.mlp.down_proj.weight_scale": "layers.1.mlp.down_proj.weight_scale",
        "model.layers.1.mlp.gate_proj.weight": "layers.1.mlp.gate_proj.weight",
    }
    for hf, llmx in pairs.items():
        assert hf_to_llmx_name(hf) == llmx
        assert llmx_to_hf_name(llmx) == hf
    assert hf_to_llmx_name("model.layers.0.self_attn.rotary_emb.inv_freq") is None
    assert hf_to_llmx_name("model.rotary_emb.inv_freq") is None
    with pytest.raises(ValueError):
        hf_to_llmx_name("transformer.h.0.attn.c_attn.weight")
    with pytest.raises(ValueError):
        llmx_to_hf_name("layers.0.attn.qkv_proj.weight")


def test_every_transformers_weight_name_maps():
    from transformers import AutoModelForCausalLM

    for family in TINY_FAMILIES:
        names = AutoModelForCausalLM.from_config(tiny_hf_config(family)).state_dict().keys()
        llmx_family = {"gemma2": "gemma2", "gemma3": "gemma3"}.get(family)  # Gemma names its norms its own way
        for n in names:
            mapped = hf_to_llmx_name(n, llmx_family)
            if n.endswith(("qkv_proj.weight", "gate_up_proj.weight")):  # Phi-3's fused weights, split at convert
                assert family == "phi3" and fused_parts(mapped, model_config_from_hf(
                    {**tiny_hf_config(family).to_dict(), "architectures": ["Phi3ForCausalLM"]}, SRC))
                continue
            if n.endswith(("mlp.experts.gate_up_proj", "mlp.experts.down_proj")):  # 3-D experts, split at convert
                arch = {"mixtral": "MixtralForCausalLM", "qwen3_moe": "Qwen3MoeForCausalLM"}.get(family,
                                                                                                "Qwen2MoeForCausalLM")
                model = model_config_from_hf({**tiny_hf_config(family).to_dict(), "architectures": [arch]}, SRC)
                assert len(split_parts(mapped, model)) in (model.num_experts, 2 * model.num_experts)
                continue
            assert mapped is not None and llmx_to_hf_name(mapped, llmx_family) == n


def _hf_dict(family: str) -> dict:
    config = tiny_hf_config(family)
    arch = {"gemma2": "Gemma2ForCausalLM", "gemma3": "Gemma3ForCausalLM", "phi3": "Phi3ForCausalLM"}[family]
    return {**config.to_dict(), "architectures": [arch]}


@pytest.mark.parametrize("family, change, message", [
    ("gemma3", {"hidden_activation": "gelu"}, "`hidden_activation` is 'gelu'; llmx runs gemma3 with"),
    ("gemma3", {"layer_types": ["full_attention"]}, "`layer_types` must list sliding_attention, full_attention once "
                                                    "per layer (3)"),
    ("gemma2", {"sliding_window": 0}, "`sliding_window` must be a positive integer, got 0"),
    ("gemma3", {"use_bidirectional_attention": True}, "`use_bidirectional_attention` is true"),
    ("gemma3", {"rope_parameters": {"full_attention": {"rope_type": "default", "rope_theta": 1e6},
                                    "sliding_attention": {"rope_type": "linear", "factor": 2.0}}},
     "`rope_parameters.sliding_attention` type 'linear' is not supported"),
    ("gemma2", {"query_pre_attn_scalar": -1}, "`query_pre_attn_scalar` must be a positive number, got -1"),
    ("phi3", {"partial_rotary_factor": 1.5, "rope_parameters": {"rope_type": "default", "rope_theta": 1e4}},
     "`partial_rotary_factor` must be a number in (0, 1], got 1.5"),
    ("phi3", {"rope_parameters": {"rope_type": "longrope", "rope_theta": 1e4, "short_factor": [1.0] * 4,
                                  "long_factor": [1.0] * 3}}, "`rope_parameters.long_factor` must list 4 numbers"),
])
def test_gemma_and_phi3_config_errors_name_the_field(family, change, message):
    with pytest.raises(LlmxError, match=re.escape(message)):
        model_config_from_hf({**_hf_dict(family), **change}, SRC)


@pytest.mark.parametrize("spelling", ["transformers 5", "older"])
def test_gemma3_reads_both_rope_spellings(spelling):
    hf = _hf_dict("gemma3")
    if spelling == "older":  # rope_theta + rope_scaling for the global layers, rope_local_base_freq for the others
        hf.pop("rope_parameters")
        hf.pop("layer_types")
        hf.update(rope_theta=1e6, rope_scaling={"rope_type": "linear", "factor": 2.0}, rope_local_base_freq=1e4,
                  sliding_window_pattern=2)
    model = model_config_from_hf(hf, SRC)
    assert model.rope_theta == 1e6 and model.local_rope_theta == 1e4
    assert model.rope_scaling == RopeScaling(type="linear", factor=2.0)
    assert model.layer_types == ("sliding_attention", "full_attention", "sliding_attention")
