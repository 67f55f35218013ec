"""Load an engine rank's weights straight into a model's modules.

Module names equal tensor-name prefixes (see runtime/models/decoder.py), so each module takes the
tensors its QuantMethod declares. Every tensor in the file must be consumed and every expected tensor
present with the declared shape: a mismatch is an engine/runtime disagreement, reported by name.
"""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors import safe_open

from llmx.common.errors import LlmxError
from llmx.runtime.layers.attention import Attention
from llmx.runtime.layers.embedding import LMHead, VocabEmbedding
from llmx.runtime.layers.linear import Linear
from llmx.runtime.layers.norm import RMSNorm


class _RankFile:
    def __init__(self, path: Path, handle):
        self.path = path
        self.handle = handle
        self.names = set(handle.keys())
        self.used: set[str] = set()

    def take(self, name: str, shape: tuple[int, ...] | None = None) -> torch.Tensor:
        if name not in self.names:
            raise LlmxError(f"{self.path}: tensor `{name}` is missing; rebuild the engine with `llmx build`.")
        t = self.handle.get_tensor(name)
        if shape is not None and tuple(t.shape) != tuple(shape):
            raise LlmxError(f"{self.path}: tensor `{name}` has shape {tuple(t.shape)}, the model expects "
                            f"{tuple(shape)}; rebuild the engine with `llmx build`.")
        self.used.add(name)
        return t

    def maybe(self, name: str) -> torch.Tensor | None:
        return self.take(name) if name in self.names else None


def load_rank_weights(model: torch.nn.Module, path: Path, device: torch.device, act_dtype: str) -> None:
    dtype = getattr(torch, act_dtype)
    with safe_open(str(path), framework="pt", device="cpu") as handle:
        f = _RankFile(path, handle)
        for name, module in model.named_modules():
            if isinstance(module, Linear):
                specs = module.expected_tensors(act_dtype)
                tensors = {s: f.take(f"{name}.{s}", spec.shape) for s, spec in specs.items()}
                module.tensors = module.method.prepare_for_device(tensors, device)
                if module.has_bias:
                    module.bias = f.take(f"{name}.bias", (module.out_features,)).to(device, dtype)
            elif isinstance(module, RMSNorm):
                module.weight = f.take(f"{name}.weight", (module.size,)).to(device, dtype)
            elif isinstance(module, VocabEmbedding):
                module.weight = f.take(f"{name}.weight").to(device, dtype)
                if module.weight.shape[0] != module.vocab_per_rank:
                    raise LlmxError(f"{path}: `{name}.weight` has {module.weight.shape[0]} vocabulary rows, "
                                    f"expected {module.vocab_per_rank}; rebuild the engine with `llmx build`.")
            elif isinstance(module, LMHead) and module.tied_to is None:
                specs = module.method.weight_specs(module.rows, module.hidden_size, act_dtype)
                tensors = {s: f.take(f"{name}.{s}", spec.shape) for s, spec in specs.items()}
                module.tensors = module.method.prepare_for_device(tensors, device)
            elif isinstance(module, Attention):
                for attr in ("k_scale", "v_scale"):
                    scale = f.maybe(f"{name}.{attr}")
                    if scale is not None:
                        setattr(module, attr, scale.to(device, torch.float32))
        unused = sorted(f.names - f.used)
        if unused:
            raise LlmxError(f"{path}: holds {len(unused)} tensors this runtime does not use (first: `{unused[0]}`); "
                            "the engine was built by an incompatible llmx version, rebuild it with `llmx build`.")
    for module in model.modules():  # layouts made from the loaded tensors (runtime/models/moe.py stacks experts)
        if hasattr(module, "weights_loaded"):
            module.weights_loaded()

