"""INT4 weights with per-group scales (W4A16): the format of int4_wo, int4_awq and int4_gptq.

Stored per Linear [N out, K in], G = group size:
  weight           uint8 [N, K//2]  two inputs per byte: low nibble = input 2j, high nibble = input 2j+1,
                                    offset binary (nibble = q + 8, q in [-8, 7])
  weight_scale     act dtype [N, K//G]  w[n, k] = (nibble - 8) * weight_scale[n, k // G]
  pre_quant_scale  act dtype [K]   (only on modules the checkpoint lists, see `configure`): x is multiplied
                                    by it per input channel before the matmul. AWQ keeps it on o_proj and
                                    down_proj, which have no norm in front of them to fold it into.
"""

from __future__ import annotations

import fnmatch
from typing import TYPE_CHECKING, Sequence

import torch

from llmx.common.errors import LlmxError
from llmx.formats.weights.base import QuantMethod, TensorSpec
from llmx.kernels.ops import kernel_or_reference

if TYPE_CHECKING:
    from llmx.formats.config import QuantConfig

# The kernel modules import triton; they are imported inside the functions that launch them, so importing
# this module does not load triton.

INT4_MAX = 7  # symmetric: scale = amax / 7, codes clamp to [-8, 7]


def check_group_divides(in_features: int, group_size: int, module: str = "a Linear") -> None:
    if group_size <= 0 or in_features % group_size:
        fitting = [g for g in (32, 64, 128) if in_features % g == 0]
        choice = f"e.g. {' or '.join(map(str, fitting))}" if fitting else "none of 32, 64, 128 does"
        raise LlmxError(
            f"{module} has {in_features} input features, which the group size {group_size} does not divide; "
            f"pick a --group-size that divides {in_features} ({choice}) or exclude the module with --exclude."
        )


def group_amax(weight: torch.Tensor, group_size: int) -> torch.Tensor:
    """max |w| per (row, group): [N, K] -> [N, K//G] float32."""
    n, k = weight.shape
    return weight.float().abs().reshape(n, k // group_size, group_size).amax(dim=-1)


def quantize_int4(weight: torch.Tensor, group_size: int, act_dtype: str,
                  weight_amax: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
    """float weight [N, K] -> {"weight", "weight_scale"}; amax per group defaults to max |w| of the group.

    The scale is rounded to the activation dtype first and the codes are computed against that stored
    scale, so dequantizing the checkpoint reproduces exactly what the codes were chosen for.
    """
    n, k = weight.shape
    amax = group_amax(weight, group_size) if weight_amax is None else weight_amax.float().reshape(n, k // group_size)
    scale = torch.where(amax > 0, amax / INT4_MAX, torch.ones_like(amax)).to(getattr(torch, act_dtype))
    expanded = scale.float().repeat_interleave(group_size, dim=1)
    q = torch.round(weight.float() / expanded).clamp(-8, INT4_MAX)
    from llmx.kernels.w4a16_format import pack_int4

    return {"weight": pack_int4(q.to(torch.int8)), "weight_scale": scale}


def dequantize_int4(tensors: dict[str, torch.Tensor]) -> torch.Tensor:
    """-> float32 [N, K]; the group size follows from the shapes."""
    from llmx.kernels.w4a16_format import dequantize_int4 as dequantize

    weight, scale = tensors["weight"], tensors["weight_scale"]
    return dequantize(weight, scale, group_size_of(weight, scale), torch.float32)


def group_size_of(weight: torch.Tensor, weight_scale: torch.Tensor) -> int:
    return weight.shape[1] * 2 // weight_scale.shape[1]


def concat_pre_quant_scales(parts: Sequence[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """Fused Linears share one input, so they must share one pre_quant_scale (or none)."""
    scales = [p.get("pre_quant_scale") for p in parts]
    if all(s is None for s in scales):
        return {}
    if any(s is None for s in scales) or any(not torch.equal(s, scales[0]) for s in scales[1:]):
        raise LlmxError("Linears fused at build (q/k/v or gate/up) carry different pre_quant_scale vectors; "
                        "re-quantize the checkpoint with `llmx quantize`, which gives them one shared scale.")
    return {"pre_quant_scale": scales[0]}


def modules_with_pre_quant_scale(quant: "QuantConfig") -> tuple[str, ...]:
    return tuple(quant.extra.get("pre_quant_scale_modules", ()))


def has_pre_quant_scale(quant: "QuantConfig", module_name: str) -> bool:
    return any(fnmatch.fnmatchcase(module_name, p) for p in modules_with_pre_quant_scale(quant))


class Int4Method(QuantMethod):
    """Weight-only INT4 with group scales; activations stay in the model dtype."""

    name = "int4"

    def __init__(self, group_size: int = 128, pre_quant_scale: bool = False):
        self.group_size = group_size
        self.pre_quant_scale = pre_quant_scale

    def configure(self, quant: "QuantConfig", module_name: str) -> "Int4Method":
        """The instance for one module of a checkpoint: its group size, and whether it stores pre_quant_scale."""
        return type(self)(quant.group_size or self.group_size, has_pre_quant_scale(quant, module_name))

    def weight_specs(self, out_features: int, in_features: int, act_dtype: str) -> dict[str, TensorSpec]:
        check_group_divides(in_features, self.group_size)
        g = self.group_size
        specs = {
            "weight": TensorSpec((out_features, in_features // 2), "uint8", out_dim=(0, 1), in_dim=(1, 2)),
            "weight_scale": TensorSpec((out_features, in_features // g), act_dtype, out_dim=(0, 1), in_dim=(1, g)),
        }
        if self.pre_quant_scale:
            specs["pre_quant_scale"] = TensorSpec((in_features,), act_dtype, in_dim=(0, 1))
        return specs

    def quantize_weight(self, weight: torch.Tensor, act_dtype: str, *, weight_amax: torch.Tensor | None = None,
                        input_amax: torch.Tensor | None = None,
                        pre_quant_scale: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        """`weight` is the matrix the quantizer sees (already divided by pre_quant_scale, if any)."""
        out = quantize_int4(weight, self.group_size, act_dtype, weight_amax)
        if pre_quant_scale is not None:
            out["pre_quant_scale"] = pre_quant_scale.to(getattr(torch, act_dtype))
        return out

    def dequantize_weight(self, tensors: dict[str, torch.Tensor]) -> torch.Tensor:
        return dequantize_int4(tensors)

    def fuse_outputs(self, parts: Sequence[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
        fused = {
            "weight": torch.cat([p["weight"] for p in parts], dim=0),
            "weight_scale": torch.cat([p["weight_scale"] for p in parts], dim=0),
        }
        fused.update(concat_pre_quant_scales(parts))
        return fused

    def apply(self, tensors: dict[str, torch.Tensor], x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        from llmx.kernels.w4a16_dispatch import w4a16_matmul
        from llmx.kernels.w4a16_format import w4a16_gemm_ref

        gemm = kernel_or_reference(x, w4a16_matmul, w4a16_gemm_ref)
        lead, x2 = x.shape[:-1], x.reshape(-1, x.shape[-1])
        weight, scale = tensors["weight"], tensors["weight_scale"]
        y = gemm(x2, weight, scale, group_size_of(weight, scale), bias, tensors.get("pre_quant_scale"))
        return y.reshape(*lead, y.shape[-1])

    def apply_gated(self, tensors: dict[str, torch.Tensor], x: torch.Tensor, bias: torch.Tensor | None,
                    out_scale: torch.Tensor | None = None) -> torch.Tensor | None:
        from llmx.kernels.w4a16_dispatch import w4a16_gated_matmul

        gated = kernel_or_reference(x, w4a16_gated_matmul, None)
        if gated is None or x.dim() != 2:
            return None
        weight, scale = tensors["weight"], tensors["weight_scale"]
        group_size = group_size_of(weight, scale)
        return gated(x, weight, scale, group_size, bias, tensors.get("pre_quant_scale"), out_scale)

    def split_input_scale(self, tensors: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], torch.Tensor] | None:
        if "pre_quant_scale" not in tensors:
            return None
        return {name: t for name, t in tensors.items() if name != "pre_quant_scale"}, tensors["pre_quant_scale"]
