"""QuantMethod: how one weight format is stored, laid out for the kernels, and multiplied.

One subclass per weight format (unquantized is a format too). A runtime Linear layer owns a QuantMethod
and the dict of tensors it declared; the method is stateless, so one instance serves every layer.

Tensor names are suffixes of the module name: the checkpoint holds `layers.0.attn.q_proj.weight`,
`layers.0.attn.q_proj.weight_scale`, ... and the Linear of `layers.0.attn.q_proj` receives
{"weight": ..., "weight_scale": ...}.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Sequence

if TYPE_CHECKING:
    import torch


@dataclass(frozen=True)
class TensorSpec:
    """Shape and dtype (torch dtype name, e.g. "bfloat16", "uint8", "float8_e4m3fn") of one stored tensor.

    `out_dim` / `in_dim`: which axis of this tensor follows the layer's output / input features (None when
    it follows neither, e.g. a per-tensor scale) and how many layer features one element spans along it
    (int4 packs two inputs per uint8: in_dim=(1, 2); group scales span group_size inputs: (1, 128)).
    Tensor-parallel sharding slices along these axes.
    """

    shape: tuple[int, ...]
    dtype: str
    out_dim: tuple[int, int] | None = None  # (axis, features per element)
    in_dim: tuple[int, int] | None = None


class QuantMethod:
    """Interface every weight format implements. `name` is the format's key in the registry."""

    name: str = ""

    def configure(self, quant, module_name: str) -> "QuantMethod":
        """The method for one module of a checkpoint quantized with `quant` (formats whose stored tensors
        depend on the checkpoint, e.g. the int4 group size, return a configured copy)."""
        return self

    def weight_specs(self, out_features: int, in_features: int, act_dtype: str) -> dict[str, TensorSpec]:
        """The tensors a Linear [out_features, in_features] stores, keyed by suffix ("weight", ...)."""
        raise NotImplementedError

    def fuse_outputs(self, parts: Sequence[dict[str, "torch.Tensor"]]) -> dict[str, "torch.Tensor"]:
        """Concatenate several Linears sharing one input (q,k,v or gate,up) along the output features.

        Formats with one scale per tensor must requantize to a common scale here.
        """
        raise NotImplementedError

    def prepare_for_device(self, tensors: dict[str, "torch.Tensor"], device: "torch.device") -> dict[str, "torch.Tensor"]:
        """Move to `device` and lay out for the kernels there (called once at load). Default: move only."""
        return {k: v.to(device) for k, v in tensors.items()}

    def apply(self, tensors: dict[str, "torch.Tensor"], x: "torch.Tensor", bias: "torch.Tensor | None") -> "torch.Tensor":
        """y = x @ W^T (+ bias) for x [tokens, in_features] -> [tokens, out_features] in x's dtype."""
        raise NotImplementedError

    def apply_gated(self, tensors: dict[str, "torch.Tensor"], x: "torch.Tensor", bias: "torch.Tensor | None",
                    out_scale: "torch.Tensor | None" = None) -> "torch.Tensor | None":
        """silu(gate) * up (* out_scale) [tokens, out_features / 2] of this fused [gate | up] Linear in one
        kernel, or None where the format has no such kernel for x (the caller runs apply, then silu_and_mul)."""
        return None

    def split_input_scale(self, tensors: dict[str, "torch.Tensor"]) -> "tuple[dict[str, torch.Tensor], torch.Tensor] | None":
        """(the tensors without it, the per-input-channel vector `apply` multiplies x by) for a producer that
        multiplies its output by that vector instead; None when the format stores none here."""
        return None
