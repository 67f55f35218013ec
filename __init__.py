"""llmx: Hugging Face LLM checkpoints to fast inference on NVIDIA GPUs.

Stages: convert -> quantize -> build -> run / bench / eval. Each subpackage is one stage or layer:
llmx.build (convert, checkpoint and engine formats, sharding), llmx.quant, llmx.runtime, llmx.kernels,
llmx.recipes, llmx.cli. Heavy dependencies (torch, transformers, modelopt) are imported lazily by the
code that needs them so `llmx --help` stays fast.
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
