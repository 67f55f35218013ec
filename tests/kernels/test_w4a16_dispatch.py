"""The one W4A16 kernel choice (tuning.int4_kernel_for) against a table recorded from the three places that made
it before (w4a16_gemm's dispatch, the gated MLP's and tuning.bucket_kernels), over a grid of M, K, group size,
GPU compute capability and activation dtype: the GPU decisions must not move.

Letters per M in M_VALUES: V = the CUDA-core GEMV, D = the tensor-core decode kernel, T = the tensor-core GEMM.
"""

from __future__ import annotations

import pytest
import torch

from llmx.kernels import tuning, w4a16_mma_decode

M_VALUES = (1, 2, 3, 4, 5, 8, 16, 17, 32, 33, 64, 65, 256, 2048)
SHAPES = ((36, 4), (64, 8), (64, 32), (96, 32), (128, 64), (128, 128), (384, 128), (4096, 64), (4096, 128),
          (4096, 256))  # (K, group size)
LETTERS = {"w4a16_gemv": "V", "w4a16_mma_decode": "D", "w4a16": "T"}
NOT_HOPPER = ("TTTTTTTTTTTTTT VVVVTTTTTTTTTT VVVVTTTTTTTTTT VVVVTTTTTTTTTT VVVVTTTTTTTTTT VVVVTTTTTTTTTT "
              "VVVVTTTTTTTTTT VVVVTTTTTTTTTT VVVVTTTTTTTTTT VVVVTTTTTTTTTT")
HOPPER_16_BIT = ("TTTTTTTTTTTTTT VVVVTTTTTTTTTT VVVVTTTTTTTTTT VVVVTTTTTTTTTT VVVVTTTTTTTTTT VDDDDDDDDDDTTT "
                 "VDDDDDDDDDDTTT VVVVTTTTTTTTTT VDDDDDDDDDDTTT VDDDDDDDDDDTTT")
# (compute capability, activation dtype) -> one string of M_VALUES letters per SHAPES entry; None = no GPU.
EXPECTED = {
    (capability, dtype): HOPPER_16_BIT if capability == (9, 0) and dtype != torch.float32 else NOT_HOPPER
    for capability in (None, (8, 0), (8, 9), (9, 0), (10, 0))
    for dtype in (torch.bfloat16, torch.float16, torch.float32)
}


@pytest.fixture
def gpu_of(monkeypatch):
    """Make `mma_decode_available` see a CUDA GPU of the given compute capability (None: no GPU)."""
    def pretend(capability):
        w4a16_mma_decode._hopper.cache_clear()
        monkeypatch.setattr(torch.cuda, "is_available", lambda: capability is not None)
        monkeypatch.setattr(torch.cuda, "get_device_capability", lambda index=None: capability)
        monkeypatch.setattr(w4a16_mma_decode, "interpreter_active", lambda: False)

    yield pretend
    w4a16_mma_decode._hopper.cache_clear()


@pytest.mark.parametrize("capability, dtype", list(EXPECTED), ids=str)
def test_the_kernel_for_each_m_k_group_and_gpu_is_the_recorded_one(gpu_of, capability, dtype):
    gpu_of(capability)
    mma_decode = w4a16_mma_decode.mma_decode_available(dtype, "cuda:0")
    found = " ".join("".join(LETTERS[tuning.int4_kernel_for(m, k, group, mma_decode=mma_decode)] for m in M_VALUES)
                     for k, group in SHAPES)
    assert found == EXPECTED[capability, dtype]


def test_gated_kernels_are_the_decode_kernels():
    assert set(tuning.W4A16_GATED) == {"w4a16_gemv", "w4a16_mma_decode"}


TC, GEMV, MMA = "w4a16", "w4a16_gemv", "w4a16_mma_decode"
NO_DECODE_KERNEL = [[(TC, 1)], [(TC, 16)], [(TC, 64)], [(TC, 256)], [(TC, 2048)], [(TC, 8192)]]
GEMV_ONLY = [[(GEMV, 1)], [(GEMV, 4), (TC, 16)], [(TC, 64)], [(TC, 256)], [(TC, 2048)], [(TC, 8192)]]
WITH_MMA = [[(GEMV, 1)], [(MMA, 16)], [(MMA, 64)], [(TC, 256)], [(TC, 2048)], [(TC, 8192)]]


@pytest.mark.parametrize("mma_decode", [False, True])
@pytest.mark.parametrize("k, group", SHAPES + ((4096, None),))
def test_bucket_entries_are_the_recorded_ones(mma_decode, k, group):
    """tuning.bucket_kernels over M_BUCKETS, as recorded before the choice became one function."""
    if group is None or k % 8 or group % 8:
        expected = NO_DECODE_KERNEL
    elif mma_decode and k % 128 == 0 and group % 128 == 0:
        expected = WITH_MMA
    else:
        expected = GEMV_ONLY
    assert [tuning.bucket_kernels("w4a16", b, k, group, mma_decode=mma_decode) for b in tuning.M_BUCKETS] == expected


def test_the_int4_kernel_files_import_none_of_each_other():
    """w4a16_gemm, w4a16_gemv and w4a16_mma_decode share w4a16_format.py; w4a16_dispatch.py imports them."""
    import ast
    from pathlib import Path

    kernels = Path(__file__).resolve().parents[2] / "kernels"
    names = {"w4a16_gemm", "w4a16_gemv", "w4a16_mma_decode"}
    for name in sorted(names):
        imported = set()
        for node in ast.walk(ast.parse((kernels / f"{name}.py").read_text())):
            if isinstance(node, ast.ImportFrom) and node.module:
                imported |= {node.module.rsplit(".", 1)[-1]} | {alias.name for alias in node.names}
            elif isinstance(node, ast.Import):
                imported |= {alias.name.rsplit(".", 1)[-1] for alias in node.names}
        assert imported & (names - {name}) == set(), name
