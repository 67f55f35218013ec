"""Algorithm names, aliases and the ModelOpt configs the presets build (no ModelOpt import needed)."""

from __future__ import annotations

import pytest

from llmx.common.errors import LlmxError
from llmx.formats import presets


@pytest.mark.parametrize("name, canonical", [("awq", "int4_awq"), ("GPTQ", "int4_gptq"), ("smoothquant", "int8_sq"),
                                             ("int4-awq", "int4_awq"), ("nvfp4", "nvfp4"), ("none", "none")])
def test_resolve_algo(name, canonical):
    assert presets.resolve_algo(name) == canonical


def test_unknown_algo_lists_every_valid_name():
    with pytest.raises(LlmxError) as info:
        presets.resolve_algo("int2")
    for algo in presets.PRESETS:
        assert algo in info.value.message
    assert "awq = int4_awq" in info.value.message


def test_calibration_needs():
    assert not presets.needs_calibration("int4_wo", None)
    assert not presets.needs_calibration("int8_wo", None)
    assert not presets.needs_calibration("fp8_pc_pt", None)
    assert presets.needs_calibration("int8_wo", "fp8")
    for algo in ("fp8", "int8_sq", "int4_awq", "int4_gptq", "w4a8_awq", "nvfp4"):
        assert presets.needs_calibration(algo, None)


def test_group_sizes():
    assert presets.effective_group_size("int4_awq", 64) == 64
    assert presets.effective_group_size("nvfp4", 128) == 16
    assert presets.effective_group_size("fp8", 128) is None
    with pytest.raises(LlmxError, match="positive even integer"):
        presets.effective_group_size("int4_wo", 0)
    with pytest.raises(LlmxError, match="multiple of 32"):
        presets.effective_group_size("w4a8_awq", 16)


def test_without_a_group_size_the_largest_that_fits_every_linear_is_chosen():
    assert presets.chooses_group_size("int4_awq", None) and not presets.chooses_group_size("int4_awq", 64)
    assert not presets.chooses_group_size("nvfp4", None) and not presets.chooses_group_size("fp8", None)
    assert presets.effective_group_size("int4_gptq", None) is None
    assert presets.choose_group_size({"a": 4096, "b": 14336}) == 128
    # SmolLM2: hidden 576 = 64 x 9, intermediate 1536
    assert presets.choose_group_size({"layers.0.attn.q_proj": 576, "layers.0.mlp.down_proj": 1536}) == 64
    assert presets.choose_group_size({"a": 96, "b": 128}) == 32
    with pytest.raises(LlmxError, match=r"layers.0.mlp.down_proj has 200 input features.*--group-size"):
        presets.choose_group_size({"layers.0.attn.q_proj": 256, "layers.0.mlp.down_proj": 200})


def test_config_quantizes_layer_linears_and_disables_exclusions_by_name():
    cfg = presets.modelopt_config("int4_awq", group_size=64, kv_cache_dtype="fp8",
                                  disabled_modules=["lm_head", "model.layers.1.mlp.down_proj"])
    entries = cfg["quant_cfg"]
    assert entries[0] == {"quantizer_name": "*", "enable": False}
    weight = next(e for e in entries if e["quantizer_name"] == "*.layers.*_proj.weight_quantizer")
    assert weight["cfg"]["block_sizes"][-1] == 64 and weight["cfg"]["num_bits"] == 4
    assert {"quantizer_name": "model.layers.1.mlp.down_proj.*", "enable": False} in entries
    assert {"quantizer_name": "lm_head.*", "enable": False} in entries
    assert entries[-1]["quantizer_name"] == "*[kv]_bmm_quantizer" and entries[-1]["cfg"]["num_bits"] == (4, 3)
    assert cfg["algorithm"]["method"] == "awq_lite"


def test_gptq_and_kv_only_configs():
    gptq = presets.modelopt_config("int4_gptq", group_size=128, kv_cache_dtype=None, disabled_modules=[])
    assert gptq["algorithm"] == {"method": "gptq", "layerwise": {"enable": True}}
    assert not presets.PRESETS["int4_gptq"].calib_use_cache
    kv = presets.modelopt_config("none", group_size=None, kv_cache_dtype="int8", disabled_modules=[])
    assert [e["quantizer_name"] for e in kv["quant_cfg"]] == ["*", "*[kv]_bmm_quantizer"]
    assert kv["quant_cfg"][-1]["cfg"]["num_bits"] == 8
