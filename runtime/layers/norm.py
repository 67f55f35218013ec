"""RMSNorm, with the residual add fused in when a residual is passed."""

from __future__ import annotations

import torch
from torch import nn

from llmx.kernels import ops


class RMSNorm(nn.Module):
    def __init__(self, size: int, eps: float):
        super().__init__()
        self.size = size
        self.eps = eps
        self.weight: torch.Tensor | None = None  # [size], set by the loader

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None = None):
        """x [T, size] -> normed [T, size]; with `residual`: (normed(x + residual), x + residual)."""
        if residual is None:
            return ops.rms_norm(x, self.weight, self.eps)
        return ops.fused_add_rms_norm(x, residual, self.weight, self.eps)


class GemmaRMSNorm(RMSNorm):
    """Gemma's RMSNorm: the stored weight w scales by (1 + w), computed in float32 (transformers' Gemma code).
    Gemma adds residuals outside its norms, so there is no fused residual form."""

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None = None):
        if residual is not None:
            raise ValueError("GemmaRMSNorm takes no residual; add it outside the norm as Gemma does")
        return ops.gemma_rms_norm(x, self.weight, self.eps)
