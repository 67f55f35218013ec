"""Speed-only: a quantized checkpoint of random weights, without calibration.

Random weights carry no accuracy to preserve, and calibrating a multi-GB dummy model would only cost
time, so every Linear is quantized through its format's own `quantize_weight` with the weight's amax and
a fixed activation amax. The result has exactly the tensors, shapes and dtypes `llmx quantize` writes,
which is all a speed benchmark needs. Never use it for a real model: use `llmx quantize`.

The source is either a --dummy-weights bf16 checkpoint (`llmx convert --dummy-weights`), or, with
--from-config, a config.json alone: each tensor is then drawn on the GPU (N(0, 0.02), norms 1, as
llmx.ingest.dummy draws them) and quantized there, which skips writing and re-reading the 16 GB bf16
checkpoint of an 8B model (85 s of an 8B device run).

    python measurements/dummy_quantize.py SOURCE OUT --algo none|fp8|fp8_pc_pt|int8_sq|int8_wo|int4_awq|nvfp4
        [--from-config] [--kv-cache-dtype fp8] [--quantize-lm-head]

`--algo none --from-config` writes the unquantized checkpoint itself (what `llmx convert --dummy-weights` writes,
drawn on the GPU instead of the CPU).
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Callable, Iterable

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from llmx.common.atomic import atomic_output_dir
from llmx.formats.checkpoint import (checkpoint_tensor_specs, linear_modules, make_provenance, rank_file,
                                     read_checkpoint, write_checkpoint_meta)
from llmx.formats.config import Mapping, QuantConfig
from llmx.formats.families import read_hf_config
from llmx.formats.tokenizer_files import copy_files, find_tokenizer_files
from llmx.formats.weights import UNQUANTIZED, method_for
from llmx.formats.weights.kv_cache import KV_CACHE_DTYPES, kv_scale_from_amax, kv_scale_names
from llmx.ingest.dummy import INIT_STD, is_norm_weight, tensor_seed

FIXED_INPUT_AMAX = torch.tensor(8.0)  # a typical activation range; only scales, never accuracy, depend on it
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("source", help="a --dummy-weights llmx checkpoint, or with --from-config a config.json / its folder")
    ap.add_argument("out")
    ap.add_argument("--algo", required=True)
    ap.add_argument("--group-size", type=int, default=128)
    ap.add_argument("--from-config", action="store_true", help="draw the weights on the device from a config.json")
    ap.add_argument("--dtype", default="bfloat16", help="activation dtype with --from-config")
    ap.add_argument("--kv-cache-dtype", choices=KV_CACHE_DTYPES, help="also a quantized KV cache (fixed scales)")
    ap.add_argument("--quantize-lm-head", action="store_true", help="quantize lm_head too (untied models)")
    args = ap.parse_args()
    source = Path(args.source)
    if args.from_config:
        config_path = source / "config.json" if source.is_dir() else source
        _, model = read_hf_config(config_path)
        dtype, tokenizer_dir, origin = args.dtype, config_path.parent, config_path
        names, read = _drawn(model, dtype)
    else:
        ckpt = read_checkpoint(source)
        model, dtype, tokenizer_dir, origin = ckpt.model, ckpt.dtype, ckpt.path, ckpt.path
        handle = safe_open(str(rank_file(ckpt.path, 0)), framework="pt", device="cpu")
        names, read = list(handle.keys()), handle.get_tensor
    quant = None if args.algo == "none" else QuantConfig(
        algo=args.algo, group_size=args.group_size if "4" in args.algo else None,
        exclude=() if args.quantize_lm_head else ("lm_head",), kv_cache_dtype=args.kv_cache_dtype)
    tensors = _quantized(model, dtype, quant, names, read)
    if args.kv_cache_dtype:
        for layer in range(model.num_layers):
            for scale_name in kv_scale_names(layer):
                tensors[scale_name] = kv_scale_from_amax(FIXED_INPUT_AMAX, args.kv_cache_dtype)
    with atomic_output_dir(Path(args.out)) as tmp:
        save_file(tensors, str(rank_file(tmp, 0)))
        provenance = make_provenance(origin, "", dummy_weights=True,
                                     note="measurements/dummy_quantize.py: uncalibrated, for speed only")
        write_checkpoint_meta(tmp, model, dtype, quant, Mapping(), provenance)
        copy_files(find_tokenizer_files(tokenizer_dir, trust_remote_code=False), tmp)
    print(f"{args.out}: {args.algo}, {sum(t.numel() * t.element_size() for t in tensors.values()) / 1e9:.2f} GB")


def _drawn(model, dtype: str) -> tuple[list[str], Callable[[str], torch.Tensor]]:
    """The unquantized checkpoint's tensor names, and a reader drawing each one on DEVICE."""
    specs = checkpoint_tensor_specs(model, dtype, None)

    def read(name: str) -> torch.Tensor:
        spec = specs[name]
        if is_norm_weight(name) or not spec.shape:
            return torch.ones(tuple(spec.shape), dtype=getattr(torch, spec.dtype), device=DEVICE)
        generator = torch.Generator(DEVICE).manual_seed(tensor_seed(0, name))
        drawn = torch.randn(tuple(spec.shape), generator=generator, device=DEVICE) * INIT_STD
        return drawn.to(getattr(torch, spec.dtype))

    return list(specs), read


def _quantized(model, dtype: str, quant: QuantConfig | None, names: Iterable[str],
               read: Callable[[str], torch.Tensor]) -> dict[str, torch.Tensor]:
    """Every tensor of the quantized checkpoint, on the CPU: Linear weights through their format."""
    linears = {m.name for m in linear_modules(model)}
    tensors: dict[str, torch.Tensor] = {}
    for name in names:
        module, _, suffix = name.rpartition(".")
        method = method_for(quant, module)
        if module in linears and suffix == "weight" and method is not UNQUANTIZED:
            w = read(name).to(DEVICE)
            stored = method.quantize_weight(w, dtype, input_amax=FIXED_INPUT_AMAX.to(w.device))
            tensors.update({f"{module}.{k}": v.cpu().contiguous() for k, v in stored.items()})
        else:
            tensors[name] = read(name).cpu()
    return tensors


if __name__ == "__main__":
    main()
