"""Quantized checkpoints move between devices: quantized on CPU runs on the GPU, quantized on the GPU
runs on the CPU, with the same logits up to the kernels' rounding.

    python measurements/quant_interop.py make-on-cpu DIR --calib FILE     # here: quantize tiny models on CPU, record logits
    python measurements/quant_interop.py check-on-gpu DIR                 # device: run those checkpoints on CUDA
    python measurements/quant_interop.py quantize-on-gpu DIR --calib FILE # device: quantize on CUDA, run on CPU and CUDA
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

ALGOS = ("fp8", "int4_awq", "nvfp4")
PROMPT = list(range(3, 67))


def logits_on(ckpt: Path, device: str, work: Path) -> torch.Tensor:
    from llmx.build.engine import build_engine
    from llmx.formats.config import BuildConfig
    from llmx.runtime.engine import LLM

    engine = build_engine(ckpt, work / f"engine-{ckpt.name}-{device}",
                          BuildConfig(max_batch_size=4, max_seq_len=256, max_num_tokens=256, device=device)).path
    llm = LLM(engine, kv_cache_tokens=512, enforce_eager=True)
    return llm.runner.prompt_logits(PROMPT).float().cpu()


def compare(a: torch.Tensor, b: torch.Tensor) -> dict:
    return {"relative_error": ((a - b).norm() / b.norm()).item(),
            "top1_agreement": (a.argmax(-1) == b.argmax(-1)).float().mean().item()}


def quantize_all(hf: Path, out: Path, calib: str, device: str) -> dict[str, float]:
    from llmx.quant.api import quantize

    seconds = {}
    for algo in ALGOS:
        t0 = time.perf_counter()
        quantize(hf, out / algo, algo=algo, calib_data=calib, calib_size=16, calib_seq_len=256, batch_size=4,
                 group_size=64, device=device, force=True)
        seconds[algo] = time.perf_counter() - t0
    return seconds


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("mode", choices=["make-on-cpu", "check-on-gpu", "quantize-on-gpu"])
    ap.add_argument("dir")
    ap.add_argument("--calib")
    args = ap.parse_args()
    root = Path(args.dir)
    from helpers.tiny_models import make_tiny_hf_model

    if args.mode == "make-on-cpu":
        hf = make_tiny_hf_model("llama", root / "hf", dtype=torch.bfloat16, hidden_size=256, intermediate_size=512,
                                num_attention_heads=4, num_key_value_heads=2, initializer_range=0.02)
        quantize_all(hf, root, args.calib, "cpu")
        expected = {algo: logits_on(root / algo, "cpu", Path("/tmp/interop-work")).tolist() for algo in ALGOS}
        (root / "expected_cpu_logits.json").write_text(json.dumps(expected))
    elif args.mode == "check-on-gpu":
        expected = json.loads((root / "expected_cpu_logits.json").read_text())
        for algo in ALGOS:
            got = logits_on(root / algo, "cuda", Path("/tmp/interop-work"))
            print(f"quantized on CPU, run on CUDA vs CPU: {algo}: {compare(got, torch.tensor(expected[algo]))}")
    else:
        hf = make_tiny_hf_model("llama", root / "hf", dtype=torch.bfloat16, tie=True, hidden_size=576,
                                intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9,
                                num_key_value_heads=3, head_dim=64, vocab_size=49152, initializer_range=0.02)
        seconds = quantize_all(hf, root, args.calib, "cuda")
        for algo in ALGOS:
            cpu = logits_on(root / algo, "cpu", Path("/tmp/interop-work"))
            gpu = logits_on(root / algo, "cuda", Path("/tmp/interop-work"))
            print(f"quantized on CUDA in {seconds[algo]:.1f} s (SmolLM2 shapes), run on CPU vs CUDA: {algo}: "
                  f"{compare(cpu, gpu)}")


if __name__ == "__main__":
    main()
