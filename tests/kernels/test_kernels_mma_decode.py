"""The tensor-core int4 decode kernel (kernels/w4a16_mma_decode.py) against the pure-torch reference.

Interpreted tests (test_interpreted_*) run in a child process with TRITON_INTERPRET=1 in float16 (the interpreter
computes bfloat16 wrongly), where the weights are converted in plain Triton instead of inline PTX: they check the
operand relabelling, split-K's ticketed reduction, the gated epilogue, bias, pre_scale and batches padded to 16, 32
and 64 rows. The GPU tests run the
same cases and Llama-3.1-8B shapes in bfloat16 and float16 through the PTX conversion and w4a16_matmul's dispatch,
repeat split-K launches (also from a CUDA graph) and check that the tile counters are left at zero.
"""

from __future__ import annotations

import pytest
import torch

from helpers.int4_inputs import int4_inputs
from helpers.triton_interpreter import interpreted, run_interpreted_tests, runs_children
from llmx.common.errors import LlmxError
from llmx.kernels import w4a16_dispatch, w4a16_format, w4a16_mma_decode
from llmx.kernels.tuning import TileConfig
from llmx.kernels.w4a16_gemv_gated import w4a16_gemv_gated, w4a16_gemv_gated_ref

hopper = pytest.mark.skipif(
    not torch.cuda.is_available() or torch.cuda.get_device_capability()[0] != 9,
    reason="needs a Hopper GPU (wgmma and packed bf16 arithmetic; run on the device)")


@runs_children
def test_kernels_in_triton_interpreter():
    """Runs this file's test_interpreted_* tests in a fresh process with TRITON_INTERPRET=1."""
    run_interpreted_tests(__file__)


C = TileConfig
CASES = {  # name: (M, N (gated: 2I), K, group size, options, tile config)
    "m1_one_tile": (1, 64, 256, 128, {}, C(16, 64, 128, num_stages=2)),
    "m3_rows_past_n_bias_pre_scale_split2": (3, 100, 512, 128, {"bias": True, "pre_scale": True},
                                             C(16, 64, 128, split_k=2)),
    "m16_block128_split4_group256": (16, 300, 1024, 256, {}, C(16, 128, 128, split_k=4)),
    "m19_default_tiles": (19, 192, 512, 128, {}, None),
    "m5_split_cut_to_divide_k_tiles": (5, 64, 384, 128, {"bias": True}, C(16, 64, 128, split_k=4)),
    "gated_m2_pre_scale_out_scale": (2, 256, 256, 128, {"gated": True, "pre_scale": True, "out_scale": True},
                                     C(16, 64, 128)),
    "gated_m7_split2_bias_odd_halves": (7, 2 * 97, 512, 128, {"gated": True, "bias": True, "out_scale": True},
                                        C(16, 64, 128, split_k=2)),
    "m40_rows_of_32_two_m_tiles_split2": (40, 100, 512, 128, {"bias": True, "pre_scale": True},
                                          C(32, 64, 128, split_k=2)),
    "gated_m64_rows_of_64_split2": (64, 256, 256, 128, {"gated": True, "out_scale": True}, C(64, 64, 128, split_k=2)),
}
TOLERANCE = {torch.float16: 2e-3, torch.bfloat16: 1.2e-2}


def _run_case(name, dtype, device, config="case"):
    """(kernel output, float32 reference) of a CASES entry through launch_w4a16_mma_decode."""
    m, n, k, group, options, cfg = CASES[name]
    x, qweight, scales, bias, pre, out_scale = int4_inputs(m, n, k, group, options, dtype, device)
    cfg = cfg if config == "case" else config
    f32 = [None if t is None else t.float() for t in (x, scales, bias, pre, out_scale)]
    if options.get("gated"):
        out = w4a16_mma_decode.launch_w4a16_mma_decode(x, qweight, scales, group, bias, pre, cfg, gated=True,
                                                       out_scale=out_scale)
        ref = w4a16_gemv_gated_ref(f32[0], qweight, f32[1], group, *f32[2:])
    else:
        out = w4a16_mma_decode.w4a16_mma_decode(x, qweight, scales, group, bias, pre, config=cfg)
        ref = w4a16_format.w4a16_gemm_ref(f32[0], qweight, f32[1], group, f32[2], f32[3])
    assert out.dtype == dtype and out.shape == ref.shape
    return out, ref


def _assert_close(out, ref, dtype, name):
    err = (out.float() - ref).abs().max().item()
    assert err <= TOLERANCE[dtype] * ref.abs().max().item(), f"{name}: max error {err:.3g} of {ref.abs().max():.3g}"


@interpreted
@pytest.mark.parametrize("name", sorted(CASES))
def test_interpreted_cases_float16(name):
    out, ref = _run_case(name, torch.float16, "cpu")
    _assert_close(out, ref, torch.float16, name)


@interpreted
def test_interpreted_split_k_leaves_its_counters_at_zero():
    for _ in range(3):
        _run_case("m3_rows_past_n_bias_pre_scale_split2", torch.float16, "cpu")
    assert int(w4a16_mma_decode._COUNTERS["cpu"].abs().sum()) == 0


@interpreted
def test_interpreted_split_k_sums_equal_one_program_per_tile():
    """Split or not, the same products: the split sums differ from the unsplit ones by float32 reordering only."""
    split, ref = _run_case("m16_block128_split4_group256", torch.float16, "cpu")
    whole, _ = _run_case("m16_block128_split4_group256", torch.float16, "cpu", C(16, 128, 128))
    assert (split.float() - whole.float()).abs().max().item() <= 2e-3 * ref.abs().max().item()


@interpreted
def test_interpreted_unaligned_weight_views_give_the_same_output():
    """A qweight view whose rows do not start on 4-byte boundaries is read through a copy, bit for bit."""
    x, qweight, scales, _, _, _ = int4_inputs(2, 64, 256, 128, {}, torch.float16)
    shifted = torch.cat([torch.zeros(64, 1, dtype=torch.uint8), qweight], dim=1)[:, 1:]
    assert shifted.storage_offset() == 1
    cfg = C(16, 64, 128)
    assert torch.equal(w4a16_mma_decode.w4a16_mma_decode(x, shifted, scales, 128, config=cfg),
                       w4a16_mma_decode.w4a16_mma_decode(x, qweight, scales, 128, config=cfg))


def test_shapes_it_does_not_run_are_refused_with_what_to_call():
    x = torch.randn(65, 256, dtype=torch.float16)
    qweight = torch.zeros(64, 128, dtype=torch.uint8)
    with pytest.raises(LlmxError, match="M <= 64 .* call w4a16_matmul"):
        w4a16_mma_decode.w4a16_mma_decode(x, qweight, torch.ones(64, 2, dtype=torch.float16), 128)
    with pytest.raises(LlmxError, match="multiples of 128"):
        w4a16_mma_decode.w4a16_mma_decode(x[:2], qweight, torch.ones(64, 4, dtype=torch.float16), 64)
    with pytest.raises(LlmxError, match="float16/bfloat16"):
        w4a16_mma_decode.w4a16_mma_decode(x[:2].float(), qweight, torch.ones(64, 2), 128)


def test_dispatch_never_picks_it_off_hopper_or_in_the_interpreter():
    """CPU tensors (the interpreter's) stay on the GEMV; float32 and group 64 never qualify."""
    for dtype, group in ((torch.float16, 128), (torch.float32, 128), (torch.float16, 64)):
        for m in (1, 2):
            assert w4a16_dispatch.int4_kernel(torch.zeros(m, 256, dtype=dtype), group) != "w4a16_mma_decode"
    assert not w4a16_mma_decode.mma_decode_available(torch.float16, "cpu")


@pytest.mark.parametrize("flag, rows, message", [("--m", "1,100", "must lie in 1..64"),
                                                 ("--m", "x", "whole row counts"),
                                                 ("--sweep-m", "0", "--sweep-m '0': every row count")])
def test_benchmark_refuses_bad_row_counts(flag, rows, message):
    import subprocess
    import sys
    from pathlib import Path

    script = Path(__file__).resolve().parents[2] / "measurements" / "kernels_int4_decode.py"
    done = subprocess.run([sys.executable, str(script), flag, rows], capture_output=True, text=True, timeout=120)
    assert done.returncode == 2 and message in done.stderr


def test_profiler_launch_script_refuses_bad_rounds_and_launches_on_a_gpu_only():
    import subprocess
    import sys
    from pathlib import Path

    script = Path(__file__).resolve().parents[2] / "measurements" / "int4_m1_launches.py"
    done = subprocess.run([sys.executable, str(script), "--rounds", "0"], capture_output=True, text=True, timeout=120)
    assert done.returncode == 2 and "give at least 1" in done.stderr
    done = subprocess.run([sys.executable, str(script), "--rounds", "1"], capture_output=True, text=True, timeout=300)
    if torch.cuda.is_available():
        kernels = 3 if torch.cuda.get_device_capability()[0] == 9 else 2
        assert done.returncode == 0 and f"launched {kernels} kernels x 1 rounds" in done.stdout, done.stderr[-2000:]
    else:
        assert done.returncode == 1 and "run it on a machine with a CUDA GPU" in done.stderr


def test_tuned_buckets_time_it_where_the_runtime_launches_it():
    from llmx.kernels import tuning

    assert tuning.bucket_kernels("w4a16", 1, 4096, 128, mma_decode=True) == [("w4a16_gemv", 1)]  # M = 1: GEMV
    assert tuning.bucket_kernels("w4a16", 16, 4096, 128, mma_decode=True) == [("w4a16_mma_decode", 16)]
    assert tuning.bucket_kernels("w4a16", 64, 4096, 128, mma_decode=True) == [("w4a16_mma_decode", 64)]
    assert tuning.bucket_kernels("w4a16", 256, 4096, 128, mma_decode=True) == [("w4a16", 256)]
    assert tuning.bucket_kernels("w4a16", 1, 4096, 64, mma_decode=True) == [("w4a16_gemv", 1)]  # group 64
    assert all(c.block_n >= 64 and c.block_k == 128 for c in tuning.candidate_configs("w4a16_mma_decode", 1))


def test_split_k_is_cut_to_divide_the_k_tiles():
    assert w4a16_mma_decode.mma_decode_config(5, 64, 384, C(16, 64, 128, split_k=4)).split_k == 1
    assert w4a16_mma_decode.mma_decode_config(5, 64, 512, C(16, 64, 128, split_k=8)).split_k == 4


def test_default_tiles_pad_the_batch_to_16_32_or_64_rows():
    assert [w4a16_mma_decode.mma_decode_config(m, 4096, 4096).block_m for m in (2, 16, 17, 32, 33, 64)] == \
        [16, 16, 32, 32, 64, 64]


def test_a_bucket_entry_timed_at_64_rows_pads_fewer_rows_less(monkeypatch):
    """The M = 64 bucket's tuned entry (64-row tiles) also serves M = 17..32: those launch 32-row tiles, with the
    entry's other fields; an override keeps a smaller block_m (two M tiles of 32 for 40 rows)."""
    from llmx.kernels import tuning

    tuned = C(64, 128, 128, split_k=2, num_stages=3)
    monkeypatch.setattr(tuning, "_TUNED", {"w4a16_mma_decode": {tuning.shape_key(64, 4096, 4096): tuned}})
    assert [w4a16_mma_decode.mma_decode_config(m, 4096, 4096) for m in (20, 32, 33, 64)] == \
        [tuned.replace(block_m=32)] * 2 + [tuned] * 2
    assert w4a16_mma_decode.mma_decode_config(40, 4096, 4096, C(32, 64, 128)).block_m == 32


# on the GPU

@hopper
@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("name", sorted(CASES))
def test_gpu_cases(name, dtype):
    out, ref = _run_case(name, dtype, "cuda")
    _assert_close(out, ref, dtype, name)


@hopper
@pytest.mark.gpu
@pytest.mark.parametrize("shape", [(6144, 4096), (4096, 14336), (128256, 4096)], ids=str)
@pytest.mark.parametrize("m", [2, 4, 16, 24, 64])
def test_gpu_llama_shapes_through_the_dispatch_bf16(shape, m):
    n, k = shape
    x, qweight, scales, _, pre, _ = int4_inputs(m, n, k, 128, {"pre_scale": True}, torch.bfloat16, "cuda", seed=m)
    assert w4a16_dispatch.int4_kernel(x, 128) == "w4a16_mma_decode"
    out = w4a16_dispatch.w4a16_matmul(x, qweight, scales, 128, None, pre)
    ref = w4a16_format.w4a16_gemm_ref(x.float(), qweight, scales.float(), 128, None, pre.float())
    _assert_close(out, ref, torch.bfloat16, f"{shape} M={m}")


@hopper
@pytest.mark.gpu
@pytest.mark.parametrize("m", [2, 8, 48])
def test_gpu_gated_dispatch_llama_gate_up_bf16(m):
    x, qweight, scales, _, _, out_scale = int4_inputs(m, 28672, 4096, 128, {"out_scale": True}, torch.bfloat16, "cuda")
    out = w4a16_gemv_gated(x, qweight, scales, 128, None, None, out_scale)
    ref = w4a16_gemv_gated_ref(x.float(), qweight, scales.float(), 128, None, None, out_scale.float())
    _assert_close(out, ref, torch.bfloat16, f"gate_up M={m}")


@hopper
@pytest.mark.gpu
def test_gpu_split_k_is_race_free_and_graph_safe():
    """200 back-to-back split-K launches (eager, then replayed from a CUDA graph, with PDL as the runtime
    launches) give the first launch's output bit for bit, and leave every counter at zero."""
    n, k = 4096, 4096
    x, qweight, scales, _, _, _ = int4_inputs(1, n, k, 128, {}, torch.bfloat16, "cuda", seed=3)
    cfg = C(16, 64, 128, split_k=8)
    first = w4a16_mma_decode.w4a16_mma_decode(x, qweight, scales, 128, config=cfg)
    outs = [w4a16_mma_decode.w4a16_mma_decode(x, qweight, scales, 128, config=cfg) for _ in range(100)]
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        graph_out = [w4a16_mma_decode.w4a16_mma_decode(x, qweight, scales, 128, config=cfg) for _ in range(20)]
    for _ in range(5):
        graph.replay()
    torch.cuda.synchronize()
    assert all(torch.equal(o, first) for o in outs + graph_out)
    assert int(w4a16_mma_decode._COUNTERS[str(x.device)].abs().sum()) == 0
