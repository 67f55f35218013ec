"""W4A16 GEMV (kernels/w4a16_gemv.py): the kernel against w4a16_gemm_ref, w4a16_matmul's dispatch to it, and
its tile tuning entries.

The kernel tests (test_interpreted_*) run in a child pytest process with TRITON_INTERPRET=1 (see
helpers/triton_interpreter.py). Their cases cover M = 1..4, N not a multiple of the tile (and below it), K of
one or several tiles with and without a tail, group sizes 32, 64, 128 and 96 (not a power of two), both ways
of reading scales (a block of whole groups per tile, or one per word), bias, pre_scale, split-K, and inputs
that are strided or not 4-byte aligned, in float32, float16 and bfloat16 (the kernel handles 16-bit values
with integer bit operations, which the interpreter runs exactly). The same cases and the Llama-3.1-8B shapes
run in bfloat16 on a CUDA GPU (skipped without one).
"""

from __future__ import annotations

import json

import pytest
import torch

from helpers.int4_inputs import int4_inputs
from helpers.triton_interpreter import (IN_INTERPRETER, interpreted, needs_cuda, run_interpreted_tests, runs_children,
                                       without_mma_decode)
from llmx.common.errors import LlmxError
from llmx.kernels import tuning, w4a16_dispatch, w4a16_format, w4a16_gemv
from llmx.kernels.tuning import TileConfig



@pytest.fixture(autouse=True)
def _gemv_not_mma_decode(without_mma_decode):
    """This file tests the kernels w4a16_matmul dispatched to before the tensor-core decode kernel."""

@runs_children
def test_kernels_in_triton_interpreter():
    """Runs this file's test_interpreted_* tests in a fresh process with TRITON_INTERPRET=1."""
    run_interpreted_tests(__file__)


C = TileConfig
CASES = {  # name: (M, N, K, group size, options, tile config; None = the default)
    "m1_whole_groups": (1, 97, 256, 128, {}, C(16, 32, 256)),
    "m2_bias_pre_scale_split2": (2, 300, 256, 32, {"bias": True, "pre_scale": True}, C(16, 128, 64, split_k=2)),
    "m3_k_tail_split3": (3, 97, 1152, 64, {"bias": True}, C(16, 64, 256, split_k=3)),
    "m4_scale_per_word": (4, 300, 1152, 128, {"pre_scale": True}, C(16, 128, 128, num_warps=2)),
    "m1_group96_tail_split2": (1, 97, 1152, 96, {"bias": True, "pre_scale": True}, C(16, 32, 512, split_k=2)),
    "m4_default_config_k64": (4, 97, 64, 32, {}, None),
    "m2_strided_unaligned_inputs": (2, 97, 256, 64, {"pre_scale": True, "unaligned": True}, C(16, 32, 128)),
}
DTYPES = {"float32": (torch.float32, 2e-5), "float16": (torch.float16, 4e-3), "bfloat16": (torch.bfloat16, 1.6e-2)}
LLAMA_SHAPES = {"qkv": (6144, 4096), "o": (4096, 4096), "gate_up": (28672, 4096), "down": (4096, 14336)}


def _inputs(m, n, k, group, options, dtype, device="cpu", seed=0):
    """(x, qweight, scales, bias, pre_scale): every nibble value, -8 included; positive group scales."""
    x, qweight, scales, bias, pre, _ = int4_inputs(m, n, k, group, options, dtype, seed=seed)
    if options.get("unaligned"):
        # Views the kernel cannot read as int32 words directly: odd byte offsets and a column stride.
        qweight = torch.cat([torch.zeros(n, 1, dtype=torch.uint8), qweight], dim=1)[:, 1:]
        scales = torch.cat([scales[:, :1], scales], dim=1)[:, 1:]
        pre = torch.cat([pre[:1], pre])[1:]
        x = x.t().contiguous().t()
        assert qweight.storage_offset() == 1 and x.stride(1) != 1
    to = dict(device=device)
    return (x.to(**to), qweight.to(**to), scales.to(**to), None if bias is None else bias.to(**to),
            None if pre is None else pre.to(**to))


def _check_against_reference(out, x, qweight, scales, group, bias, pre, rel):
    """`out` against w4a16_gemm_ref computed in float32 from the same inputs."""
    ref = w4a16_format.w4a16_gemm_ref(x.float(), qweight, scales.float(), group,
                                     None if bias is None else bias.float(), None if pre is None else pre.float())
    assert out.dtype == x.dtype and out.shape == ref.shape
    err = (out.float() - ref).abs().max().item()
    tol = rel * ref.abs().max().item() + 1e-5
    assert err <= tol, f"max error {err:.3g} > {tol:.3g}"


@interpreted
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("name", CASES)
def test_interpreted_gemv_matches_reference(name, dtype):
    m, n, k, group, options, cfg = CASES[name]
    act, rel = DTYPES[dtype]
    x, qweight, scales, bias, pre = _inputs(m, n, k, group, options, act)
    out = w4a16_gemv.w4a16_gemv(x, qweight, scales, group, bias, pre, config=cfg)
    _check_against_reference(out, x, qweight, scales, group, bias, pre, rel)


def _relative_error_to_exact(out, x, qweight, scales, group, pre):
    """max |out - exact| / max |exact|, exact = the format's product in float64 from the same 16-bit inputs."""
    xd = x.double() * (1.0 if pre is None else pre.double())
    exact = xd @ w4a16_format.dequantize_int4(qweight, scales.double(), group, torch.float64).T
    return ((out.double() - exact).abs().max() / exact.abs().max()).item()


@interpreted
@pytest.mark.parametrize("m", [1, 2])
def test_interpreted_folded_offset_loop_stays_within_fp16_rounding(m):
    """The folded-offset loop (M <= 2, 16-bit activations) gives up float32 bits to save the subtract; its error
    must stay below one fp16 rounding of the largest output (2^-11). The same inputs in float32 run the exact
    subtract loop, which must agree with the folded one to that rounding."""
    n, k = 64, 4096
    x, qweight, scales, _, pre = _inputs(m, n, k, 128, {"pre_scale": m == 2}, torch.float16, seed=m)
    x = x * 4  # activations of a few units: the offset part of the products grows with them
    assert w4a16_gemv.folds_offset(m, torch.float16) and not w4a16_gemv.folds_offset(m, torch.float32)
    folded = w4a16_gemv.w4a16_gemv(x, qweight, scales, 128, None, pre)
    exact_loop = w4a16_gemv.w4a16_gemv(x.float(), qweight, scales, 128, None, None if pre is None else pre.float())
    assert _relative_error_to_exact(folded, x, qweight, scales, 128, pre) <= 2.0 ** -11
    assert (folded.float() - exact_loop).abs().max() <= 2.0 ** -11 * exact_loop.abs().max()


@interpreted
def test_interpreted_w4a16_matmul_hands_decode_rows_to_the_gemv(monkeypatch):
    calls = []

    def recording(*args, **kwargs):
        calls.append(args[0].shape[0])
        return gemv(*args, **kwargs)

    gemv = w4a16_gemv.launch_w4a16_gemv
    monkeypatch.setattr(w4a16_gemv, "launch_w4a16_gemv", recording)
    for m, k, group in ((1, 64, 32), (4, 64, 32), (5, 64, 32), (2, 36, 4), (3, 64, 4)):
        x, qweight, scales, bias, pre = _inputs(m, 40, k, group, {"bias": True}, torch.float32)
        calls.clear()
        out = w4a16_dispatch.w4a16_matmul(x, qweight, scales, group, bias, pre)
        assert calls == ([m] if tuning.w4a16_uses_gemv(m, k, group) else []), (m, k, group)
        # M = 5, K % 8 != 0 and group size 4 run the tensor-core kernel, still matching the reference.
        _check_against_reference(out, x, qweight, scales, group, bias, pre, 2e-5)
    assert [tuning.w4a16_uses_gemv(m, k, g) for m, k, g in ((4, 64, 32), (5, 64, 32), (2, 36, 4), (3, 64, 4))] == \
        [True, False, False, False]


def test_gemv_refuses_what_it_does_not_run():
    x = torch.randn(5, 64)
    qweight, scales = w4a16_format.quantize_int4_ref(torch.randn(16, 64), 32)
    with pytest.raises(LlmxError, match="w4a16_gemv takes M <= 4 .*call w4a16_matmul"):
        w4a16_gemv.w4a16_gemv(x, qweight, scales, 32)
    qweight, scales = w4a16_format.quantize_int4_ref(torch.randn(16, 64), 4)
    with pytest.raises(LlmxError, match="group_size % 8"):
        w4a16_gemv.w4a16_gemv(x[:1], qweight, scales, 4)
    with pytest.raises(LlmxError, match="qweight must be uint8"):
        w4a16_gemv.w4a16_gemv(x[:1], qweight[:, :8], scales, 4)
    with pytest.raises(LlmxError, match="tune w4a16"):
        w4a16_gemv.w4a16_gemv_tuning_case(16, 64, 64, "cpu", 32)


# ---------------------------------------------------------------------------------------------------
# tuning


@pytest.mark.parametrize("shape", LLAMA_SHAPES)
def test_gemv_default_config_is_a_candidate_and_fills_the_gpu(shape):
    n, k = LLAMA_SHAPES[shape]
    for m in (1, 4):
        cfg = tuning.default_config("w4a16_gemv", m, n, k)
        assert cfg in tuning.candidate_configs("w4a16_gemv", m)
        assert -(-n // cfg.block_n) * cfg.split_k >= tuning.sm_count()  # 132 SMs here: every one gets a tile
        assert k % (cfg.block_k * cfg.split_k) == 0  # no masked tail on the real shapes
    # A tensor-parallel shard with few rows splits K instead.
    assert tuning.default_config("w4a16_gemv", 1, 512, 4096).split_k > 1


def test_gemv_candidates_keep_accumulators_in_registers():
    def rows_per_thread(cfg):
        return cfg.block_n * cfg.block_k // (1024 * cfg.num_warps)

    one, four = tuning.candidate_configs("w4a16_gemv", 1), tuning.candidate_configs("w4a16_gemv", 4)
    assert {rows_per_thread(c) for c in one} == {4, 8} and {rows_per_thread(c) for c in four} == {4}
    assert set(four) < set(one) and len(set(one)) == len(one)


def test_bucket_kernels_route_w4a16_decode_buckets_to_the_gemv():
    assert tuning.GEMV_MAX_M < tuning.M_BUCKETS[1]  # M = 2..GEMV_MAX_M share the M = 16 bucket
    assert tuning.bucket_kernels("w4a16", 1, 4096, 128) == [("w4a16_gemv", 1)]
    assert tuning.bucket_kernels("w4a16", 16, 4096, 128) == [("w4a16_gemv", 4), ("w4a16", 16)]
    assert tuning.bucket_kernels("w4a16", 64, 4096, 128) == [("w4a16", 64)]
    # Where w4a16_matmul keeps the tensor-core kernel, and other kernels: unchanged.
    assert tuning.bucket_kernels("w4a16", 1, 4096, 4) == [("w4a16", 1)]
    assert tuning.bucket_kernels("w4a16", 1, 36, 4) == [("w4a16", 1)]
    assert tuning.bucket_kernels("w4a8", 1, 4096, 128) == [("w4a8", 1)]
    assert tuning.bucket_kernels("int8", 16, 4096) == [("int8", 16)]


def test_tuned_gemv_entries_serve_their_rows():
    one, four = TileConfig(16, 32, 512, num_warps=2), TileConfig(16, 64, 256, num_warps=4, num_stages=3)
    tc = TileConfig(16, 64, 128)
    table = {"format": tuning.TABLE_FORMAT, "version": tuning.TABLE_VERSION, "kernels": {
        "w4a16_gemv": {tuning.shape_key(1, 4096, 4096): one.to_dict(), tuning.shape_key(4, 4096, 4096): four.to_dict()},
        "w4a16": {tuning.shape_key(16, 4096, 4096): tc.to_dict()}}}
    tuning.load_tuned(json.loads(json.dumps(table)))
    try:
        assert tuning.gemm_config("w4a16_gemv", 1, 4096, 4096) == one
        assert [tuning.gemm_config("w4a16_gemv", m, 4096, 4096) for m in (2, 3, 4)] == [four] * 3
        assert tuning.gemm_config("w4a16", 9, 4096, 4096) == tc
    finally:
        tuning.load_tuned(None)


# ---------------------------------------------------------------------------------------------------
# on the GPU (bfloat16)


@needs_cuda
@pytest.mark.gpu
@pytest.mark.parametrize("name", CASES)
def test_gpu_gemv_cases_bf16(name):
    m, n, k, group, options, cfg = CASES[name]
    x, qweight, scales, bias, pre = _inputs(m, n, k, group, options, torch.bfloat16, "cuda")
    out = w4a16_gemv.w4a16_gemv(x, qweight, scales, group, bias, pre, config=cfg)
    _check_against_reference(out, x, qweight, scales, group, bias, pre, 1.6e-2)


@needs_cuda
@pytest.mark.gpu
@pytest.mark.parametrize("m", [1, 2, 3, 4])
@pytest.mark.parametrize("shape", LLAMA_SHAPES)
def test_gpu_gemv_llama_shapes_bf16(shape, m):
    n, k = LLAMA_SHAPES[shape]
    x, qweight, scales, _, pre = _inputs(m, n, k, 128, {"pre_scale": m % 2 == 0}, torch.bfloat16, "cuda", seed=m)
    out = w4a16_dispatch.w4a16_matmul(x, qweight, scales, 128, None, pre)  # through the dispatch, default tiles
    assert torch.equal(out, w4a16_gemv.w4a16_gemv(x, qweight, scales, 128, None, pre))
    _check_against_reference(out, x, qweight, scales, 128, None, pre, 1.6e-2)


@needs_cuda
@pytest.mark.gpu
def test_gpu_autotune_gemv_returns_a_loadable_table():
    table = tuning.autotune("w4a16_gemv", [(256, 256)], [1, 4],
                            candidates=lambda kernel, m: tuning.candidate_configs(kernel, m)[:3])
    json.dumps(table)
    tuning.load_tuned(table)
    try:
        for m in (1, 4):
            tuned = TileConfig.from_dict(table["kernels"]["w4a16_gemv"][tuning.shape_key(m, 256, 256)])
            assert tuning.gemm_config("w4a16_gemv", m, 256, 256) == tuned
    finally:
        tuning.load_tuned(None)


@needs_cuda
@pytest.mark.gpu
@pytest.mark.parametrize("m", [1, 2])
def test_gpu_folded_offset_loop_is_as_close_as_the_subtract_loop_bf16(m):
    """On the GPU (fused multiply-adds) too, the folded-offset loop's bf16 outputs stay within a bf16 rounding
    of the exact subtract loop's (the same inputs in float32), and within half a bf16 step (2^-8) of the largest
    exact output."""
    n, k = LLAMA_SHAPES["down"]
    x, qweight, scales, _, pre = _inputs(m, n, k, 128, {"pre_scale": True}, torch.bfloat16, "cuda", seed=m)
    folded = w4a16_gemv.w4a16_gemv(x, qweight, scales, 128, None, pre)
    subtracted = w4a16_gemv.w4a16_gemv(x.float(), qweight, scales, 128, None, pre.float())
    assert (folded.float() - subtracted).abs().max() <= 2.0 ** -8 * subtracted.abs().max()
    assert _relative_error_to_exact(folded, x, qweight, scales, 128, pre) <= 2.0 ** -8


@pytest.mark.skipif(IN_INTERPRETER, reason="compiles for sm_90; the interpreter process does not")
def test_folded_offset_compiles_to_a_shorter_k_loop_at_one_row():
    """The reason for the folded-offset loop: compiled for sm_90 here (no GPU needed) with the installed triton,
    its K loop at M = 1 must stay clearly shorter than the subtract loop's (445 against 522 instructions with
    triton 3.6), and it must have no subtract per weight left."""
    import re
    import subprocess
    import sys
    from pathlib import Path

    pytest.importorskip("triton")
    script = Path(__file__).resolve().parents[2] / "measurements" / "gemv_sass.py"
    counts = {}
    for subtract in (False, True):
        done = subprocess.run([sys.executable, str(script), "--rows", "1"] + ["--subtract-offset"] * subtract,
                              capture_output=True, text=True, timeout=300)
        assert done.returncode == 0, done.stderr[-3000:]
        counts[subtract] = {op: int(n) for op, n in re.findall(r"^  (\w+)\s+(\d+)\s", done.stdout, re.M)}
        total = int(re.search(r"K loop: (\d+) instructions", done.stdout).group(1))
        assert total == sum(counts[subtract].values()), done.stdout
    folded, subtracted = (sum(counts[flag].values()) for flag in (False, True))
    assert folded <= 0.92 * subtracted, (folded, subtracted)
    weights = 16 * 1024 // 128  # per thread and iteration: block_n * block_k / threads
    assert counts[False].get("FADD", 0) <= weights // 8 < counts[True].get("FADD", 0), counts
