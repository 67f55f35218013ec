"""The README's pipeline walk-through runs as written on the quickstart's model (SmolLM2-135M on CPU): every
convert, quantize, build, run, bench and eval command of the block, in order, each exiting 0."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from helpers.corpus import CORPUS

REPO = Path(__file__).resolve().parents[2]
MARKER = "<!-- readme-pipeline"

pytestmark = pytest.mark.slow


def readme_pipeline_block() -> str:
    text = (REPO / "README.md").read_text(encoding="utf-8")
    match = re.search(re.escape(MARKER) + r".*?-->\n```bash\n(.*?)```", text, flags=re.DOTALL)
    assert match, f"README.md has no ```bash block after {MARKER!r}"
    return match.group(1)


def test_the_block_names_every_stage():
    block = readme_pipeline_block()
    for command in ("llmx convert", "llmx quantize", "llmx build", "llmx run", "llmx bench", "llmx eval"):
        assert command in block, command


def test_readme_pipeline_runs_as_written(tmp_path):
    from helpers.smollm2 import smollm2_dir

    # The repository root as a user has it after the quickstart: the model in .llmx-work/, the corpus in tests/.
    (tmp_path / ".llmx-work").mkdir()
    (tmp_path / ".llmx-work" / "smollm2-135m-instruct").symlink_to(smollm2_dir(), target_is_directory=True)
    (tmp_path / "tests" / "data").mkdir(parents=True)
    (tmp_path / "tests" / "data" / "corpus").symlink_to(CORPUS, target_is_directory=True)
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"}
    result = subprocess.run(["bash", "-euo", "pipefail", "-c", readme_pipeline_block()], cwd=tmp_path, env=env,
                            capture_output=True, text=True, timeout=2400)
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-4000:]

    outputs = json.loads((tmp_path / "outputs.json").read_text())
    assert len(outputs["outputs"]) == 2 and all(o["text"] for o in outputs["outputs"])
    assert json.loads((tmp_path / "bench.json").read_text())["schema"] == "llmx-bench/1"
    assert json.loads((tmp_path / "bf16.json").read_text())["schema"] == "llmx-eval/1"
    awq = json.loads((tmp_path / "ckpt" / "smollm2-awq" / "llmx.json").read_text())
    assert awq["quantization"]["group_size"] == 64
    assert sorted(p.name for p in (tmp_path / "engines" / "smollm2-tp3").glob("rank*.safetensors")) == [
        "rank0.safetensors", "rank1.safetensors", "rank2.safetensors"]
