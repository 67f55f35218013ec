"""Pieces every Triton GEMM in llmx shares: tile scheduling, operand loads, epilogue, output buffers.

All GEMMs compute y[M, N] = x[M, K] @ W[N, K]^T with row-major (K-contiguous) operands. A launch grid is
(tiles, SPLIT_K): program (pid, pid_k) owns output tile `output_tile(pid)` and the pid_k-th of SPLIT_K
equal slices of the K loop. With SPLIT_K > 1 the partial sums are added atomically into a zeroed float32
buffer, cast to the output dtype afterwards (`new_output` / `finish_output`).

Weight-only kernels accumulate the transposed tile out^T [BLOCK_N, BLOCK_M] (the converted weight is
the tensor cores' register operand and the batch the narrow side; see w4a16_gemm); W8A8 accumulates
[BLOCK_M, BLOCK_N]. `store_tile` writes either orientation.
"""

from __future__ import annotations

from typing import Callable

import torch

from llmx.kernels._triton_util import jit, pin_fp_fusion, tl, triton
from llmx.kernels.tuning import TileConfig


@jit
def output_tile(pid, M, N, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, GROUP_M: tl.constexpr):
    """(offs_m, offs_n, m_ok, n_ok): the rows and columns of y that program `pid` owns, and which of them
    exist. GROUP_M consecutive programs share a weight column tile, so the weights they all read stay in L2."""
    grid_m = tl.cdiv(M, BLOCK_M)
    grid_n = tl.cdiv(N, BLOCK_N)
    width = GROUP_M * grid_n
    first_m = (pid // width) * GROUP_M
    rows = tl.minimum(grid_m - first_m, GROUP_M)
    pid_m = first_m + (pid % width) % rows
    pid_n = (pid % width) // rows
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    return offs_m, offs_n, offs_m < M, offs_n < N


@jit
def load_rows(ptrs, row_ok, cols, limit, EVEN: tl.constexpr):
    """A [rows, cols] operand tile, zero where masked: rows by row_ok; columns by `cols < limit` unless
    EVEN (the K loop divides evenly, so no column can run past the end)."""
    if EVEN:
        mask = row_ok[:, None]
    else:
        mask = row_ok[:, None] & (cols < limit)[None, :]
    if ptrs.dtype.element_ty.is_int():
        return tl.load(ptrs, mask=mask, other=0)
    return tl.load(ptrs, mask=mask, other=0.0)  # float types, fp8 included


@jit
def store_tile(acc, out_ptr, bias_ptr, offs_m, offs_n, m_ok, n_ok, pid_k, stride_om,
               TRANSPOSED: tl.constexpr, HAS_BIAS: tl.constexpr, SPLIT_K: tl.constexpr):
    """Add the bias (once: by the first K slice) and write a float32 tile of y, or of y^T when
    TRANSPOSED ([BLOCK_N, BLOCK_M]); atomically added when SPLIT_K > 1."""
    if TRANSPOSED:
        if HAS_BIAS:
            bias = tl.load(bias_ptr + offs_n, mask=n_ok, other=0.0).to(tl.float32)
            acc += tl.where(pid_k == 0, bias, 0.0)[:, None]
        ptrs = out_ptr + offs_m[None, :] * stride_om + offs_n[:, None]
        mask = n_ok[:, None] & m_ok[None, :]
    else:
        if HAS_BIAS:
            bias = tl.load(bias_ptr + offs_n, mask=n_ok, other=0.0).to(tl.float32)
            acc += tl.where(pid_k == 0, bias, 0.0)[None, :]
        ptrs = out_ptr + offs_m[:, None] * stride_om + offs_n[None, :]
        mask = m_ok[:, None] & n_ok[None, :]
    if SPLIT_K > 1:
        tl.atomic_add(ptrs, acc, mask=mask, sem="relaxed")
    else:
        tl.store(ptrs, acc.to(out_ptr.dtype.element_ty), mask=mask)


@jit
def weight_dot(w, x, acc, act: tl.constexpr):
    """acc + w [BLOCK_N, D] @ x [BLOCK_M, D]^T in float32: a transposed tile of a weight-only kernel
    (exact fp32 products when the activations are fp32)."""
    if act == tl.float32:
        return tl.dot(w, tl.trans(x), acc, input_precision="ieee")
    return tl.dot(w, tl.trans(x), acc)


@jit
def scale_groups(w, s, ROWS: tl.constexpr, GROUPS: tl.constexpr, PER_GROUP: tl.constexpr, act: tl.constexpr):
    """w [ROWS, GROUPS * PER_GROUP] times its group scales s [ROWS, GROUPS], in the activation dtype."""
    return tl.reshape(tl.reshape(w, (ROWS, GROUPS, PER_GROUP)) * s[:, :, None], (ROWS, GROUPS * PER_GROUP)).to(act)


def tuning_case(launch: Callable[[TileConfig], torch.Tensor], expected: torch.Tensor, tol: float):
    """(run, check) for `tuning.autotune`: run(config) launches with that tile config, check(output) says
    whether it is within `tol` of the reference output `expected` (float32). The tuner launches without the
    wrappers' checks, so FP fusion is pinned here (see _triton_util)."""
    pin_fp_fusion()

    def check(y: torch.Tensor) -> bool:
        return bool((y.float() - expected).abs().max().item() <= tol)

    return launch, check


def as_int32_words(t: torch.Tensor) -> torch.Tensor:
    """A 2-D tensor whose rows are whole int32 words, as int32: uint8 [R, 4C] or 16-bit [R, 2C] -> [R, C], the
    lower-addressed element in the low bits. A view when every row starts 4-byte aligned, else a copy."""
    size = t.element_size()
    aligned = t.stride(1) == 1 and (t.storage_offset() * size) % 4 == 0 and (t.stride(0) * size) % 4 == 0
    return (t if aligned else t.clone(memory_format=torch.contiguous_format)).view(torch.int32)


def new_output(m: int, n: int, dtype: torch.dtype, device: torch.device, cfg: TileConfig) -> torch.Tensor:
    """The buffer a launch writes: `dtype` directly, or zeroed float32 for split-K's atomic adds."""
    if cfg.split_k > 1:
        return torch.zeros((m, n), device=device, dtype=torch.float32)
    return torch.empty((m, n), device=device, dtype=dtype)


def finish_output(y: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    return y if y.dtype == dtype else y.to(dtype)


def launch_grid(m: int, n: int, cfg: TileConfig) -> tuple[int, int]:
    return triton.cdiv(m, cfg.block_m) * triton.cdiv(n, cfg.block_n), cfg.split_k


def tile_kwargs(cfg: TileConfig, block_k: int | None = None) -> dict[str, int]:
    """The launch's tile constexprs and compile options from a TileConfig."""
    return dict(BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, BLOCK_K=block_k or cfg.block_k, SPLIT_K=cfg.split_k,
                GROUP_M=cfg.group_m, num_warps=cfg.num_warps, num_stages=cfg.num_stages)
