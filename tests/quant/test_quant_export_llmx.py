"""export_llmx without ModelOpt: folding smoothing vectors into the norms, pre_quant_scale kept where no norm
precedes, shared per-tensor scales in fused groups, KV scales, and the checkpoint tensor order."""

from __future__ import annotations

import pytest
import torch

from llmx.formats.checkpoint import checkpoint_tensor_specs
from llmx.quant.export_llmx import LinearState, export_tensors, pre_quant_scale_patterns
from llmx.formats.weights import method_for
from llmx.formats.config import ModelConfig, QuantConfig

H, I = 64, 128
CONFIG = ModelConfig(architecture="LlamaForCausalLM", family="llama", vocab_size=32, hidden_size=H,
                     intermediate_size=I, num_layers=1, num_heads=4, num_kv_heads=2, head_dim=16,
                     max_position_embeddings=64, rms_norm_eps=1e-6, rope_theta=10000.0)
SHAPES = {"attn.q_proj": (64, H), "attn.k_proj": (32, H), "attn.v_proj": (32, H), "attn.o_proj": (H, 64),
          "mlp.gate_proj": (I, H), "mlp.up_proj": (I, H), "mlp.down_proj": (H, I)}


@pytest.fixture
def source():
    g = torch.Generator().manual_seed(0)
    tensors = {f"layers.0.{m}.weight": torch.randn(*s, generator=g) * 0.05 for m, s in SHAPES.items()}
    tensors.update({"embed.weight": torch.randn(32, H, generator=g), "lm_head.weight": torch.randn(32, H, generator=g),
                    "final_norm.weight": torch.rand(H, generator=g) + 0.5,
                    "layers.0.attn_norm.weight": torch.rand(H, generator=g) + 0.5,
                    "layers.0.mlp_norm.weight": torch.rand(H, generator=g) + 0.5})
    return {k: v.to(torch.bfloat16) for k, v in tensors.items()}


def _smoothed_states(source, seed=1):
    """States as ModelOpt leaves them after AWQ/SmoothQuant: a different smoothing vector per Linear."""
    g = torch.Generator().manual_seed(seed)
    states = {}
    for m, (n, k) in SHAPES.items():
        s = torch.rand(k, generator=g) * 1.5 + 0.5
        w = source[f"layers.0.{m}.weight"].float()
        states[f"layers.0.{m}"] = LinearState(weight=w / s, pre_quant_scale=s, input_amax=torch.tensor(3.0),
                                              input_channel_amax=torch.rand(k, generator=g) * 3)
    return states


def _export(quant, source, states, kv_amax=None):
    out = dict(export_tensors(CONFIG, "bfloat16", quant, source=lambda n: source[n], states=states,
                              kv_amax=kv_amax or {}))
    specs = checkpoint_tensor_specs(CONFIG, "bfloat16", quant)
    assert list(out) == list(specs)
    for name, spec in specs.items():
        assert tuple(out[name].shape) == tuple(spec.shape) and str(out[name].dtype)[6:] == spec.dtype, name
    return out


def _weight(out, quant, module):
    method = method_for(quant, module)
    tensors = {k.removeprefix(module + "."): v for k, v in out.items() if k.startswith(module + ".")}
    return method.dequantize_weight(tensors), tensors


@pytest.mark.parametrize("algo", ["int8_sq", "int4_awq"])
def test_smoothing_folded_into_norms_and_kept_on_o_and_down(algo, source):
    """Fused groups: one smoothing vector (the mean) in the norm, weights = quantize(original / vector).
    o_proj/down_proj: weights = quantize(original / pre_quant_scale), the vector stored as it is applied."""
    quant = QuantConfig(algo=algo, group_size=32 if algo == "int4_awq" else None, exclude=("lm_head",),
                        extra={"pre_quant_scale_modules": pre_quant_scale_patterns(algo)})
    states = _smoothed_states(source)
    out = _export(quant, source, _smoothed_states(source))

    def requantized(module, scale):
        method = method_for(quant, module)
        original = source[f"{module}.weight"].float()
        return method.dequantize_weight(method.quantize_weight(original / scale, "bfloat16"))

    for block, projs, norm in (("attn", ("q_proj", "k_proj", "v_proj"), "attn_norm"),
                               ("mlp", ("gate_proj", "up_proj"), "mlp_norm")):
        realized = out[f"layers.0.{norm}.weight"].float() / source[f"layers.0.{norm}.weight"].float()
        mean = torch.stack([states[f"layers.0.{block}.{p}"].pre_quant_scale for p in projs]).mean(0)
        assert torch.allclose(realized, mean, rtol=1e-2)
        for p in projs:
            module = f"layers.0.{block}.{p}"
            w, tensors = _weight(out, quant, module)
            assert "pre_quant_scale" not in tensors
            assert torch.equal(w, requantized(module, realized))
    for module in ("layers.0.attn.o_proj", "layers.0.mlp.down_proj"):
        w, tensors = _weight(out, quant, module)
        stored = tensors["pre_quant_scale"]
        assert stored.dtype == torch.bfloat16
        assert torch.allclose(stored.float(), states[module].pre_quant_scale, rtol=1e-2)
        assert torch.equal(w, requantized(module, stored.float()))
    assert torch.equal(out["final_norm.weight"], source["final_norm.weight"])
    assert torch.equal(out["lm_head.weight"], source["lm_head.weight"])


def test_without_smoothing_norms_are_copied_and_weights_quantized_from_state(source):
    quant = QuantConfig(algo="int4_gptq", group_size=32, exclude=("lm_head",))
    states = {f"layers.0.{m}": LinearState(weight=source[f"layers.0.{m}.weight"].float()) for m in SHAPES}
    out = _export(quant, source, states)
    assert torch.equal(out["layers.0.attn_norm.weight"], source["layers.0.attn_norm.weight"])
    w, _ = _weight(out, quant, "layers.0.mlp.up_proj")
    original = source["layers.0.mlp.up_proj.weight"].float()
    assert (w - original).norm() / original.norm() < 0.12


@pytest.mark.parametrize("algo, scale_key", [("fp8", "weight_scale"), ("nvfp4", "weight_scale_2")])
def test_fused_groups_share_per_tensor_scales(algo, scale_key, source):
    quant = QuantConfig(algo=algo, group_size=16 if algo == "nvfp4" else None, exclude=("lm_head",))
    states = {}
    for i, m in enumerate(SHAPES):
        states[f"layers.0.{m}"] = LinearState(weight=source[f"layers.0.{m}.weight"].float() * (i + 1),
                                              input_amax=torch.tensor(float(i + 1)))
    out = _export(quant, source, states)
    for group in (("q_proj", "k_proj", "v_proj"), ("gate_proj", "up_proj")):
        block = "attn" if group[0] == "q_proj" else "mlp"
        names = [f"layers.0.{block}.{p}" for p in group]
        assert len({out[f"{n}.{scale_key}"].item() for n in names}) == 1
        assert len({out[f"{n}.input_scale"].item() for n in names}) == 1
    assert out["layers.0.attn.o_proj.input_scale"] != out["layers.0.mlp.down_proj.input_scale"]


def test_kv_scales(source):
    quant = QuantConfig(algo="none", kv_cache_dtype="int8", exclude=("lm_head",))
    out = _export(quant, source, {}, kv_amax={0: (torch.tensor(12.7), torch.tensor(25.4))})
    assert out["layers.0.attn.k_scale"].item() == pytest.approx(0.1)
    assert out["layers.0.attn.v_scale"].item() == pytest.approx(0.2)
    assert torch.equal(out["layers.0.attn.q_proj.weight"], source["layers.0.attn.q_proj.weight"])


def test_w4a8_input_scale_follows_the_shared_smoothing(source):
    quant = QuantConfig(algo="w4a8_awq", group_size=32, exclude=("lm_head",),
                        extra={"pre_quant_scale_modules": pre_quant_scale_patterns("w4a8_awq")})
    states = _smoothed_states(source)
    out = _export(quant, source, states)
    realized = out["layers.0.attn_norm.weight"].float() / source["layers.0.attn_norm.weight"].float()
    expected = (states["layers.0.attn.q_proj"].input_channel_amax * realized).amax() / 448
    shared = max((states[f"layers.0.attn.{p}"].input_channel_amax * realized).amax() / 448
                 for p in ("q_proj", "k_proj", "v_proj"))
    assert out["layers.0.attn.q_proj.input_scale"].item() == pytest.approx(shared.item(), rel=1e-5)
    assert shared >= expected
