"""Shared pieces of the fault-injection tests: a tiny engine, the same engine with NaN weights, and a check
that a command failed the way users are promised (one `error:` line, the exit code, no traceback)."""

from __future__ import annotations

import json
import shutil
import struct
from pathlib import Path
from typing import Callable

import pytest

from llmx.cli.main import run_cli

ENGINE_OPTIONS = ["--device", "cpu", "--max-seq-len", "64", "--max-batch-size", "2", "--max-num-tokens", "64"]


@pytest.fixture(scope="session")
def tiny_hf(tmp_path_factory) -> Path:
    from helpers.tiny_models import make_tiny_hf_model

    return make_tiny_hf_model("llama", tmp_path_factory.mktemp("faults") / "hf")


@pytest.fixture(scope="session")
def tiny_engine(tiny_hf, tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("faults-engine")
    assert run_cli(["convert", str(tiny_hf), "-o", str(root / "ckpt")]) == 0
    assert run_cli(["build", str(root / "ckpt"), "-o", str(root / "engine"), *ENGINE_OPTIONS]) == 0
    return root / "engine"


@pytest.fixture(scope="session")
def nan_engine(tiny_engine, tmp_path_factory) -> Path:
    """The tiny engine with its final norm's weights overwritten by NaN in place (same file size)."""
    engine = tmp_path_factory.mktemp("faults-nan") / "engine"
    shutil.copytree(tiny_engine, engine)
    poison_tensor(engine / "rank0.safetensors", "final_norm.weight")
    return engine


@pytest.fixture(scope="session")
def nan_checkpoint(tiny_engine, tmp_path_factory) -> Path:
    """The tiny engine's checkpoint with NaN final-norm weights: what a broken quantization would hand on."""
    source = Path(json.loads((tiny_engine / "engine.json").read_text())["checkpoint_dir"])
    ckpt = tmp_path_factory.mktemp("faults-nan-ckpt") / "ckpt"
    shutil.copytree(source, ckpt)
    poison_tensor(ckpt / "rank0.safetensors", "final_norm.weight")
    return ckpt


def poison_tensor(path: Path, name: str) -> None:
    """Overwrite the stored bytes of tensor `name` with NaN (bfloat16, float16 or float32)."""
    data = bytearray(path.read_bytes())
    header_len = struct.unpack("<Q", data[:8])[0]
    header = json.loads(data[8:8 + header_len])
    start, end = header[name]["data_offsets"]
    nan = {"BF16": b"\xc0\x7f", "F16": b"\x00\x7e", "F32": b"\x00\x00\xc0\x7f"}[header[name]["dtype"]]
    begin = 8 + header_len + start
    data[begin:8 + header_len + end] = nan * ((end - start) // len(nan))
    path.write_bytes(bytes(data))


@pytest.fixture(scope="session")
def heldout(tmp_path_factory) -> Path:
    from helpers.corpus import CORPUS

    path = tmp_path_factory.mktemp("faults-text") / "heldout.txt"
    path.write_text((CORPUS / "austen_persuasion.txt").read_text(encoding="utf-8")[:4_000], encoding="utf-8")
    return path


@pytest.fixture
def fails(capsys) -> Callable[..., str]:
    """fails(argv, fragment, code=2): run `llmx argv`, expect exit `code` and one `error:` line holding
    `fragment` on stderr (no traceback); returns that line. stdout is returned by `fails.out`."""

    def check(argv: list[str], fragment: str, code: int = 2) -> str:
        assert run_cli([str(a) for a in argv]) == code
        captured = capsys.readouterr()
        check.out = captured.out
        lines = captured.err.strip().splitlines()
        assert lines and "Traceback" not in captured.err, captured.err
        assert lines[-1].startswith("error: "), captured.err
        assert fragment in lines[-1], lines[-1]
        return lines[-1]

    check.out = ""
    return check
