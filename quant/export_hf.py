"""`--export-format hf`: a ModelOpt unified Hugging Face checkpoint (config.json with quantization_config,
hf_quant_config.json, model.safetensors) as vLLM, SGLang and TensorRT-LLM load it, plus the tokenizer.

ModelOpt's export rewrites the model it is given (packs weights, folds scales into norms), so it runs on
a deep copy: the caller's calibrated model stays usable.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

from llmx.formats.tokenizer_files import copy_files

# The llmx modules that import torch are imported inside the functions that use them, so importing this
# module does not load torch.

HF_QUANT_CONFIG = "hf_quant_config.json"


def export_hf(model: Any, out_dir: Path, dtype: str, tokenizer_files: list[Path]) -> None:
    """Write the HF folder into `out_dir` (the temporary directory of an atomic output)."""
    import torch

    from llmx.quant.modelopt import export_hf_checkpoint

    export_hf_checkpoint(copy.deepcopy(model), str(out_dir), getattr(torch, dtype))
    copy_files(tokenizer_files, Path(out_dir))
