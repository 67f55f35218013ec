"""Per-step host work of the runtime at decode, without the model: what a GPU step waits on.

Runs `LLM.step()` over a stand-in runner that builds each step's input tensors with the real
`ModelRunner.prepare` and then returns random tokens instead of running a model. Per decode step of B running
sequences it times the whole step less the stand-in's token drawing, and its pieces: the scheduler (schedule +
postprocess, block manager included), building the WorkItems, `prepare`, and making the outputs (bookkeeping,
detokenization of requests with stop strings), plus what reading the outputs' text costs the caller. Three ways
of using the engine:

- tokens: the caller reads token ids only (like `llmx bench`);
- stream: the caller reads every output's new_text after each step (like `llmx run --stream`);
- stop:   every request has a stop string (checked within the step), token ids read.

Runs on any machine; on the GPU machine the same code runs on its host CPU. Prompts are random tokens,
128 unless --prompt-len says otherwise (longer contexts show the per-step work that grows with length).
`--clock cpu` times with this thread's CPU time instead of wall time: on a shared machine, where other
processes take the CPU away mid-step, that keeps the figures comparable from run to run.

    python measurements/host_overhead.py [--batch 1,64,256,1024] [--steps 50] [--modes tokens,stream,stop]
                                       [--prompt-len 128] [--tokenizer HF_DIR] [--clock wall|cpu] [--gc on|off]
                                       [--json OUT|-]
"""

from __future__ import annotations

import argparse
import gc
import json
import random
import statistics
import sys
import time

import torch

from llmx.formats.config import BuildConfig
from llmx.runtime.engine import LLM
from llmx.runtime.model_runner import ModelRunner
from llmx.runtime.sequence import SamplingParams

BLOCK_SIZE = 16
NEVER_SEEN_STOP = "\x00stop\x00"  # a stop string random tokens do not produce: the requests keep running
MODES = ("tokens", "stream", "stop")


class StandInRunner(ModelRunner):
    """ModelRunner's host side (prepare, release) with the model replaced by random tokens; it records how long
    prepare took and how long drawing the tokens took (not host overhead: the model's stand-in)."""

    def __init__(self, num_blocks: int, vocab: int, clock, seed: int = 0):  # no model or KV cache to load
        self.clock = clock
        self.block_size = BLOCK_SIZE
        self.num_blocks = num_blocks
        self.device = torch.device("cpu")
        self.generators = {}
        self.vocab = vocab
        self.rng = random.Random(seed)
        self.entered = self.prepare_s = self.model_s = 0.0

    def execute(self, work):
        self.entered = self.clock()
        inputs = self.prepare(work)
        prepared = self.clock()
        tokens = {w.seq_id: self.rng.randrange(100, self.vocab) for w in inputs.sampling}
        self.prepare_s, self.model_s = prepared - self.entered, self.clock() - prepared
        return tokens


def _timed(fn, marks: list[float], clock):
    """fn, recording the clock at entry and at exit into marks."""
    def wrapper(*args, **kwargs):
        marks.append(clock())
        result = fn(*args, **kwargs)
        marks.append(clock())
        return result
    return wrapper


def measure(batch: int, steps: int, mode: str, tokenizer, clock=time.perf_counter,
            prompt_len: int = 128) -> dict[str, float]:
    """Median host milliseconds per decode step of `batch` sequences, in total and per piece."""
    vocab = min(len(tokenizer), 40000) if tokenizer is not None else 40000
    blocks = batch * (-(-(prompt_len + steps + 2) // BLOCK_SIZE) + 1)
    # The whole prompt batch is prefilled in the first step (not timed), so every timed step is a decode step.
    build = BuildConfig(max_batch_size=batch, max_seq_len=prompt_len + steps + 16,
                        max_num_tokens=batch * prompt_len, kv_block_size=BLOCK_SIZE, device="cpu")
    runner = StandInRunner(blocks, vocab, clock)
    llm = LLM.over_runner(runner, build, tokenizer=tokenizer, eos_token_ids=(0,))
    scheduled, postprocessed = [], []
    llm.scheduler.schedule = _timed(llm.scheduler.schedule, scheduled, clock)
    llm.scheduler.postprocess = _timed(llm.scheduler.postprocess, postprocessed, clock)
    stop = (NEVER_SEEN_STOP,) if mode == "stop" else ()
    params = SamplingParams(max_new_tokens=steps + 10, ignore_eos=True, stop=stop)
    rng = random.Random(1)
    for _ in range(batch):
        llm.add_request([rng.randrange(100, vocab) for _ in range(prompt_len)], params)
    pieces = ("schedule+postprocess", "work items", "prepare", "outputs", "read text")
    timings: dict[str, list[float]] = {name: [] for name in ("total", *pieces)}
    for step in range(steps + 1):
        scheduled.clear()
        postprocessed.clear()
        start = clock()
        outputs = llm.step()
        end = clock()
        if mode == "stream":
            for output in outputs:
                output.new_text
        read = clock() - end
        if step == 0:  # the prefill step is not a decode step
            continue
        if len(outputs) != batch or any(o.finished for o in outputs):
            raise RuntimeError(f"step {step} advanced {len(outputs)} of {batch} requests; expected all, running")
        (sched_in, sched_out), (post_in, post_out) = scheduled, postprocessed
        exited = runner.entered + runner.prepare_s + runner.model_s
        parts = {"schedule+postprocess": (sched_out - sched_in) + (post_out - post_in),
                 "work items": runner.entered - sched_out, "prepare": runner.prepare_s,
                 "outputs": (post_in - exited) + (end - post_out), "read text": read}
        timings["total"].append(end - start - runner.model_s + read)
        for name, seconds in parts.items():
            timings[name].append(seconds)
    return {name: statistics.median(values) * 1e3 for name, values in timings.items()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batch", default="1,64,256,1024", help="comma-separated numbers of running sequences")
    ap.add_argument("--steps", type=int, default=50, help="decode steps timed per point (median reported)")
    ap.add_argument("--modes", default="tokens,stream,stop",
                    help=f"comma-separated, of {', '.join(MODES)}; stream and stop need --tokenizer")
    ap.add_argument("--prompt-len", type=int, default=128, help="tokens per prompt (random ids)")
    ap.add_argument("--tokenizer", help="HF folder whose tokenizer detokenizes the outputs (default: none)")
    ap.add_argument("--clock", choices=("wall", "cpu"), default="wall",
                    help="wall: elapsed time; cpu: this thread's CPU time (steady on a shared machine)")
    ap.add_argument("--gc", choices=("on", "off"), default="on",
                    help="off: Python's cyclic garbage collector disabled while measuring (what it costs a step)")
    ap.add_argument("--json", metavar="OUT", help="also write the figures as JSON to OUT ('-' for stdout)")
    args = ap.parse_args()
    modes = [m for m in args.modes.split(",") if m]
    unknown = [m for m in modes if m not in MODES]
    if unknown:
        ap.error(f"unknown mode(s) {', '.join(unknown)}; choose from {', '.join(MODES)}")
    tokenizer = None
    if args.tokenizer:
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(args.tokenizer)
    elif any(m != "tokens" for m in modes):
        ap.error("the stream and stop modes detokenize: give --tokenizer HF_DIR, or --modes tokens")
    clock = time.thread_time if args.clock == "cpu" else time.perf_counter
    if args.gc == "off":
        gc.disable()
    report = {"steps": args.steps, "prompt_tokens": args.prompt_len, "unit": "median host ms per decode step",
              "clock": args.clock, "gc": args.gc, "tokenizer": args.tokenizer, "results": []}
    log = sys.stderr if args.json == "-" else sys.stdout
    print(f"median host milliseconds per decode step ({args.clock} clock, {args.steps} steps, prompts of "
          f"{args.prompt_len} tokens, garbage collector {args.gc})", file=log)
    for mode in modes:
        for batch in (int(b) for b in args.batch.split(",")):
            m = measure(batch, args.steps, mode, tokenizer, clock, args.prompt_len)
            report["results"].append({"mode": mode, "batch": batch, **{k: round(v, 4) for k, v in m.items()}})
            parts = "  ".join(f"{k} {v:.2f}" for k, v in m.items() if k != "total")
            print(f"{mode:6s} batch {batch:4d}: total {m['total']:.2f} ms  =  {parts}", file=log, flush=True)
    if args.json:
        text = json.dumps(report, indent=2)
        if args.json == "-":
            print(text)
        else:
            with open(args.json, "w", encoding="utf-8") as f:
                f.write(text + "\n")


if __name__ == "__main__":
    main()
