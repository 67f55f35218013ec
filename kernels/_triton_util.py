"""Plumbing shared by the Triton kernel modules: the optional triton import, the launch-device checks
every wrapper makes, and small launch-size helpers.

Triton is an optional dependency (`llmx[gpu]`): the kernel modules must import without it, because the
CPU runtime only needs their pure-torch references. `jit` therefore decorates with `triton.jit` when
triton is present and otherwise keeps a placeholder that explains itself when launched.

Triton chooses between compiling and interpreting (TRITON_INTERPRET=1, kernels on CPU tensors) once, when
triton and the kernel modules are imported: its own library functions (tl.zeros, tl.max, ...) are
decorated at that moment too, so the variable cannot be switched later in the same process. Tests that
use the interpreter therefore run in a fresh process started with TRITON_INTERPRET=1.

Fused multiply-adds: the kernels are written for them (the int4 GEMV's inner loop is one FFMA per weight and
row; a separate multiply and add would double it). Triton reads TRITON_DEFAULT_FP_FUSION when it compiles a
kernel, and 3.9 warns at every first compile that the default will turn to off in 3.10. `pin_fp_fusion` sets it
to on, unless the user chose a value, right before a kernel can first compile: every wrapper's
`check_launch_device` and every tuning case (`_gemm_common.tuning_case`) call it, so importing llmx leaves the
environment alone.
"""

from __future__ import annotations

import functools
from typing import Any, Callable

import torch

from llmx.common import env
from llmx.common.errors import LlmxError

try:
    import triton
    import triton.language as tl
except ImportError:
    triton = None
    tl = None

# H100 SXM: 132 SMs. The interpreter pretends to be one so that CPU tests take the GPU's launch decisions.
DEFAULT_SM_COUNT = 132

# Kernel families only support the activation dtypes the runtime uses.
FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def triton_available() -> bool:
    return triton is not None


class _TritonMissing:
    """Stands in for a kernel when triton is not installed; launching it raises a clear LlmxError."""

    def __init__(self, fn: Callable[..., Any]):
        self.fn = fn

    def __getitem__(self, grid: Any):
        raise LlmxError(
            f"Triton kernel {self.fn.__name__} needs the `triton` package: install llmx with the gpu extra "
            "(pip install 'llmx[gpu]') or run on the pure-torch path."
        )


def jit(fn: Callable[..., Any]):
    """`triton.jit` when triton is importable, else a placeholder (so the module still imports)."""
    if triton is None:
        return _TritonMissing(fn)
    return triton.jit(fn)


def interpreter_active() -> bool:
    """True when this process imported Triton under TRITON_INTERPRET=1 (its own library included)."""
    if triton is None:
        return False
    from triton.runtime.interpreter import InterpretedFunction

    return isinstance(getattr(tl, "zeros", None), InterpretedFunction)


def is_interpreted(kernel: Any) -> bool:
    """True when `kernel` was decorated under TRITON_INTERPRET=1 and so runs on CPU tensors."""
    if isinstance(kernel, _TritonMissing):
        return False
    from triton.runtime.interpreter import InterpretedFunction

    return isinstance(kernel, InterpretedFunction)


def pin_fp_fusion() -> None:
    """TRITON_DEFAULT_FP_FUSION=1 unless the user chose a value (see above); call before a kernel compiles."""
    env.set_default(env.TRITON_DEFAULT_FP_FUSION)


def check_launch_device(op: str, kernel: Any, *tensors: torch.Tensor | None) -> torch.device:
    """All tensors on one device, and one `kernel` runs on: CUDA when compiled, CPU when interpreted.
    Every kernel wrapper calls it before its launch, which may compile the kernel: it pins FP fusion first."""
    pin_fp_fusion()
    present = [t for t in tensors if t is not None]
    device = present[0].device
    if any(t.device != device for t in present):
        found = sorted({str(t.device) for t in present})
        raise LlmxError(f"{op}: all tensors must be on one device, got {', '.join(found)}; move them together.")
    if isinstance(kernel, _TritonMissing):
        raise LlmxError(f"{op}: the Triton kernel needs `pip install 'llmx[gpu]'`; use the *_ref function on CPU.")
    if is_interpreted(kernel) != interpreter_active():
        raise LlmxError(f"{op}: TRITON_INTERPRET changed between importing triton and llmx.kernels; set it (or not) "
                        "before starting Python.")
    if is_interpreted(kernel):
        if device.type != "cpu":
            raise LlmxError(f"{op}: Triton was loaded with TRITON_INTERPRET=1, which runs kernels on CPU tensors, "
                            f"got {device}; start Python without TRITON_INTERPRET to use the GPU.")
    elif device.type != "cuda":
        raise LlmxError(f"{op}: the Triton kernel needs CUDA tensors, got {device}; use the *_ref function on CPU "
                        "(or set TRITON_INTERPRET=1 before starting Python to run kernels in Triton's interpreter).")
    return device


def sm_count(device: torch.device) -> int:
    """Streaming multiprocessors of `device` (the H100's count under the interpreter)."""
    if device.type == "cuda":
        return _cuda_sm_count(device.index if device.index is not None else torch.cuda.current_device())
    return DEFAULT_SM_COUNT


@functools.lru_cache(maxsize=None)
def _cuda_sm_count(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


def next_power_of_2(n: int) -> int:
    return 1 if n <= 1 else 1 << (n - 1).bit_length()


def cdiv(a: int, b: int) -> int:
    return -(-a // b)


def check_scale(op: str, name: str, scale: torch.Tensor | None) -> torch.Tensor:
    """A quantized KV cache's per-layer scale: a float32 tensor holding one number."""
    if scale is None:
        raise LlmxError(f"{op}: a quantized (fp8/int8) KV cache needs `{name}`; pass the layer's float32 scale.")
    if not isinstance(scale, torch.Tensor) or scale.numel() != 1 or scale.dtype != torch.float32:
        raise LlmxError(f"{op}: `{name}` must be a float32 tensor with one element (the per-layer KV scale).")
    return scale


# KV-cache element types stored quantized, with a per-layer float32 scale: stored = round(x / scale).
QUANTIZED_KV_DTYPES = (torch.float8_e4m3fn, torch.int8)
FP8_E4M3_MAX = 448.0
