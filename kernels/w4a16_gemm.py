"""W4A16 GEMM: int4 group-wise weights (AWQ, GPTQ, int4_wo) times 16-bit (or fp32) activations.

Storage format (the checkpoint's, and what the kernel reads directly):
- `qweight` uint8 [N, K // 2]: two 4-bit values per byte; the low nibble is input feature 2j, the high
  nibble input feature 2j + 1. Each value is stored offset-binary: nibble = q + 8 with q in [-8, 7].
- `scales` [N, K // group_size] in the activation dtype (bf16 / fp16 / fp32); symmetric, no zero points.
- dequantised weight: w[n, k] = (nibble[n, k] - 8) * scales[n, k // group_size].
- optional `pre_scale` [K] (AWQ's activation scale): the GEMM computes (x * pre_scale) @ w^T.

`w4a16_gemm(x [M, K], qweight, scales, group_size, bias=None, pre_scale=None) -> [M, N]` in x's dtype;
`w4a16_gemm_ref` computes the same in pure torch (the CPU path). `pack_int4` / `unpack_int4` convert
between int8 values in [-8, 7] and the packed bytes; `int4_from_modelopt` converts ModelOpt's export
packing (two output channels per byte) to this one; `quantize_int4_ref` makes a group-wise symmetric
int4 weight from a float one (tests and dummy weights; real checkpoints come from ModelOpt).

Kernel: each program computes a [BLOCK_N, BLOCK_M] tile of out^T = W @ x^T. Putting the dequantised
weight on the left makes it the tensor cores' register operand (Hopper's wgmma reads only the left
operand from registers) and makes the batch, not N, the narrow side of the tile, so decode batches of
1..16 rows waste little work. Nibbles become floats with a magic-exponent bit trick (an OR and a
subtract) instead of int-to-float conversions, which run at a fraction of the FMA rate. The low and
high nibbles of a byte are kept apart, as two half-depth operands against the even and odd input
features. When a K tile sits inside one quantization group, the group scale multiplies the
[BLOCK_N, BLOCK_M] partial product instead of every weight.
"""

from __future__ import annotations

import torch

from llmx.common.errors import LlmxError
from llmx.kernels import tuning
from llmx.kernels._gemm_common import (finish_output, launch_grid, load_rows, new_output, output_tile, scale_groups,
                                      store_tile, tile_kwargs, tuning_case, weight_dot)
from llmx.kernels._triton_util import check_launch_device, jit, tl
from llmx.kernels.tuning import TileConfig

_ACT_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


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
    if x.dim() != 2 or x.dtype not in _ACT_DTYPES:
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
    if tuple(scales.shape) != (n, k // group_size) or scales.dtype not in _ACT_DTYPES:
        raise LlmxError(f"{what}: scales must be a float tensor [N, K//group_size] = [{n}, {k // group_size}], "
                        f"got {scales.dtype} {tuple(scales.shape)}.")
    if bias is not None and tuple(bias.shape) != (n,):
        raise LlmxError(f"{what}: bias must have shape [N] = [{n}], got {tuple(bias.shape)}.")
    if pre_scale is not None and tuple(pre_scale.shape) != (k,):
        raise LlmxError(f"{what}: pre_scale must have shape [K] = [{k}], got {tuple(pre_scale.shape)}.")


def w4a16_gemm_ref(x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor, group_size: int,
                   bias: torch.Tensor | None = None, pre_scale: torch.Tensor | None = None) -> torch.Tensor:
    """Pure-torch W4A16: dequantise to x's dtype, then x @ w^T (+ bias). Same contract as `w4a16_gemm`."""
    check_int4_inputs(x, qweight, scales, group_size, bias, pre_scale, "w4a16_gemm_ref")
    if pre_scale is not None:
        x = x * pre_scale.to(x.dtype)
    w = dequantize_int4(qweight, scales, group_size, x.dtype)
    return torch.nn.functional.linear(x, w, None if bias is None else bias.to(x.dtype))


def w4a16_gemm(x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor, group_size: int,
               bias: torch.Tensor | None = None, pre_scale: torch.Tensor | None = None, *,
               config: TileConfig | dict | None = None) -> torch.Tensor:
    """Triton W4A16 GEMM: x [M, K] @ dequant(qweight, scales)^T (+ bias) -> [M, N] in x's dtype.

    `config` overrides the tile configuration (else the tuned table, else the heuristic default).
    """
    check_int4_inputs(x, qweight, scales, group_size, bias, pre_scale, "w4a16_gemm")
    check_launch_device("w4a16_gemm", _w4a16_kernel, x, qweight, scales, bias, pre_scale)
    m, k = x.shape
    # Decode rows: the tensor-core decode kernel on Hopper, else the CUDA-core GEMV (their modules import this one).
    from llmx.kernels.w4a16_mma_decode import launch_w4a16_mma_decode, uses_mma_decode
    if uses_mma_decode(x, k, group_size):
        return launch_w4a16_mma_decode(x, qweight, scales, group_size, bias, pre_scale, config)
    if tuning.w4a16_uses_gemv(m, k, group_size):
        from llmx.kernels.w4a16_gemv import launch_w4a16_gemv
        return launch_w4a16_gemv(x, qweight, scales, group_size, bias, pre_scale, config)
    return launch_w4a16_tensor_core(x, qweight, scales, group_size, bias, pre_scale, config)


def launch_w4a16_tensor_core(x, qweight, scales, group_size, bias, pre_scale, config) -> torch.Tensor:
    """The tensor-core GEMM's launch for inputs already checked, at any M (w4a16_gemm sends it M > 16, or M > 4
    where the decode kernel does not run)."""
    m, k = x.shape
    n = qweight.shape[0]
    cfg = tuning.gemm_config("w4a16", m, n, k, config)
    block_k = _block_k_for_group(cfg.block_k, group_size)
    x = x if x.stride(1) == 1 else x.contiguous()
    qweight, scales = qweight.contiguous(), scales.contiguous().to(x.dtype)
    y = new_output(m, n, x.dtype, x.device, cfg)
    _w4a16_kernel[launch_grid(m, n, cfg)](
        x, qweight, scales, x if pre_scale is None else pre_scale.to(x.dtype).contiguous(),
        x if bias is None else bias.to(x.dtype).contiguous(), y,
        m, n, k, x.stride(0), qweight.stride(0), scales.stride(0), y.stride(0),
        GROUP_SIZE=group_size, SCALE_AFTER_DOT=group_size % block_k == 0,
        HAS_PRE_SCALE=pre_scale is not None, HAS_BIAS=bias is not None,
        EVEN_K=k % (block_k * cfg.split_k) == 0, **tile_kwargs(cfg, block_k),
    )
    return finish_output(y, x.dtype)


def _block_k_for_group(block_k: int, group_size: int) -> int:
    """A K tile either inside one group (group % tile == 0) or made of whole power-of-two groups; at
    least 32 wide, so each nibble half of it is a 16-deep tensor-core K."""
    block_k = max(block_k, 32)
    if group_size % block_k == 0:
        return block_k
    if block_k % group_size == 0 and group_size & (group_size - 1) == 0:
        return block_k
    largest_pow2_divisor = group_size & -group_size
    if largest_pow2_divisor < 32:
        raise LlmxError(f"w4a16_gemm: group_size={group_size} must be a power of two or a multiple of 32 for the "
                        f"Triton kernel; use w4a16_gemm_ref or requantize with group size 32, 64 or 128.")
    return min(block_k, largest_pow2_divisor)


def w4a16_tuning_case(m: int, n: int, k: int, device: str = "cuda", group_size: int = 128,
                      dtype: torch.dtype = torch.bfloat16, launch=None):
    """Random inputs for `tuning.autotune`: (run(config) -> output, check(output) -> bool). `launch(x, qweight,
    scales, group_size, bias, pre_scale, config)` is the kernel timed: the tensor-core GEMM unless given, never
    w4a16_gemm's dispatch, which could hand the config to another kernel."""
    x = torch.randn(m, k, device=device, dtype=dtype)
    qweight = torch.randint(0, 256, (n, k // 2), device=device, dtype=torch.uint8)
    scales = (torch.rand(n, k // group_size, device=device) * 0.02 + 0.001).to(dtype)
    expected = w4a16_gemm_ref(x, qweight, scales, group_size).float()
    tol = 2e-2 * expected.abs().max().item() + 1e-2

    launch = launch or launch_w4a16_tensor_core
    return tuning_case(lambda cfg: launch(x, qweight, scales, group_size, None, None, cfg), expected, tol)


@jit
def _int4_to_float(nibbles, DTYPE: tl.constexpr):
    """uint8 nibbles (0..15) -> DTYPE values nibble - 8, exactly: OR the nibble into the mantissa of
    2^k (k = mantissa bits) and subtract 2^k + 8."""
    if DTYPE == tl.bfloat16:
        v = (nibbles.to(tl.uint16) | 0x4300).to(tl.bfloat16, bitcast=True) - 136.0
    elif DTYPE == tl.float16:
        v = (nibbles.to(tl.uint16) | 0x6400).to(tl.float16, bitcast=True) - 1032.0
    else:
        v = (nibbles.to(tl.uint32) | 0x4B000000).to(tl.float32, bitcast=True) - 8388616.0
    return v.to(DTYPE)


@jit
def _w4a16_kernel(
    x_ptr, qw_ptr, scales_ptr, pre_ptr, bias_ptr, out_ptr,
    M, N, K, stride_xm, stride_qn, stride_sn, stride_om,
    GROUP_SIZE: tl.constexpr, SCALE_AFTER_DOT: tl.constexpr, HAS_PRE_SCALE: tl.constexpr,
    HAS_BIAS: tl.constexpr, EVEN_K: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    SPLIT_K: tl.constexpr, GROUP_M: tl.constexpr,
):
    act = x_ptr.dtype.element_ty
    pid_k = tl.program_id(1)
    offs_m, offs_n, m_ok, n_ok = output_tile(tl.program_id(0), M, N, BLOCK_M, BLOCK_N, GROUP_M)
    offs_k = tl.arange(0, BLOCK_K)
    offs_j = tl.arange(0, BLOCK_K // 2)  # packed byte j of a K tile: inputs 2j (low nibble) and 2j + 1 (high)

    # The low and high nibbles multiply the even and odd input features: two half-depth dots instead of
    # interleaving the nibbles back into K order, which would shuffle every weight through shared memory.
    acc = tl.zeros((BLOCK_N, BLOCK_M), dtype=tl.float32)
    iters = tl.cdiv(K, BLOCK_K * SPLIT_K)
    for it in range(0, iters):
        k0 = (pid_k * iters + it) * BLOCK_K
        packed = load_rows(qw_ptr + offs_n[:, None] * stride_qn + (k0 // 2 + offs_j)[None, :], n_ok,
                           k0 // 2 + offs_j, K // 2, EVEN_K)
        # Contiguous [BLOCK_M, BLOCK_K] load, then even/odd columns apart in registers: the activation
        # tile is the small one at decode sizes, and strided loads would not vectorize.
        x = load_rows(x_ptr + offs_m[:, None] * stride_xm + (k0 + offs_k)[None, :], m_ok, k0 + offs_k, K, EVEN_K)
        if HAS_PRE_SCALE:
            x = (x * tl.load(pre_ptr + k0 + offs_k, mask=k0 + offs_k < K, other=0.0)[None, :]).to(act)
        x_even, x_odd = tl.split(tl.reshape(x, (BLOCK_M, BLOCK_K // 2, 2)))
        w_low = _int4_to_float(packed & 0xF, act)  # [BLOCK_N, BLOCK_K // 2]
        w_high = _int4_to_float(packed >> 4, act)
        if SCALE_AFTER_DOT:
            # The whole K tile lies in group k0 // GROUP_SIZE: scale the partial product per row n.
            s = tl.load(scales_ptr + offs_n * stride_sn + tl.minimum(k0, K - 1) // GROUP_SIZE, mask=n_ok, other=0.0)
            part = weight_dot(w_low, x_even, tl.zeros((BLOCK_N, BLOCK_M), dtype=tl.float32), act)
            acc += weight_dot(w_high, x_odd, part, act) * s.to(tl.float32)[:, None]
        else:
            # BLOCK_K spans BLOCK_K // GROUP_SIZE whole groups of GROUP_SIZE // 2 bytes: scale each weight.
            offs_g = k0 // GROUP_SIZE + tl.arange(0, BLOCK_K // GROUP_SIZE)
            s = tl.load(scales_ptr + offs_n[:, None] * stride_sn + offs_g[None, :],
                        mask=n_ok[:, None] & (offs_g < K // GROUP_SIZE)[None, :], other=0.0)
            w_low = scale_groups(w_low, s, BLOCK_N, BLOCK_K // GROUP_SIZE, GROUP_SIZE // 2, act)
            w_high = scale_groups(w_high, s, BLOCK_N, BLOCK_K // GROUP_SIZE, GROUP_SIZE // 2, act)
            acc = weight_dot(w_high, x_odd, weight_dot(w_low, x_even, acc, act), act)

    store_tile(acc, out_ptr, bias_ptr, offs_m, offs_n, m_ok, n_ok, pid_k, stride_om, True, HAS_BIAS, SPLIT_K)

