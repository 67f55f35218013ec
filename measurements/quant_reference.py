#!/usr/bin/env python3
"""Each algorithm's perplexity loss in ModelOpt's own fake-quantized model next to llmx's engine made from it.

For every algorithm, one calibration (`llmx.quant.api.calibrated_model`: the ModelOpt config, calibration
tokens and code path of `llmx quantize`) gives both numbers: the calibrated transformers model, ModelOpt's
quantizers simulating the format in place, is scored by transformers ("reference"), then the same
calibration is exported to an llmx checkpoint and scored by the llmx runtime ("llmx",
`llmx.eval.perplexity`). Both score the same held-out windows (non-overlapping, from the start of the
text, no BOS, tokens 2..seq_len of each predicted), and each change is against its own bf16 model, so the
gap between the two changes is what export, packing, scales and kernels cost on top of the algorithm.

int8_sq and fp8_pc_pt quantize activations per token at run time, which ModelOpt's calibration config does
not model (a static per-tensor int8 scale; no activation quantizer): for them the reference is also scored
with per-token dynamic input quantizers ("reference, run-time activations"), and the gap is taken against
that one.

    python measurements/quant_reference.py [--model HF_DIR] [--algos int8_wo,int4_gptq,...] [--calib-size 64]
        [--calib-seq-len 256] [--group-size 64] [--seq-len 512] [--windows 16] [--device cpu|cuda]
        [--workdir DIR] [--json OUT.json]

Prints a markdown table (algo, bf16 perplexity, reference change, llmx change, gap in percentage points) and
with --json writes every number and setting. On a 2-core CPU with the defaults expect about 20 minutes for
the seven algorithms, most of it AWQ's scale search and GPTQ's layerwise passes.
"""

from __future__ import annotations

import argparse
import math
import os
import shutil
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

# run as a program, this folder is on sys.path: the model and corpus defaults are quant_accuracy.py's
from quant_accuracy import CORPUS, DEFAULT_MODEL, model_dir

ALGOS = ("int8_wo", "int8_sq", "fp8", "fp8_pc_pt", "int4_wo", "int4_awq", "int4_gptq")
# Activations the engine quantizes per token at run time: ModelOpt's num_bits for the reference's dynamic quantizers.
RUNTIME_PER_TOKEN_INPUTS = {"int8_sq": 8, "fp8_pc_pt": (4, 3)}


def heldout_windows(ckpt: Path, data: Path, seq_len: int, windows: int) -> list[list[int]]:
    """The token windows `llmx.eval.perplexity` scores for this text, tokenizer and window shape."""
    import transformers

    from llmx.eval.perplexity import _windows

    tokenizer = transformers.AutoTokenizer.from_pretrained(str(ckpt), local_files_only=True)
    ids = tokenizer.encode(data.read_text(encoding="utf-8"), add_special_tokens=False)
    return _windows(ids, seq_len, windows, data)


def transformers_perplexity(model, windows: list[list[int]]) -> float:
    """exp(mean NLL of tokens 2..seq_len) over `windows`, each scored alone, logits in float32."""
    import torch

    from llmx.eval.perplexity import perplexity_of

    device = next(model.parameters()).device
    total, count = 0.0, 0
    with torch.no_grad():
        for window in windows:
            ids = torch.tensor([window], device=device)
            logits = model(input_ids=ids, use_cache=False).logits[0, :-1].float()
            total += float(torch.nn.functional.cross_entropy(logits, ids[0, 1:], reduction="sum").double())
            count += len(window) - 1
    return perplexity_of(total / count)


def change(value: float, base: float) -> float:
    """Perplexity change against `base`, in percent."""
    return (value / base - 1.0) * 100.0


def write_json(path: Path, doc: dict) -> None:
    """`doc` at `path`, replaced whole (a run stopped midway leaves the algorithms measured so far)."""
    from llmx.common import jsonio

    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(jsonio.dumps(doc) + "\n")
    os.replace(tmp, path)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", type=Path, default=DEFAULT_MODEL, help="HF folder (default: SmolLM2 at /tmp/smollm2)")
    ap.add_argument("--algos", default=",".join(ALGOS), help="comma-separated algorithms of llmx quantize")
    ap.add_argument("--calib", type=Path, default=CORPUS / "austen_prideprejudice.txt")
    ap.add_argument("--data", type=Path, default=CORPUS / "austen_emma.txt", help="held-out evaluation text")
    ap.add_argument("--calib-size", type=int, default=None, help="default: quantize's for the device")
    ap.add_argument("--calib-seq-len", type=int, default=None, help="default: quantize's for the device")
    ap.add_argument("--group-size", type=int, default=None, help="int4 group (default: quantize's choice)")
    ap.add_argument("--seq-len", type=int, default=512)
    ap.add_argument("--windows", type=int, default=16)
    ap.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    ap.add_argument("--workdir", type=Path, default=None, help="keep checkpoints here (default: a temp dir)")
    ap.add_argument("--json", type=Path, default=None, help="write the results here as JSON")
    ap.add_argument("--gptq-damp", type=float, default=None, help="int4_gptq's damping (default: quantize's)")
    ap.add_argument("--gptq-block-size", type=int, default=None, help="int4_gptq's block size (default: quantize's)")
    ap.add_argument("--gptq-act-order", action="store_true", help="int4_gptq with activation order")
    args = ap.parse_args()

    import torch
    import transformers

    from llmx.ingest.convert import convert
    from llmx.quant.api import calibrated_model
    from llmx.quant.modelopt import quantize_inputs_per_token, quantized_linear_names
    from llmx.eval.perplexity import evaluate_perplexity

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="llmx-quant-reference-"))
    workdir.mkdir(parents=True, exist_ok=True)
    rows = []
    try:
        source = model_dir(args.model)
        ckpt = workdir / "bf16"
        if not (ckpt / "llmx.json").exists():
            convert(source, ckpt, dtype="bfloat16")
        windows = heldout_windows(ckpt, args.data, args.seq_len, args.windows)

        def llmx_ppl(path: Path) -> float:
            return evaluate_perplexity(path, args.data, seq_len=args.seq_len, windows=args.windows,
                                       device=device).perplexity

        bf16_model = transformers.AutoModelForCausalLM.from_pretrained(str(source), dtype=torch.bfloat16).to(device)
        ref_base = transformers_perplexity(bf16_model.eval(), windows)
        del bf16_model
        llmx_base = llmx_ppl(ckpt)
        print(f"bf16: reference {ref_base:.3f}, llmx {llmx_base:.3f}", file=sys.stderr, flush=True)
        doc = {"model": str(args.model), "data": args.data.name, "calib": args.calib.name, "seq_len": args.seq_len,
               "windows": args.windows, "device": device, "cpu_count": os.cpu_count(), "torch": torch.__version__,
               "transformers": transformers.__version__, "created": datetime.now(timezone.utc).isoformat(),
               "bf16": {"reference_perplexity": ref_base, "llmx_perplexity": llmx_base}, "algos": rows}
        for algo in filter(None, args.algos.split(",")):
            out = workdir / algo
            gptq = {"gptq_damp": args.gptq_damp, "gptq_block_size": args.gptq_block_size,
                    "gptq_act_order": args.gptq_act_order or None} if algo in ("int4_gptq", "gptq") else {}
            t0 = time.perf_counter()
            with calibrated_model(ckpt, algo=algo, calib_data=str(args.calib), calib_size=args.calib_size,
                                  calib_seq_len=args.calib_seq_len, group_size=args.group_size, device=device,
                                  **gptq) as calibrated:
                seconds = time.perf_counter() - t0
                calibrated.write_llmx(out)  # before the reference's quantizers change below
                reference = transformers_perplexity(calibrated.model, windows)
                runtime_acts = None
                if algo in RUNTIME_PER_TOKEN_INPUTS:
                    quantize_inputs_per_token(calibrated.model, quantized_linear_names(calibrated.model),
                                              RUNTIME_PER_TOKEN_INPUTS[algo])
                    runtime_acts = transformers_perplexity(calibrated.model, windows)
                calib = calibrated.calib
                settings = {"group_size": calibrated.quant.group_size,
                            "calibration": None if calib is None else [calib.num_samples, calib.seq_len],
                            "calib_data_hash": None if calib is None else calib.data_hash,
                            "gptq": None if calibrated.options.gptq is None else vars(calibrated.options.gptq)}
            engine = llmx_ppl(out)
            ref_change = change(runtime_acts if runtime_acts is not None else reference, ref_base)
            row = {"algo": algo, **settings, "reference_perplexity": reference,
                   "reference_change_pct": change(reference, ref_base),
                   "reference_runtime_activations_perplexity": runtime_acts,
                   "reference_runtime_activations_change_pct": None if runtime_acts is None
                   else change(runtime_acts, ref_base),
                   "llmx_perplexity": engine, "llmx_change_pct": change(engine, llmx_base),
                   "gap_points": change(engine, llmx_base) - ref_change, "calibrate_seconds": seconds}
            rows.append(row)
            if args.json is not None:
                write_json(args.json, doc)
            print(f"{algo}: reference {reference:.3f}"
                  + (f" (run-time activations {runtime_acts:.3f})" if runtime_acts is not None else "")
                  + f", llmx {engine:.3f}, gap {row['gap_points']:+.2f} points", file=sys.stderr, flush=True)
            shutil.rmtree(out, ignore_errors=True)
    finally:
        if args.workdir is None:
            shutil.rmtree(workdir, ignore_errors=True)

    def pct(value: float | None) -> str:
        return "-" if value is None or math.isnan(value) else f"{value:+.2f}%"

    print(f"Model: {args.model.name}; eval: {args.data.name}, {args.windows} windows x {args.seq_len} tokens, no BOS; "
          f"calibration: {args.calib.name}, seed 0; device {device} ({os.cpu_count()} cores); torch "
          f"{torch.__version__}, transformers {transformers.__version__}. bf16 perplexity: reference (transformers) "
          f"{ref_base:.3f}, llmx {llmx_base:.3f}.\n")
    print("| algo | group | calibration | reference | reference, run-time activations | llmx | gap (points) |")
    print("| --- | ---: | --- | ---: | ---: | ---: | ---: |")
    for r in rows:
        calibration = "-" if r["calibration"] is None else f"{r['calibration'][0]} x {r['calibration'][1]}"
        print(f"| {r['algo']} | {r['group_size'] or '-'} | {calibration} | {pct(r['reference_change_pct'])} | "
              f"{pct(r['reference_runtime_activations_change_pct'])} | {pct(r['llmx_change_pct'])} | "
              f"{r['gap_points']:+.2f} |")


if __name__ == "__main__":
    main()
