"""Linear layers whose weights are stored in any QuantMethod's format, with tensor-parallel variants.

Weights live in `self.tensors` (suffix -> tensor, e.g. {"weight", "weight_scale"}), placed on the device
by the loader through the method's `prepare_for_device`, not as nn.Parameters: inference never trains,
and the formats differ per method.
"""

from __future__ import annotations

import torch
from torch import nn

from llmx.formats.weights import QuantMethod
from llmx.runtime.distributed import tp_all_reduce


class Linear(nn.Module):
    """y = x W^T + b for this rank's slice of W [out_features, in_features] (sizes are per rank).

    parallel: None (replicated), "column" (out features split; no communication) or "row" (in features
    split; partial sums all-reduced, then the bias added once).
    """

    def __init__(self, in_features: int, out_features: int, *, bias: bool, method: QuantMethod,
                 parallel: str | None = None):
        super().__init__()
        self.in_features = in_features
        self.out_features = out_features
        self.has_bias = bias
        self.method = method
        self.parallel = parallel
        self.tensors: dict[str, torch.Tensor] = {}
        self.bias: torch.Tensor | None = None

    def expected_tensors(self, act_dtype: str) -> dict:
        return self.method.weight_specs(self.out_features, self.in_features, act_dtype)

    def forward(self, x: torch.Tensor, tensors: dict[str, torch.Tensor] | None = None) -> torch.Tensor:
        """`tensors` replaces self.tensors for this call (e.g. without an input scale the producer applied)."""
        tensors = self.tensors if tensors is None else tensors
        if self.parallel == "row":
            y = self.method.apply(tensors, x, None)
            y = tp_all_reduce(y)
            return y if self.bias is None else y + self.bias
        return self.method.apply(tensors, x, self.bias)

    def gated(self, x: torch.Tensor, out_scale: torch.Tensor | None = None) -> torch.Tensor | None:
        """For a fused [gate | up] Linear: silu(gate) * up (* out_scale) in one kernel, or None where the
        method has none for x (QuantMethod.apply_gated)."""
        return self.method.apply_gated(self.tensors, x, self.bias, out_scale)

    def extra_repr(self) -> str:
        return f"in={self.in_features}, out={self.out_features}, method={self.method.name}, parallel={self.parallel}"
