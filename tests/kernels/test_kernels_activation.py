"""silu_and_mul (SwiGLU's activation): the reference against transformers' LlamaMLP arithmetic, the
Triton kernel against the reference under Triton's CPU interpreter (child process) and on a GPU."""

from __future__ import annotations

import pytest
import torch

from llmx.common.errors import LlmxError
from llmx.kernels import activation
from helpers.triton_interpreter import interpreted, needs_cuda, run_interpreted_tests, runs_children


@runs_children
def test_kernels_in_triton_interpreter():
    """Runs this file's test_interpreted_* tests in a fresh process with TRITON_INTERPRET=1."""
    run_interpreted_tests(__file__)


def _rand(*shape, dtype=torch.float32, seed=0) -> torch.Tensor:
    return (torch.randn(*shape, generator=torch.Generator().manual_seed(seed)) * 3).to(dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_reference_is_silu_of_gate_times_up(dtype):
    x = _rand(5, 2 * 24, dtype=dtype)
    gate, up = x[:, :24], x[:, 24:]
    # transformers' LlamaMLP: act_fn(gate_proj(x)) * up_proj(x), in the model dtype.
    assert torch.equal(activation.silu_and_mul_ref(x), torch.nn.functional.silu(gate) * up)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("tokens,intermediate", [(1, 64), (7, 96), (3, 1500), (33, 2048)])
@interpreted
def test_interpreted_silu_and_mul_matches_reference(tokens, intermediate, dtype):
    x = _rand(tokens, 2 * intermediate, dtype=dtype)
    out = activation.silu_and_mul(x)
    tol = dict(atol=1e-5, rtol=1e-5) if dtype == torch.float32 else dict(atol=2e-3, rtol=2e-3)
    torch.testing.assert_close(out, activation.silu_and_mul_ref(x), **tol)
    assert out.shape == (tokens, intermediate) and out.dtype == dtype


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("tokens,intermediate", [(1, 64), (7, 96), (3, 1500)])
@interpreted
def test_interpreted_gelu_tanh_and_mul_matches_reference(tokens, intermediate, dtype):
    x = _rand(tokens, 2 * intermediate, dtype=dtype) * 3  # reach both tails of the tanh
    out = activation.gelu_tanh_and_mul(x)
    tol = dict(atol=1e-5, rtol=1e-5) if dtype == torch.float32 else dict(atol=4e-3, rtol=4e-3)
    torch.testing.assert_close(out, activation.gelu_tanh_and_mul_ref(x), **tol)
    assert out.shape == (tokens, intermediate) and out.dtype == dtype
    assert not torch.allclose(out.float(), activation.silu_and_mul_ref(x).float(), atol=1e-2)


def test_rejects_odd_width_and_integer_input():
    with pytest.raises(LlmxError, match="2 \\* intermediate"):
        activation.silu_and_mul_ref(torch.zeros(2, 7))
    with pytest.raises(LlmxError, match="float16/bfloat16/float32"):
        activation.silu_and_mul_ref(torch.zeros(2, 8, dtype=torch.int32))


@needs_cuda
@pytest.mark.gpu
@pytest.mark.parametrize("tokens", [1, 256, 4097])
def test_gpu_silu_and_mul_matches_reference_bf16(tokens):
    x = _rand(tokens, 2 * 14336, dtype=torch.bfloat16).cuda()
    torch.testing.assert_close(activation.silu_and_mul(x), activation.silu_and_mul_ref(x), atol=1e-2, rtol=1.6e-2)
    torch.testing.assert_close(activation.gelu_tanh_and_mul(x), activation.gelu_tanh_and_mul_ref(x), atol=1e-2,
                               rtol=1.6e-2)
