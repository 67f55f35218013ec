"""Shared pieces of the pipeline tests: one tiny random Llama, real text from the test corpus (tests/data/corpus), recipe files,
and an in-process `llmx pipeline` runner."""

from __future__ import annotations

import contextlib
import copy
import io
import json
import shutil
from pathlib import Path
from typing import Any, Callable

import pytest

from helpers.corpus import CORPUS


# The smallest recipe that exercises every stage: int8 SmoothQuant (it calibrates, so the calibration text
# is an input), an engine of 64 tokens, two perplexity windows, four 16/4 benchmark requests.
BASE_RECIPE: dict[str, Any] = {
    "family": "llama",
    "target": "cpu",
    "quantize": {"algo": "int8_sq", "calib_data": "calib.txt", "calib_size": 4, "calib_seq_len": 32,
                 "batch_size": 4, "device": "cpu"},
    "build": {"max_batch_size": 4, "max_seq_len": 64, "max_num_tokens": 64, "device": "cpu"},
    "eval": {"datasets": [{"name": "heldout", "data": "heldout.txt", "seq_len": 32, "windows": 2,
                           "max_increase": 10.0}]},
    "bench": {"warmup": 1, "scenarios": [{"name": "tiny", "isl": 16, "osl": 4, "num_requests": 4,
                                          "min_output_tok_s": 0.01}]},
}
WEIGHT_ONLY = {"algo": "int8_wo", "device": "cpu"}  # no calibration: the quickest quantize


class Project:
    """A folder with calibration and held-out text, a recipe writer, and `run` for `llmx pipeline --json`."""

    def __init__(self, root: Path, model: Path, capture: Callable[[], tuple[str, str]]):
        self.root = root
        self.model = model
        self.calib = root / "calib.txt"
        self.heldout = root / "heldout.txt"
        self.workdir = root / "work"
        self._capture = capture
        self.calib.write_text((CORPUS / "austen_prideprejudice.txt").read_text(encoding="utf-8")[:20_000])
        self.heldout.write_text((CORPUS / "austen_persuasion.txt").read_text(encoding="utf-8")[:6_000])

    @staticmethod
    def base() -> dict[str, Any]:
        """A copy of BASE_RECIPE, to derive changed sections from."""
        return copy.deepcopy(BASE_RECIPE)

    def recipe(self, name: str = "recipe.yaml", **sections: Any) -> Path:
        """BASE_RECIPE with whole sections replaced (a value of None removes the section)."""
        import yaml

        doc = copy.deepcopy(BASE_RECIPE)
        for key, value in sections.items():
            if value is None:
                doc.pop(key, None)
            else:
                doc[key] = value
        path = self.root / name
        path.write_text(yaml.safe_dump(doc, sort_keys=False))
        return path

    def run(self, recipe: Path, *extra: str, model: Path | None = None) -> tuple[int, dict | None, str]:
        """`llmx pipeline --recipe R --model M --workdir W --json EXTRA...` -> (exit code, summary or None, stderr)."""
        from llmx.cli.main import run_cli

        argv = ["pipeline", "--recipe", str(recipe), "--model", str(model or self.model),
                "--workdir", str(self.workdir), "--json", *extra]
        code = run_cli(argv)
        out, err = self._capture()
        return code, (json.loads(out) if out.strip() else None), err

    @staticmethod
    def statuses(summary: dict) -> dict[str, str]:
        return {stage["name"]: stage["status"] for stage in summary["stages"]}

    def output_mtimes(self) -> dict[str, int]:
        """mtime of every stage output file in the workdir (the pipeline's own bookkeeping excluded)."""
        return {p.relative_to(self.workdir).as_posix(): p.stat().st_mtime_ns for p in self.workdir.rglob("*")
                if p.is_file() and ".llmx-pipeline" not in p.parts}


@pytest.fixture(scope="session")
def tiny_hf(tmp_path_factory) -> Path:
    """One tiny random Llama (HF folder) for every pipeline test; tests only read it."""
    from helpers.tiny_models import make_tiny_hf_model

    return make_tiny_hf_model("llama", tmp_path_factory.mktemp("pipeline-model") / "hf")


@pytest.fixture
def project(tmp_path, tiny_hf, capsys) -> Project:
    def capture() -> tuple[str, str]:
        captured = capsys.readouterr()
        return captured.out, captured.err

    return Project(tmp_path, tiny_hf, capture)


@pytest.fixture(scope="session")
def measured_workdir(tmp_path_factory, tiny_hf) -> Path:
    """A workdir after one complete run of BASE_RECIPE with int8 weight-only quantization (made once).

    Keys hold content hashes, not paths, so a copy of it next to another Project's identical texts is
    reused there as it is.
    """
    streams = {"out": io.StringIO(), "err": io.StringIO()}

    def capture() -> tuple[str, str]:
        out, err = streams["out"].getvalue(), streams["err"].getvalue()
        streams.update(out=io.StringIO(), err=io.StringIO())
        return out, err

    project = Project(tmp_path_factory.mktemp("measured"), tiny_hf, capture)
    with contextlib.redirect_stdout(streams["out"]):
        code, _, err = project.run(project.recipe(quantize=WEIGHT_ONLY))
    assert code == 0, err
    return project.workdir


@pytest.fixture
def measured(project, measured_workdir) -> Project:
    """`project` with a copy of measured_workdir as its workdir."""
    shutil.copytree(measured_workdir, project.workdir)
    return project
