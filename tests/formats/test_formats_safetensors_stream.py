"""The streaming safetensors writer/reader against the reference safetensors library."""

from __future__ import annotations

import hashlib
import json
import struct

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from llmx.formats.safetensors_stream import (ByteProgress, SafetensorsFile, SafetensorsStreamWriter, TensorEntry,
                                             dtype_name)
from llmx.common.errors import LlmxError


def _sample_tensors() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return {
        "a.bf16": torch.randn(3, 5, generator=g).to(torch.bfloat16),
        "b.fp8": (torch.randn(4, 8, generator=g) * 10).to(torch.float8_e4m3fn),
        "c.uint8": torch.randint(0, 256, (7,), generator=g, dtype=torch.uint8),
        "d.int8": torch.randint(-128, 128, (2, 3), generator=g, dtype=torch.int8),
        "e.int32": torch.randint(-1000, 1000, (3,), generator=g, dtype=torch.int32),
        "f.fp32": torch.randn(2, 2, 2, generator=g),
        "g.scalar": torch.tensor(0.125, dtype=torch.float32),
        "h.fp16": torch.randn(6, generator=g).to(torch.float16),
        "i.empty": torch.zeros(0, 4, dtype=torch.bfloat16),
    }


def _same_bytes(a: torch.Tensor, b: torch.Tensor) -> bool:
    return torch.equal(a.reshape(-1).view(torch.uint8), b.reshape(-1).view(torch.uint8))


def _entries(tensors):
    return [TensorEntry(n, dtype_name(t), tuple(t.shape)) for n, t in tensors.items()]


def test_written_file_reads_back_identically_with_safe_open(tmp_path):
    tensors = _sample_tensors()
    path = tmp_path / "x.safetensors"
    with SafetensorsStreamWriter(path, _entries(tensors), {"format": "pt", "note": "hi"}) as w:
        for name, t in tensors.items():
            w.write(name, t)
    with safe_open(str(path), framework="pt", device="cpu") as f:
        assert set(f.keys()) == set(tensors)
        assert f.metadata() == {"format": "pt", "note": "hi"}
        for name, t in tensors.items():
            got = f.get_tensor(name)
            assert got.dtype == t.dtype and got.shape == t.shape, name
            assert _same_bytes(got, t), name
    # Tensor data starts 8-byte aligned, like files written by the reference library.
    (header_len,) = struct.unpack("<Q", path.read_bytes()[:8])
    assert header_len % 8 == 0


def test_chunked_writes_equal_one_write(tmp_path):
    t = torch.arange(60, dtype=torch.float32).reshape(10, 6).to(torch.bfloat16)
    a, b = tmp_path / "a.safetensors", tmp_path / "b.safetensors"
    entries = [TensorEntry("t", "bfloat16", (10, 6))]
    with SafetensorsStreamWriter(a, entries) as w:
        w.write("t", t)
    with SafetensorsStreamWriter(b, entries) as w:
        w.write_chunks("t", [t[:3], t[3:4], t[4:]])
    assert a.read_bytes() == b.read_bytes()


def test_non_contiguous_tensor_is_written_in_logical_order(tmp_path):
    t = torch.arange(12, dtype=torch.float32).reshape(3, 4)[:, 1:3]
    path = tmp_path / "x.safetensors"
    with SafetensorsStreamWriter(path, [TensorEntry("t", "float32", (3, 2))]) as w:
        w.write("t", t)
    with safe_open(str(path), framework="pt") as f:
        assert torch.equal(f.get_tensor("t"), t)


def test_reader_reads_reference_files_and_hashes_raw_bytes(tmp_path):
    tensors = _sample_tensors()
    path = tmp_path / "ref.safetensors"
    save_file(tensors, str(path), metadata={"format": "pt"})
    h = hashlib.sha256()
    with SafetensorsFile.open(path) as f:
        assert f.metadata == {"format": "pt"}
        h.update(f.header_bytes)
        for entry in f.tensors:  # file order: the hash then equals the file's own hash
            got = f.read(entry.name, h)
            t = tensors[entry.name]
            assert got.dtype == t.dtype and got.shape == t.shape
            assert _same_bytes(got, t)
    assert h.hexdigest() == hashlib.sha256(path.read_bytes()).hexdigest()


def test_writer_refuses_out_of_order_wrong_shape_wrong_dtype_and_missing(tmp_path):
    entries = [TensorEntry("a", "float32", (2,)), TensorEntry("b", "bfloat16", (3,))]
    with pytest.raises(ValueError, match="expected tensor `a` next"):
        with SafetensorsStreamWriter(tmp_path / "1.safetensors", entries) as w:
            w.write("b", torch.zeros(3, dtype=torch.bfloat16))
    with pytest.raises(ValueError, match="shape"):
        with SafetensorsStreamWriter(tmp_path / "2.safetensors", entries) as w:
            w.write("a", torch.zeros(3))
    with pytest.raises(ValueError, match="dtype"):
        with SafetensorsStreamWriter(tmp_path / "3.safetensors", entries) as w:
            w.write("a", torch.zeros(2, dtype=torch.float16))
    with pytest.raises(ValueError, match="`b` was declared but never written"):
        with SafetensorsStreamWriter(tmp_path / "4.safetensors", entries) as w:
            w.write("a", torch.zeros(2))
    with pytest.raises(ValueError, match="declared twice"):
        SafetensorsStreamWriter(tmp_path / "5.safetensors", entries + entries[:1])


def test_reader_rejects_truncated_and_garbage_files(tmp_path):
    good = tmp_path / "good.safetensors"
    save_file({"w": torch.randn(64, 64)}, str(good))
    data = good.read_bytes()

    truncated = tmp_path / "truncated.safetensors"
    truncated.write_bytes(data[: len(data) - 100])
    with pytest.raises(LlmxError, match=r"truncated\.safetensors.*truncated"):
        SafetensorsFile.open(truncated)

    header_cut = tmp_path / "header_cut.safetensors"
    header_cut.write_bytes(data[:20])
    with pytest.raises(LlmxError, match="truncated"):
        SafetensorsFile.open(header_cut)

    garbage = tmp_path / "garbage.safetensors"
    garbage.write_bytes(struct.pack("<Q", 10) + b"not json!!" + b"\0" * 16)
    with pytest.raises(LlmxError, match="not JSON"):
        SafetensorsFile.open(garbage)

    trailing = tmp_path / "trailing.safetensors"
    trailing.write_bytes(data + b"\0" * 8)
    with pytest.raises(LlmxError, match="follow the last tensor"):
        SafetensorsFile.open(trailing)

    wrong_size = tmp_path / "wrong_size.safetensors"
    header = json.dumps({"w": {"dtype": "F32", "shape": [3], "data_offsets": [0, 8]}}).encode()
    wrong_size.write_bytes(struct.pack("<Q", len(header)) + header + b"\0" * 8)
    with pytest.raises(LlmxError, match="spans 8 bytes"):
        SafetensorsFile.open(wrong_size)

    with pytest.raises(LlmxError, match="does not exist"):
        SafetensorsFile.open(tmp_path / "absent.safetensors")


def test_byte_progress_reports_running_totals_to_the_stage_protocol():
    calls = []
    p = ByteProgress(lambda stage, done, total: calls.append((stage, done, total)), "convert", 10)
    p.advance(4)
    p.advance(6)
    assert calls == [("convert", 4, 10), ("convert", 10, 10)]
    ByteProgress(None, "x", 1).advance(1)
    with pytest.raises(TypeError):
        ByteProgress(42, "x", 1)
