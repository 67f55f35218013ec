"""FP8 (e4m3) weights and activations: per-tensor static scales (fp8) or per-channel/per-token (fp8_pc_pt).

Stored per Linear [N out, K in]:
  fp8:       weight float8_e4m3fn [N, K], weight_scale float32 [] (= amax(|W|) / 448),
             input_scale float32 [] (= calibrated amax(|x|) / 448, static)
  fp8_pc_pt: weight float8_e4m3fn [N, K], weight_scale float32 [N] (per output channel);
             activations are scaled per token at run time (amax of the token / 448), so no input_scale.
w = float(weight) * weight_scale; the GEMM (llmx.kernels.fp8_gemm) computes (q(x) @ weight^T) * input_scale
* weight_scale.
"""

from __future__ import annotations

from typing import Sequence

import torch

from llmx.formats.weights.base import QuantMethod, TensorSpec
from llmx.kernels.ops import kernel_or_reference

# The kernel modules import triton; they are imported inside the functions that launch them, so importing
# this module does not load triton.

FP8_MAX = 448.0
_MIN_SCALE = 1e-12  # keeps an all-zero tensor or token from dividing by zero


def fp8_scale(amax: torch.Tensor) -> torch.Tensor:
    return (amax.float() / FP8_MAX).clamp_min(_MIN_SCALE)


def to_fp8(x: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """x / scale, saturated to the e4m3 range and rounded to nearest: the quantizer of weights and activations."""
    return (x.float() / scale.float()).clamp(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn)


def requantize_to_common_scale(parts: Sequence[dict[str, torch.Tensor]]) -> tuple[list[torch.Tensor], torch.Tensor]:
    """Per-tensor scales of fused parts differ: requantize every weight to the largest scale (no overflow)."""
    common = torch.stack([p["weight_scale"].float().reshape(()) for p in parts]).amax()
    weights = []
    for p in parts:
        if torch.equal(p["weight_scale"].float().reshape(()), common):
            weights.append(p["weight"])
        else:
            weights.append(to_fp8(p["weight"].float() * p["weight_scale"].float(), common))
    return weights, common


class Fp8Method(QuantMethod):
    """FP8 weights with one scale per tensor, FP8 activations with a static calibrated scale."""

    name = "fp8"

    def weight_specs(self, out_features: int, in_features: int, act_dtype: str) -> dict[str, TensorSpec]:
        return {
            "weight": TensorSpec((out_features, in_features), "float8_e4m3fn", out_dim=(0, 1), in_dim=(1, 1)),
            "weight_scale": TensorSpec((), "float32"),
            "input_scale": TensorSpec((), "float32"),
        }

    def quantize_weight(self, weight: torch.Tensor, act_dtype: str, *, weight_amax: torch.Tensor | None = None,
                        input_amax: torch.Tensor | None = None,
                        pre_quant_scale: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        if input_amax is None:
            raise ValueError("fp8 needs the calibrated input amax of every quantized Linear")
        amax = weight.float().abs().amax() if weight_amax is None else weight_amax.float().reshape(())
        scale = fp8_scale(amax)
        return {"weight": to_fp8(weight, scale), "weight_scale": scale,
                "input_scale": fp8_scale(input_amax.float().reshape(()))}

    def dequantize_weight(self, tensors: dict[str, torch.Tensor]) -> torch.Tensor:
        return tensors["weight"].float() * tensors["weight_scale"].float()

    def fuse_outputs(self, parts: Sequence[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
        weights, scale = requantize_to_common_scale(parts)
        # A larger static input scale only widens the clipping range of the shared input: no overflow.
        input_scale = torch.stack([p["input_scale"].float().reshape(()) for p in parts]).amax()
        return {"weight": torch.cat(weights, dim=0), "weight_scale": scale, "input_scale": input_scale}

    def apply(self, tensors: dict[str, torch.Tensor], x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        return _fp8_gemm(x, tensors["weight"], tensors["weight_scale"], tensors["input_scale"], bias)


class Fp8PerChannelMethod(QuantMethod):
    """FP8 weights with one scale per output channel, FP8 activations scaled per token at run time."""

    name = "fp8_pc_pt"

    def weight_specs(self, out_features: int, in_features: int, act_dtype: str) -> dict[str, TensorSpec]:
        return {
            "weight": TensorSpec((out_features, in_features), "float8_e4m3fn", out_dim=(0, 1), in_dim=(1, 1)),
            "weight_scale": TensorSpec((out_features,), "float32", out_dim=(0, 1)),
        }

    def quantize_weight(self, weight: torch.Tensor, act_dtype: str, *, weight_amax: torch.Tensor | None = None,
                        input_amax: torch.Tensor | None = None,
                        pre_quant_scale: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        n = weight.shape[0]
        amax = weight.float().abs().amax(dim=1) if weight_amax is None else weight_amax.float().reshape(n)
        scale = fp8_scale(amax)
        return {"weight": to_fp8(weight, scale[:, None]), "weight_scale": scale}

    def dequantize_weight(self, tensors: dict[str, torch.Tensor]) -> torch.Tensor:
        return tensors["weight"].float() * tensors["weight_scale"].float()[:, None]

    def fuse_outputs(self, parts: Sequence[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
        return {"weight": torch.cat([p["weight"] for p in parts], dim=0),
                "weight_scale": torch.cat([p["weight_scale"] for p in parts], dim=0)}

    def apply(self, tensors: dict[str, torch.Tensor], x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        return _fp8_gemm(x, tensors["weight"], tensors["weight_scale"], None, bias)


def _fp8_gemm(x, weight, weight_scale, input_scale, bias):
    from llmx.kernels import fp8_gemm as k

    gemm = kernel_or_reference(x, k.fp8_linear, k.fp8_linear_ref)
    lead, x2 = x.shape[:-1], x.reshape(-1, x.shape[-1])
    y = gemm(x2, weight, weight_scale, input_scale, bias)
    return y.reshape(*lead, y.shape[-1])
