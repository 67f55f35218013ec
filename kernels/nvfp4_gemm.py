"""NVFP4 weight GEMM for Hopper: e2m1 weights dequantised in the kernel, 16-bit (or fp32) activations.

Hopper has no FP4 tensor cores, so NVFP4 runs as a weight-only GEMM (like W4A16): the bytes read are the
4-bit codes plus one fp8 scale per 16 weights.

Storage format = what ModelOpt 0.47's `NVFP4QTensor.quantize(w, 16)` produces, stored without conversion
(checked against modelopt/torch/quantization/qtensor/nvfp4_tensor.py and by the tests):
- `qweight` uint8 [N, K // 2] (ModelOpt's `quantized_data`): two e2m1 codes per byte, the low nibble is
  input feature 2j, the high nibble 2j + 1 (`packed = (q[..., 1::2] << 4) | q[..., 0::2]`).
  Code bits: bit 3 = sign, bits 0-2 index the magnitudes [0, 0.5, 1, 1.5, 2, 3, 4, 6].
- `block_scales` float8_e4m3fn [N, K // 16] (ModelOpt's `weights_scaling_factor`), one per 16 inputs.
- `global_scale` float32 scalar (ModelOpt's `weights_scaling_factor_2` = amax(|W|) / (6 * 448), exported
  as `weight_scale_2`). It is a multiplier, like the block scale:
      w[n, k] = e2m1(code[n, k]) * float(block_scales[n, k // 16]) * global_scale
  (ModelOpt quantizes by dividing W by block_scale * global_scale and dequantises by multiplying.)
K must be a multiple of 16 (ModelOpt pads the last block; llmx models have such K).

`nvfp4_gemm(x [M, K], qweight, block_scales, global_scale, bias=None) -> [M, N]` in x's dtype;
`nvfp4_gemm_ref` is the pure-torch version (CPU path). `quantize_nvfp4_ref` reproduces ModelOpt's
quantizer for tests and dummy weights.

Kernel: out^T tiles = W @ x^T as in w4a16_gemm (dequantised weight is the register operand). A code
becomes a float16 by placing its 3 magnitude bits at the bottom of the fp16 exponent and top of the
mantissa (e2m1 and fp16 then differ by exactly 2^14, subnormal 0.5 included); the e4m3 block scale
becomes fp16 the same way (factor 2^8). The product of a code and a block scale has at most 6
significant bits, so it is exact in fp16 and bf16; the global scale multiplies the fp32 accumulator.
"""

from __future__ import annotations

import torch

from llmx.common.errors import LlmxError
from llmx.kernels import tuning
from llmx.kernels._gemm_common import (finish_output, launch_grid, load_rows, new_output, output_tile, scale_groups,
                                      store_tile, tile_kwargs, tuning_case, weight_dot)
from llmx.kernels._triton_util import check_launch_device, jit, tl
from llmx.kernels.tuning import TileConfig

BLOCK_SIZE = 16
E2M1_MAX = 6.0
E4M3_MAX = 448.0
_ACT_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
_E2M1_VALUES = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0, -0.0, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0, -6.0)
# Round-to-nearest boundaries between consecutive magnitudes; a tie rounds to the even code (as ModelOpt).
_E2M1_BOUNDS = (0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0)


def unpack_e2m1(qweight: torch.Tensor) -> torch.Tensor:
    """uint8 [N, K // 2] -> uint8 codes [N, K] (low nibble first)."""
    return torch.stack((qweight & 0x0F, qweight >> 4), dim=-1).reshape(qweight.shape[0], -1)


def pack_e2m1(codes: torch.Tensor) -> torch.Tensor:
    """uint8 codes [N, K] (values 0..15, K even) -> uint8 [N, K // 2]; inverse of `unpack_e2m1`."""
    if codes.dim() != 2 or codes.shape[1] % 2 or codes.dtype != torch.uint8:
        raise LlmxError(f"pack_e2m1 needs uint8 codes [N, K] with K even, got {codes.dtype} {tuple(codes.shape)}.")
    if codes.numel() and int(codes.max()) > 15:
        raise LlmxError("pack_e2m1 codes must be 4-bit values in [0, 15].")
    return codes[:, 0::2] | (codes[:, 1::2] << 4)


def e2m1_to_float(codes: torch.Tensor) -> torch.Tensor:
    """uint8 codes -> float32 values."""
    table = torch.tensor(_E2M1_VALUES, dtype=torch.float32, device=codes.device)
    return table[codes.long()]


def dequantize_nvfp4(qweight: torch.Tensor, block_scales: torch.Tensor, global_scale: torch.Tensor,
                     dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """The weight [N, K] the format stands for, computed in float32 and returned in `dtype`."""
    n = qweight.shape[0]
    values = e2m1_to_float(unpack_e2m1(qweight)).reshape(n, -1, BLOCK_SIZE)
    scale = block_scales.to(torch.float32) * global_scale.to(torch.float32)
    return (values * scale.unsqueeze(-1)).reshape(n, -1).to(dtype)


def quantize_nvfp4_ref(w: torch.Tensor, global_scale: torch.Tensor | None = None):
    """w [N, K] -> (qweight uint8 [N, K//2], block_scales float8_e4m3fn [N, K//16], global_scale float32 []),
    following ModelOpt's dynamic NVFP4 quantizer (same scales, same codes)."""
    n, k = w.shape
    if k % BLOCK_SIZE:
        raise LlmxError(f"quantize_nvfp4_ref: K={k} must be a multiple of {BLOCK_SIZE}.")
    wf = w.float()
    if global_scale is None:
        global_scale = wf.abs().amax() / (E2M1_MAX * E4M3_MAX)
    global_scale = global_scale.float().reshape(())
    blocks = wf.reshape(n, k // BLOCK_SIZE, BLOCK_SIZE)
    block_scale = blocks.abs().amax(dim=-1) / (E2M1_MAX * global_scale)
    block_scale[block_scale == 0] = 1.0
    block_scales = block_scale.clamp(min=2.0 ** -9, max=E4M3_MAX).to(torch.float8_e4m3fn)
    scaled = blocks / (block_scales.float() * global_scale).unsqueeze(-1)
    mag = scaled.abs()
    bounds = torch.tensor(_E2M1_BOUNDS, device=w.device)
    index = torch.searchsorted(bounds, mag.contiguous(), out_int32=True)
    # searchsorted puts a value equal to a bound below it; ties at the odd-code bounds (0.75, 1.75, 3.5)
    # must round up to the even code instead.
    index = index + torch.isin(mag, bounds[[1, 3, 5]]).to(torch.int32)
    codes = (index | ((scaled < 0).to(torch.int32) << 3)).to(torch.uint8).reshape(n, k)
    return pack_e2m1(codes), block_scales, global_scale


def _check_inputs(x, qweight, block_scales, global_scale, bias, what):
    if x.dim() != 2 or x.dtype not in _ACT_DTYPES:
        raise LlmxError(f"{what}: x must be a 2-D float16/bfloat16/float32 tensor [M, K], "
                        f"got {x.dtype} {tuple(x.shape)}.")
    k = x.shape[1]
    if k % BLOCK_SIZE:
        raise LlmxError(f"{what}: K={k} must be a multiple of {BLOCK_SIZE} for NVFP4.")
    if qweight.dtype != torch.uint8 or qweight.dim() != 2 or qweight.shape[1] * 2 != k:
        raise LlmxError(f"{what}: qweight must be uint8 [N, K//2] = [N, {k // 2}], "
                        f"got {qweight.dtype} {tuple(qweight.shape)}.")
    n = qweight.shape[0]
    if block_scales.dtype != torch.float8_e4m3fn or tuple(block_scales.shape) != (n, k // BLOCK_SIZE):
        raise LlmxError(f"{what}: block_scales must be float8_e4m3fn [N, K//16] = [{n}, {k // BLOCK_SIZE}], "
                        f"got {block_scales.dtype} {tuple(block_scales.shape)}.")
    if global_scale.numel() != 1 or global_scale.dtype != torch.float32:
        raise LlmxError(f"{what}: global_scale must be a float32 scalar tensor (ModelOpt's weight_scale_2), "
                        f"got {global_scale.dtype} with {global_scale.numel()} elements.")
    if bias is not None and tuple(bias.shape) != (n,):
        raise LlmxError(f"{what}: bias must have shape [N] = [{n}], got {tuple(bias.shape)}.")


def nvfp4_gemm_ref(x: torch.Tensor, qweight: torch.Tensor, block_scales: torch.Tensor,
                   global_scale: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """Pure-torch NVFP4 GEMM: dequantise in float32, cast to x's dtype, x @ w^T (+ bias)."""
    _check_inputs(x, qweight, block_scales, global_scale, bias, "nvfp4_gemm_ref")
    w = dequantize_nvfp4(qweight, block_scales, global_scale, x.dtype)
    return torch.nn.functional.linear(x, w, None if bias is None else bias.to(x.dtype))


def nvfp4_gemm(x: torch.Tensor, qweight: torch.Tensor, block_scales: torch.Tensor, global_scale: torch.Tensor,
               bias: torch.Tensor | None = None, *, config: TileConfig | dict | None = None) -> torch.Tensor:
    """Triton NVFP4 x bf16/fp16 GEMM -> [M, N] in x's dtype. `config` overrides the tile configuration."""
    _check_inputs(x, qweight, block_scales, global_scale, bias, "nvfp4_gemm")
    check_launch_device("nvfp4_gemm", _nvfp4_kernel, x, qweight, block_scales, global_scale, bias)
    m, k = x.shape
    n = qweight.shape[0]
    cfg = tuning.gemm_config("nvfp4", m, n, k, config)
    x = x if x.stride(1) == 1 else x.contiguous()
    # The kernel decodes the e4m3 bits itself: no fp8 support needed from Triton or its interpreter.
    scale_bits = block_scales.contiguous().view(torch.uint8)
    qweight = qweight.contiguous()
    block_k = max(cfg.block_k, 32)  # each nibble half of a K tile is a 16-deep tensor-core K
    y = new_output(m, n, x.dtype, x.device, cfg)
    _nvfp4_kernel[launch_grid(m, n, cfg)](
        x, qweight, scale_bits, global_scale.reshape(1), x if bias is None else bias.to(x.dtype).contiguous(), y,
        m, n, k, x.stride(0), qweight.stride(0), scale_bits.stride(0), y.stride(0),
        HAS_BIAS=bias is not None, EVEN_K=k % (block_k * cfg.split_k) == 0, **tile_kwargs(cfg, block_k),
    )
    return finish_output(y, x.dtype)


def nvfp4_tuning_case(m: int, n: int, k: int, device: str = "cuda", dtype: torch.dtype = torch.bfloat16):
    """Random inputs for `tuning.autotune`: (run(config) -> output, check(output) -> bool)."""
    x = torch.randn(m, k, device=device, dtype=dtype)
    qweight, block_scales, global_scale = quantize_nvfp4_ref(torch.randn(n, k, device=device) * 0.02)
    expected = nvfp4_gemm_ref(x, qweight, block_scales, global_scale).float()
    tol = 2e-2 * expected.abs().max().item() + 1e-3

    return tuning_case(lambda cfg: nvfp4_gemm(x, qweight, block_scales, global_scale, config=cfg), expected, tol)


@jit
def _e2m1_to_f16(codes):
    """uint8 e2m1 codes -> exact float16 values (sign to bit 15, magnitude bits to bits 9-11, x 2^14)."""
    c = codes.to(tl.uint16)
    bits = ((c & 0x8) << 12) | ((c & 0x7) << 9)
    return bits.to(tl.float16, bitcast=True) * 16384.0


@jit
def _e4m3_to_f16(raw):
    """uint8 float8_e4m3fn bits -> exact float16 (exponent and mantissa to bits 7-13, x 2^8).
    NaN codes are not decoded; ModelOpt clamps block scales to [2^-9, 448]."""
    r = raw.to(tl.uint16)
    bits = ((r & 0x80) << 8) | ((r & 0x7F) << 7)
    return bits.to(tl.float16, bitcast=True) * 256.0


@jit
def _nvfp4_kernel(
    x_ptr, qw_ptr, bs_ptr, gs_ptr, bias_ptr, out_ptr,
    M, N, K, stride_xm, stride_qn, stride_sn, stride_om,
    HAS_BIAS: tl.constexpr, EVEN_K: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    SPLIT_K: tl.constexpr, GROUP_M: tl.constexpr,
):
    act = x_ptr.dtype.element_ty
    pid_k = tl.program_id(1)
    offs_m, offs_n, m_ok, n_ok = output_tile(tl.program_id(0), M, N, BLOCK_M, BLOCK_N, GROUP_M)
    offs_k = tl.arange(0, BLOCK_K)
    offs_j = tl.arange(0, BLOCK_K // 2)  # packed byte j: inputs 2j (low nibble) and 2j + 1 (high)
    offs_s = tl.arange(0, BLOCK_K // 16)

    # Low and high nibbles multiply the even and odd input features (two half-depth dots, as in
    # w4a16_gemm); a block of 16 inputs is 8 bytes, so each byte's scale is block_scales[j // 8].
    acc = tl.zeros((BLOCK_N, BLOCK_M), dtype=tl.float32)
    iters = tl.cdiv(K, BLOCK_K * SPLIT_K)
    for it in range(0, iters):
        k0 = (pid_k * iters + it) * BLOCK_K
        packed = load_rows(qw_ptr + offs_n[:, None] * stride_qn + (k0 // 2 + offs_j)[None, :], n_ok,
                           k0 // 2 + offs_j, K // 2, EVEN_K)
        raw_scales = load_rows(bs_ptr + offs_n[:, None] * stride_sn + (k0 // 16 + offs_s)[None, :], n_ok,
                               k0 // 16 + offs_s, K // 16, EVEN_K)
        # Contiguous [BLOCK_M, BLOCK_K] load, then even/odd columns apart in registers: the activation
        # tile is the small one at decode sizes, and strided loads would not vectorize.
        x = load_rows(x_ptr + offs_m[:, None] * stride_xm + (k0 + offs_k)[None, :], m_ok, k0 + offs_k, K, EVEN_K)
        x_even, x_odd = tl.split(tl.reshape(x, (BLOCK_M, BLOCK_K // 2, 2)))
        scales = _e4m3_to_f16(raw_scales)  # [BLOCK_N, BLOCK_K // 16]
        w_low = scale_groups(_e2m1_to_f16(packed & 0xF), scales, BLOCK_N, BLOCK_K // 16, 8, act)
        w_high = scale_groups(_e2m1_to_f16(packed >> 4), scales, BLOCK_N, BLOCK_K // 16, 8, act)
        acc = weight_dot(w_high, x_odd, weight_dot(w_low, x_even, acc, act), act)

    store_tile(acc * tl.load(gs_ptr), out_ptr, bias_ptr, offs_m, offs_n, m_ok, n_ok, pid_k, stride_om, True,
               HAS_BIAS, SPLIT_K)
