"""`llmx eval`: perplexity of an engine or checkpoint on a text file, with a regression gate."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Annotated, Any, Literal, Optional

import typer

from llmx.bench.regression import check_percent, compare_perplexity, describe_value, load_eval_baseline
from llmx.cli._console import emit_json, out, print_info, progress_bars, stage_callback
from llmx.cli._options import JsonOption, PrintConfigOption, RecipeOption
from llmx.cli._settings import require, resolve_settings
from llmx.common.errors import GateFailure

# Library modules that `llmx --help` does not need are imported inside the commands that use them: --help
# imports every command module and must stay under 0.6 s (torch, transformers and pydantic alone take more).

DEFAULTS: dict[str, Any] = {
    "data": None,
    "seq_len": 512,
    "windows": None,
    "max_increase": 5.0,
    "device": "auto",
}


def eval_command(
    engine_or_ckpt: Annotated[Path, typer.Argument(
        metavar="ENGINE|CKPT", show_default=False,
        help="Engine directory, or a checkpoint (a temporary engine is built for it).")],
    data: Annotated[Optional[Path], typer.Option(
        metavar="FILE", show_default=False, help="UTF-8 text to score (required unless the recipe sets eval.data).")] = None,
    seq_len: Annotated[Optional[int], typer.Option(
        min=2, show_default=False, help=f"Tokens per window [default: {DEFAULTS['seq_len']}].")] = None,
    windows: Annotated[Optional[int], typer.Option(
        min=1, show_default=False,
        help="Score only the first N windows [default: every whole window in the file].")] = None,
    baseline: Annotated[Optional[Path], typer.Option(
        metavar="FILE", show_default=False,
        help="A previous `llmx eval --json` result on the same text, --seq-len and --windows: exit 1 if perplexity "
             "rose by more than --max-increase.")] = None,
    max_increase: Annotated[Optional[float], typer.Option(
        min=0.0, show_default=False,
        help=f"Allowed perplexity increase over the baseline, in percent [default: {DEFAULTS['max_increase']}].")] = None,
    device: Annotated[Optional[Literal["cuda", "cpu", "auto"]], typer.Option(
        show_default=False, help="Device for a checkpoint's temporary engine [default: auto].")] = None,
    recipe: RecipeOption = None,
    print_config: PrintConfigOption = False,
    json_output: JsonOption = False,
) -> None:
    """Perplexity on held-out text: the yardstick for quantization regressions.

    The text is tokenized without special tokens and cut into non-overlapping windows of --seq-len tokens
    from its start; each window is scored on its own. The same file, --seq-len and --windows give the same
    windows for every model sharing a tokenizer, so a quantized engine compares directly with its bf16 one.

    Examples:

      llmx eval engines/llama8b --data heldout.txt --seq-len 2048 --windows 32 --json > bf16.json

      llmx eval engines/llama8b-fp8 --data heldout.txt --seq-len 2048 --windows 32 --baseline bf16.json --max-increase 1
    """
    flags = {"data": str(data) if data else None, "seq_len": seq_len, "windows": windows,
             "max_increase": max_increase, "device": device}
    settings = resolve_settings("eval", recipe=recipe, flags=flags, defaults=DEFAULTS)
    if print_config:
        emit_json(settings.to_dict())
        return
    text = Path(require(settings, "data"))
    baseline_result = None
    if baseline is not None:  # checked whole before anything is measured
        check_percent(settings["max_increase"], "--max-increase")
        baseline_result = load_eval_baseline(baseline)
    from llmx.eval.perplexity import evaluate_perplexity

    device_name = None if settings["device"] == "auto" else settings["device"]  # None: the library picks
    with progress_bars() as bars:
        result = evaluate_perplexity(engine_or_ckpt, text, seq_len=settings["seq_len"], windows=settings["windows"],
                                     device=device_name, progress=stage_callback(bars))
    summary = {"schema": "llmx-eval/1", "path": str(engine_or_ckpt), **result.to_dict()}
    comparison = None
    if baseline_result is not None:
        comparison = compare_perplexity(summary, baseline_result, settings["max_increase"], baseline_name=str(baseline))
        summary["baseline"] = comparison.to_dict()
    if json_output:
        emit_json(summary)
    else:
        out().print(f"perplexity [bold]{describe_value(result.perplexity)}[/] (mean NLL "
                    f"{describe_value(result.mean_nll)}) on {text}: {result.num_windows} windows of {result.seq_len} "
                    f"tokens from the start of the file, {result.num_tokens:,} tokens scored", highlight=False)
    if not math.isfinite(result.perplexity):
        # A broken model, whatever the gate: NaN compares false with every threshold, so it is named here.
        raise GateFailure(f"perplexity of {engine_or_ckpt} on {text} is {describe_value(result.perplexity)}: the "
                          "model's log-probabilities are not finite numbers (check the weights, the quantization "
                          "scales and config.json's rms_norm_eps).")
    if comparison is not None:
        verdict = (f"perplexity {comparison.current:.4f} vs baseline {comparison.baseline:.4f} "
                   f"({comparison.change_pct:+.2f}%, allowed +{settings['max_increase']}%)")
        if comparison.regressed:
            raise GateFailure(f"{verdict}: regressed against {baseline}.")
        print_info(f"{verdict}: ok.")
