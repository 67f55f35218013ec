"""Architecture name -> model class. llmx.formats.families validates names against the same set."""

from __future__ import annotations

from llmx.runtime.models.decoder import DecoderModel
from llmx.runtime.models.gemma import GemmaModel

MODEL_REGISTRY: dict[str, type] = {
    "LlamaForCausalLM": DecoderModel,
    "MistralForCausalLM": DecoderModel,
    "Qwen2ForCausalLM": DecoderModel,
    "Qwen3ForCausalLM": DecoderModel,
    "Phi3ForCausalLM": DecoderModel,
    "Gemma2ForCausalLM": GemmaModel,
    "Gemma3ForCausalLM": GemmaModel,
    "MixtralForCausalLM": DecoderModel,
    "Qwen2MoeForCausalLM": DecoderModel,
    "Qwen3MoeForCausalLM": DecoderModel,
}


def model_class(architecture: str) -> type:
    return MODEL_REGISTRY[architecture]
