"""Programmatic dependent launch (PDL): let a decode kernel start while the kernel before it drains.

Without PDL the GPU starts kernel N+1 only after kernel N has finished and flushed its writes: the SMs
sit idle for the launch latency and for the tail of N's last programs, a microsecond or two per kernel,
and a Llama-3.1-8B decode step chains ~290 kernels (9 per layer) each of which runs for only 3-30 us.
Hopper (sm_90) can launch N+1 early, as soon as every program of N has signalled
(`griddepcontrol.launch_dependents`) or exited; N+1's programs then block in `griddepcontrol.wait` until N
has completed and its memory is visible, so the result is the same, only the launch overlaps.

The contract every PDL-launched kernel keeps (see `wait_and_release`): it waits before its first read
or write of global memory, so that neither a value N writes (read after write) nor a buffer N still
reads (write after read: the graph pool reuses buffers) is touched early. The signal comes after the
wait (right after it, or after the main loop: `wait_only` + `release`), so at most two kernels overlap:
N+1 waits on N, which has already passed its own wait.
Kernels launched without PDL (cuBLAS, torch's own) simply keep the ordinary ordering around them.

On: CUDA devices of compute capability 9.0 and above, with a Triton that has the griddepcontrol ops.
`LLMX_PDL=0` (environment, read at the first launch) or `set_pdl(False)` turns it off. The choice is a launch
argument and a compile-time constant of each kernel, so engines need no rebuild either way.
"""

from __future__ import annotations

import functools

import torch

from llmx.common import env
from llmx.kernels._triton_util import interpreter_active, jit, tl

_ENABLED: bool | None = None  # set_pdl's choice; None until the first launch reads LLMX_PDL


def set_pdl(enabled: bool) -> None:
    """Turn PDL on or off for launches from now on (kernels compiled either way stay cached)."""
    global _ENABLED
    _ENABLED = enabled


def pdl_launch(device: torch.device) -> dict:
    """Keyword arguments for a kernel launch on `device`: the kernel's PDL constant, and Triton's
    `launch_pdl` option when PDL is on (left out otherwise, so the interpreter never sees it)."""
    if _enabled() and device.type == "cuda" and _supported(device.index if device.index is not None
                                                          else torch.cuda.current_device()):
        return {"PDL": True, "launch_pdl": True}
    return {"PDL": False}


def _enabled() -> bool:
    global _ENABLED
    if _ENABLED is None:
        _ENABLED = env.LLMX_PDL.read()
    return _ENABLED


@functools.lru_cache(maxsize=None)
def _supported(index: int) -> bool:
    if tl is None or interpreter_active():
        return False
    extra = getattr(getattr(tl, "extra", None), "cuda", None)
    has_ops = hasattr(extra, "gdc_wait") and hasattr(extra, "gdc_launch_dependents")
    return has_ops and torch.cuda.get_device_capability(index)[0] >= 9


@jit
def wait_and_release(PDL: tl.constexpr):
    """Call before a kernel's first global memory access: wait for the previous kernel to complete, then let
    the next one launch. Compiles to nothing when PDL is False."""
    if PDL:
        tl.extra.cuda.gdc_wait()
        tl.extra.cuda.gdc_launch_dependents()


@jit
def wait_only(PDL: tl.constexpr):
    """`wait_and_release` without the release, for kernels that call `release` later themselves."""
    if PDL:
        tl.extra.cuda.gdc_wait()


@jit
def release(PDL: tl.constexpr):
    """Let the next kernel launch (after `wait_only`). A kernel of several waves of programs releases late,
    after its main loop: the next kernel's programs, launched early, hold registers and shared memory on the
    SMs while they wait, which a heavy next kernel (a GEMV after a GEMV) takes from this one's later waves."""
    if PDL:
        tl.extra.cuda.gdc_launch_dependents()
