"""The gated int4 GEMV (kernels/w4a16_gemv_gated.py): silu(gate) * up in the gate_up GEMV.

Interpreted tests (test_interpreted_*) run in a child process with TRITON_INTERPRET=1, in float32 and float16
(the interpreter computes bfloat16 wrongly); the GPU tests run the same cases and the Llama-3.1-8B gate_up
shape in bfloat16. Without out_scale the kernel must be bit-identical to the two kernels it replaces (the
GEMV into a [M, 2I] buffer, then silu_and_mul); with it, close to the reference.
"""

from __future__ import annotations

import pytest
import torch

from helpers.int4_inputs import int4_inputs
from helpers.triton_interpreter import interpreted, needs_cuda, run_interpreted_tests, runs_children, without_mma_decode
from llmx.common.errors import LlmxError
from llmx.kernels import activation, w4a16_gemv
from llmx.kernels.tuning import TileConfig
from llmx.kernels.w4a16_gemv_gated import w4a16_gemv_gated, w4a16_gemv_gated_ref



@pytest.fixture(autouse=True)
def _gemv_not_mma_decode(without_mma_decode):
    """This file tests the kernels w4a16_matmul dispatched to before the tensor-core decode kernel."""

@runs_children
def test_kernels_in_triton_interpreter():
    """Runs this file's test_interpreted_* tests in a fresh process with TRITON_INTERPRET=1."""
    run_interpreted_tests(__file__)


C = TileConfig
CASES = {  # name: (M, I (half of N), K, group size, options, tile config; None = the default)
    "m1_halves_of_16": (1, 97, 256, 128, {}, C(16, 32, 256)),
    "m2_bias_out_scale_split_refused": (2, 97, 256, 32, {"bias": True, "out_scale": True}, C(16, 32, 64, split_k=2)),
    "m3_halves_of_8_k_tail": (3, 40, 1152, 64, {"pre_scale": True}, C(16, 16, 256)),
    "m4_out_scale_default_config": (4, 300, 512, 128, {"out_scale": True}, None),
}
DTYPES = {"float32": (torch.float32, 2e-5), "float16": (torch.float16, 4e-3), "bfloat16": (torch.bfloat16, 1.6e-2)}


def _inputs(m, inter, k, group, options, dtype, device="cpu", seed=0):
    """(x, qweight, scales, bias, pre_scale, out_scale) for a [gate | up] weight of 2 * inter rows."""
    return int4_inputs(m, 2 * inter, k, group, options, dtype, device, seed)


def _check_case(name: str, dtype: torch.dtype, rel: float, device: str) -> None:
    m, inter, k, group, options, cfg = CASES[name]
    x, qweight, scales, bias, pre, out_scale = _inputs(m, inter, k, group, options, dtype, device)
    out = w4a16_gemv_gated(x, qweight, scales, group, bias, pre, out_scale, config=cfg)
    f32 = [None if t is None else t.float() for t in (x, scales, bias, pre, out_scale)]
    ref = w4a16_gemv_gated_ref(f32[0], qweight, f32[1], group, *f32[2:])
    assert out.dtype == dtype and out.shape == (m, inter)
    err = (out.float() - ref).abs().max().item()
    assert err <= rel * ref.abs().max().item() + 1e-5, f"max error {err:.3g}"
    # The two kernels it replaces: the GEMV with a 16-bit output, then silu_and_mul (then the scale).
    plain_cfg = None if cfg is None else cfg.replace(split_k=1)
    unfused = activation.silu_and_mul(w4a16_gemv.w4a16_gemv(x, qweight, scales, group, bias, pre, config=plain_cfg))
    if out_scale is None:
        assert torch.equal(out, unfused)
    else:
        expected = (unfused.float() * out_scale.float()).to(dtype)
        # One rounding fewer than silu_and_mul then a scaled copy: at most one step of the dtype apart.
        assert ((out.float() - expected.float()).abs() <= expected.float().abs() * 2 * torch.finfo(dtype).eps).all()


@interpreted
@pytest.mark.parametrize("dtype", ["float32", "float16"])
@pytest.mark.parametrize("name", CASES)
def test_interpreted_gated_gemv_matches_reference_and_the_unfused_kernels(name, dtype):
    _check_case(name, *DTYPES[dtype], "cpu")


def test_gated_gemv_refuses_what_it_does_not_run():
    x, qweight, scales, _, _, out_scale = _inputs(1, 16, 64, 32, {"out_scale": True}, torch.float32)
    with pytest.raises(LlmxError, match="even number of rows"):
        w4a16_gemv_gated_ref(x, qweight[:31], scales[:31], 32)
    with pytest.raises(LlmxError, match=r"out_scale must have shape \[N / 2\] = \[16\]"):
        w4a16_gemv_gated_ref(x, qweight, scales, 32, out_scale=out_scale[:8])
    with pytest.raises(LlmxError, match="run w4a16_matmul and silu_and_mul instead"):
        w4a16_gemv_gated(torch.randn(5, 64), qweight, scales, 32)
    assert w4a16_gemv_gated_ref(torch.randn(5, 64), qweight, scales, 32).shape == (5, 16)  # any M


def test_gated_reference_is_gemm_then_activation_then_scale():
    x, qweight, scales, bias, _, out_scale = _inputs(2, 16, 64, 32, {"bias": True, "out_scale": True}, torch.float32)
    from llmx.kernels.w4a16_format import w4a16_gemm_ref

    y = w4a16_gemm_ref(x, qweight, scales, 32, bias)
    expected = torch.nn.functional.silu(y[:, :16]) * y[:, 16:] * out_scale
    assert torch.equal(w4a16_gemv_gated_ref(x, qweight, scales, 32, bias, None, out_scale), expected)


# ---------------------------------------------------------------------------------------------------
# on the GPU (bfloat16)


@needs_cuda
@pytest.mark.gpu
@pytest.mark.parametrize("name", CASES)
def test_gpu_gated_gemv_cases_bf16(name):
    _check_case(name, *DTYPES["bfloat16"], "cuda")


@needs_cuda
@pytest.mark.gpu
@pytest.mark.parametrize("m", [1, 2, 4])
def test_gpu_gated_gemv_llama_gate_up_bf16(m):
    x, qweight, scales, _, _, _ = _inputs(m, 14336, 4096, 128, {}, torch.bfloat16, "cuda", seed=m)
    out = w4a16_gemv_gated(x, qweight, scales, 128)
    assert torch.equal(out, activation.silu_and_mul(w4a16_gemv.w4a16_gemv(x, qweight, scales, 128)))
