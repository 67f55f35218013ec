"""Row-wise argmax of logits for greedy sampling, in two short kernels instead of one block per row.

Contract:
  x    [S, V] float32 / bfloat16 / float16, rows contiguous (stride(1) == 1; any row stride)
  returns int64 [S]: the column of each row's maximum. Ties go to the smallest column and NaN counts as
  larger than every number (the first NaN of a row wins), as in torch.argmax; an all -inf row gives 0.
CUDA tensors run the kernels, CPU tensors take torch.argmax (under TRITON_INTERPRET=1 they run the
kernels in Triton's interpreter).

Why two stages: torch.argmax reduces each row in one thread block, ~32 us for one 128,256-wide row on an
H100, where reading its 0.5 MB from HBM takes well under a microsecond. Here
  1. one program per (row, chunk of CHUNK columns) reduces its chunk to a (value, column) pair in a
     float32 / int32 scratch [S, num_chunks];
  2. one program per row reduces that row's pairs and writes the column.
CHUNK and both grids depend on the shape only and nothing is read back to the host, so a CUDA graph
can capture the call.
"""

from __future__ import annotations

import torch

from llmx.common.errors import LlmxError
from llmx.kernels._triton_util import (
    FLOAT_DTYPES,
    cdiv,
    check_launch_device,
    interpreter_active,
    jit,
    next_power_of_2,
    sm_count,
    tl,
)

# Columns per stage-1 program, a power of two: at least 4 KiB of float32 (below that, more programs
# only add scheduling and scratch traffic), at most 32 KiB (32 values per thread at 8 warps).
MIN_CHUNK = 1024
MAX_CHUNK = 8192
# Stage 1 aims at this many programs per SM, so one row of a 128K vocabulary still spreads over the GPU.
_PROGRAMS_PER_SM = 4


@jit
def _max_or_first_nan(values, N: tl.constexpr):
    """(value, lane) of the maximum of values [N] float32, the first lane on ties; (NaN, first NaN lane)
    when values holds NaN: torch.argmax's order.

    NaN lanes are kept out of tl.max, whose NaN handling differs between compiled kernels and the
    interpreter.
    """
    lanes = tl.arange(0, N)
    is_nan = values != values
    best_value, best_lane = tl.max(tl.where(is_nan, float("-inf"), values), axis=0, return_indices=True,
                                   return_indices_tie_break_left=True)
    first_nan = tl.min(tl.where(is_nan, lanes, N), axis=0)
    has_nan = first_nan < N
    return tl.where(has_nan, float("nan"), best_value), tl.where(has_nan, first_nan, best_lane)


@jit
def _chunk_argmax_kernel(x_ptr, chunk_value_ptr, chunk_col_ptr, stride_row, num_cols, num_chunks,
                         CHUNK: tl.constexpr):
    row = tl.program_id(0)
    chunk = tl.program_id(1)
    cols = chunk * CHUNK + tl.arange(0, CHUNK)
    # Lanes past the row's end read -inf and come after every real column, so even an all -inf row
    # resolves to a real column.
    values = tl.load(x_ptr + row.to(tl.int64) * stride_row + cols, mask=cols < num_cols, other=float("-inf"))
    value, lane = _max_or_first_nan(values.to(tl.float32), CHUNK)
    tl.store(chunk_value_ptr + row * num_chunks + chunk, value)
    tl.store(chunk_col_ptr + row * num_chunks + chunk, chunk * CHUNK + lane)


@jit
def _row_argmax_kernel(chunk_value_ptr, chunk_col_ptr, out_ptr, num_chunks, CHUNKS_PAD: tl.constexpr):
    # Chunks are in column order, so the first chunk holding the row's maximum (or a NaN) holds the
    # smallest such column. Padding lanes read -inf and come after every real chunk.
    row = tl.program_id(0)
    chunks = tl.arange(0, CHUNKS_PAD)
    valid = chunks < num_chunks
    values = tl.load(chunk_value_ptr + row * num_chunks + chunks, mask=valid, other=float("-inf"))
    cols = tl.load(chunk_col_ptr + row * num_chunks + chunks, mask=valid, other=0)
    _, winner = _max_or_first_nan(values, CHUNKS_PAD)
    col = tl.sum(tl.where(chunks == winner, cols, 0), axis=0)
    tl.store(out_ptr + row, col.to(tl.int64))


def argmax_rows_ref(x: torch.Tensor) -> torch.Tensor:
    """torch.argmax over the last dimension: int64 [S]."""
    return torch.argmax(x, dim=-1)


def choose_chunk(num_rows: int, num_cols: int, num_sms: int) -> int:
    """Stage-1 columns per program: the smallest power of two in [MIN_CHUNK, MAX_CHUNK] that keeps the
    programs near _PROGRAMS_PER_SM per SM (1 x 128,256 -> 1024, 126 programs; 64 x 128,256 -> 8192)."""
    per_program = cdiv(num_rows * num_cols, _PROGRAMS_PER_SM * num_sms)
    return min(max(next_power_of_2(per_program), MIN_CHUNK), MAX_CHUNK)


def argmax_rows(x: torch.Tensor) -> torch.Tensor:
    """Index of the maximum of each row of x [S, V]: int64 [S] (see the module docstring for ties and NaN)."""
    op = "argmax_rows"
    if x.dim() != 2 or x.shape[1] == 0:
        raise LlmxError(f"{op}: x must be [rows, columns] with at least one column, got shape {tuple(x.shape)}.")
    if x.dtype not in FLOAT_DTYPES:
        raise LlmxError(f"{op}: x must be float32/bfloat16/float16, got {x.dtype}.")
    if x.device.type == "cpu" and not interpreter_active():
        return argmax_rows_ref(x)
    device = check_launch_device(op, _chunk_argmax_kernel, x)
    if x.stride(1) != 1:
        x = x.contiguous()
    num_rows, num_cols = x.shape
    out = torch.empty(num_rows, dtype=torch.int64, device=x.device)
    if num_rows == 0:
        return out
    chunk = choose_chunk(num_rows, num_cols, sm_count(device))
    num_chunks = cdiv(num_cols, chunk)
    chunk_values = torch.empty((num_rows, num_chunks), dtype=torch.float32, device=x.device)
    chunk_cols = torch.empty((num_rows, num_chunks), dtype=torch.int32, device=x.device)
    _chunk_argmax_kernel[(num_rows, num_chunks)](
        x, chunk_values, chunk_cols, x.stride(0), num_cols, num_chunks, CHUNK=chunk,
        num_warps=4 if chunk <= 2048 else 8,
    )
    _row_argmax_kernel[(num_rows,)](chunk_values, chunk_cols, out, num_chunks,
                                    CHUNKS_PAD=next_power_of_2(num_chunks), num_warps=1)
    return out
