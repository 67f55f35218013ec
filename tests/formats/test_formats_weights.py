"""Every quantized weight format: specs match what quantize_weight stores, apply equals dequantize-then-matmul
(up to the activation quantization the format prescribes), fusion equals separate applies, TP slicing axes."""

from __future__ import annotations

import pytest
import torch

from llmx.common.errors import LlmxError
from llmx.formats.weights import METHODS, method_for
from llmx.formats.weights.fp8 import Fp8Method, Fp8PerChannelMethod
from llmx.formats.weights.int4 import Int4Method
from llmx.formats.weights.int8 import Int8SmoothQuantMethod, Int8WeightOnlyMethod
from llmx.formats.weights.kv_cache import check_kv_cache_dtype, kv_scale_from_amax
from llmx.formats.weights.nvfp4 import Nvfp4Method
from llmx.formats.weights.w4a8 import W4A8Method
from llmx.formats.config import QuantConfig

N, K = 48, 128
ACT = "bfloat16"


def _weight(n=N, k=K, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, k, generator=g) * 0.05


def _x(m=5, k=K, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(m, k, generator=g).to(torch.bfloat16)


def _calib(method, w, x):
    kwargs = {"input_amax": x.float().abs().amax()}
    if getattr(method, "pre_quant_scale", False):
        kwargs["pre_quant_scale"] = torch.linspace(0.5, 2.0, w.shape[1])
    return kwargs


CASES = {
    "fp8": (Fp8Method(), 0.04),
    "fp8_pc_pt": (Fp8PerChannelMethod(), 0.04),
    "int8_sq": (Int8SmoothQuantMethod(), 0.01),
    "int8_sq+pqs": (Int8SmoothQuantMethod(pre_quant_scale=True), 0.01),
    "int8_wo": (Int8WeightOnlyMethod(), 0.01),
    "int4": (Int4Method(group_size=32), 0.12),
    "int4+pqs": (Int4Method(group_size=32, pre_quant_scale=True), 0.12),
    "w4a8_awq": (W4A8Method(group_size=32), 0.12),
    "nvfp4": (Nvfp4Method(), 0.15),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_specs_match_quantized_tensors(case):
    method, _ = CASES[case]
    w, x = _weight(), _x()
    tensors = method.quantize_weight(w, ACT, **_calib(method, w, x))
    specs = method.weight_specs(N, K, ACT)
    assert set(tensors) == set(specs)
    for name, spec in specs.items():
        t = tensors[name]
        assert tuple(t.shape) == tuple(spec.shape), name
        assert str(t.dtype).removeprefix("torch.") == spec.dtype, name
        if spec.out_dim is not None:
            axis, per = spec.out_dim
            assert t.shape[axis] * per == N, name
        if spec.in_dim is not None:
            axis, per = spec.in_dim
            assert t.shape[axis] * per == K, name


@pytest.mark.parametrize("case", sorted(CASES))
def test_dequantized_weight_close_to_original(case):
    method, bound = CASES[case]
    w, x = _weight(), _x()
    kwargs = _calib(method, w, x)
    scale = kwargs.get("pre_quant_scale")
    w_seen = w / scale if scale is not None else w
    tensors = method.quantize_weight(w_seen, ACT, **kwargs)
    err = (method.dequantize_weight(tensors) - w_seen).norm() / w_seen.norm()
    assert err < bound


def _activation_reference(case, method, tensors, x):
    """What the format's GEMM must compute, from the dequantized weight and the activation quantization."""
    xf = x.float()
    if "pre_quant_scale" in tensors:
        xf = (x * tensors["pre_quant_scale"]).float()
    w = method.dequantize_weight(tensors)
    if case == "fp8":
        s = tensors["input_scale"]
        xf = (xf / s).clamp(-448, 448).to(torch.float8_e4m3fn).float() * s
    elif case == "w4a8_awq":
        s = tensors["input_scale"]
        xf = (xf / s).clamp(-448, 448).to(torch.float8_e4m3fn).float() * s
    elif case == "fp8_pc_pt":
        s = xf.abs().amax(dim=1, keepdim=True) / 448
        xf = (xf / s).to(torch.float8_e4m3fn).float() * s
    elif case.startswith("int8_sq"):
        s = xf.abs().amax(dim=1, keepdim=True) / 127
        xf = torch.round(xf / s).clamp(-128, 127) * s
    return xf @ w.t()


@pytest.mark.parametrize("case", sorted(CASES))
def test_apply_matches_dequantized_matmul(case):
    method, _ = CASES[case]
    w, x = _weight(), _x()
    tensors = method.quantize_weight(w, ACT, **_calib(method, w, x))
    tensors = method.prepare_for_device(tensors, torch.device("cpu"))
    bias = torch.randn(N).to(torch.bfloat16)
    y = method.apply(tensors, x, bias)
    assert y.dtype == x.dtype and y.shape == (x.shape[0], N)
    ref = _activation_reference(case, method, tensors, x) + bias.float()
    assert torch.allclose(y.float(), ref, rtol=2e-2, atol=2e-2 * ref.abs().max().item())


@pytest.mark.parametrize("case", sorted(CASES))
def test_fused_apply_equals_separate_applies(case):
    method, _ = CASES[case]
    x = _x()
    parts = []
    for seed, rows in ((0, 32), (1, 16), (2, 16)):
        w = _weight(rows, K, seed) * (1 + seed)  # different magnitudes: per-tensor scales differ
        kwargs = _calib(method, w, x)
        if "pre_quant_scale" in kwargs:
            kwargs["pre_quant_scale"] = torch.linspace(0.5, 2.0, K)  # fused parts share one vector
        parts.append(method.quantize_weight(w, ACT, **kwargs))
    fused = method.fuse_outputs(parts)
    specs = method.weight_specs(64, K, ACT)
    assert {k: tuple(v.shape) for k, v in fused.items()} == {k: tuple(s.shape) for k, s in specs.items()}
    separate = torch.cat([method.apply(p, x, None).float() for p in parts], dim=1)
    together = method.apply(fused, x, None).float()
    scale = separate.abs().max().item()
    if case in ("fp8", "nvfp4"):  # per-tensor scales were requantized to the largest one
        assert (together - separate).norm() / separate.norm() < 0.08
    else:
        assert torch.allclose(together, separate, rtol=1e-2, atol=1e-2 * scale)


def test_fp8_fuse_requantizes_to_largest_scale():
    method = Fp8Method()
    small = method.quantize_weight(_weight(16, K, 0), ACT, input_amax=torch.tensor(2.0))
    large = method.quantize_weight(_weight(16, K, 1) * 4, ACT, input_amax=torch.tensor(5.0))
    fused = method.fuse_outputs([small, large])
    assert torch.equal(fused["weight_scale"], large["weight_scale"])
    assert torch.equal(fused["input_scale"], large["input_scale"])
    assert torch.equal(fused["weight"][16:].view(torch.uint8), large["weight"].view(torch.uint8))
    rel = (method.dequantize_weight(fused)[:16] - method.dequantize_weight(small)).norm() / small["weight"].float().norm()
    assert rel < 0.1


def test_fusing_different_pre_quant_scales_is_refused():
    method = Int4Method(group_size=32, pre_quant_scale=True)
    a = method.quantize_weight(_weight(16, K, 0), ACT, pre_quant_scale=torch.ones(K))
    b = method.quantize_weight(_weight(16, K, 1), ACT, pre_quant_scale=torch.full((K,), 2.0))
    with pytest.raises(LlmxError, match="pre_quant_scale"):
        method.fuse_outputs([a, b])


def test_int4_layout_low_nibble_is_even_input_offset_binary():
    method = Int4Method(group_size=32)
    w = torch.zeros(2, 64)
    w[0, :32] = torch.tensor([1.0, -1.0] * 16)  # scale = 1/7 -> codes +7, -7
    w[0, 32:] = 0.5
    w[1, 0] = -0.25
    t = method.quantize_weight(w, "float32")
    assert t["weight"][0, 0].item() == (7 + 8) | ((-7 + 8) << 4)
    assert torch.allclose(t["weight_scale"][0], torch.tensor([1 / 7, 0.5 / 7]))
    assert t["weight"][1, 0].item() & 0x0F == -7 + 8


def test_int4_codes_follow_stored_bf16_scale():
    """Codes are chosen against the rounded (stored) scale, so dequantization reproduces the grid exactly."""
    method = Int4Method(group_size=32)
    w = _weight()
    t = method.quantize_weight(w, ACT)
    deq = method.dequantize_weight(t)
    scale = t["weight_scale"].float().repeat_interleave(32, dim=1)
    assert torch.equal(torch.round(deq / scale), deq / scale)
    assert (deq - w).abs().max() <= scale.max() / 2 + 1e-6


def test_weight_amax_from_calibration_is_respected():
    method = Int4Method(group_size=32)
    w = _weight()
    amax = w.abs().reshape(N, K // 32, 32).amax(-1) * 0.5  # clipped (AWQ-clip style) ranges
    t = method.quantize_weight(w, "float32", weight_amax=amax.reshape(-1, 1))
    assert torch.allclose(t["weight_scale"], amax / 7)


def test_method_for_configures_group_size_and_pre_quant_scale():
    quant = QuantConfig(algo="int4_awq", group_size=64, exclude=("lm_head",),
                        extra={"pre_quant_scale_modules": ["layers.*.mlp.down_proj"]})
    down = method_for(quant, "layers.3.mlp.down_proj")
    gate = method_for(quant, "layers.3.mlp.gate_proj")
    assert isinstance(down, Int4Method) and down.group_size == 64
    assert "pre_quant_scale" in down.weight_specs(64, 128, ACT)
    assert "pre_quant_scale" not in gate.weight_specs(128, 64, ACT)
    assert down.weight_specs(64, 128, ACT)["weight_scale"].shape == (64, 2)
    assert method_for(quant, "lm_head").name == "unquantized"


def test_every_algorithm_has_a_format():
    from llmx.formats.presets import PRESETS

    method_for(QuantConfig(algo="fp8"), "layers.0.attn.q_proj")  # loads the registry
    assert set(PRESETS) <= set(METHODS)
    with pytest.raises(LlmxError, match="not a weight format"):
        method_for(QuantConfig(algo="int3"), "layers.0.attn.q_proj")


def test_group_size_must_divide_in_features():
    with pytest.raises(LlmxError, match="100 input features.*group size 64"):
        Int4Method(group_size=64).weight_specs(32, 100, ACT)
    with pytest.raises(LlmxError, match="multiple of 16"):
        Nvfp4Method().weight_specs(32, 40, ACT)


def test_kv_cache_scales():
    assert kv_scale_from_amax(torch.tensor(254.0), "int8").item() == pytest.approx(2.0)
    assert kv_scale_from_amax(torch.tensor(896.0), "fp8").item() == pytest.approx(2.0)
    assert kv_scale_from_amax(0.0, "int8").item() > 0
    assert check_kv_cache_dtype(None) is None
    with pytest.raises(LlmxError, match="fp8, int8"):
        check_kv_cache_dtype("fp4")
