"""Model families, keyed by the Hugging Face architecture name (`architectures[0]`)."""

from __future__ import annotations

from llmx.runtime.models.registry import MODEL_REGISTRY, model_class

__all__ = ["MODEL_REGISTRY", "model_class"]
