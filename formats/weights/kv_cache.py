"""KV-cache quantization scales: one float32 scale per layer for K and one for V.

A quantized cache stores round(x / scale) (see llmx.kernels.kv_cache_write). The scale is the calibrated
amax of the post-RoPE keys (or the values) over the calibration data divided by the largest value the
cache type holds: 448 for fp8 e4m3, 127 for int8, the same scales ModelOpt's unified HF export writes
(so `--export-format hf` and the llmx format agree, and imported checkpoints keep theirs).
Checkpoint names: `layers.{i}.attn.k_scale` / `v_scale`, float32 scalars.
"""

from __future__ import annotations

import torch

from llmx.common.errors import LlmxError

KV_CACHE_QMAX = {"fp8": 448.0, "int8": 127.0}
KV_CACHE_DTYPES = tuple(KV_CACHE_QMAX)


def check_kv_cache_dtype(kv_cache_dtype: str | None, field: str = "--kv-cache-dtype") -> str | None:
    if kv_cache_dtype is None or kv_cache_dtype in KV_CACHE_QMAX:
        return kv_cache_dtype
    raise LlmxError(f"{field} {kv_cache_dtype!r} is not supported; use one of: {', '.join(KV_CACHE_DTYPES)}.")


def kv_scale_from_amax(amax: torch.Tensor | float, kv_cache_dtype: str) -> torch.Tensor:
    """amax of K or V over the calibration data -> float32 scalar scale (never zero)."""
    amax = torch.as_tensor(amax, dtype=torch.float32).reshape(())
    return (amax / KV_CACHE_QMAX[kv_cache_dtype]).clamp_min(1e-12)


def kv_scale_names(layer: int) -> tuple[str, str]:
    return f"layers.{layer}.attn.k_scale", f"layers.{layer}.attn.v_scale"
