"""Installing engine.json's tuned GEMM tiles at run time: tuning.load_engine_tiles (CPU only, no kernels run).

The autotuner itself, the tables and the defaults are tested in test_kernels_gemm.py.
"""

from __future__ import annotations

import logging

import pytest

from llmx.common.errors import LlmxError
from llmx.kernels import tuning
from llmx.kernels.tuning import TileConfig

H100 = "NVIDIA H100 80GB HBM3"
TUNED = TileConfig(16, 128, 512, split_k=2, num_warps=8, num_stages=3)


def _table(device_name: str | None = H100) -> dict:
    table = {"format": tuning.TABLE_FORMAT, "version": tuning.TABLE_VERSION,
             "kernels": {"w4a16": {tuning.shape_key(1, 4096, 4096): TUNED.to_dict()}}}
    if device_name is not None:
        table["device"] = {"name": device_name, "compute_capability": "9.0", "triton": "3.9.0"}
    return table


@pytest.fixture(autouse=True)
def fresh_state(monkeypatch):
    monkeypatch.setattr(tuning, "_WARNED_MISMATCH", set())
    yield
    tuning.load_tuned(None)


def _warnings(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name == tuning.__name__ and r.levelno == logging.WARNING]


def test_table_tuned_on_this_gpu_is_installed(caplog):
    default = tuning.default_config("w4a16", 1, 4096, 4096)
    assert default != TUNED
    assert tuning.load_engine_tiles(_table(), H100) is True
    assert tuning.gemm_config("w4a16", 1, 4096, 4096) == TUNED
    # Other M buckets and shapes keep the defaults.
    assert tuning.gemm_config("w4a16", 64, 4096, 4096) == tuning.default_config("w4a16", 64, 4096, 4096)
    assert _warnings(caplog) == []


def test_table_from_another_gpu_falls_back_to_defaults_with_one_warning(caplog):
    tuning.load_engine_tiles(_table(), H100)
    assert tuning.load_engine_tiles(_table(), "NVIDIA H200") is False
    assert tuning.gemm_config("w4a16", 1, 4096, 4096) == tuning.default_config("w4a16", 1, 4096, 4096)
    tuning.load_engine_tiles(_table(), "NVIDIA H200")  # a second engine load in the same process: no repeat
    (message,) = _warnings(caplog)
    assert H100 in message and "NVIDIA H200" in message and "default tiles" in message and "\n" not in message


def test_table_without_a_device_name_is_not_trusted(caplog):
    assert tuning.load_engine_tiles(_table(device_name=None), H100) is False
    assert tuning.gemm_config("w4a16", 1, 4096, 4096) == tuning.default_config("w4a16", 1, 4096, 4096)
    assert len(_warnings(caplog)) == 1


def test_warn_false_stays_silent_and_other_ranks_do_not_repeat_it(caplog):
    assert tuning.load_engine_tiles(_table(), "NVIDIA A100-SXM4-80GB", warn=False) is False
    assert _warnings(caplog) == []


def test_no_table_or_no_gpu_clears_an_earlier_table(caplog):
    tuning.load_engine_tiles(_table(), H100)
    assert tuning.load_engine_tiles(None, H100) is False
    assert tuning.gemm_config("w4a16", 1, 4096, 4096) != TUNED
    tuning.load_engine_tiles(_table(), H100)
    assert tuning.load_engine_tiles(_table(), None) is False  # a CPU run: the table is never used
    assert tuning.gemm_config("w4a16", 1, 4096, 4096) != TUNED
    assert _warnings(caplog) == []


def test_malformed_table_from_this_gpu_is_refused():
    table = _table()
    table["kernels"]["w4a16"][tuning.shape_key(1, 4096, 4096)] = {"block_m": 16, "block_n": 24, "block_k": 64}
    with pytest.raises(LlmxError, match="block_n=24"):
        tuning.load_engine_tiles(table, H100)
    with pytest.raises(LlmxError, match="rebuild the engine"):
        tuning.load_engine_tiles({**_table(), "version": 99}, H100)
