"""argmax_rows (the greedy sampler's row argmax) against torch.argmax: in Triton's interpreter on CPU
(test_interpreted_*, run in a child process started with TRITON_INTERPRET=1, as in
test_kernels_attention.py), and compiled on a CUDA GPU (skipped on CPU-only machines)."""

from __future__ import annotations

import pytest
import torch

from llmx.common.errors import LlmxError
from llmx.kernels import argmax
from helpers.triton_interpreter import IN_INTERPRETER, interpreted, needs_cuda, run_interpreted_tests, runs_children

NAN, INF = float("nan"), float("inf")


@runs_children
def test_kernels_in_triton_interpreter():
    """Runs this file's test_interpreted_* tests in a fresh process with TRITON_INTERPRET=1."""
    run_interpreted_tests(__file__)


def _random_rows(rows: int, cols: int, dtype: torch.dtype, seed: int) -> torch.Tensor:
    return torch.randn(rows, cols, generator=torch.Generator().manual_seed(seed)).to(dtype)


def _special_rows(cols: int) -> torch.Tensor:
    """Rows whose answer depends on the tie, -inf and NaN rules, with the deciding columns in
    different chunks (MIN_CHUNK columns each)."""
    chunk = argmax.MIN_CHUNK
    x = _random_rows(7, cols, torch.float32, seed=1)
    x[0] = -INF  # all -inf: column 0
    x[1, [chunk + 5, 40, 2 * chunk]] = 100.0  # a three-way tie across chunks: the first column
    x[2, [chunk + 3, chunk + 9]] = 100.0  # a tie inside one chunk
    x[3, [2 * chunk + 1, chunk + 2]] = NAN  # NaN beats every number, the first NaN wins
    x[3, 0] = INF
    x[4] = NAN  # all NaN: column 0
    x[5, cols - 1] = 100.0  # the maximum in the last, partial chunk
    x[6, : cols - 1] = -INF  # only the last column is finite
    return x


@pytest.mark.parametrize("rows,cols,dtype", [(1, 3000, torch.float32), (5, 2500, torch.float16),
                                             (5, 300, torch.float32), (1, 1, torch.float32)])
@interpreted
def test_interpreted_argmax_matches_torch_on_random_rows(rows, cols, dtype):
    x = _random_rows(rows, cols, dtype, seed=rows * cols)
    out = argmax.argmax_rows(x)
    assert out.dtype == torch.int64 and out.shape == (rows,)
    assert torch.equal(out, torch.argmax(x, dim=-1))


@interpreted
def test_interpreted_argmax_follows_torch_on_ties_inf_and_nan():
    x = _special_rows(2500)
    expected = torch.tensor([0, 40, argmax.MIN_CHUNK + 3, argmax.MIN_CHUNK + 2, 0, 2499, 2499])
    assert torch.equal(torch.argmax(x, dim=-1), expected)  # the rules as torch states them
    assert torch.equal(argmax.argmax_rows(x), expected)


@interpreted
def test_interpreted_argmax_reads_rows_through_their_stride():
    wide = _random_rows(5, 3000, torch.float32, seed=2)
    logits = wide[:, 100:2600]  # rows 3000 apart, as a slice of a wider buffer
    assert torch.equal(argmax.argmax_rows(logits), torch.argmax(logits, dim=-1))


@pytest.mark.skipif(IN_INTERPRETER, reason="CPU tensors run the kernels under the interpreter")
def test_cpu_tensors_take_torch_argmax_and_bad_inputs_raise():
    x = _special_rows(2500)
    assert torch.equal(argmax.argmax_rows(x), torch.argmax(x, dim=-1))
    with pytest.raises(LlmxError, match="rows, columns"):
        argmax.argmax_rows(x[0])
    with pytest.raises(LlmxError, match="float32"):
        argmax.argmax_rows(x.to(torch.int32))


def test_chunk_size_spreads_one_row_over_the_gpu_and_caps_large_batches():
    assert argmax.choose_chunk(1, 128256, 132) == argmax.MIN_CHUNK
    assert argmax.choose_chunk(8, 128256, 132) == 2048
    assert argmax.choose_chunk(256, 128256, 132) == argmax.MAX_CHUNK


# ----------------------------------------------------------------------------------------------------
# Compiled kernels on a GPU: evidence for the device run, skipped on CPU.
# ----------------------------------------------------------------------------------------------------


@needs_cuda
@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("rows,cols", [(1, 128256), (5, 128256), (64, 128256), (1024, 32000), (3, 262144),
                                       (7, 1000)])
def test_gpu_argmax_matches_torch(rows, cols, dtype):
    # bf16 logits tie often (8 bits of mantissa): the tie rule is exercised on real rows too.
    x = torch.randn(rows, cols, device="cuda").to(dtype)
    assert torch.equal(argmax.argmax_rows(x), torch.argmax(x, dim=-1))


@needs_cuda
@pytest.mark.gpu
def test_gpu_argmax_follows_torch_on_ties_inf_and_nan():
    x = _special_rows(128256).cuda()
    assert torch.equal(argmax.argmax_rows(x), torch.argmax(x, dim=-1))


@needs_cuda
@pytest.mark.gpu
def test_gpu_argmax_replays_in_a_cuda_graph():
    x = torch.randn(64, 128256, device="cuda")
    argmax.argmax_rows(x)  # compile outside the capture
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = argmax.argmax_rows(x)
    for seed in range(3):
        x.copy_(torch.randn(64, 128256, generator=torch.Generator().manual_seed(seed)))
        graph.replay()
        assert torch.equal(out, torch.argmax(x, dim=-1))
