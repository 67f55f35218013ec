#!/usr/bin/env python3
"""Peak memory of `llmx convert` on a multi-GB checkpoint: it should track the largest tensor, not the model.

Writes a synthetic Llama checkpoint (random float32 weights, several safetensors shards plus the index,
~3 GB by default) into a temporary directory, converts it to bfloat16 in a child process, and prints the
child's peak resident set size (getrusage ru_maxrss) next to the largest tensor and the total size. A
second child that only imports the same modules gives the baseline the conversion adds to. With
--dummy-8b it also times `llmx convert --dummy-weights` on Llama-3.1-8B shapes (16 GB written).
Everything it writes is deleted at the end.

    python measurements/convert_peak_rss.py [--size-gb 3] [--dummy-8b] [--workdir /tmp]
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

# Runs in a fresh interpreter, so its ru_maxrss covers only this conversion.
_CHILD = r"""
import json, resource, sys, time
from llmx.ingest.convert import convert
import torch  # noqa: F401  (the baseline child imports the same)
mode, src, out = sys.argv[1], sys.argv[2], sys.argv[3]
t0 = time.perf_counter()
if mode == "convert":
    convert(src, out, dtype="bfloat16")
elif mode == "dummy":
    convert(src, out, dtype="bfloat16", dummy_weights=True)
seconds = time.perf_counter() - t0
print(json.dumps({"max_rss_kb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss, "seconds": seconds}))
"""

MB = 1e6
GB = 1e9


def synthetic_config(size_gb: float) -> dict:
    """A TinyLlama-like shape (hidden 2048, 32k vocab) with enough layers to reach size_gb in float32."""
    hidden, inter, vocab, heads, kv_heads = 2048, 5632, 32000, 16, 4
    head_dim = hidden // heads
    per_layer = 4 * (2 * hidden * hidden + 2 * hidden * kv_heads * head_dim + 3 * hidden * inter + 2 * hidden)
    fixed = 4 * (2 * vocab * hidden + hidden)
    layers = max(1, round((size_gb * GB - fixed) / per_layer))
    return {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": hidden,
            "intermediate_size": inter, "num_hidden_layers": layers, "num_attention_heads": heads,
            "num_key_value_heads": kv_heads, "vocab_size": vocab, "max_position_embeddings": 4096,
            "rms_norm_eps": 1e-5, "rope_theta": 10000.0, "hidden_act": "silu", "tie_word_embeddings": False,
            "torch_dtype": "float32"}


def write_synthetic_hf(out_dir: Path, config: dict, shard_bytes: float) -> tuple[int, str, int, int]:
    """Write config.json + float32 shards + index; returns (total bytes, largest name, its bytes, shards)."""
    from llmx.formats.checkpoint import checkpoint_tensor_specs
    from llmx.formats.families import llmx_to_hf_name, model_config_from_hf
    from llmx.formats.safetensors_stream import SafetensorsStreamWriter, TensorEntry
    from llmx.ingest.dummy import random_slabs

    out_dir.mkdir(parents=True)
    (out_dir / "config.json").write_text(json.dumps(config, indent=2))
    model = model_config_from_hf(config, out_dir / "config.json")
    specs = checkpoint_tensor_specs(model, "float32", None)
    entries = [TensorEntry(llmx_to_hf_name(n), "float32", tuple(s.shape)) for n, s in specs.items()]

    shards: list[list[TensorEntry]] = [[]]
    for e in entries:
        if shards[-1] and sum(x.nbytes for x in shards[-1]) + e.nbytes > shard_bytes:
            shards.append([])
        shards[-1].append(e)
    weight_map = {}
    hf_to_spec = {llmx_to_hf_name(n): (n, s) for n, s in specs.items()}
    for i, shard in enumerate(shards):
        fname = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        with SafetensorsStreamWriter(out_dir / fname, shard) as writer:
            for e in shard:
                name, spec = hf_to_spec[e.name]
                writer.write_chunks(e.name, random_slabs(name, spec, seed=0), shape=e.shape)
                weight_map[e.name] = fname
    total = sum(e.nbytes for e in entries)
    (out_dir / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2))
    largest = max(entries, key=lambda e: e.nbytes)
    return total, largest.name, largest.nbytes, len(shards)


def run_child(mode: str, src: Path, out: Path) -> dict:
    proc = subprocess.run([sys.executable, "-c", _CHILD, mode, str(src), str(out)], capture_output=True, text=True)
    if proc.returncode != 0:
        sys.exit(f"child `{mode}` failed:\n{proc.stderr}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def dir_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in path.iterdir() if p.is_file())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size-gb", type=float, default=3.0, help="float32 size of the synthetic checkpoint")
    ap.add_argument("--shard-gb", type=float, default=1.0, help="size of each safetensors shard")
    ap.add_argument("--dummy-8b", action="store_true", help="also write a Llama-3.1-8B dummy checkpoint (16 GB)")
    ap.add_argument("--workdir", default=None, help="where to put the temporary files (default: system temp)")
    args = ap.parse_args()

    root = Path(tempfile.mkdtemp(prefix="llmx-rss-", dir=args.workdir))
    try:
        config = synthetic_config(args.size_gb)
        t0 = time.perf_counter()
        total, largest, largest_bytes, n_shards = write_synthetic_hf(root / "hf", config, args.shard_gb * GB)
        print(f"synthetic HF checkpoint: Llama shapes, hidden {config['hidden_size']}, "
              f"{config['num_hidden_layers']} layers, vocab {config['vocab_size']}: {total / GB:.2f} GB float32 "
              f"in {n_shards} shards (written in {time.perf_counter() - t0:.1f} s)")
        print(f"largest tensor: {largest} {largest_bytes / MB:.1f} MB float32 "
              f"({largest_bytes / 2 / MB:.1f} MB once cast to bfloat16)")

        base = run_child("baseline", root / "hf", root / "unused")
        conv = run_child("convert", root / "hf", root / "ckpt")
        base_mb, peak_mb = base["max_rss_kb"] * 1024 / MB, conv["max_rss_kb"] * 1024 / MB
        print(f"convert -> bfloat16: {conv['seconds']:.1f} s, {total / GB / conv['seconds']:.2f} GB/s read, "
              f"output {dir_bytes(root / 'ckpt') / GB:.2f} GB")
        print(f"peak RSS of the convert process: {peak_mb:.0f} MB = {base_mb:.0f} MB baseline (python + torch + "
              f"llmx imported) + {peak_mb - base_mb:.0f} MB for the conversion "
              f"(largest tensor {largest_bytes / MB:.0f} MB float32 + its bfloat16 copy "
              f"{largest_bytes / 2 / MB:.0f} MB; model {total / GB:.2f} GB)")
        shutil.rmtree(root / "ckpt")

        if args.dummy_8b:
            hf8 = root / "hf8b"
            hf8.mkdir()
            (hf8 / "config.json").write_text(json.dumps({
                "architectures": ["LlamaForCausalLM"], "hidden_size": 4096, "intermediate_size": 14336,
                "num_hidden_layers": 32, "num_attention_heads": 32, "num_key_value_heads": 8,
                "vocab_size": 128256, "max_position_embeddings": 131072, "rms_norm_eps": 1e-5,
                "rope_theta": 500000.0, "rope_scaling": {"rope_type": "llama3", "factor": 8.0,
                                                         "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                                                         "original_max_position_embeddings": 8192}}))
            dummy = run_child("dummy", hf8, root / "ckpt8b")
            size = dir_bytes(root / "ckpt8b")
            print(f"dummy Llama-3.1-8B (bfloat16): {size / GB:.2f} GB written in {dummy['seconds']:.1f} s, "
                  f"peak RSS {dummy['max_rss_kb'] * 1024 / MB:.0f} MB")
    finally:
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
