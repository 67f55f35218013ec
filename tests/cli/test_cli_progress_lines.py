"""Off a terminal, long commands print plain progress lines (stage, done/total, rate, ETA) at an interval."""

from __future__ import annotations

import io
import subprocess
import sys

from llmx.cli._progress_lines import ProgressLines


class FakeClock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_first_update_then_one_line_per_interval_then_completion():
    stream, clock = io.StringIO(), FakeClock()
    sink = ProgressLines(stream, interval=15.0, clock=clock)
    sink("calibrate", 0, 64)
    for done in range(1, 64):
        clock.now += 1.0
        sink("calibrate", done, 64)
    clock.now += 1.0
    sink("calibrate", 64, 64)
    sink("calibrate", 64, 64)  # a repeated completion prints nothing more
    lines = stream.getvalue().splitlines()
    # start, every 15 s over 63 s of updates (4 lines), completion
    assert len(lines) == 6, lines
    assert lines[0].startswith("llmx: calibrate 0/64 (0%)")
    assert lines[1] == "llmx: calibrate 15/64 (23%), 1/s, 15 s elapsed, ETA 49 s"
    assert lines[-1] == "llmx: calibrate 64/64 (100%), 1/s, 1 min 4 s elapsed"


def test_stages_are_independent_and_unknown_totals_show_a_count():
    stream, clock = io.StringIO(), FakeClock()
    sink = ProgressLines(stream, interval=15.0, clock=clock)
    sink("load", 1, 10)
    sink("requests", 3, 0)
    clock.now += 2.0
    sink("load", 10, 10)
    lines = stream.getvalue().splitlines()
    assert [line.split()[1] for line in lines] == ["load", "requests", "load"]
    assert lines[1] == "llmx: requests 3, 0 s elapsed"
    assert lines[2] == "llmx: load 10/10 (100%), 4.5/s, 2 s elapsed"  # 9 done in 2 s since the first report


def test_convert_with_stderr_to_a_file_prints_progress_lines(tiny_model_dir, tmp_path):
    hf = tiny_model_dir("llama")
    result = subprocess.run([sys.executable, "-m", "llmx", "convert", str(hf), "-o", str(tmp_path / "ckpt")],
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    lines = [line for line in result.stderr.splitlines() if line.startswith("llmx: ")]
    assert lines and any("100%" in line for line in lines), result.stderr
