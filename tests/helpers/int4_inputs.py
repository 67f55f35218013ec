"""Random inputs of an int4 group-wise GEMM call, shared by the int4 kernel tests (GEMV, gated GEMV, tensor-core
decode kernel), so that their cases draw the same tensors from the same seed."""

from __future__ import annotations

import torch


def int4_inputs(m: int, n: int, k: int, group: int, options: dict, dtype: torch.dtype, device: str = "cpu",
                seed: int = 0):
    """(x [m, k], qweight uint8 [n, k / 2], scales [n, k / group], bias [n], pre_scale [k], out_scale [n / 2]):
    every nibble value, -8 included; positive group scales. bias, pre_scale and out_scale are None unless
    `options` asks for them ("bias", "pre_scale", "out_scale": the gated kernels' scale of their n / 2 outputs)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(m, k, generator=g).to(dtype)
    qweight = torch.randint(0, 256, (n, k // 2), generator=g, dtype=torch.uint8)
    scales = (torch.rand(n, k // group, generator=g) * 0.05 + 0.005).to(dtype)
    bias = torch.randn(n, generator=g).to(dtype) if options.get("bias") else None
    pre = (torch.rand(k, generator=g) + 0.5).to(dtype) if options.get("pre_scale") else None
    out_scale = (torch.rand(n // 2, generator=g) + 0.5).to(dtype) if options.get("out_scale") else None
    return tuple(None if t is None else t.to(device) for t in (x, qweight, scales, bias, pre, out_scale))
