"""Plain floating-point weights (bf16/fp16/fp32): the format of every unquantized checkpoint."""

from __future__ import annotations

from typing import Sequence

import torch

from llmx.formats.weights.base import QuantMethod, TensorSpec


class UnquantizedMethod(QuantMethod):
    name = "unquantized"

    def weight_specs(self, out_features: int, in_features: int, act_dtype: str) -> dict[str, TensorSpec]:
        return {"weight": TensorSpec((out_features, in_features), act_dtype, out_dim=(0, 1), in_dim=(1, 1))}

    def fuse_outputs(self, parts: Sequence[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
        return {"weight": torch.cat([p["weight"] for p in parts], dim=0)}

    def apply(self, tensors: dict[str, torch.Tensor], x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        return torch.nn.functional.linear(x, tensors["weight"], bias)
