"""The scheduler's KV admission policies side by side on one workload, without a model: steps, preemptions and
the prompt tokens recomputed because of them.

    python measurements/admission_policies.py --isl 2048 --osl 2048 --num-requests 1500 --max-batch 512
        --kv-cache-tokens 880000 [--block-size 16] [--max-num-tokens 8192]
        [--policies reserve,watermark=0,watermark=0.01] [--json OUT]

Runs runtime/scheduler.py as the engine does (every request at once, EOS ignored, each step's samples applied
before the next is scheduled) over a block manager of --kv-cache-tokens, with a stand-in for the model (every
sampled token is 1). It counts what each policy makes the GPU do: steps by type, the tokens computed, and how
many of them are recomputation (prompt + generated tokens of preempted sequences computed again). Use the KV
size an engine reports (`llmx bench` prints it; step_breakdown.py too) to predict that engine's behaviour; the
time each step takes is for step_breakdown.py to measure.
"""

from __future__ import annotations

import argparse
import os
import random
import sys
import time
from pathlib import Path

from llmx.runtime.block_manager import BlockManager
from llmx.runtime.scheduler import Scheduler
from llmx.runtime.sequence import SamplingParams, Sequence


def parse_policy(text: str) -> tuple[str, float | None]:
    """reserve | watermark | watermark=FRACTION -> (admission, watermark or None for the default)."""
    name, _, value = text.partition("=")
    if name not in ("reserve", "watermark") or (value and name != "watermark"):
        raise ValueError(f"policy {text!r}: use reserve, watermark or watermark=FRACTION")
    return name, float(value) if value else None


def simulate(policy: str, *, isl: int, osl: int, num_requests: int, max_batch: int, kv_cache_tokens: int,
             block_size: int = 16, max_num_tokens: int = 8192, seed: int = 0) -> dict:
    """One run of the workload under `policy`; returns its step and token counts."""
    admission, watermark = parse_policy(policy)
    blocks = BlockManager(kv_cache_tokens // block_size, block_size)
    sched = Scheduler(blocks, max_num_seqs=max_batch, max_num_tokens=max_num_tokens, max_model_len=isl + osl,
                      block_size=block_size, admission=admission,
                      **({"watermark": watermark} if watermark is not None else {}))
    rng = random.Random(seed)
    params = SamplingParams(max_new_tokens=osl, ignore_eos=True)
    for i in range(num_requests):  # random prompts: no prefix-cache hits between requests
        sched.add(Sequence(i, [rng.randrange(1, 32000) for _ in range(isl)], params))
    kinds = {"prefill": 0, "mixed": 0, "decode": 0}
    computed = decode_rows = peak_running = 0
    start = time.perf_counter()
    while sched.has_unfinished():
        out = sched.schedule()
        rows = sum(1 for item in out.scheduled if item.num_new_tokens == 1 and item.samples)
        tokens = out.num_batched_tokens
        kinds["decode" if tokens == rows else "mixed" if rows else "prefill"] += 1
        computed += tokens
        decode_rows += rows
        peak_running = max(peak_running, sched.num_running)
        sched.postprocess(out, {item.seq: 1 for item in out.scheduled if item.samples})
    needed = num_requests * (isl + osl - 1)  # the last output token is sampled, never computed
    steps = sum(kinds.values())
    return {"policy": policy, "steps": steps, "steps_by_type": kinds, "preemptions": sched.num_preemptions,
            "tokens_computed": computed, "tokens_recomputed": computed - needed,
            "recomputed_share": (computed - needed) / needed, "mean_decode_rows": decode_rows / steps,
            "peak_running": peak_running, "host_s": time.perf_counter() - start}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    for name, help_text in (("isl", "prompt tokens per request"), ("osl", "output tokens per request"),
                            ("num-requests", "requests, all sent at once"), ("max-batch", "most sequences at once"),
                            ("kv-cache-tokens", "KV-cache size in tokens")):
        ap.add_argument(f"--{name}", type=int, required=True, help=help_text)
    ap.add_argument("--block-size", type=int, default=16)
    ap.add_argument("--max-num-tokens", type=int, default=8192, help="token budget of a step")
    ap.add_argument("--policies", default="reserve,watermark=0,watermark=0.01")
    ap.add_argument("--json", type=Path, help="also write the figures here")
    args = ap.parse_args(argv)
    try:
        policies = args.policies.split(",")
        for policy in policies:
            parse_policy(policy)
    except ValueError as exc:
        ap.error(str(exc))
    for name in ("isl", "osl", "num_requests", "max_batch", "kv_cache_tokens", "block_size", "max_num_tokens"):
        if getattr(args, name) < 1:
            ap.error(f"--{name.replace('_', '-')} must be at least 1")
    if args.isl + args.osl - 1 > args.kv_cache_tokens:
        ap.error("--kv-cache-tokens must hold at least one whole request (isl + osl - 1 tokens)")
    print(f"{args.isl}/{args.osl}, {args.num_requests} requests, max batch {args.max_batch}, KV cache "
          f"{args.kv_cache_tokens:,} tokens in blocks of {args.block_size}, {args.max_num_tokens} tokens a step")
    print(f"{'policy':<16}{'steps':>7}{'prefill':>8}{'mixed':>7}{'decode':>8}{'preempt':>8}{'recomputed':>12}"
          f"{'rows/step':>10}{'peak run':>9}")
    results = []
    for policy in policies:
        r = simulate(policy, isl=args.isl, osl=args.osl, num_requests=args.num_requests, max_batch=args.max_batch,
                     kv_cache_tokens=args.kv_cache_tokens, block_size=args.block_size,
                     max_num_tokens=args.max_num_tokens)
        results.append(r)
        k = r["steps_by_type"]
        print(f"{policy:<16}{r['steps']:>7}{k['prefill']:>8}{k['mixed']:>7}{k['decode']:>8}{r['preemptions']:>8}"
              f"{r['tokens_recomputed']:>12,}{r['mean_decode_rows']:>10.0f}{r['peak_running']:>9}", flush=True)
    if args.json:
        from llmx.common.jsonio import dumps

        tmp = args.json.with_name(f".{args.json.name}.tmp-{os.getpid()}")
        tmp.write_text(dumps({"workload": vars(args) | {"json": str(args.json)}, "results": results}) + "\n")
        os.replace(tmp, args.json)
    return 0


if __name__ == "__main__":
    sys.exit(main())
