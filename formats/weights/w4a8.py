"""W4A8 AWQ: the int4 group-scaled weights of llmx.formats.weights.int4 plus an FP8 activation scale.

Stored per Linear [N out, K in]: weight uint8 [N, K//2], weight_scale act dtype [N, K//G], optional
pre_quant_scale act dtype [K] (as int4), and input_scale float32 [] (= calibrated amax(|x * pre_quant_scale|) / 448).

apply runs llmx.kernels.fp8_gemm.w4a8_gemm on CUDA (int4 values are exact in e4m3, FP8 tensor cores);
its CPU reference quantizes the activation to e4m3 with input_scale, dequantizes both operands in float32
and multiplies. The kernel needs a group size that is a multiple of 32.
"""

from __future__ import annotations

from typing import Sequence

import torch

from llmx.formats.weights.base import TensorSpec
from llmx.formats.weights.fp8 import fp8_scale
from llmx.formats.weights.int4 import Int4Method, group_size_of
from llmx.kernels.ops import kernel_or_reference

# The kernel modules import triton; they are imported inside the functions that launch them, so importing
# this module does not load triton.


class W4A8Method(Int4Method):
    name = "w4a8_awq"

    def weight_specs(self, out_features: int, in_features: int, act_dtype: str) -> dict[str, TensorSpec]:
        specs = super().weight_specs(out_features, in_features, act_dtype)
        specs["input_scale"] = TensorSpec((), "float32")
        return specs

    def quantize_weight(self, weight: torch.Tensor, act_dtype: str, *, weight_amax: torch.Tensor | None = None,
                        input_amax: torch.Tensor | None = None,
                        pre_quant_scale: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        """`input_amax` is the amax of the activation the GEMM sees, i.e. after pre_quant_scale."""
        if input_amax is None:
            raise ValueError("w4a8_awq needs the calibrated input amax of every quantized Linear")
        out = super().quantize_weight(weight, act_dtype, weight_amax=weight_amax, pre_quant_scale=pre_quant_scale)
        out["input_scale"] = fp8_scale(input_amax.float().reshape(()))
        return out

    def fuse_outputs(self, parts: Sequence[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
        fused = super().fuse_outputs(parts)
        fused["input_scale"] = torch.stack([p["input_scale"].float().reshape(()) for p in parts]).amax()
        return fused

    def apply(self, tensors: dict[str, torch.Tensor], x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        from llmx.kernels import fp8_gemm as k

        gemm = kernel_or_reference(x, k.w4a8_gemm, k.w4a8_gemm_ref)
        lead, x2 = x.shape[:-1], x.reshape(-1, x.shape[-1])
        weight, scale = tensors["weight"], tensors["weight_scale"]
        y = gemm(x2, weight, scale, group_size_of(weight, scale), tensors["input_scale"], bias,
                 tensors.get("pre_quant_scale"))
        return y.reshape(*lead, y.shape[-1])

    def apply_gated(self, tensors: dict[str, torch.Tensor], x: torch.Tensor, bias: torch.Tensor | None,
                    out_scale: torch.Tensor | None = None) -> torch.Tensor | None:
        return None  # its activations go through FP8 tensor cores, not the int4 GEMV that has the gated variant
