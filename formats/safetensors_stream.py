"""Read and write safetensors files one tensor at a time, so peak memory stays near one tensor.

`safetensors.safe_open` memory-maps the whole file: every page it touches stays in the process's
resident set until the handle closes, so converting a 5 GB shard that way peaks at 5 GB of RSS. Here
the reader parses the header itself and copies each tensor with one positioned read into a fresh
tensor, and the writer emits the header up front (all names, dtypes and shapes are known before any
data) and then appends each tensor's bytes as it arrives. Files written here are ordinary safetensors
files (`safe_open` reads them); files read here are validated as strictly as the Rust library does.

Format: 8-byte little-endian header length N, N bytes of JSON {name: {"dtype", "shape",
"data_offsets": [begin, end]}, "__metadata__": {str: str}}, then the tensor bytes, contiguous, with
offsets relative to the end of the header.
"""

from __future__ import annotations

import json
import math
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, BinaryIO, Iterable, Sequence

from llmx.common.errors import LlmxError
from llmx.common.progress import Progress

if TYPE_CHECKING:
    import hashlib

    import torch

# torch dtype name -> (safetensors dtype code, bytes per element).
DTYPES: dict[str, tuple[str, int]] = {
    "float64": ("F64", 8),
    "float32": ("F32", 4),
    "float16": ("F16", 2),
    "bfloat16": ("BF16", 2),
    "int64": ("I64", 8),
    "int32": ("I32", 4),
    "int16": ("I16", 2),
    "int8": ("I8", 1),
    "uint8": ("U8", 1),
    "uint16": ("U16", 2),
    "uint32": ("U32", 4),
    "uint64": ("U64", 8),
    "bool": ("BOOL", 1),
    "float8_e4m3fn": ("F8_E4M3", 1),
    "float8_e5m2": ("F8_E5M2", 1),
}
_CODE_TO_DTYPE = {code: name for name, (code, _) in DTYPES.items()}

# A header larger than this is not a safetensors file (the Rust library uses the same 100 MB cap).
_MAX_HEADER_BYTES = 100_000_000
_HEADER_ALIGN = 8


@dataclass(frozen=True)
class TensorEntry:
    """Name, dtype (torch dtype name) and shape of one tensor in a file."""

    name: str
    dtype: str
    shape: tuple[int, ...]

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * DTYPES[self.dtype][1]


@dataclass(frozen=True)
class StoredTensor(TensorEntry):
    """A tensor of an existing file: `start`/`end` are absolute byte offsets of its data in the file."""

    start: int = 0
    end: int = 0


def dtype_name(tensor: "torch.Tensor") -> str:
    """torch.bfloat16 -> "bfloat16"."""
    return str(tensor.dtype).removeprefix("torch.")


def _byte_view(tensor: "torch.Tensor"):
    """The tensor's bytes as a writable numpy uint8 array sharing its memory (tensor must be contiguous)."""
    import torch

    return tensor.reshape(-1).view(torch.uint8).numpy()


class SafetensorsFile:
    """A safetensors file whose header has been read and validated; tensors are read on demand.

    Use as a context manager (or call `close`). `read(name)` returns a new CPU tensor holding only that
    tensor's bytes; `tensors` lists every entry in file order (ascending offsets).
    """

    def __init__(self, path: Path, header_bytes: bytes, tensors: list[StoredTensor], metadata: dict[str, str],
                 handle: BinaryIO):
        self.path = path
        self.header_bytes = header_bytes  # the 8-byte length prefix plus the JSON header, as stored
        self.tensors = tensors
        self.by_name = {t.name: t for t in tensors}
        self.metadata = metadata
        self._handle = handle

    @classmethod
    def open(cls, path: Path) -> "SafetensorsFile":
        path = Path(path)
        try:
            handle = open(path, "rb")
        except FileNotFoundError:
            raise LlmxError(f"{path} does not exist; check the path or re-download the checkpoint.") from None
        except OSError as exc:
            raise LlmxError(f"{path} cannot be opened ({exc.strerror}); check its permissions.") from None
        try:
            header_bytes, tensors, metadata = _parse_header(path, handle)
        except BaseException:
            handle.close()
            raise
        return cls(path, header_bytes, tensors, metadata, handle)

    def close(self) -> None:
        self._handle.close()

    def __enter__(self) -> "SafetensorsFile":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __contains__(self, name: str) -> bool:
        return name in self.by_name

    def read(self, name: str, hasher: "hashlib._Hash | None" = None) -> "torch.Tensor":
        """Load one tensor; when `hasher` is given, feed it the tensor's raw bytes as stored."""
        import torch

        entry = self.by_name[name]
        tensor = torch.empty(entry.shape, dtype=getattr(torch, entry.dtype))
        view = _byte_view(tensor)
        self._handle.seek(entry.start)
        got = self._handle.readinto(view)
        if got != entry.nbytes:
            raise LlmxError(
                f"{self.path} ended after {got:,} of the {entry.nbytes:,} bytes of tensor `{name}`; "
                "the file changed while being read or is truncated, re-download it."
            )
        if hasher is not None:
            hasher.update(view)
        return tensor


def _parse_header(path: Path, f: BinaryIO) -> tuple[bytes, list[StoredTensor], dict[str, str]]:
    def corrupt(why: str) -> LlmxError:
        return LlmxError(f"{path} is not a valid safetensors file ({why}); re-download or re-export it.")

    f.seek(0, 2)
    file_size = f.tell()
    f.seek(0)
    prefix = f.read(8)
    if len(prefix) < 8:
        raise corrupt(f"only {file_size} bytes long")
    (header_len,) = struct.unpack("<Q", prefix)
    if header_len > _MAX_HEADER_BYTES or 8 + header_len > file_size:
        raise corrupt(f"header length {header_len:,} exceeds the {file_size:,}-byte file: truncated")
    raw = f.read(header_len)
    try:
        header = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise corrupt(f"header is not JSON: {exc}") from None
    if not isinstance(header, dict):
        raise corrupt("header is not a JSON object")
    metadata = header.pop("__metadata__", None) or {}
    if not isinstance(metadata, dict):
        raise corrupt("__metadata__ is not an object")

    data_start = 8 + header_len
    tensors = []
    for name, info in header.items():
        try:
            code, shape, (begin, end) = info["dtype"], tuple(info["shape"]), info["data_offsets"]
        except (TypeError, KeyError, ValueError):
            raise corrupt(f"entry `{name}` lacks dtype, shape or data_offsets") from None
        if code not in _CODE_TO_DTYPE:
            raise corrupt(f"tensor `{name}` has dtype {code}, which llmx does not read")
        if not all(isinstance(d, int) and d >= 0 for d in shape) or not (
                isinstance(begin, int) and isinstance(end, int) and 0 <= begin <= end):
            raise corrupt(f"tensor `{name}` has a malformed shape or data_offsets")
        entry = StoredTensor(name, _CODE_TO_DTYPE[code], shape, data_start + begin, data_start + end)
        if end - begin != entry.nbytes:
            raise corrupt(f"tensor `{name}` spans {end - begin:,} bytes but its shape {list(shape)} "
                          f"of {code} needs {entry.nbytes:,}")
        tensors.append(entry)

    tensors.sort(key=lambda t: (t.start, t.end))
    expected_start = data_start
    for t in tensors:
        if t.start != expected_start:
            raise corrupt(f"tensor `{t.name}` does not start where the previous one ends (gap or overlap)")
        expected_start = t.end
    if expected_start > file_size:
        raise corrupt(f"header declares {expected_start - data_start:,} bytes of tensor data but the file holds "
                      f"{file_size - data_start:,}: truncated")
    if expected_start < file_size:
        raise corrupt(f"{file_size - expected_start:,} bytes follow the last tensor")
    return prefix + raw, tensors, {str(k): str(v) for k, v in metadata.items()}


class SafetensorsStreamWriter:
    """Write a safetensors file whose tensors arrive one at a time, in the order declared up front.

    `entries` fixes every name, dtype and shape before any data is written; each `write` (or
    `write_chunks`, for a tensor produced in pieces along dim 0) must deliver the next declared tensor
    with exactly that dtype and shape. `close` raises if any declared tensor was never written. On an
    exception inside the `with` block the file is left incomplete: callers write into the temporary
    directory of `llmx.common.atomic.atomic_output_dir`, which is deleted on failure.
    """

    def __init__(self, path: Path, entries: Sequence[TensorEntry], metadata: dict[str, str] | None = None):
        self.path = Path(path)
        self.entries = list(entries)
        names = [e.name for e in self.entries]
        if len(set(names)) != len(names):
            dup = next(n for n in names if names.count(n) > 1)
            raise ValueError(f"tensor `{dup}` is declared twice for {self.path}")
        for e in self.entries:
            if e.dtype not in DTYPES:
                raise ValueError(f"tensor `{e.name}` has dtype {e.dtype}, which safetensors cannot store")
        self._next = 0
        self._file = open(self.path, "wb")
        self._file.write(_encode_header(self.entries, metadata or {"format": "pt"}))

    @property
    def total_bytes(self) -> int:
        return sum(e.nbytes for e in self.entries)

    def write(self, name: str, tensor: "torch.Tensor") -> None:
        self.write_chunks(name, [tensor], shape=tuple(tensor.shape))

    def write_chunks(self, name: str, chunks: Iterable["torch.Tensor"], shape: tuple[int, ...] | None = None) -> None:
        """Write the next declared tensor from pieces that concatenate along dim 0 to its declared shape."""
        entry = self._expect(name)
        if shape is not None and tuple(shape) != entry.shape:
            raise ValueError(f"tensor `{name}` has shape {tuple(shape)}, declared {entry.shape} in {self.path}")
        rows = 0
        for chunk in chunks:
            got = dtype_name(chunk)
            if got != entry.dtype:
                raise ValueError(f"tensor `{name}` has dtype {got}, declared {entry.dtype} in {self.path}")
            if entry.shape and tuple(chunk.shape[1:]) != entry.shape[1:]:
                raise ValueError(f"a chunk of `{name}` has shape {tuple(chunk.shape)}, declared {entry.shape}")
            rows += chunk.shape[0] if entry.shape else 1
            self._file.write(_byte_view(chunk.detach().cpu().contiguous()))
        expected_rows = entry.shape[0] if entry.shape else 1
        if rows != expected_rows:
            raise ValueError(f"tensor `{name}` received {rows} rows, declared {entry.shape} in {self.path}")
        self._next += 1

    def _expect(self, name: str) -> TensorEntry:
        if self._next >= len(self.entries):
            raise ValueError(f"tensor `{name}` was not declared for {self.path}")
        entry = self.entries[self._next]
        if entry.name != name:
            raise ValueError(f"expected tensor `{entry.name}` next in {self.path}, got `{name}`")
        return entry

    def close(self) -> None:
        """Finish the file; raises if a declared tensor is missing."""
        self._file.close()
        if self._next != len(self.entries):
            raise ValueError(f"{self.path}: tensor `{self.entries[self._next].name}` was declared but never written")

    def __enter__(self) -> "SafetensorsStreamWriter":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.close()
        else:
            self._file.close()


def _encode_header(entries: Sequence[TensorEntry], metadata: dict[str, Any]) -> bytes:
    header: dict[str, Any] = {"__metadata__": {str(k): str(v) for k, v in metadata.items()}}
    offset = 0
    for e in entries:
        header[e.name] = {"dtype": DTYPES[e.dtype][0], "shape": list(e.shape),
                          "data_offsets": [offset, offset + e.nbytes]}
        offset += e.nbytes
    raw = json.dumps(header, separators=(",", ":")).encode("utf-8")
    # Pad with spaces so tensor data starts 8-byte aligned, as the reference writer does.
    raw += b" " * (-(8 + len(raw)) % _HEADER_ALIGN)
    return struct.pack("<Q", len(raw)) + raw


class ByteProgress:
    """Reports streamed bytes to an optional `progress(stage, done_bytes, total_bytes)` sink
    (llmx.common.progress)."""

    def __init__(self, progress: Progress | None, stage: str, total_bytes: int):
        if progress is not None and not callable(progress):
            raise TypeError("progress must be None or a callable(stage, done, total)")
        self.progress = progress
        self.stage = stage
        self.total = total_bytes
        self.done = 0

    def advance(self, nbytes: int) -> None:
        self.done += nbytes
        if self.progress is not None:
            self.progress(self.stage, self.done, self.total)
