"""The bytes one batch-1 decode step of a model reads, and its time at a memory bandwidth (the roofline).

For a mixture of experts only the routed experts count: per sparse layer the top-k experts' gate, up and down
weights (and the shared expert, Qwen2-MoE), plus the router; dense layers their MLP. Every layer reads its
attention weights and norms and the KV cache up to `--context` tokens; the step reads one embedding row and the
LM head. Weights in bytes per element of --weight-bytes (2: bf16, 1: fp8; scales not counted); router, norms,
embedding and the LM head stay in bf16 (quantize leaves them so), the KV cache in --kv-bytes.

    python measurements/moe_step_bytes.py measurements/configs/qwen3-30b-a3b.json [--weight-bytes 1] [--context 256]
        [--tbps 3.0]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from llmx.formats.families import read_hf_config
from llmx.formats.config import ModelConfig


def step_bytes(model: ModelConfig, weight_bytes: float, context: int, kv_bytes: float) -> dict[str, float]:
    """Bytes by part for one decode token of one sequence at `context` cached tokens."""
    h, bf16 = model.hidden_size, 2
    attention = (h * (model.q_size + 2 * model.kv_size) + model.q_size * h) * weight_bytes
    kv = 2 * context * model.kv_size * kv_bytes
    parts = {"attention": 0.0, "kv_cache": 0.0, "experts": 0.0, "router": 0.0, "dense_mlp": 0.0, "norms": 0.0}
    for layer in range(model.num_layers):
        parts["attention"] += attention
        parts["kv_cache"] += kv
        parts["norms"] += 2 * h * bf16 + (2 * model.head_dim * bf16 if model.qk_norm else 0)
        if model.is_moe_layer(layer):
            routed = model.num_experts_per_tok * 3 * h * model.moe_intermediate_size
            shared = 3 * h * (model.shared_expert_intermediate_size or 0)
            parts["experts"] += (routed + shared) * weight_bytes
            parts["router"] += model.num_experts * h * bf16
        else:
            parts["dense_mlp"] += 3 * h * model.intermediate_size * weight_bytes
    parts["lm_head"] = model.vocab_size * h * bf16
    parts["embedding_row"] = h * bf16
    return parts


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("config", type=Path, help="a config.json (or the folder holding it)")
    ap.add_argument("--weight-bytes", type=float, default=2.0, help="bytes per Linear weight (2 bf16, 1 fp8)")
    ap.add_argument("--kv-bytes", type=float, default=2.0, help="bytes per KV-cache element")
    ap.add_argument("--context", type=int, default=128, help="cached tokens the step attends to")
    ap.add_argument("--tbps", type=float, default=3.0, help="memory bandwidth, TB/s (H100: 3.0 measured copy rate)")
    args = ap.parse_args()
    path = args.config / "config.json" if args.config.is_dir() else args.config
    _, model = read_hf_config(path)
    parts = step_bytes(model, args.weight_bytes, args.context, args.kv_bytes)
    total = sum(parts.values())
    print(json.dumps({"config": str(path), "layers": model.num_layers, "weight_bytes": args.weight_bytes,
                      "context": args.context, "bytes": {k: round(v) for k, v in parts.items()},
                      "total_gb": round(total / 1e9, 4), "tbps": args.tbps,
                      "roofline_step_us": round(total / (args.tbps * 1e12) * 1e6, 1),
                      "roofline_tok_s": round(args.tbps * 1e12 / total, 1)}, indent=1))


if __name__ == "__main__":
    main()
