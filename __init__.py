"""llmx: Hugging Face LLM checkpoints to fast inference on NVIDIA GPUs.

Stages: convert -> quantize -> build -> run / bench / eval. Each subpackage is one stage or layer:
llmx.build (convert, checkpoint and engine formats, sharding), llmx.quant, llmx.runtime, llmx.kernels,
llmx.recipes, llmx.cli. Heavy dependencies (torch, transformers, modelopt) are imported lazily by the
code that needs them so `llmx --help` stays fast.
"""

__version__ = "0.1.0"
