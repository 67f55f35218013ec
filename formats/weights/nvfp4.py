"""NVFP4: e2m1 weights in blocks of 16 with e4m3 block scales and one float32 global scale.

Stored per Linear [N out, K in] exactly as ModelOpt's NVFP4QTensor produces it (and its unified HF export
names it), see llmx.kernels.nvfp4_gemm for the bit layout:
  weight          uint8 [N, K//2]  two e2m1 codes per byte, low nibble = input 2j
  weight_scale    float8_e4m3fn [N, K//16]
  weight_scale_2  float32 []  global scale = amax(|W|) / (6 * 448)
  input_scale     float32 []  activation global scale = calibrated amax(|x|) / (6 * 448), used by FP4 x FP4
                  kernels (Blackwell); on Hopper, which has no FP4 tensor cores, the GEMM is W4A16 and the
                  activations stay in the model dtype.
w[n, k] = e2m1(code) * float(weight_scale[n, k // 16]) * weight_scale_2.
"""

from __future__ import annotations

from typing import Sequence

import torch

from llmx.common.errors import LlmxError
from llmx.formats.weights.base import QuantMethod, TensorSpec
from llmx.kernels.ops import kernel_or_reference

# The kernel modules import triton; they are imported inside the functions that launch them, so importing
# this module does not load triton.

BLOCK = 16
E2M1_MAX = 6.0
E4M3_MAX = 448.0


def global_scale(amax: torch.Tensor) -> torch.Tensor:
    return (amax.float().reshape(()) / (E2M1_MAX * E4M3_MAX)).clamp_min(1e-12)


def check_block_divides(in_features: int, module: str = "a Linear") -> None:
    if in_features % BLOCK:
        raise LlmxError(f"{module} has {in_features} input features; NVFP4 needs a multiple of {BLOCK}: "
                        "exclude the module with --exclude or pick another --algo.")


class Nvfp4Method(QuantMethod):
    name = "nvfp4"

    def weight_specs(self, out_features: int, in_features: int, act_dtype: str) -> dict[str, TensorSpec]:
        check_block_divides(in_features)
        return {
            "weight": TensorSpec((out_features, in_features // 2), "uint8", out_dim=(0, 1), in_dim=(1, 2)),
            "weight_scale": TensorSpec((out_features, in_features // BLOCK), "float8_e4m3fn",
                                       out_dim=(0, 1), in_dim=(1, BLOCK)),
            "weight_scale_2": TensorSpec((), "float32"),
            "input_scale": TensorSpec((), "float32"),
        }

    def quantize_weight(self, weight: torch.Tensor, act_dtype: str, *, weight_amax: torch.Tensor | None = None,
                        input_amax: torch.Tensor | None = None,
                        pre_quant_scale: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        """`weight_amax` is the global amax (ModelOpt's weight quantizer amax); default max |W|."""
        from llmx.kernels.nvfp4_gemm import quantize_nvfp4_ref

        if input_amax is None:
            raise ValueError("nvfp4 needs the calibrated input amax of every quantized Linear")
        amax = weight.float().abs().amax() if weight_amax is None else weight_amax
        packed, block_scales, scale_2 = quantize_nvfp4_ref(weight.float(), global_scale(amax))
        return {"weight": packed, "weight_scale": block_scales, "weight_scale_2": scale_2,
                "input_scale": global_scale(input_amax)}

    def dequantize_weight(self, tensors: dict[str, torch.Tensor]) -> torch.Tensor:
        from llmx.kernels.nvfp4_gemm import dequantize_nvfp4

        return dequantize_nvfp4(tensors["weight"], tensors["weight_scale"], tensors["weight_scale_2"])

    def fuse_outputs(self, parts: Sequence[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
        """Parts with different global scales are requantized to the largest one (block scales then
        shrink, never overflow e4m3); `llmx quantize` writes q/k/v and gate/up with one shared global
        scale already, so for its checkpoints this is a plain concatenation."""
        from llmx.kernels.nvfp4_gemm import quantize_nvfp4_ref

        common = torch.stack([p["weight_scale_2"].float().reshape(()) for p in parts]).amax()
        weights, block_scales = [], []
        for p in parts:
            if torch.equal(p["weight_scale_2"].float().reshape(()), common):
                weights.append(p["weight"])
                block_scales.append(p["weight_scale"])
            else:
                packed, scales, _ = quantize_nvfp4_ref(self.dequantize_weight(p), common)
                weights.append(packed)
                block_scales.append(scales)
        input_scale = torch.stack([p["input_scale"].float().reshape(()) for p in parts]).amax()
        return {"weight": torch.cat(weights, dim=0), "weight_scale": torch.cat(block_scales, dim=0),
                "weight_scale_2": common, "input_scale": input_scale}

    def apply(self, tensors: dict[str, torch.Tensor], x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        from llmx.kernels import nvfp4_gemm as k

        gemm = kernel_or_reference(x, k.nvfp4_gemm, k.nvfp4_gemm_ref)
        lead, x2 = x.shape[:-1], x.reshape(-1, x.shape[-1])
        y = gemm(x2, tensors["weight"], tensors["weight_scale"], tensors["weight_scale_2"], bias)
        return y.reshape(*lead, y.shape[-1])
