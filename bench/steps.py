"""Steps of a benchmark run by type (prefill-only, mixed, decode-only), timed from their tokens' return, and the
kernel groups a profile is summed into: the measuring half of measurements/step_breakdown.py (and the groups of
measurements/profile_decode.py), kept in the package so that tests import it.

A step's time is the gap between its tokens' return and the previous step's: while the device never idles that is
the step's device time, and where the host is slower it is host time. Steps with prompt tokens and no decode rows
are "prefill", with both "mixed", with decode rows only "decode".
"""

from __future__ import annotations

import re
import statistics
import time
from dataclasses import dataclass

from llmx.runtime.sequence import SamplingParams

# The llmx modules that import torch are imported inside the functions that use them, so importing this
# module does not load torch.

# Kernel names (GPU profiles) -> group, first match wins.
KERNEL_GROUPS = (
    ("attention", r"_decode_kernel|_merge_splits|_prefill_kernel|flash|attention"),
    ("kv_write", r"kv_cache|_write_kv"),
    ("rope", r"rotary|rope"),
    ("norm", r"rms_norm|_rms"),
    ("gemm", r"gemm|gemv|cutlass|sm90_xmma|nvjet|_int8_|_w4a|_nvfp4|_fp8|scaled_mm|splitk|ampere|sm80"),
    ("activation", r"silu|gelu|act_and_mul|mul_kernel|vectorized_elementwise"),
    ("quantize_act", r"quantize|_quant"),
    ("sampling", r"argmax|softmax|topk|sort|multinomial|gather|index|reduce"),
)

STEP_TYPES = ("prefill", "mixed", "decode")
# On CPU the profiler sees torch ops, not kernels; the pure-torch attention gathers the paged KV (index) and runs
# batched products and a softmax. These patterns come first, then the kernel patterns.
CPU_GROUPS = (
    ("gemm", r"^aten::(mm|addmm|matmul|linear)$"),
    ("attention", r"^aten::(bmm|_softmax|softmax|index|scaled_dot_product\w*)$"),
    ("norm", r"^aten::(rsqrt|pow|mean)$"),
    ("sampling", r"^aten::(argmax|topk|sort|multinomial)$"),
)


def group_of(name: str) -> str:
    lowered = name.lower()
    for group, pattern in (*CPU_GROUPS, *KERNEL_GROUPS):
        if re.search(pattern, lowered):
            return group
    return "other"


@dataclass
class StepRecord:
    decode_rows: int
    prompt_tokens: int
    prompt_chunks: int
    decode_kv_len: float  # mean KV length the decode rows attend to (0 without decode rows)
    launched_at: float
    done_at: float | None = None

    @property
    def kind(self) -> str:
        if not self.prompt_tokens:
            return "decode"
        return "mixed" if self.decode_rows else "prefill"


class StepRecorder:
    """Wraps a runner's `launch` (or `execute`, for a runner that cannot queue steps) to record each step, until
    `detach` puts the runner's own method back."""

    def __init__(self, runner, clock=time.perf_counter):
        self.clock = clock
        self.steps: list[StepRecord] = []
        self._runner = runner
        self._wrapped = "launch" if getattr(runner, "can_launch", False) else "execute"
        if self._wrapped == "launch":
            launch = runner.launch

            def recorded_launch(work, after=None):
                record = self._record(work)
                pending = launch(work, after)
                result = pending.result

                def timed_result():
                    tokens = result()
                    if record.done_at is None:
                        record.done_at = self.clock()
                    return tokens

                pending.result = timed_result
                return pending

            runner.launch = recorded_launch
        else:
            execute = runner.execute

            def recorded_execute(work):
                record = self._record(work)
                tokens = execute(work)
                record.done_at = self.clock()
                return tokens

            runner.execute = recorded_execute

    def detach(self) -> None:
        """Stop recording: the runner's own method (a class attribute) shows through again."""
        delattr(self._runner, self._wrapped)

    def _record(self, work) -> StepRecord:
        decode = [w for w in work if len(w.tokens) == 1 and w.sample]
        chunks = [w for w in work if not (len(w.tokens) == 1 and w.sample)]
        kv_len = statistics.fmean(w.start + 1 for w in decode) if decode else 0.0
        record = StepRecord(len(decode), sum(len(w.tokens) for w in chunks), len(chunks), kv_len, self.clock())
        self.steps.append(record)
        return record


def summarize(steps: list[StepRecord]) -> dict[str, dict]:
    """Per step type: count, seconds, share of the run, mean ms, median shape, tokens per second."""
    done = [s for s in steps if s.done_at is not None]
    durations = []
    for i, step in enumerate(done):
        start = done[i - 1].done_at if i else step.launched_at
        durations.append(max(0.0, step.done_at - start))
    total = sum(durations)
    out: dict[str, dict] = {}
    for kind in STEP_TYPES:
        picked = [(s, d) for s, d in zip(done, durations) if s.kind == kind]
        if not picked:
            continue
        seconds = sum(d for _, d in picked)
        rows = [s.decode_rows for s, _ in picked]
        prompt = [s.prompt_tokens for s, _ in picked]
        out[kind] = {
            "steps": len(picked),
            "seconds": seconds,
            "share": seconds / total if total > 0 else None,
            "mean_ms": 1e3 * seconds / len(picked),
            "median_decode_rows": statistics.median(rows),
            "median_prompt_tokens": statistics.median(prompt),
            "median_prompt_chunks": statistics.median(s.prompt_chunks for s, _ in picked),
            "median_decode_kv_len": statistics.median(s.decode_kv_len for s, _ in picked),
            "tokens_per_s": (sum(rows) + sum(prompt)) / seconds if seconds > 0 else None,
        }
    return out


def synthetic_step(shape: dict, block_size: int, num_blocks: int):
    """WorkItems of one step of `shape` (a summarize() entry) over distinct KV blocks (wrapping around the
    cache if it is smaller than the step needs): what the runner would be handed for such a step."""
    from llmx.runtime.model_runner import WorkItem

    greedy = SamplingParams(max_new_tokens=1)
    next_block = 0

    def blocks(tokens: int) -> list[int]:
        nonlocal next_block
        count = -(-tokens // block_size)
        table = [(next_block + i) % num_blocks for i in range(count)]
        next_block += count
        return table

    work = []
    kv_len = max(1, round(shape["median_decode_kv_len"]))
    for i in range(int(shape["median_decode_rows"])):
        work.append(WorkItem(-1 - i, [7], kv_len - 1, blocks(kv_len), True, greedy))
    chunks = int(shape["median_prompt_chunks"])
    tokens = int(shape["median_prompt_tokens"])
    for j in range(chunks):
        n = tokens // chunks + (1 if j < tokens % chunks else 0)
        if n:
            work.append(WorkItem(-100_000 - j, [11] * n, 0, blocks(n), True, greedy))
    return work


CELL = re.compile(r"^(\d+)/(\d+)/(\d+)(?:/(\d+))?(?::(reserve|watermark)(?:=(0?\.\d+|0))?)?$")


def parse_cell(text: str) -> dict:
    """ISL/OSL/REQUESTS[/MAX_BATCH][:ADMISSION[=WATERMARK]] -> its parts (MAX_BATCH None: the engine's;
    ADMISSION reserve by default; WATERMARK the scheduler's default unless given, for watermark admission)."""
    match = CELL.match(text)
    bad = not match or not all(int(match.group(i)) >= 1 for i in (1, 2, 3)) or match.group(4) == "0"
    if bad or (match.group(6) is not None and match.group(5) != "watermark"):
        raise ValueError(f"--cell {text!r}: write ISL/OSL/REQUESTS[/MAX_BATCH][:reserve|watermark[=FRACTION]] with "
                         "positive integers, e.g. 2048/2048/400/512:watermark=0")
    isl, osl, requests, max_batch, admission, watermark = match.groups()
    return {"isl": int(isl), "osl": int(osl), "num_requests": int(requests),
            "max_batch": int(max_batch) if max_batch else None, "admission": admission or "reserve",
            "watermark": float(watermark) if watermark is not None else None}
