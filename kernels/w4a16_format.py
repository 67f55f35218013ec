"""The int4 group-wise weight format (AWQ, GPTQ, int4_wo, and W4A8's weights) and its pure-torch product.

Storage (the checkpoint's, and what every W4A16 kernel reads directly):
- `qweight` uint8 [N, K // 2]: two 4-bit values per byte; the low nibble is input feature 2j, the high
  nibble input feature 2j + 1. Each value is stored offset-binary: nibble = q + 8 with q in [-8, 7].
- `scales` [N, K // group_size] in the activation dtype (bf16 / fp16 / fp32); symmetric, no zero points.
- dequantised weight: w[n, k] = (nibble[n, k] - 8) * scales[n, k // group_size].
- optional `pre_scale` [K] (AWQ's activation scale): the product is (x * pre_scale) @ w^T.

`w4a16_gemm_ref(x [M, K], qweight, scales, group_size, bias=None, pre_scale=None) -> [M, N]` is that product in
pure torch: the CPU path, and the reference the three W4A16 kernels (w4a16_gemm, w4a16_gemv, w4a16_mma_decode)
are tested and tuned against. `pack_int4` / `unpack_int4` convert between int8 values in [-8, 7] and the packed
bytes; `int4_from_modelopt` converts ModelOpt's export packing (two output channels per byte) to this one;
`quantize_int4_ref` makes a group-wise symmetric int4 weight from a float one (tests and dummy weights; real
checkpoints come from ModelOpt). The kernel modules import this one and not each other
(kernels/w4a16_dispatch.py picks which of them runs).
"""

from __future__ import annotations

from typing import Callable

import torch

from llmx.common.errors import LlmxError
from llmx.kernels._gemm_common import tuning_case

ACT_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def pack_int4(q: torch.Tensor) -> torch.Tensor:
    """int values in [-8, 7], shape [N, K] (K even) -> uint8 [N, K // 2] (low nibble = even k)."""
    if q.dim() != 2 or q.shape[1] % 2:
        raise LlmxError(f"pack_int4 needs a 2-D tensor with an even number of columns, got {tuple(q.shape)}.")
    if q.numel() and (int(q.min()) < -8 or int(q.max()) > 7):
        raise LlmxError("pack_int4 values must lie in [-8, 7]; clamp the quantized weight first.")
    u = (q.to(torch.int16) + 8).to(torch.uint8)
    return u[:, 0::2] | (u[:, 1::2] << 4)


def unpack_int4(qweight: torch.Tensor) -> torch.Tensor:
    """uint8 [N, K // 2] -> int8 [N, K] with values in [-8, 7]; inverse of `pack_int4`."""
    low = (qweight & 0x0F).to(torch.int8) - 8
    high = (qweight >> 4).to(torch.int8) - 8
    return torch.stack((low, high), dim=-1).reshape(qweight.shape[0], -1)


def int4_from_modelopt(packed: torch.Tensor) -> torch.Tensor:
    """ModelOpt's HF-export int4 packing -> this format's qweight.

    ModelOpt (`pack_int4_in_uint8`, int4_awq / w4a8_awq export) stores uint8 [N // 2, K]: output
    channels 2i and 2i + 1 in the low and high nibble of one byte, as 4-bit two's complement. Returns
    uint8 [N, K // 2] (input pairs per byte, offset-binary). Its group scales ([N, K // G]) are ours as is.
    """
    if packed.dtype != torch.uint8 or packed.dim() != 2 or packed.shape[1] % 2:
        raise LlmxError(f"int4_from_modelopt needs ModelOpt's uint8 [N // 2, K] (K even), "
                        f"got {packed.dtype} {tuple(packed.shape)}.")
    nibbles = torch.stack((packed & 0x0F, packed >> 4), dim=1).to(torch.int8)  # [N // 2, 2, K]
    q = torch.where(nibbles >= 8, nibbles - 16, nibbles)  # sign-extend two's complement
    return pack_int4(q.reshape(2 * packed.shape[0], packed.shape[1]))


def dequantize_int4(qweight: torch.Tensor, scales: torch.Tensor, group_size: int,
                    dtype: torch.dtype | None = None) -> torch.Tensor:
    """The weight [N, K] the format stands for, in `dtype` (default: the scales' dtype)."""
    dtype = dtype or scales.dtype
    q = unpack_int4(qweight).to(dtype)
    return q * scales.to(dtype).repeat_interleave(group_size, dim=1)


def quantize_int4_ref(w: torch.Tensor, group_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric round-to-nearest int4 per group: w [N, K] -> (qweight uint8 [N, K//2], scales [N, K//G]
    in w's dtype) with scale = absmax / 7 (so -8 is unused, as in AWQ/GPTQ symmetric export)."""
    n, k = w.shape
    if k % group_size or group_size % 2:
        raise LlmxError(f"quantize_int4_ref: K={k} must be a multiple of an even group_size={group_size}.")
    groups = w.float().reshape(n, k // group_size, group_size)
    scales = (groups.abs().amax(dim=-1) / 7.0).clamp_min(1e-8).to(w.dtype)
    q = torch.round(groups / scales.float().unsqueeze(-1)).clamp(-8, 7).to(torch.int8)
    return pack_int4(q.reshape(n, k)), scales


def check_int4_inputs(x, qweight, scales, group_size, bias, pre_scale, what):
    """The shapes and dtypes of an int4 group-wise GEMM call (this format; W4A8 adds its own rules)."""
    if x.dim() != 2 or x.dtype not in ACT_DTYPES:
        raise LlmxError(f"{what}: x must be a 2-D float16/bfloat16/float32 tensor [M, K], "
                        f"got {x.dtype} {tuple(x.shape)}.")
    m, k = x.shape
    if qweight.dtype != torch.uint8 or qweight.dim() != 2 or qweight.shape[1] * 2 != k:
        raise LlmxError(f"{what}: qweight must be uint8 [N, K//2] = [N, {k // 2}] for x with K={k}, "
                        f"got {qweight.dtype} {tuple(qweight.shape)}.")
    n = qweight.shape[0]
    if group_size < 2 or group_size % 2 or k % group_size:
        raise LlmxError(f"{what}: group_size={group_size} must be even and divide K={k}; "
                        f"check the checkpoint's quantization.group_size.")
    if tuple(scales.shape) != (n, k // group_size) or scales.dtype not in ACT_DTYPES:
        raise LlmxError(f"{what}: scales must be a float tensor [N, K//group_size] = [{n}, {k // group_size}], "
                        f"got {scales.dtype} {tuple(scales.shape)}.")
    if bias is not None and tuple(bias.shape) != (n,):
        raise LlmxError(f"{what}: bias must have shape [N] = [{n}], got {tuple(bias.shape)}.")
    if pre_scale is not None and tuple(pre_scale.shape) != (k,):
        raise LlmxError(f"{what}: pre_scale must have shape [K] = [{k}], got {tuple(pre_scale.shape)}.")


def w4a16_gemm_ref(x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor, group_size: int,
                   bias: torch.Tensor | None = None, pre_scale: torch.Tensor | None = None) -> torch.Tensor:
    """Pure-torch W4A16: dequantise to x's dtype, then x @ w^T (+ bias). The contract of every W4A16 kernel."""
    check_int4_inputs(x, qweight, scales, group_size, bias, pre_scale, "w4a16_gemm_ref")
    if pre_scale is not None:
        x = x * pre_scale.to(x.dtype)
    w = dequantize_int4(qweight, scales, group_size, x.dtype)
    return torch.nn.functional.linear(x, w, None if bias is None else bias.to(x.dtype))


def int4_tuning_case(launch: Callable, m: int, n: int, k: int, device: str, group_size: int, dtype: torch.dtype):
    """Random inputs for `tuning.autotune` of one W4A16 kernel: (run(config) -> output, check(output) -> bool).
    `launch(x, qweight, scales, group_size, bias, pre_scale, config)` is the kernel's launch, timed directly
    (never through w4a16_matmul's dispatch, which could hand the config to another kernel)."""
    x = torch.randn(m, k, device=device, dtype=dtype)
    qweight = torch.randint(0, 256, (n, k // 2), device=device, dtype=torch.uint8)
    scales = (torch.rand(n, k // group_size, device=device) * 0.02 + 0.001).to(dtype)
    expected = w4a16_gemm_ref(x, qweight, scales, group_size).float()
    tol = 2e-2 * expected.abs().max().item() + 1e-2
    return tuning_case(lambda cfg: launch(x, qweight, scales, group_size, None, None, cfg), expected, tol)
