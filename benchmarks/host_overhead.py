"""Per-step host work of the runtime at decode, without the model: what a GPU step waits on.

Times, per decode step of B running sequences, each host-side piece the engine runs around the model:
the scheduler (schedule + postprocess, block manager included), building the WorkItems, the runner's
`prepare` (Python lists -> tensors), and incremental detokenization of one token per sequence. Runs on
any machine; on the GPU machine the same code runs on its host CPU.

    python benchmarks/host_overhead.py [--batch 1,64,256] [--tokenizer HF_DIR] [--steps 50]
"""

from __future__ import annotations

import argparse
import statistics
import time
from types import SimpleNamespace

import torch

from llmx.runtime.block_manager import BlockManager
from llmx.runtime.detokenizer import DetokenizerState, detokenize_step
from llmx.runtime.model_runner import ModelRunner, WorkItem
from llmx.runtime.scheduler import Scheduler
from llmx.runtime.sequence import SamplingParams, Sequence


def measure(batch: int, steps: int, tokenizer) -> dict[str, float]:
    block_size, prompt_len = 16, 128
    blocks = batch * ((prompt_len + steps + 2) // block_size + 2)
    manager = BlockManager(blocks, block_size, enable_prefix_caching=True)
    scheduler = Scheduler(manager, max_num_seqs=batch, max_num_tokens=batch * prompt_len, max_model_len=4096,
                          block_size=block_size, eos_token_ids=(0,))
    params = SamplingParams(max_new_tokens=steps + 10, ignore_eos=True)
    gen = torch.Generator().manual_seed(0)
    for i in range(batch):
        scheduler.add(Sequence(i, torch.randint(100, 40000, (prompt_len,), generator=gen).tolist(), params))
    runner = SimpleNamespace(block_size=block_size, device=torch.device("cpu"))
    detok = {i: DetokenizerState.for_prompt([]) for i in range(batch)}
    timings: dict[str, list[float]] = {"schedule+postprocess": [], "work items": [], "prepare": [], "detokenize": []}
    first = True
    for _ in range(steps + 1):
        t0 = time.perf_counter()
        out = scheduler.schedule()
        t1 = time.perf_counter()
        items = [WorkItem.from_sequence(w.seq, w.num_new_tokens) for w in out.scheduled]
        t2 = time.perf_counter()
        ModelRunner.prepare(runner, items)
        t3 = time.perf_counter()
        sampled = {w.seq: int(torch.randint(100, 40000, (), generator=gen)) for w in out.scheduled}
        t4 = time.perf_counter()
        scheduler.postprocess(out.scheduled, sampled)
        t5 = time.perf_counter()
        if tokenizer is not None:
            for seq, token in sampled.items():
                detokenize_step(tokenizer, detok[seq.seq_id], [token])
        t6 = time.perf_counter()
        if first:  # the prefill step is not a decode step
            first = False
            continue
        timings["schedule+postprocess"].append((t1 - t0) + (t5 - t4))
        timings["work items"].append(t2 - t1)
        timings["prepare"].append(t3 - t2)
        timings["detokenize"].append(t6 - t5)
    return {k: statistics.median(v) * 1e3 for k, v in timings.items()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batch", default="1,64,256")
    ap.add_argument("--steps", type=int, default=50)
    ap.add_argument("--tokenizer", help="HF folder whose tokenizer to detokenize with (default: skip)")
    args = ap.parse_args()
    tokenizer = None
    if args.tokenizer:
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(args.tokenizer)
    print(f"median host milliseconds per decode step ({args.steps} steps, prompts of 128 tokens)")
    for batch in (int(b) for b in args.batch.split(",")):
        m = measure(batch, args.steps, tokenizer)
        parts = "  ".join(f"{k} {v:.2f}" for k, v in m.items())
        print(f"batch {batch:4d}: total {sum(m.values()):.2f} ms  =  {parts}", flush=True)


if __name__ == "__main__":
    main()
