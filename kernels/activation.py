"""SwiGLU's activation in one pass: silu(gate) * up from the fused gate|up projection's output (and Gemma's
gelu_tanh(gate) * up, the same kernel with GELU_TANH set).

The MLP's gate_up projection returns x [T, 2 * I] = [gate | up]; `silu_and_mul(x)` returns
silu(gate) * up [T, I]. In torch that is two elementwise kernels and a [T, I] intermediate in memory
(silu, then mul); at decode sizes each is a separate few-microsecond launch, per layer.

Numerics follow `torch.nn.functional.silu(gate) * up` in the activation dtype (what transformers
computes): silu in float32 rounded to the activation dtype, then the product rounded once more.
"""

from __future__ import annotations

import torch

from llmx.common.errors import LlmxError
from llmx.kernels._triton_util import FLOAT_DTYPES, check_launch_device, jit, next_power_of_2, tl
from llmx.kernels.pdl import pdl_launch, wait_and_release

_BLOCK = 1024


def _check(x: torch.Tensor) -> None:
    if x.dim() != 2 or x.shape[1] % 2:
        raise LlmxError(f"silu_and_mul: x must be [tokens, 2 * intermediate], got shape {tuple(x.shape)}.")
    if x.dtype not in FLOAT_DTYPES:
        raise LlmxError(f"silu_and_mul: x must be float16/bfloat16/float32, got {x.dtype}.")


def silu_and_mul_ref(x: torch.Tensor) -> torch.Tensor:
    """Pure-torch: x [T, 2I] -> silu(x[:, :I]) * x[:, I:] [T, I] in x's dtype."""
    _check(x)
    gate, up = x.chunk(2, dim=-1)
    return torch.nn.functional.silu(gate) * up


@jit
def _silu_and_mul_kernel(x_ptr, out_ptr, stride_x, stride_out, INTERMEDIATE: tl.constexpr, BLOCK: tl.constexpr,
                         PDL: tl.constexpr, GELU_TANH: tl.constexpr = False):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = cols < INTERMEDIATE
    dtype = out_ptr.dtype.element_ty
    wait_and_release(PDL)
    gate = tl.load(x_ptr + row * stride_x + cols, mask=mask, other=0.0).to(tl.float32)
    up = tl.load(x_ptr + row * stride_x + INTERMEDIATE + cols, mask=mask, other=0.0).to(tl.float32)
    if GELU_TANH:
        # 0.5 g (1 + tanh(sqrt(2/pi) (g + 0.044715 g^3))), tanh(y) = 1 - 2 / (exp(2y) + 1)
        inner = 0.7978845608028654 * (gate + 0.044715 * gate * gate * gate)
        activated = (0.5 * gate * (2.0 - 2.0 / (tl.exp(2.0 * inner) + 1.0))).to(dtype).to(tl.float32)
    else:
        activated = (gate / (1.0 + tl.exp(-gate))).to(dtype).to(tl.float32)
    tl.store(out_ptr + row * stride_out + cols, (activated * up).to(dtype), mask=mask)


def silu_and_mul(x: torch.Tensor, *, gelu_tanh: bool = False) -> torch.Tensor:
    """Triton: x [T, 2I] -> silu(x[:, :I]) * x[:, I:] [T, I] in x's dtype, one kernel (gelu_tanh: Gemma's
    gelu_tanh(gate) * up instead, the activation likewise rounded to x's dtype before the product)."""
    _check(x)
    check_launch_device("silu_and_mul", _silu_and_mul_kernel, x)
    if x.stride(1) != 1:
        x = x.contiguous()
    tokens, intermediate = x.shape[0], x.shape[1] // 2
    out = torch.empty((tokens, intermediate), dtype=x.dtype, device=x.device)
    if tokens == 0:
        return out
    block = min(_BLOCK, next_power_of_2(intermediate))
    _silu_and_mul_kernel[(tokens, -(-intermediate // block))](
        x, out, x.stride(0), out.stride(0), INTERMEDIATE=intermediate, BLOCK=block, GELU_TANH=gelu_tanh, num_warps=4,
        **pdl_launch(x.device))
    return out


def gelu_tanh_and_mul_ref(x: torch.Tensor) -> torch.Tensor:
    """Gemma's gated MLP activation: x [T, 2I] = [gate | up] -> gelu_tanh(gate) * up [T, I] in x's dtype, as
    transformers' `gelu_pytorch_tanh(gate_proj(x)) * up_proj(x)`."""
    _check(x)
    gate, up = x.chunk(2, dim=-1)
    return torch.nn.functional.gelu(gate, approximate="tanh") * up


def gelu_tanh_and_mul(x: torch.Tensor) -> torch.Tensor:
    """Triton: x [T, 2I] -> gelu_tanh(x[:, :I]) * x[:, I:] [T, I] in x's dtype, one kernel."""
    return silu_and_mul(x, gelu_tanh=True)
