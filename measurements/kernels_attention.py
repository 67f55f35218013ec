"""Attention and elementwise hot-path kernels on a CUDA GPU: correctness against the references, then speed.

    python measurements/kernels_attention.py                      # every kernel, Llama-3.1-8B shapes
    python measurements/kernels_attention.py --kernels decode,prefill --json results.json

Kernels: paged attention decode (split-K) and prefill (from scratch, chunked over a cached prefix, mixed
with decodes), write_kv_cache, rms_norm, fused_add_rms_norm, rms_norm_heads (Qwen3 q/k norm), rotary,
and the greedy sampler's row argmax. Shapes are Llama-3.1-8B's per GPU (32 query heads, 8 KV heads,
head_dim 128, hidden 4096, vocabulary 128,256), bf16 activations, float32 logits, KV cache blocks of 16
tokens in bf16, fp8 or int8. Decode also runs as a CUDA graph launches it: short live contexts in an
8192-token block table (the graph's, sized for max_seq_len), so the split count is chosen for the table.

For each case, on fresh random data:
1. the kernel's output is compared with its `*_ref` on the same inputs (max |error| <= 2% of max
   |reference|; argmax indices must be equal, `err` is then the share of rows that differ); a mismatch
   prints FAIL and makes the script exit with status 1;
2. it is timed on the GPU alone (median and 20/80% quantiles): calls replayed from a CUDA graph with
   the L2 cache overwritten between calls, so the KV cache and activations come from HBM
   (llmx/kernels/gpu_timing.py);
3. GB/s = unavoidable bytes / time (every input read once, every output written once; for attention
   the K/V of each sequence's visible context once per KV head) is printed next to the 3.0 TB/s HBM
   ceiling measured on an H100 SXM, and attention also prints TFLOP/s against the 786 TFLOP/s
   bf16 ceiling. `roofline` is the share reached of max(bytes / HBM, FLOPs / compute).
Prefill from scratch also times torch's scaled_dot_product_attention (flash backend) on the same
sequences laid out contiguously, and argmax times torch.argmax, as baselines. Launch overhead is
excluded, as in llmx's decode steps (graph replay); the smallest cases still pay the GPU's own
per-kernel start and tail.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
from dataclasses import dataclass
from typing import Any, Callable

import torch

HEADS, KV_HEADS, HEAD_DIM, HIDDEN, BLOCK_SIZE, VOCAB = 32, 8, 128, 4096, 16, 128256
KERNELS = ("decode", "prefill", "write_kv_cache", "rms_norm", "rotary", "argmax")


@dataclass
class Ceilings:
    hbm_tbps: float = 3.0
    bf16_tflops: float = 786.0


@dataclass
class Case:
    kernel: str
    label: str
    run: Callable[[], Any]
    reference: Callable[[], Any]
    bytes: int
    flops: int = 0
    baseline: Callable[[], Any] | None = None
    baseline_name: str = "torch SDPA"
    exact: bool = False  # integer outputs (argmax): every element must match the reference


def _relative_error(out: Any, ref: Any) -> float:
    outs = out if isinstance(out, tuple) else (out,)
    refs = ref if isinstance(ref, tuple) else (ref,)
    worst = 0.0
    for o, r in zip(outs, refs):
        o, r = o.float(), r.float()
        worst = max(worst, float((o - r).abs().max()) / max(float(r.abs().max()), 1e-6))
    return worst


def _mismatch_share(out: torch.Tensor, ref: torch.Tensor) -> float:
    return float((out != ref).float().mean())


# ----------------------------------------------------------------------------------------------------
# Paged attention
# ----------------------------------------------------------------------------------------------------


@dataclass
class PagedInputs:
    q: torch.Tensor
    k_cache: torch.Tensor
    v_cache: torch.Tensor
    block_tables: torch.Tensor
    seq_lens: torch.Tensor
    query_start_loc: torch.Tensor
    k_scale: torch.Tensor | None
    v_scale: torch.Tensor | None
    q_lens: list[int]
    seq_len_list: list[int]

    def args(self):
        return (self.q, self.k_cache, self.v_cache, self.block_tables, self.seq_lens, self.query_start_loc,
                1.0 / math.sqrt(HEAD_DIM))

    def kwargs(self):
        return dict(k_scale=self.k_scale, v_scale=self.v_scale, max_query_len=max(self.q_lens))


def paged_inputs(q_lens: list[int], seq_lens: list[int], kv_dtype: torch.dtype,
                 table_tokens: int = 0) -> PagedInputs:
    """Random K/V already in a paged cache whose block ids are shuffled (as after many alloc/free cycles).
    The block table is as wide as the longest sequence, or `table_tokens` (padded with block 0)."""
    blocks = [math.ceil(n / BLOCK_SIZE) for n in seq_lens]
    num_blocks = sum(blocks)
    block_ids = torch.randperm(num_blocks, device="cuda").to(torch.int32)
    table_width = max(max(blocks), math.ceil(table_tokens / BLOCK_SIZE))
    tables = torch.zeros(len(seq_lens), table_width, dtype=torch.int32, device="cuda")
    start = 0
    for seq, count in enumerate(blocks):
        tables[seq, :count] = block_ids[start:start + count]
        start += count
    shape = (num_blocks, BLOCK_SIZE, KV_HEADS, HEAD_DIM)
    k_scale = v_scale = None
    if kv_dtype == torch.bfloat16:
        k_cache = torch.randn(shape, device="cuda", dtype=torch.bfloat16)
        v_cache = torch.randn(shape, device="cuda", dtype=torch.bfloat16)
    elif kv_dtype == torch.float8_e4m3fn:
        k_scale, v_scale = torch.tensor(0.01, device="cuda"), torch.tensor(0.01, device="cuda")
        k_cache = (torch.randn(shape, device="cuda") * 100).clamp(-448, 448).to(kv_dtype)
        v_cache = (torch.randn(shape, device="cuda") * 100).clamp(-448, 448).to(kv_dtype)
    else:
        k_scale, v_scale = torch.tensor(0.02, device="cuda"), torch.tensor(0.02, device="cuda")
        k_cache = torch.randint(-127, 128, shape, device="cuda", dtype=torch.int8)
        v_cache = torch.randint(-127, 128, shape, device="cuda", dtype=torch.int8)
    q = torch.randn(sum(q_lens), HEADS, HEAD_DIM, device="cuda", dtype=torch.bfloat16)
    query_start_loc = torch.tensor([0, *torch.tensor(q_lens).cumsum(0).tolist()], dtype=torch.int32, device="cuda")
    return PagedInputs(q, k_cache, v_cache, tables, torch.tensor(seq_lens, dtype=torch.int32, device="cuda"),
                       query_start_loc, k_scale, v_scale, list(q_lens), list(seq_lens))


def attention_cost(q_lens: list[int], seq_lens: list[int], kv_dtype: torch.dtype) -> tuple[int, int]:
    """(bytes, FLOPs): each sequence's K and V once per KV head, q in and out once; 4*D FLOPs per visible
    (query head, key) pair (QK^T and PV, a multiply-add each)."""
    kv_element = torch.empty(0, dtype=kv_dtype).element_size()
    kv_bytes = sum(seq_lens) * KV_HEADS * HEAD_DIM * 2 * kv_element
    q_bytes = 2 * sum(q_lens) * HEADS * HEAD_DIM * 2
    pairs = sum(sum(n - q + j + 1 for j in range(q)) for q, n in zip(q_lens, seq_lens))
    return kv_bytes + q_bytes, 4 * HEAD_DIM * HEADS * pairs


def attention_case(kernel: str, label: str, q_lens: list[int], seq_lens: list[int],
                   kv_dtype: torch.dtype = torch.bfloat16, sdpa_baseline: bool = False,
                   table_tokens: int = 0) -> Case:
    from llmx.kernels import paged_attention as attention

    inputs = paged_inputs(q_lens, seq_lens, kv_dtype, table_tokens)
    size, flops = attention_cost(q_lens, seq_lens, kv_dtype)
    baseline = None
    if sdpa_baseline:
        # The same sequences as contiguous [1, heads, len, head_dim] tensors for torch's flash attention.
        dense = [(torch.randn(1, HEADS, n, HEAD_DIM, device="cuda", dtype=torch.bfloat16),
                  torch.randn(1, KV_HEADS, n, HEAD_DIM, device="cuda", dtype=torch.bfloat16),
                  torch.randn(1, KV_HEADS, n, HEAD_DIM, device="cuda", dtype=torch.bfloat16)) for n in seq_lens]

        def baseline():
            for q, k, v in dense:
                torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)

    return Case(kernel, label,
                run=lambda: attention.paged_attention(*inputs.args(), **inputs.kwargs()),
                reference=lambda: attention.paged_attention_ref(*inputs.args(), **inputs.kwargs()),
                bytes=size, flops=flops, baseline=baseline)


def decode_cases() -> list[Case]:
    cases = []
    for batch, context in [(1, 4096), (1, 32768), (8, 4096), (32, 2048), (64, 1024), (256, 512)]:
        cases.append(attention_case("decode", f"batch {batch} x ctx {context}", [1] * batch, [context] * batch))
    for kv_dtype, name in [(torch.float8_e4m3fn, "fp8"), (torch.int8, "int8")]:
        cases.append(attention_case("decode", f"batch 64 x ctx 2048 {name} KV", [1] * 64, [2048] * 64, kv_dtype))
    # As a decode CUDA graph captured for max_seq_len 8192 launches it: the split count follows the
    # table (shapes only), the kernel shares out the live context. Bytes count the live context only.
    from llmx.kernels import paged_attention as attention
    from llmx.kernels._triton_util import sm_count

    table = 8192
    for batch in (1, 4, 16):
        splits = attention.choose_num_splits(batch, KV_HEADS, table, sm_count(torch.device("cuda")))
        for live in (256, 1024, 2048):
            cases.append(attention_case("decode", f"b{batch} live {live} table {table} ({splits} splits)",
                                        [1] * batch, [live] * batch, table_tokens=table))
    return cases


def prefill_cases() -> list[Case]:
    return [
        attention_case("prefill", "1 x 2048 from scratch", [2048], [2048], sdpa_baseline=True),
        attention_case("prefill", "4 x 1024 from scratch", [1024] * 4, [1024] * 4, sdpa_baseline=True),
        attention_case("prefill", "chunk 512 over 3584 cached", [512], [4096]),
        attention_case("prefill", "2 x chunk 1024 + 64 decodes", [1024, 1024] + [1] * 64,
                       [1024, 3072] + [1024] * 64),
        attention_case("prefill", "1 x 2048 from scratch fp8 KV", [2048], [2048], torch.float8_e4m3fn),
    ]


# ----------------------------------------------------------------------------------------------------
# KV-cache writes, norms, rotary
# ----------------------------------------------------------------------------------------------------


def write_kv_cases() -> list[Case]:
    from llmx.kernels import kv_cache_write

    cases = []
    for tokens, cache_dtype in [(256, torch.bfloat16), (8192, torch.bfloat16), (8192, torch.float8_e4m3fn)]:
        k = torch.randn(tokens, KV_HEADS, HEAD_DIM, device="cuda", dtype=torch.bfloat16)
        v = torch.randn_like(k)
        num_blocks = 2 * tokens // BLOCK_SIZE
        slots = torch.randperm(num_blocks * BLOCK_SIZE, device="cuda")[:tokens]
        shape = (num_blocks, BLOCK_SIZE, KV_HEADS, HEAD_DIM)
        caches = [torch.zeros(shape, device="cuda", dtype=torch.float32).to(cache_dtype) for _ in range(4)]
        scales = {}
        if cache_dtype != torch.bfloat16:
            scales = dict(k_scale=torch.tensor(0.02, device="cuda"), v_scale=torch.tensor(0.02, device="cuda"))

        def run(caches=caches, k=k, v=v, slots=slots, scales=scales):
            kv_cache_write.write_kv_cache(k, v, caches[0], caches[1], slots, **scales)
            return caches[0], caches[1]  # compared in float32 by _relative_error, outside the timing

        def reference(caches=caches, k=k, v=v, slots=slots, scales=scales):
            kv_cache_write.write_kv_cache_ref(k, v, caches[2], caches[3], slots, **scales)
            return caches[2], caches[3]

        size = 2 * tokens * KV_HEADS * HEAD_DIM * (2 + caches[0].element_size()) + tokens * 8
        name = "bf16" if cache_dtype == torch.bfloat16 else "fp8"
        cases.append(Case("write_kv_cache", f"{tokens} tokens -> {name} cache", run, reference, size))
    return cases


def norm_cases() -> list[Case]:
    from llmx.kernels import rms_norm as norm

    cases = []
    weight = torch.randn(HIDDEN, device="cuda", dtype=torch.bfloat16)
    for tokens in (1, 256, 8192):
        x = torch.randn(tokens, HIDDEN, device="cuda", dtype=torch.bfloat16)
        residual = torch.randn_like(x)
        cases.append(Case("rms_norm", f"{tokens} x {HIDDEN}", lambda x=x: norm.rms_norm(x, weight, 1e-5),
                          lambda x=x: norm.rms_norm_ref(x, weight, 1e-5), 2 * x.numel() * 2 + HIDDEN * 2))
        cases.append(Case("rms_norm", f"fused add {tokens} x {HIDDEN}",
                          lambda x=x, r=residual: norm.fused_add_rms_norm(x, r, weight, 1e-5),
                          lambda x=x, r=residual: norm.fused_add_rms_norm_ref(x, r, weight, 1e-5),
                          4 * x.numel() * 2 + HIDDEN * 2))
    fused = torch.randn(8192, (HEADS + 2 * KV_HEADS) * HEAD_DIM, device="cuda", dtype=torch.bfloat16)
    q = fused[:, : HEADS * HEAD_DIM].view(8192, HEADS, HEAD_DIM)  # strided view, as the attention layer has it
    head_weight = torch.randn(HEAD_DIM, device="cuda", dtype=torch.bfloat16)
    cases.append(Case("rms_norm", f"heads 8192 x {HEADS} x {HEAD_DIM} (strided q)",
                      lambda: norm.rms_norm_heads(q, head_weight, 1e-6),
                      lambda: norm.rms_norm_heads_ref(q, head_weight, 1e-6), 2 * q.numel() * 2))
    return cases


def rotary_cases() -> list[Case]:
    from llmx.formats.config import RopeScaling
    from llmx.kernels import rotary
    from llmx.runtime.layers import rope_tables

    scaling = RopeScaling(type="llama3", factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
                          original_max_position_embeddings=8192)
    cache = rope_tables.rope_cos_sin_cache(HEAD_DIM, 131072, 500000.0, scaling).cuda()
    cases = []
    for tokens in (256, 8192):
        fused = torch.randn(tokens, (HEADS + 2 * KV_HEADS) * HEAD_DIM, device="cuda", dtype=torch.bfloat16)
        q = fused[:, : HEADS * HEAD_DIM].view(tokens, HEADS, HEAD_DIM)
        k = fused[:, HEADS * HEAD_DIM: (HEADS + KV_HEADS) * HEAD_DIM].view(tokens, KV_HEADS, HEAD_DIM)
        positions = torch.randint(0, 131072, (tokens,), device="cuda")
        size = 2 * tokens * (HEADS + KV_HEADS) * HEAD_DIM * 2 + tokens * (HEAD_DIM * 4 + 8)
        cases.append(Case("rotary", f"{tokens} tokens, {HEADS}+{KV_HEADS} heads",
                          lambda q=q, k=k, p=positions: rotary.apply_rotary(q, k, p, cache),
                          lambda q=q, k=k, p=positions: rotary.apply_rotary_ref(q, k, p, cache), size))
    return cases


def argmax_cases() -> list[Case]:
    from llmx.kernels.argmax import argmax_rows

    cases = []
    for rows in (1, 64, 256):
        logits = torch.randn(rows, VOCAB, device="cuda")
        cases.append(Case("argmax", f"{rows} x {VOCAB} float32", lambda x=logits: argmax_rows(x),
                          lambda x=logits: torch.argmax(x, dim=-1), logits.numel() * 4 + rows * 8,
                          baseline=lambda x=logits: torch.argmax(x, dim=-1), baseline_name="torch.argmax",
                          exact=True))
    return cases


BUILDERS = {"decode": decode_cases, "prefill": prefill_cases, "write_kv_cache": write_kv_cases,
            "rms_norm": norm_cases, "rotary": rotary_cases, "argmax": argmax_cases}


# ----------------------------------------------------------------------------------------------------
# Measuring and reporting
# ----------------------------------------------------------------------------------------------------


def measure(case: Case, ceil: Ceilings, tolerance: float) -> dict:
    from llmx.kernels.gpu_timing import graph_time_ms

    out, ref = case.run(), case.reference()
    error = _mismatch_share(out, ref) if case.exact else _relative_error(out, ref)
    median, low, high = graph_time_ms(case.run)
    seconds = median * 1e-3
    roofline_s = max(case.bytes / (ceil.hbm_tbps * 1e12), case.flops / (ceil.bf16_tflops * 1e12))
    ok = error == 0.0 if case.exact else error <= tolerance
    result = {"kernel": case.kernel, "case": case.label, "ok": ok, "rel_error": error,
              "ms": median, "ms_p20": low, "ms_p80": high, "bytes": case.bytes, "flops": case.flops,
              "gb_per_s": case.bytes / seconds / 1e9, "hbm_fraction": case.bytes / seconds / (ceil.hbm_tbps * 1e12),
              "tflops": case.flops / seconds / 1e12, "roofline_fraction": roofline_s / seconds}
    if case.baseline is not None:
        result["baseline"] = case.baseline_name
        result["baseline_ms"] = graph_time_ms(case.baseline)[0]
    return result


def print_row(r: dict) -> None:
    status = "ok  " if r["ok"] else "FAIL"
    line = (f"{status} {r['kernel']:<15} {r['case']:<36} {r['ms'] * 1e3:9.1f} us "
            f"[{r['ms_p20'] * 1e3:7.1f}-{r['ms_p80'] * 1e3:7.1f}]  {r['gb_per_s']:7.0f} GB/s "
            f"({100 * r['hbm_fraction']:5.1f}% HBM)")
    if r["flops"]:
        line += f"  {r['tflops']:6.1f} TFLOP/s"
    line += f"  roofline {100 * r['roofline_fraction']:5.1f}%  err {r['rel_error']:.1e}"
    if "baseline_ms" in r:
        line += f"  ({r['baseline']} {r['baseline_ms'] * 1e3:.1f} us)"
    print(line, flush=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--kernels", default=",".join(KERNELS), help=f"comma-separated subset of {','.join(KERNELS)}")
    parser.add_argument("--json", help="also write the results to this JSON file")
    parser.add_argument("--tolerance", type=float, default=0.02, help="max |error| / max |reference| (default 0.02)")
    parser.add_argument("--hbm-tbps", type=float, default=Ceilings.hbm_tbps, help="HBM ceiling of this GPU, TB/s")
    parser.add_argument("--bf16-tflops", type=float, default=Ceilings.bf16_tflops, help="bf16 ceiling, TFLOP/s")
    args = parser.parse_args(argv)

    if not torch.cuda.is_available():
        print("kernels_attention.py measures compiled Triton kernels and needs a CUDA GPU; none is visible.",
              file=sys.stderr)
        return 2
    if os.environ.get("TRITON_INTERPRET") == "1":
        print("unset TRITON_INTERPRET: the interpreter runs kernels on the CPU, which is not what to time.",
              file=sys.stderr)
        return 2
    kernels = [name.strip() for name in args.kernels.split(",") if name.strip()]
    unknown = sorted(set(kernels) - set(KERNELS))
    if unknown:
        print(f"unknown --kernels {','.join(unknown)}; choose from {','.join(KERNELS)}.", file=sys.stderr)
        return 2

    ceil = Ceilings(hbm_tbps=args.hbm_tbps, bf16_tflops=args.bf16_tflops)
    torch.manual_seed(0)
    print(f"{torch.cuda.get_device_name()} | torch {torch.__version__} | ceilings: HBM {ceil.hbm_tbps:.1f} TB/s, "
          f"bf16 {ceil.bf16_tflops:.0f} TFLOP/s | Llama-3.1-8B: {HEADS} heads, {KV_HEADS} KV heads, "
          f"head_dim {HEAD_DIM}, KV block {BLOCK_SIZE}")
    results = []
    for kernel in kernels:
        for case in BUILDERS[kernel]():
            results.append(measure(case, ceil, args.tolerance))
            print_row(results[-1])
        torch.cuda.empty_cache()
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"device": torch.cuda.get_device_name(), "torch": torch.__version__,
                       "ceilings": vars(ceil), "results": results}, f, indent=2)
    failed = [r for r in results if not r["ok"]]
    if failed:
        print(f"{len(failed)} case(s) differ from their reference beyond {args.tolerance:.0%}.", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
