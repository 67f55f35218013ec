"""Output paths: refused before any work when llmx must not or cannot write them, one writer at a time, and the
leftovers of a killed writer removed by the next run (common/atomic.py through `llmx convert` and `llmx build`)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from llmx.cli.main import run_cli

from .conftest import ENGINE_OPTIONS


def test_the_current_directory_is_refused_as_output_even_with_force(tiny_hf, tmp_path, monkeypatch, fails):
    work = tmp_path / "work"
    (work / "notes").mkdir(parents=True)
    (work / "notes" / "keep.txt").write_text("mine")
    monkeypatch.chdir(work / "notes")
    for out in (".", "..", str(work)):
        fails(["convert", tiny_hf, "-o", out, "--force"], "is the current directory or holds it", code=2)
    assert (work / "notes" / "keep.txt").read_text() == "mine"


def test_an_output_holding_the_input_is_refused_even_with_force(tiny_hf, tmp_path, fails):
    ckpt = tmp_path / "models" / "ckpt"
    assert run_cli(["convert", str(tiny_hf), "-o", str(ckpt)]) == 0
    for out in (ckpt, ckpt.parent):
        fails(["build", ckpt, "-o", out, "--force", *ENGINE_OPTIONS], "would replace the input folder", code=2)
    assert (ckpt / "llmx.json").is_file()


def test_an_output_under_a_file_is_refused_before_any_work(tiny_hf, tmp_path, fails):
    (tmp_path / "a-file").write_text("x")
    fails(["convert", tiny_hf, "-o", tmp_path / "a-file" / "ckpt"], "is a file, not a directory", code=2)


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into read-only directories: nothing to refuse")
def test_an_unwritable_parent_is_refused_before_any_work(tiny_hf, tmp_path, fails):
    locked = tmp_path / "locked"
    locked.mkdir(mode=0o555)
    try:
        fails(["convert", tiny_hf, "-o", locked / "ckpt"], "is not writable by this user", code=2)
    finally:
        locked.chmod(0o755)


# A writer that enters atomic_output_dir, writes part of its output, says so and waits to be killed: the state a
# convert or build is in when SIGKILL or a power cut stops it.
_WRITER = textwrap.dedent("""
    import sys, time
    from pathlib import Path
    from llmx.common.atomic import atomic_output_dir
    with atomic_output_dir(Path(sys.argv[1])) as tmp:
        (tmp / "half-written.safetensors").write_bytes(b"x" * 4096)
        print("writing", flush=True)
        time.sleep(600)
""")


def _start_writer(out: Path) -> subprocess.Popen:
    writer = subprocess.Popen([sys.executable, "-c", _WRITER, str(out)], stdout=subprocess.PIPE, text=True)
    assert writer.stdout.readline().strip() == "writing"
    return writer


def test_a_second_writer_of_the_same_output_refuses_and_leaves_the_first_ones_work(tiny_hf, tmp_path, fails):
    out = tmp_path / "ckpt"
    writer = _start_writer(out)
    try:
        line = fails(["convert", tiny_hf, "-o", out, "--force"], "is writing", code=2)
        assert f"pid {writer.pid}" in line
        assert len(list(tmp_path.glob(".ckpt.tmp-*/half-written.safetensors"))) == 1
    finally:
        writer.kill()
        writer.wait()


def test_the_leftovers_of_a_killed_writer_are_removed_by_the_next_run(tiny_hf, tmp_path):
    out = tmp_path / "ckpt"
    writer = _start_writer(out)
    writer.send_signal(signal.SIGKILL)
    writer.wait()
    assert [p.name for p in tmp_path.glob(".ckpt.tmp-*")], "the killed writer left its temporary directory"
    (tmp_path / ".ckpt.old-999999").mkdir()  # a replaced output a killed run had not deleted yet
    (tmp_path / ".ckpt-other.tmp-abcdefgh").mkdir()  # another output's: not ours to remove
    assert run_cli(["convert", str(tiny_hf), "-o", str(out)]) == 0
    assert sorted(p.name for p in tmp_path.iterdir()) == [".ckpt-other.tmp-abcdefgh", "ckpt"]
    assert json.loads((out / "llmx.json").read_text())["format"] == "llmx-checkpoint"


def _copy_model(src: Path, dst: Path) -> Path:
    dst.mkdir(parents=True)
    for f in src.iterdir():
        (dst / f.name).write_bytes(f.read_bytes())
    return dst


def test_a_symlink_out_of_the_model_folder_is_refused_with_the_link_named(tiny_hf, tmp_path, fails):
    secret = tmp_path / "elsewhere" / "secret.json"
    secret.parent.mkdir()
    secret.write_text('{"not": "a tokenizer"}')
    model = _copy_model(tiny_hf, tmp_path / "model")
    (model / "tokenizer_config.json").unlink()
    (model / "tokenizer_config.json").symlink_to(secret)
    line = fails(["convert", model, "-o", tmp_path / "ckpt"], "points outside the model folder", code=2)
    assert str(model / "tokenizer_config.json") in line
    assert not (tmp_path / "ckpt").exists()


def test_a_link_inside_the_model_folder_is_followed(tiny_hf, tmp_path):
    model = _copy_model(tiny_hf, tmp_path / "model")
    (model / "weights").mkdir()
    (model / "model.safetensors").rename(model / "weights" / "model.safetensors")
    (model / "model.safetensors").symlink_to(Path("weights") / "model.safetensors")
    assert run_cli(["convert", str(model), "-o", str(tmp_path / "ckpt")]) == 0


def test_an_index_entry_leaving_the_model_folder_is_refused(tiny_hf, tmp_path, fails):
    model = _copy_model(tiny_hf, tmp_path / "model")
    (model / "model.safetensors").rename(tmp_path / "outside.safetensors")
    names = json.loads(subprocess.run(
        [sys.executable, "-c", "import sys, json; from safetensors import safe_open; "
         "print(json.dumps(list(safe_open(sys.argv[1], 'pt').keys())))", str(tmp_path / "outside.safetensors")],
        capture_output=True, text=True, check=True).stdout)
    index = {"metadata": {}, "weight_map": {name: "../outside.safetensors" for name in names}}
    (model / "model.safetensors.index.json").write_text(json.dumps(index))
    fails(["convert", model, "-o", tmp_path / "ckpt"], "must be a file name in the same folder", code=2)


def test_too_little_free_space_is_refused_before_any_work(tiny_hf, tmp_path, fails, monkeypatch):
    import collections

    import llmx.common.atomic as atomic

    ckpt = tmp_path / "ckpt"
    assert run_cli(["convert", str(tiny_hf), "-o", str(ckpt)]) == 0
    usage = collections.namedtuple("usage", "total used free")
    monkeypatch.setattr(atomic.shutil, "disk_usage", lambda path: usage(10**6, 10**6 - 1000, 1000))
    line = fails(["convert", tiny_hf, "-o", tmp_path / "ckpt2"], "the checkpoint needs about", code=2)
    assert f"and {tmp_path} has 0.0 MB free; free some space" in line
    fails(["build", ckpt, "-o", tmp_path / "engine", *ENGINE_OPTIONS], "the engine needs about", code=2)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt"]
    monkeypatch.undo()
    assert run_cli(["build", str(ckpt), "-o", str(tmp_path / "engine"), *ENGINE_OPTIONS]) == 0
