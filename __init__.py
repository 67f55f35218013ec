"""llmx: Hugging Face LLM checkpoints to fast inference on NVIDIA GPUs.

Stages: convert -> quantize -> build -> run / bench / eval. Each subpackage is one stage or layer, and imports
run down the layers (docs/ARCHITECTURE.md): llmx.cli; llmx.pipeline, llmx.serve; llmx.bench, llmx.eval,
llmx.recipes; llmx.build; llmx.quant; llmx.ingest (convert); llmx.runtime; llmx.formats (configs, checkpoint
and engine directories, rank layouts, weight formats); llmx.kernels; llmx.common. Heavy dependencies (torch,
transformers, modelopt) are imported lazily by the code that needs them so `llmx --help` stays fast.

The public Python API, importable from here (`from llmx import LLM, SamplingParams`):

- `LLM(engine_dir)`: load an engine; `generate(prompts, params)`, `stream(...)`, `add_request` / `step`
- `SamplingParams`: max_new_tokens, temperature, top_p, top_k, seed, stop tokens
- `convert`, `quantize`, `build_engine`, `evaluate_perplexity`, `run_benchmark`: what the commands call
"""

__version__ = "0.1.0"

import os as _os
import sys as _sys

# This package's folder is the repository root. Run from there (`python -m pytest`, `python -m llmx`), the
# interpreter also puts the folder on sys.path, and then its subfolders shadow installed top-level packages
# of the same names: transformers imports Hugging Face's `kernels` package when it is installed (5.25 needs it)
# and would get llmx's kernels/ instead. llmx's modules are only ever imported as llmx.*, so the entry goes.
_root = _os.path.dirname(_os.path.abspath(__file__))
_sys.path[:] = [p for p in _sys.path if _os.path.abspath(p or _os.curdir) != _root]

# name -> module: each is imported on first use, so `import llmx` (and the CLI's start-up) stays light.
_PUBLIC_API = {
    "LLM": "llmx.runtime.engine",
    "SamplingParams": "llmx.runtime.sequence",
    "convert": "llmx.ingest.convert",
    "quantize": "llmx.quant.api",
    "build_engine": "llmx.build.engine",
    "evaluate_perplexity": "llmx.eval.perplexity",
    "run_benchmark": "llmx.bench.runner",
}
__all__ = ["__version__", *_PUBLIC_API]


def __getattr__(name: str):
    module = _PUBLIC_API.get(name)
    if module is None:
        raise AttributeError(f"module 'llmx' has no attribute {name!r}")
    import importlib

    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_PUBLIC_API))
