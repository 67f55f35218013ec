"""The CLI boundary: environment errors become one sentence (exit 2), Ctrl-C exits 130, bugs keep their
traceback, and --debug / LLMX_DEBUG=1 show the traceback of any error."""

from __future__ import annotations

import errno
import json
import os
import resource
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from llmx.cli.main import run_cli
from llmx.common.errors import describe_exception


def raise_in_eval(monkeypatch, exc: BaseException) -> None:
    """Make `llmx eval` raise `exc` from inside the command (where a real fault would come from)."""
    import llmx.eval.perplexity as perplexity

    def fault(*args, **kwargs):
        raise exc

    monkeypatch.setattr(perplexity, "evaluate_perplexity", fault)


EVAL = ["eval", "engine", "--data", "text.txt"]


@pytest.mark.parametrize("exc, fragments", [
    (OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), "/data/out/rank0.safetensors"),
     ["/data/out/rank0.safetensors: No space left on device (ENOSPC); free some space"]),
    (OSError(errno.EFBIG, os.strerror(errno.EFBIG)), ["File too large (EFBIG)", "`ulimit -f`"]),
    (PermissionError(errno.EACCES, os.strerror(errno.EACCES), "/ro/engine"),
     ["/ro/engine: Permission denied (EACCES); choose a path you may write to"]),
    (OSError(errno.EROFS, os.strerror(errno.EROFS), "/mnt/ro/x"), ["/mnt/ro/x: Read-only file system (EROFS)"]),
    (OSError(errno.EXDEV, os.strerror(errno.EXDEV), "/a", None, "/b"), ["/a -> /b: Invalid cross-device link (EXDEV)"]),
    (MemoryError(), ["out of memory"]),
    (UnicodeDecodeError("utf-8", b"ab\xff", 2, 3, "invalid start byte"),
     ["not valid UTF-8 was read (byte 2: invalid start byte)"]),
])
def test_environment_errors_are_one_sentence(monkeypatch, fails, exc, fragments):
    raise_in_eval(monkeypatch, exc)
    line = fails(EVAL, fragments[0], code=2)
    assert all(f in line for f in fragments), line


def test_a_gpu_out_of_memory_is_one_sentence(monkeypatch, fails):
    class OutOfMemoryError(RuntimeError):  # torch.cuda.OutOfMemoryError's name, without a GPU
        pass

    raise_in_eval(monkeypatch, OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB"))
    fails(EVAL, "the GPU ran out of memory: lower --kv-cache-fraction", code=2)


def test_a_bug_keeps_its_traceback(monkeypatch):
    raise_in_eval(monkeypatch, ZeroDivisionError("a bug"))
    with pytest.raises(ZeroDivisionError):
        run_cli(EVAL)
    assert describe_exception(ZeroDivisionError()) is None


def test_ctrl_c_inside_a_command_exits_130(monkeypatch, capsys):
    raise_in_eval(monkeypatch, KeyboardInterrupt())
    assert run_cli(EVAL) == 130
    assert "Traceback" not in capsys.readouterr().err


@pytest.mark.parametrize("how", ["flag", "env"])
def test_debug_shows_the_traceback_then_the_sentence(monkeypatch, capsys, how):
    raise_in_eval(monkeypatch, OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), "/full/x"))
    argv = ["--debug", *EVAL] if how == "flag" else EVAL
    if how == "env":
        monkeypatch.setenv("LLMX_DEBUG", "1")
    assert run_cli(argv) == 2
    err = capsys.readouterr().err
    assert "Traceback (most recent call last)" in err and "OSError" in err
    assert err.strip().splitlines()[-1].startswith("error: /full/x: No space left on device")


def test_debug_is_off_again_for_the_next_run(monkeypatch, capsys):
    raise_in_eval(monkeypatch, OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), "/full/x"))
    assert run_cli(["--debug", *EVAL]) == 2
    capsys.readouterr()
    assert run_cli(EVAL) == 2
    assert "Traceback" not in capsys.readouterr().err


def llmx(*args: str, limit_file_bytes: int | None = None, **kwargs) -> subprocess.Popen:
    def limit():
        if limit_file_bytes is not None:
            resource.setrlimit(resource.RLIMIT_FSIZE, (limit_file_bytes, limit_file_bytes))

    return subprocess.Popen([sys.executable, "-m", "llmx", *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, preexec_fn=limit, **kwargs)


def test_a_file_size_limit_during_convert_is_one_sentence_and_leaves_nothing(tiny_hf, tmp_path):
    process = llmx("convert", str(tiny_hf), "-o", str(tmp_path / "ckpt"), limit_file_bytes=64 * 1024)
    _, err = process.communicate(timeout=300)
    assert process.returncode == 2, err
    assert err.strip().splitlines()[-1].startswith("error: File too large (EFBIG)") and "Traceback" not in err
    assert os.listdir(tmp_path) == []  # the temporary directory went with the failure


@pytest.mark.parametrize("out", ["/proc/llmx-fault-test", "/proc/self/status", "/sys/llmx-fault-test", "/dev/null"])
def test_special_output_paths_are_one_sentence(tiny_hf, fails, out):
    fails(["convert", tiny_hf, "-o", out, "--force"], "a system folder that holds no files", code=2)


def test_sigint_during_a_benchmark_exits_130_without_a_traceback(tiny_engine):
    process = llmx("bench", str(tiny_engine), "--isl", "16", "--osl", "40", "--num-requests", "100000",
                   "--warmup", "0", "--concurrency", "1", "--kv-cache-tokens", "256")
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:  # wait until the engine is loaded and requests run
        time.sleep(0.5)
        if process.poll() is not None:
            break
        if Path(f"/proc/{process.pid}/status").is_file() and _cpu_seconds(process.pid) > 4:
            break
    assert process.poll() is None, process.communicate()[1]
    process.send_signal(signal.SIGINT)
    _, err = process.communicate(timeout=60)
    assert process.returncode == 130, err
    assert "Traceback" not in err and "KeyboardInterrupt" not in err


def _cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def test_a_cpu_allocation_failure_is_one_sentence(monkeypatch, fails):
    import torch

    try:
        torch.empty(2**50, dtype=torch.uint8)  # 1 PiB: refused by the allocator without touching memory
    except RuntimeError as exc:
        allocation_failure = exc
    else:
        pytest.skip("this allocator accepted a 1 PiB request")
    raise_in_eval(monkeypatch, allocation_failure)
    fails(EVAL, "the machine ran out of memory (1,048,576.0 GiB at once): lower --kv-cache-tokens", code=2)


def test_ctrl_c_inside_a_pipeline_stage_is_not_swallowed(nan_checkpoint, heldout, tmp_path, monkeypatch, capsys):
    """The runner reports a stage's exceptions as failures; Ctrl-C is not one of them: it exits 130 and a
    second run can take the workdir's lock again."""
    import yaml

    import llmx.pipeline.stages as stages

    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(yaml.safe_dump({
        "family": "llama", "target": "cpu", "build": {"max_seq_len": 64, "device": "cpu"},
        "eval": {"datasets": [{"name": "heldout", "data": str(heldout), "seq_len": 32, "windows": 1}]}}))
    argv = ["pipeline", "--recipe", str(recipe), "--model", str(nan_checkpoint), "--workdir", str(tmp_path / "w")]

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(stages, "run_build", interrupted)
    assert run_cli(argv) == 130
    assert "Traceback" not in capsys.readouterr().err
    monkeypatch.undo()
    assert run_cli(argv) == 1  # the lock was released; the NaN model then fails its eval


def test_a_full_disk_in_a_pipeline_stage_is_one_sentence(nan_checkpoint, heldout, tmp_path, monkeypatch, capsys):
    import yaml

    import llmx.pipeline.stages as stages

    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(yaml.safe_dump({"family": "llama", "target": "cpu", "build": {"max_seq_len": 64,
                                                                                   "device": "cpu"}}))

    def disk_full(*args, **kwargs):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(tmp_path / "w" / "build" / "rank0.safetensors"))

    monkeypatch.setattr(stages, "run_build", disk_full)
    code = run_cli(["pipeline", "--recipe", str(recipe), "--model", str(nan_checkpoint), "--workdir",
                    str(tmp_path / "w"), "--json"])
    captured = capsys.readouterr()
    assert code == 2 and "Traceback" not in captured.err
    [build] = [s for s in json.loads(captured.out)["stages"] if s["name"] == "build"]
    assert build["status"] == "failed"
    assert build["message"].endswith("rank0.safetensors: No space left on device (ENOSPC); free some space or write "
                                     "the output to another disk.")
