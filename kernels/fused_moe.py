"""Fused mixture-of-experts MLP: the routed tokens of every expert in two grouped-GEMM launches.

Input x [T, H], the experts' stacked weights w13 [E, 2I, H] (each expert's gate rows then up rows) and w2
[E, H, I], and the routing (weights [T, k] float32, expert ids [T, k]; id -1 drops the pair: an expert another
rank holds under expert parallelism). Each of the T * k (token, choice) pairs is
a "slot" s = token * k + choice. `align_by_expert` sorts the slots by expert into groups padded to BLOCK_M rows
(padding rows hold the sentinel T * k), and lists each BLOCK_M block's expert (-1 past the last group). Then:

  1. grouped GEMM over all blocks: h[s] = x[s // k] @ w13[e]^T            [T * k, 2I], x.dtype
  2. silu(gate) * up (kernels/activation.py)                             [T * k, I]
  3. grouped GEMM over all blocks: y[s] = weight[s] * (a[s] @ w2[e]^T)    [T * k, H], float32
  4. out[t] = sum over its k slots of y                                  [T, H], x.dtype

Each program of a GEMM takes one block of rows (one expert) and BLOCK_N output features, and reads only its
expert's weights. Every shape is fixed by T, k and E (the grid covers the most blocks the groups can need), and
sorting is torch ops without a host sync, so a decode step with it is captured in a CUDA graph.

FP8 experts (`fused_moe_fp8`: the fp8 format, per-tensor scales): each GEMM's input is quantized to e4m3 with the
layer's static input scale first (kernels/quantize_act.py), the tensor cores multiply e4m3 by e4m3 into float32,
and the accumulator is scaled by input scale * the expert's weight scale: what the fp8 Linear computes per expert.

`fused_moe_ref` is the torch reference: the experts one by one, transformers' arithmetic, sums in float32;
`fused_moe_fp8_ref` the same through kernels/fp8_gemm.py's reference Linear.
"""

from __future__ import annotations

import torch

from llmx.common.errors import LlmxError
from llmx.kernels._triton_util import FLOAT_DTYPES, cdiv, check_launch_device, jit, tl
from llmx.kernels.activation import silu_and_mul, silu_and_mul_ref
from llmx.kernels.fp8_gemm import fp8_linear_ref
from llmx.kernels.quantize_act import quantize_fp8


def _check(x: torch.Tensor, w13: torch.Tensor, w2: torch.Tensor, weights: torch.Tensor, ids: torch.Tensor, *,
           weight_dtype: bool = True) -> None:
    if x.dim() != 2 or w13.dim() != 3 or w2.dim() != 3:
        raise LlmxError(f"fused_moe: x must be [tokens, hidden], w13 [experts, 2 * inter, hidden] and w2 [experts, "
                        f"hidden, inter], got {tuple(x.shape)}, {tuple(w13.shape)}, {tuple(w2.shape)}.")
    experts, two_inter, hidden = w13.shape
    if hidden != x.shape[1] or two_inter % 2 or tuple(w2.shape) != (experts, hidden, two_inter // 2):
        raise LlmxError(f"fused_moe: shapes disagree: x {tuple(x.shape)}, w13 {tuple(w13.shape)}, "
                        f"w2 {tuple(w2.shape)}.")
    if weights.shape != ids.shape or ids.dim() != 2 or ids.shape[0] != x.shape[0]:
        raise LlmxError(f"fused_moe: routing weights and ids must both be [tokens, top_k], got {tuple(weights.shape)} "
                        f"and {tuple(ids.shape)} for {x.shape[0]} tokens.")
    if x.dtype not in FLOAT_DTYPES or weight_dtype and (w13.dtype != x.dtype or w2.dtype != x.dtype):
        raise LlmxError(f"fused_moe: x, w13 and w2 must share one float dtype, got {x.dtype}, {w13.dtype}, {w2.dtype}.")


def fused_moe_ref(x: torch.Tensor, w13: torch.Tensor, w2: torch.Tensor, weights: torch.Tensor,
                  ids: torch.Tensor) -> torch.Tensor:
    """Pure torch: sum over each token's chosen experts e of weight * down_e(silu(gate_e(x)) * up_e(x)) -> [T, H]."""
    _check(x, w13, w2, weights, ids)
    out = torch.zeros(x.shape, dtype=torch.float32, device=x.device)
    for e in torch.unique(ids[ids >= 0]).tolist():
        token, slot = torch.nonzero(ids == e, as_tuple=True)
        h = silu_and_mul_ref(torch.nn.functional.linear(x[token], w13[e]))
        out.index_add_(0, token, torch.nn.functional.linear(h, w2[e]).float() * weights[token, slot, None].float())
    return out.to(x.dtype)


def _check_fp8(x, w13, w13_scale, a13_scale, w2, w2_scale, a2_scale, weights, ids) -> None:
    if w13.dtype != torch.float8_e4m3fn or w2.dtype != torch.float8_e4m3fn:
        raise LlmxError(f"fused_moe_fp8: w13 and w2 must be float8_e4m3fn, got {w13.dtype} and {w2.dtype}.")
    experts = w13.shape[0] if w13.dim() == 3 else -1
    if tuple(w13_scale.shape) != (experts,) or tuple(w2_scale.shape) != (experts,) or a13_scale.numel() != 1 \
            or a2_scale.numel() != 1:
        raise LlmxError(f"fused_moe_fp8: weight scales must be [experts] and input scales scalars, got "
                        f"{tuple(w13_scale.shape)}, {tuple(w2_scale.shape)}, {tuple(a13_scale.shape)}, "
                        f"{tuple(a2_scale.shape)}.")
    _check(x, w13.view(torch.uint8), w2.view(torch.uint8), weights, ids, weight_dtype=False)


def fused_moe_fp8_ref(x: torch.Tensor, w13: torch.Tensor, w13_scale: torch.Tensor, a13_scale: torch.Tensor,
                      w2: torch.Tensor, w2_scale: torch.Tensor, a2_scale: torch.Tensor, weights: torch.Tensor,
                      ids: torch.Tensor) -> torch.Tensor:
    """Pure torch: fused_moe_ref with each expert an fp8 Linear (weight [N, K] e4m3, its scale, the layer's static
    input scale), as kernels/fp8_gemm.fp8_linear_ref computes it."""
    _check_fp8(x, w13, w13_scale, a13_scale, w2, w2_scale, a2_scale, weights, ids)
    out = torch.zeros(x.shape, dtype=torch.float32, device=x.device)
    for e in torch.unique(ids[ids >= 0]).tolist():
        token, slot = torch.nonzero(ids == e, as_tuple=True)
        h = silu_and_mul_ref(fp8_linear_ref(x[token], w13[e], w13_scale[e], a13_scale))
        y = fp8_linear_ref(h, w2[e], w2_scale[e], a2_scale)
        out.index_add_(0, token, y.float() * weights[token, slot, None].float())
    return out.to(x.dtype)


def align_by_expert(ids: torch.Tensor, num_experts: int, block_m: int) -> tuple[torch.Tensor, torch.Tensor]:
    """ids [T, k] -> (slots [blocks * block_m] int32: slot numbers grouped by expert, each group padded to a
    multiple of block_m with the sentinel T * k; block_experts [blocks] int32: each block's expert, -1 past the
    groups and for the dropped pairs (id -1), grouped last). blocks = ceil(T * k / block_m) + min(E + 1, T * k),
    the most the groups can fill."""
    flat = torch.where(ids.reshape(-1) < 0, num_experts, ids.reshape(-1))  # dropped pairs: a group after the last
    n = flat.numel()
    counts = torch.zeros(num_experts + 1, dtype=torch.int64, device=ids.device)
    counts.scatter_add_(0, flat, torch.ones_like(flat))
    padded = (counts + block_m - 1) // block_m * block_m
    group_end = torch.cumsum(padded, 0)
    order = torch.argsort(flat, stable=True)
    expert_of = flat[order]
    rank_in_group = torch.arange(n, device=ids.device) - (torch.cumsum(counts, 0) - counts)[expert_of]
    blocks = cdiv(n, block_m) + min(num_experts + 1, n)
    slots = torch.full((blocks * block_m,), n, dtype=torch.int32, device=ids.device)
    slots[(group_end - padded)[expert_of] + rank_in_group] = order.to(torch.int32)
    block_start = torch.arange(blocks, device=ids.device) * block_m
    block_experts = torch.searchsorted(group_end, block_start, right=True).to(torch.int32)
    block_experts = torch.where(block_experts < num_experts, block_experts, -1)
    return slots, block_experts


@jit
def _moe_gemm_kernel(a_ptr, w_ptr, out_ptr, slots_ptr, block_experts_ptr, weights_ptr, w_scale_ptr, a_scale_ptr,
                     num_slots, N, K, stride_am, stride_we, stride_wn, stride_om, SLOTS_PER_ROW: tl.constexpr,
                     MUL_WEIGHT: tl.constexpr, SCALED: tl.constexpr, IEEE: tl.constexpr, BLOCK_M: tl.constexpr,
                     BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """out[s, n] = (weight[s] *) (a_scale * w_scale[expert] *) sum_k a[s // SLOTS_PER_ROW, k] * w[expert, n, k]
    for this block's slots (SCALED: fp8 operands)."""
    pid_m = tl.program_id(0)
    expert = tl.load(block_experts_ptr + pid_m)
    if expert < 0:
        return
    slots = tl.load(slots_ptr + pid_m * BLOCK_M + tl.arange(0, BLOCK_M))
    valid = slots < num_slots
    rows = (slots // SLOTS_PER_ROW).to(tl.int64)
    cols = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    col_ok = cols < N
    ks = tl.arange(0, BLOCK_K)
    a_ptrs = a_ptr + rows[:, None] * stride_am + ks[None, :]
    w_ptrs = w_ptr + expert.to(tl.int64) * stride_we + cols[None, :].to(tl.int64) * stride_wn + ks[:, None]
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        k_ok = ks + k0 < K
        a = tl.load(a_ptrs, mask=valid[:, None] & k_ok[None, :], other=0.0)
        w = tl.load(w_ptrs, mask=k_ok[:, None] & col_ok[None, :], other=0.0)
        if IEEE:
            acc = tl.dot(a, w, acc, input_precision="ieee")
        else:
            acc = tl.dot(a, w, acc)
        a_ptrs += BLOCK_K
        w_ptrs += BLOCK_K
    if SCALED:
        acc = acc * (tl.load(a_scale_ptr) * tl.load(w_scale_ptr + expert))
    if MUL_WEIGHT:
        acc = acc * tl.load(weights_ptr + slots, mask=valid, other=0.0)[:, None]
    out_ptrs = out_ptr + slots[:, None].to(tl.int64) * stride_om + cols[None, :]
    tl.store(out_ptrs, acc.to(out_ptr.dtype.element_ty), mask=valid[:, None] & col_ok[None, :])


def _grouped_gemm(a: torch.Tensor, w: torch.Tensor, out: torch.Tensor, slots: torch.Tensor,
                  block_experts: torch.Tensor, weights: torch.Tensor | None, slots_per_row: int, block_m: int,
                  scales: tuple[torch.Tensor, torch.Tensor] | None = None) -> None:
    """scales: (the experts' weight scales [E], the input scale []) for fp8 operands."""
    n, k = w.shape[1], w.shape[2]
    block_n, block_k = 64, 64 if k >= 64 else 32
    grid = (block_experts.numel(), cdiv(n, block_n))
    w_scale, a_scale = scales if scales is not None else (out, out)
    _moe_gemm_kernel[grid](
        a, w, out, slots, block_experts, weights if weights is not None else out, w_scale, a_scale, out.shape[0],
        n, k, a.stride(0), w.stride(0), w.stride(1), out.stride(0), SLOTS_PER_ROW=slots_per_row,
        MUL_WEIGHT=weights is not None, SCALED=scales is not None, IEEE=a.dtype == torch.float32, BLOCK_M=block_m,
        BLOCK_N=block_n, BLOCK_K=block_k, num_warps=4, num_stages=3)


def block_m_for(slots: int, num_experts: int) -> int:
    """Rows per block: 16 when experts see a few tokens each (decode), 64 for prefill-sized groups."""
    return 16 if slots <= 16 * num_experts else 64


def fused_moe(x: torch.Tensor, w13: torch.Tensor, w2: torch.Tensor, weights: torch.Tensor,
              ids: torch.Tensor) -> torch.Tensor:
    """Triton: the same result as fused_moe_ref (sums in float32, rounded once to x's dtype) in two grouped GEMMs."""
    _check(x, w13, w2, weights, ids)
    check_launch_device("fused_moe", _moe_gemm_kernel, x, w13, w2, weights, ids)
    tokens, top_k = ids.shape
    experts, hidden = w13.shape[0], x.shape[1]
    if tokens == 0:
        return torch.zeros_like(x)
    x, w13, w2 = x.contiguous(), w13.contiguous(), w2.contiguous()
    weights = weights.float().contiguous()
    block_m = block_m_for(tokens * top_k, experts)
    slots, block_experts = align_by_expert(ids, experts, block_m)
    gate_up = torch.empty((tokens * top_k, w13.shape[1]), dtype=x.dtype, device=x.device)
    _grouped_gemm(x, w13, gate_up, slots, block_experts, None, top_k, block_m)
    act = silu_and_mul(gate_up)
    down = torch.zeros((tokens * top_k, hidden), dtype=torch.float32, device=x.device)  # dropped pairs stay 0
    _grouped_gemm(act, w2, down, slots, block_experts, weights.reshape(-1), 1, block_m)
    return down.view(tokens, top_k, hidden).sum(dim=1).to(x.dtype)


def fused_moe_fp8(x: torch.Tensor, w13: torch.Tensor, w13_scale: torch.Tensor, a13_scale: torch.Tensor,
                  w2: torch.Tensor, w2_scale: torch.Tensor, a2_scale: torch.Tensor, weights: torch.Tensor,
                  ids: torch.Tensor) -> torch.Tensor:
    """Triton: fused_moe_fp8_ref's result in two grouped e4m3 GEMMs (inputs quantized by kernels/quantize_act.py)."""
    _check_fp8(x, w13, w13_scale, a13_scale, w2, w2_scale, a2_scale, weights, ids)
    check_launch_device("fused_moe_fp8", _moe_gemm_kernel, x, w13, w2, weights, ids)
    tokens, top_k = ids.shape
    experts, hidden = w13.shape[0], x.shape[1]
    if tokens == 0:
        return torch.zeros_like(x)
    a13_scale, a2_scale = a13_scale.float().reshape(()), a2_scale.float().reshape(())
    w13_scale, w2_scale = w13_scale.float().contiguous(), w2_scale.float().contiguous()
    block_m = block_m_for(tokens * top_k, experts)
    slots, block_experts = align_by_expert(ids, experts, block_m)
    xq, _ = quantize_fp8(x.contiguous(), a13_scale)
    gate_up = torch.empty((tokens * top_k, w13.shape[1]), dtype=x.dtype, device=x.device)
    _grouped_gemm(xq, w13.contiguous(), gate_up, slots, block_experts, None, top_k, block_m, (w13_scale, a13_scale))
    act, _ = quantize_fp8(silu_and_mul(gate_up), a2_scale)
    down = torch.zeros((tokens * top_k, hidden), dtype=torch.float32, device=x.device)  # dropped pairs stay 0
    _grouped_gemm(act, w2.contiguous(), down, slots, block_experts, weights.float().contiguous().reshape(-1), 1,
                  block_m, (w2_scale, a2_scale))
    return down.view(tokens, top_k, hidden).sum(dim=1).to(x.dtype)
