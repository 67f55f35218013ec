"""An architecture llmx cannot convert is refused from config.json alone, before torch and transformers load."""

from __future__ import annotations

import json
import subprocess
import sys

PROBE = """
import atexit, sys
atexit.register(lambda: print("heavy imports:", sorted(m for m in ("torch", "transformers") if m in sys.modules),
                              file=sys.stderr))
from llmx.cli.main import main
sys.argv = ["llmx", "convert", sys.argv[1], "-o", sys.argv[2]]
main()
"""


def test_unsupported_architecture_is_refused_without_loading_torch(tmp_path):
    model = tmp_path / "falcon"
    model.mkdir()
    (model / "config.json").write_text(json.dumps({"architectures": ["FalconForCausalLM"], "model_type": "falcon"}))
    result = subprocess.run([sys.executable, "-c", PROBE, str(model), str(tmp_path / "out")], capture_output=True,
                            text=True, timeout=120)
    assert result.returncode == 2, result.stderr
    assert "architecture FalconForCausalLM is not supported" in result.stderr
    assert "heavy imports: []" in result.stderr
    assert not (tmp_path / "out").exists()
