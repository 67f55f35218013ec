"""`llmx quantize`: llmx checkpoint -> quantized llmx checkpoint (post-training quantization)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any, Literal, Optional

import typer

from llmx.cli._console import (emit_json, format_bytes, out, print_warning, progress_bars, resolve_device,
                               stage_callback)
from llmx.cli._options import ForceOption, JsonOption, PrintConfigOption, RecipeOption, require_out
from llmx.cli._settings import require, resolve_settings

# Library modules that `llmx --help` does not need are imported inside the commands that use them: --help
# imports every command module and must stay under 0.6 s (torch, transformers and pydantic alone take more).

DEFAULTS: dict[str, Any] = {
    "algo": None,
    "kv_cache_dtype": None,
    "calib_data": None,
    "calib_size": None,  # by device: quant.api.CALIBRATION_DEFAULTS
    "calib_seq_len": None,
    "batch_size": 8,
    "group_size": None,  # chosen for the model: formats.presets.AUTO_GROUP_SIZES
    "exclude": [],
    "device": "auto",
    "seed": 0,
    "export_format": "llmx",
    "quantize_lm_head": False,
    "gptq_damp": None,  # int4_gptq's settings: llmx.quant.gptq.GptqSettings
    "gptq_block_size": None,
    "gptq_act_order": None,
}


def quantize_command(
    src: Annotated[Path, typer.Argument(
        metavar="SRC", show_default=False, help="llmx checkpoint to quantize (from `llmx convert`).")],
    out_dir: Annotated[Optional[Path], typer.Option(
        "-o", "--out", metavar="OUT", show_default=False, help="Quantized checkpoint directory to write (required).")] = None,
    algo: Annotated[Optional[str], typer.Option(
        metavar="ALGO", show_default=False,
        help="Weight format: fp8 (per-tensor), fp8_pc_pt (per-channel weights, per-token activations), int8_sq "
             "(SmoothQuant W8A8), int8_wo / int4_wo (weight-only), int4_awq, int4_gptq, w4a8_awq, nvfp4. "
             "Required unless the recipe sets it.")] = None,
    kv_cache_dtype: Annotated[Optional[Literal["fp8", "int8"]], typer.Option(
        show_default=False, help="Also quantize the KV cache [default: the activation dtype].")] = None,
    calib_data: Annotated[Optional[str], typer.Option(
        metavar="PATH|NAME", show_default=False,
        help="Calibration data for the algorithms that calibrate (all but int8_wo, int4_wo and fp8_pc_pt) and for "
             "--kv-cache-dtype: a .txt file, a .json/.jsonl/.parquet file or saved dataset folder whose rows hold "
             "`text`, `article` or chat `messages` (rendered with the model's chat template), a known set "
             "(cnn_dailymail, ultrachat_200k, pile_val, wikitext; fetched through the Hugging Face cache) or another "
             "hub dataset name [default: cnn_dailymail, which needs the hub or a cached copy].")] = None,
    calib_size: Annotated[Optional[int], typer.Option(
        min=1, show_default=False,
        help="Calibration samples [default: 512 on a GPU, 64 on a CPU]. What a CPU run costs: on 2 cores, "
             "SmolLM2-135M at the CPU default (64 x 256 tokens) takes about 10 s with int8_sq, 30 s with fp8 and "
             "5 min with int4_awq (its scale search forwards every batch 12 times); time grows with samples x "
             "tokens x model size (QUANTIZATION.md).")] = None,
    calib_seq_len: Annotated[Optional[int], typer.Option(
        min=1, show_default=False, help="Tokens per calibration sample [default: 512 on a GPU, 256 on a CPU].")] = None,
    batch_size: Annotated[Optional[int], typer.Option(
        min=1, show_default=False, help=f"Calibration batch size [default: {DEFAULTS['batch_size']}].")] = None,
    group_size: Annotated[Optional[int], typer.Option(
        min=1, show_default=False,
        help="Inputs per scale of the int4 formats [default: the largest of 128, 64 and 32 that divides the input "
             "features of every quantized Linear, shown in the summary]. NVFP4 always uses blocks of 16.")] = None,
    exclude: Annotated[Optional[list[str]], typer.Option(
        metavar="PATTERN", show_default=False,
        help="Leave matching modules unquantized (llmx names, glob patterns, e.g. 'layers.0.*'); repeat for "
             "several. lm_head is left unquantized unless --quantize-lm-head.")] = None,
    quantize_lm_head: Annotated[Optional[bool], typer.Option(
        "--quantize-lm-head/--no-quantize-lm-head", show_default=False,
        help="Also quantize the LM head (the vocab x hidden logits GEMM: 1 GB of Llama-3.1-8B's bf16 weights) with "
             "the format and algorithm of --algo. It costs accuracy: on an untied SmolLM2-135M, perplexity is 7.5% "
             "higher with int4_awq than with the head left in bf16 (int4_gptq 2.1%, fp8 2.3%, int8_sq 0.6%; see "
             "QUANTIZATION.md). Refused for models whose head is tied to the input embedding, and with an --exclude "
             "matching lm_head [default: no].")] = None,
    gptq_damp: Annotated[Optional[float], typer.Option(
        show_default=False, help="int4_gptq: the fraction of the Hessian's mean diagonal added to it before "
                                 "inversion [default: 0.01].")] = None,
    gptq_block_size: Annotated[Optional[int], typer.Option(
        show_default=False, help="int4_gptq: columns updated together, a multiple of the group size [default: 128]. "
                                 "It changes speed, not the result.")] = None,
    gptq_act_order: Annotated[Optional[bool], typer.Option(
        "--gptq-act-order/--no-gptq-act-order", show_default=False,
        help="int4_gptq: quantize the input columns with the largest activations first, with group scales fixed "
             "from the original weights (llmx's format has contiguous groups) [default: no; QUANTIZATION.md "
             "compares both].")] = None,
    device: Annotated[Optional[Literal["cuda", "cpu", "auto"]], typer.Option(
        show_default=False, help="Where calibration runs [default: auto = cuda when a GPU is visible].")] = None,
    seed: Annotated[Optional[int], typer.Option(
        min=0, show_default=False, help=f"Seed for calibration sampling [default: {DEFAULTS['seed']}].")] = None,
    export_format: Annotated[Optional[Literal["llmx", "hf"]], typer.Option(
        show_default=False,
        help="llmx: a checkpoint for `llmx build`; hf: a Hugging Face folder with ModelOpt's quantization "
             f"config [default: {DEFAULTS['export_format']}].")] = None,
    force: ForceOption = False,
    recipe: RecipeOption = None,
    print_config: PrintConfigOption = False,
    json_output: JsonOption = False,
) -> None:
    """Quantize a checkpoint's weights (and optionally its KV cache) with calibration data.

    Prints a summary: algorithm, modules quantized and skipped, size before and after, time, and any
    warnings (e.g. layers whose calibration looked degenerate). Calibration runs on the GPU when one is
    visible; on CPU it works but is slow for large models.

    Examples:

      llmx quantize ckpt/llama8b -o ckpt/llama8b-fp8 --algo fp8 --kv-cache-dtype fp8 --calib-data calib.txt

      llmx quantize ckpt/llama8b -o ckpt/llama8b-awq --algo int4_awq --calib-data calib.txt --calib-size 128

      llmx quantize ckpt/llama8b-instruct -o ckpt/llama8b-instruct-fp8 --algo fp8 --calib-data ultrachat_200k

      llmx quantize ckpt/llama8b -o ckpt/llama8b-int8 --algo int8_wo

      llmx quantize ckpt/llama8b -o ckpt/llama8b-awq-head --algo int4_awq --quantize-lm-head --calib-data calib.txt

      llmx quantize ckpt/llama8b -o ckpt/llama8b-q --recipe llama/h100 --calib-data calib.txt
    """
    flags = {"algo": algo, "kv_cache_dtype": kv_cache_dtype, "calib_data": calib_data, "calib_size": calib_size,
             "calib_seq_len": calib_seq_len, "batch_size": batch_size, "group_size": group_size,
             "exclude": exclude or None, "device": device, "seed": seed, "export_format": export_format,
             "quantize_lm_head": quantize_lm_head, "gptq_damp": gptq_damp, "gptq_block_size": gptq_block_size,
             "gptq_act_order": gptq_act_order}
    settings = resolve_settings("quantize", recipe=recipe, flags=flags, defaults=DEFAULTS)
    if print_config:
        emit_json(settings.to_dict())
        return
    chosen_algo = require(settings, "algo")
    target = require_out(out_dir, f"llmx quantize {src} -o {src}-{chosen_algo} --algo {chosen_algo}")
    from llmx.quant.api import quantize

    values = dict(settings.values)
    with progress_bars() as bars:
        result = quantize(
            src, target, algo=chosen_algo, kv_cache_dtype=values["kv_cache_dtype"], calib_data=values["calib_data"],
            calib_size=values["calib_size"], calib_seq_len=values["calib_seq_len"], batch_size=values["batch_size"],
            group_size=values["group_size"], exclude=tuple(values["exclude"]), device=resolve_device(values["device"]),
            seed=values["seed"], export_format=values["export_format"], force=force, recipe=settings.recipe,
            progress=stage_callback(bars), quantize_lm_head=values["quantize_lm_head"], gptq_damp=values["gptq_damp"],
            gptq_block_size=values["gptq_block_size"], gptq_act_order=values["gptq_act_order"])
    summary = quantize_summary(result)
    if json_output:
        emit_json(summary)
        return
    _print_table(summary)
    for warning in summary["warnings"]:
        print_warning(warning)


def quantize_summary(result: Any) -> dict[str, Any]:
    quantized, skipped = list(result.quantized_modules), list(result.skipped_modules)
    return {
        "path": str(result.path), "algo": result.algo,
        "quantized_modules": quantized, "skipped_modules": skipped,
        "size_before_bytes": result.size_before_bytes, "size_after_bytes": result.size_after_bytes,
        "seconds": round(result.seconds, 3), "calib_data_hash": result.calib_data_hash,
        "calib_samples": result.calib_shape[0] if result.calib_shape else None,
        "calib_seq_len": result.calib_shape[1] if result.calib_shape else None,
        "group_size": result.group_size, "group_size_chosen": result.group_size_chosen,
        "warnings": list(result.warnings),
        # Mixtures of experts: per sparse layer, the experts calibration routed no token to (null for dense models).
        "experts_without_calibration_tokens": (None if result.experts_without_tokens is None else
                                               {str(k): v for k, v in result.experts_without_tokens.items()}),
    }


def _print_table(summary: dict[str, Any]) -> None:
    from rich.table import Table

    before, after = summary["size_before_bytes"], summary["size_after_bytes"]
    skipped = summary["skipped_modules"]
    table = Table(title=f"quantized -> {summary['path']}", show_header=False, title_justify="left")
    table.add_column(style="bold")
    table.add_column()
    table.add_row("algorithm", summary["algo"])
    if summary["group_size"] is not None:
        chosen = summary["group_size_chosen"]
        how = " (chosen: the largest of 128/64/32 dividing every quantized Linear)" if chosen else ""
        table.add_row("group size", f"{summary['group_size']}{how}")
    table.add_row("modules quantized", str(len(summary["quantized_modules"])))
    table.add_row("modules skipped", f"{len(skipped)}" + (f" ({', '.join(skipped[:8])}{', ...' if len(skipped) > 8 else ''})" if skipped else ""))
    ratio = f" ({after / before:.2f}x)" if before else ""
    table.add_row("size", f"{format_bytes(before)} -> {format_bytes(after)}{ratio}")
    table.add_row("time", f"{summary['seconds']:.1f} s")
    calibration = "none"
    if summary["calib_data_hash"]:
        calibration = f"{summary['calib_samples']} x {summary['calib_seq_len']} tokens, {summary['calib_data_hash']}"
    table.add_row("calibration", calibration)
    unseen = summary["experts_without_calibration_tokens"]
    if unseen is not None:
        reached = sum(1 for n in unseen.values() if n == 0)
        table.add_row("experts", f"every expert calibrated in {reached} of {len(unseen)} sparse layers"
                      + ("" if reached == len(unseen) else " (the others are listed in the warnings)"))
    table.add_row("warnings", str(len(summary["warnings"])))
    out().print(table)
