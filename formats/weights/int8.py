"""INT8 weights with per-output-channel scales: SmoothQuant W8A8 (int8_sq) and weight-only W8A16 (int8_wo).

Stored per Linear [N out, K in]:
  int8_sq: weight int8 [N, K], weight_scale float32 [N] (= amax of row n / 127); activations are
           quantized to int8 per token at run time (amax of the token / 127). SmoothQuant's smoothing
           vector is folded into the RMSNorm in front of q/k/v and gate/up (exact: those Linears share one
           vector); o_proj and down_proj, which have no norm in front, keep it as
           pre_quant_scale act dtype [K] (x is multiplied by it before quantization), on the modules the
           checkpoint lists in quantization.extra["pre_quant_scale_modules"].
  int8_wo: weight int8 [N, K], weight_scale act dtype [N]; activations stay in the model dtype. The
           GEMM (llmx.kernels.int8_gemm) reads float32 scales: prepare_for_device casts them at load.
w[n, k] = weight[n, k] * weight_scale[n].
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Sequence

import torch

from llmx.formats.weights.base import QuantMethod, TensorSpec
from llmx.formats.weights.int4 import concat_pre_quant_scales, has_pre_quant_scale
from llmx.kernels.ops import kernel_or_reference

if TYPE_CHECKING:
    from llmx.formats.config import QuantConfig

# The kernel modules import triton; they are imported inside the functions that launch them, so importing
# this module does not load triton.

INT8_MAX = 127.0
_MIN_SCALE = 1e-12


def int8_scale(amax: torch.Tensor) -> torch.Tensor:
    return (amax.float() / INT8_MAX).clamp_min(_MIN_SCALE)


def to_int8(x: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    return torch.round(x.float() / scale.float()).clamp(-128, 127).to(torch.int8)


def quantize_per_channel(weight: torch.Tensor, weight_amax: torch.Tensor | None,
                         scale_dtype: torch.dtype) -> dict[str, torch.Tensor]:
    n = weight.shape[0]
    amax = weight.float().abs().amax(dim=1) if weight_amax is None else weight_amax.float().reshape(n)
    scale = int8_scale(amax).to(scale_dtype)
    return {"weight": to_int8(weight, scale.float()[:, None]), "weight_scale": scale}


class Int8SmoothQuantMethod(QuantMethod):
    name = "int8_sq"

    def __init__(self, pre_quant_scale: bool = False):
        self.pre_quant_scale = pre_quant_scale

    def configure(self, quant: "QuantConfig", module_name: str) -> "Int8SmoothQuantMethod":
        return type(self)(has_pre_quant_scale(quant, module_name))

    def weight_specs(self, out_features: int, in_features: int, act_dtype: str) -> dict[str, TensorSpec]:
        specs = {
            "weight": TensorSpec((out_features, in_features), "int8", out_dim=(0, 1), in_dim=(1, 1)),
            "weight_scale": TensorSpec((out_features,), "float32", out_dim=(0, 1)),
        }
        if self.pre_quant_scale:
            specs["pre_quant_scale"] = TensorSpec((in_features,), act_dtype, in_dim=(0, 1))
        return specs

    def quantize_weight(self, weight: torch.Tensor, act_dtype: str, *, weight_amax: torch.Tensor | None = None,
                        input_amax: torch.Tensor | None = None,
                        pre_quant_scale: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        out = quantize_per_channel(weight, weight_amax, torch.float32)
        if pre_quant_scale is not None:
            out["pre_quant_scale"] = pre_quant_scale.to(getattr(torch, act_dtype))
        return out

    def dequantize_weight(self, tensors: dict[str, torch.Tensor]) -> torch.Tensor:
        return tensors["weight"].float() * tensors["weight_scale"].float()[:, None]

    def fuse_outputs(self, parts: Sequence[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
        fused = {"weight": torch.cat([p["weight"] for p in parts], dim=0),
                 "weight_scale": torch.cat([p["weight_scale"] for p in parts], dim=0)}
        fused.update(concat_pre_quant_scales(parts))
        return fused

    def apply(self, tensors: dict[str, torch.Tensor], x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        from llmx.kernels import int8_gemm as k

        linear = kernel_or_reference(x, k.int8_linear, k.int8_linear_ref)
        lead, x2 = x.shape[:-1], x.reshape(-1, x.shape[-1])
        y = linear(x2, tensors["weight"], tensors["weight_scale"], None, bias, tensors.get("pre_quant_scale"))
        return y.reshape(*lead, y.shape[-1])


class Int8WeightOnlyMethod(QuantMethod):
    name = "int8_wo"

    def weight_specs(self, out_features: int, in_features: int, act_dtype: str) -> dict[str, TensorSpec]:
        return {
            "weight": TensorSpec((out_features, in_features), "int8", out_dim=(0, 1), in_dim=(1, 1)),
            "weight_scale": TensorSpec((out_features,), act_dtype, out_dim=(0, 1)),
        }

    def quantize_weight(self, weight: torch.Tensor, act_dtype: str, *, weight_amax: torch.Tensor | None = None,
                        input_amax: torch.Tensor | None = None,
                        pre_quant_scale: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        return quantize_per_channel(weight, weight_amax, getattr(torch, act_dtype))

    def dequantize_weight(self, tensors: dict[str, torch.Tensor]) -> torch.Tensor:
        return tensors["weight"].float() * tensors["weight_scale"].float()[:, None]

    def fuse_outputs(self, parts: Sequence[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
        return {"weight": torch.cat([p["weight"] for p in parts], dim=0),
                "weight_scale": torch.cat([p["weight_scale"] for p in parts], dim=0)}

    def prepare_for_device(self, tensors: dict[str, torch.Tensor], device: torch.device) -> dict[str, torch.Tensor]:
        return {"weight": tensors["weight"].to(device),
                "weight_scale": tensors["weight_scale"].to(device, torch.float32)}

    def apply(self, tensors: dict[str, torch.Tensor], x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        from llmx.kernels import int8_gemm as k

        gemm = kernel_or_reference(x, k.int8_wo_gemm, k.int8_wo_gemm_ref)
        lead, x2 = x.shape[:-1], x.reshape(-1, x.shape[-1])
        y = gemm(x2, tensors["weight"], tensors["weight_scale"].float(), bias)
        return y.reshape(*lead, y.shape[-1])
