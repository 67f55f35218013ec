"""Speed-only: turn a --dummy-weights bf16 checkpoint into a quantized one without calibration.

Random weights carry no accuracy to preserve, and calibrating a multi-GB dummy model would only cost
time, so every Linear is quantized through its format's own `quantize_weight` with the weight's amax and
a fixed activation amax. The result has exactly the tensors, shapes and dtypes `llmx quantize` writes,
which is all a speed benchmark needs. Never use it for a real model: use `llmx quantize`.

    python benchmarks/dummy_quantize.py DUMMY_CKPT OUT --algo fp8|fp8_pc_pt|int8_sq|int8_wo|int4_awq|nvfp4 [--kv-cache-dtype fp8]
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from llmx.build.checkpoint import linear_modules, make_provenance, rank_file, read_checkpoint, write_checkpoint_meta
from llmx.build.tokenizer_files import copy_files, find_tokenizer_files
from llmx.common.atomic import atomic_output_dir
from llmx.quant.methods import UNQUANTIZED, method_for
from llmx.quant.methods.kv_cache import KV_CACHE_DTYPES, kv_scale_from_amax, kv_scale_names
from llmx.runtime.config import QuantConfig

FIXED_INPUT_AMAX = torch.tensor(8.0)  # a typical activation range; only scales, never accuracy, depend on it


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("ckpt")
    ap.add_argument("out")
    ap.add_argument("--algo", required=True)
    ap.add_argument("--group-size", type=int, default=128)
    ap.add_argument("--kv-cache-dtype", choices=KV_CACHE_DTYPES, help="also a quantized KV cache (fixed scales)")
    args = ap.parse_args()
    ckpt = read_checkpoint(Path(args.ckpt))
    quant = QuantConfig(algo=args.algo, group_size=args.group_size if "4" in args.algo else None,
                        exclude=("lm_head",), kv_cache_dtype=args.kv_cache_dtype)
    linears = {m.name: m for m in linear_modules(ckpt.model)}
    tensors: dict[str, torch.Tensor] = {}
    with safe_open(str(rank_file(ckpt.path, 0)), framework="pt", device="cpu") as f:
        for name in f.keys():
            module, _, suffix = name.rpartition(".")
            method = method_for(quant, module)
            if module in linears and suffix == "weight" and method is not UNQUANTIZED:
                w = f.get_tensor(name).to("cuda" if torch.cuda.is_available() else "cpu")
                stored = method.quantize_weight(w, ckpt.dtype, input_amax=FIXED_INPUT_AMAX.to(w.device))
                tensors.update({f"{module}.{k}": v.cpu().contiguous() for k, v in stored.items()})
            else:
                tensors[name] = f.get_tensor(name)
    if args.kv_cache_dtype:
        for layer in range(ckpt.model.num_layers):
            for scale_name in kv_scale_names(layer):
                tensors[scale_name] = kv_scale_from_amax(FIXED_INPUT_AMAX, args.kv_cache_dtype)
    with atomic_output_dir(Path(args.out)) as tmp:
        save_file(tensors, str(rank_file(tmp, 0)))
        provenance = make_provenance(ckpt.path, ckpt.provenance.get("source_hash", ""), dummy_weights=True,
                                     note="benchmarks/dummy_quantize.py: uncalibrated, for speed only")
        write_checkpoint_meta(tmp, ckpt.model, ckpt.dtype, quant, ckpt.mapping, provenance)
        copy_files(find_tokenizer_files(ckpt.path, trust_remote_code=False), tmp)
    print(f"{args.out}: {args.algo}, {sum(t.numel() * t.element_size() for t in tensors.values()) / 1e9:.2f} GB")


if __name__ == "__main__":
    main()
