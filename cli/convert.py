"""`llmx convert`: Hugging Face folder -> llmx checkpoint."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Annotated, Literal, Optional

import typer

from llmx.cli._console import emit_json, format_bytes, out, print_info, progress_bars, stage_callback
from llmx.cli._options import ForceOption, JsonOption, PrintConfigOption, RecipeOption, require_out
from llmx.cli._settings import resolve_settings

# Library modules that `llmx --help` does not need are imported inside the commands that use them: --help
# imports every command module and must stay under 0.6 s (torch, transformers and pydantic alone take more).

DEFAULTS = {"dtype": "bfloat16"}


def convert_command(
    hf_dir: Annotated[str, typer.Argument(
        metavar="MODEL", show_default=False,
        help="Hugging Face model folder (config.json, *.safetensors or a dummy-weights run, tokenizer files), or a "
             "hub model ID ORG/NAME[@REVISION] downloaded into the Hugging Face cache (HF_HOME, HF_TOKEN and "
             "HF_HUB_OFFLINE apply; only safetensors weights are fetched). An existing local path wins.")],
    out_dir: Annotated[Optional[Path], typer.Option(
        "-o", "--out", metavar="CKPT", show_default=False, help="Checkpoint directory to write (required).")] = None,
    dtype: Annotated[Optional[Literal["bfloat16", "float16", "float32"]], typer.Option(
        show_default=False,
        help=f"Weight dtype stored in the checkpoint [default: {DEFAULTS['dtype']}].")] = None,
    dummy_weights: Annotated[bool, typer.Option(
        "--dummy-weights", help="Ignore the weight files and write seeded random weights of the right shapes "
                                "(speed work on a model you only have the config.json of).")] = False,
    force: ForceOption = False,
    trust_remote_code: Annotated[bool, typer.Option(
        "--trust-remote-code",
        help="Allow the model folder's own Python code (off by default: it runs with your rights).")] = False,
    recipe: RecipeOption = None,
    print_config: PrintConfigOption = False,
    json_output: JsonOption = False,
) -> None:
    """Convert a Hugging Face checkpoint folder or hub model into an llmx checkpoint (streamed tensor by tensor).

    Supported architectures: Llama, Mistral, Qwen2, Qwen3. The output holds llmx.json, rank0.safetensors and
    the tokenizer files; it is written into a temporary directory and renamed when complete. A hub model's
    repository ID and resolved commit are recorded in llmx.json's provenance.

    Examples:

      llmx convert ./Llama-3.1-8B-Instruct -o ckpt/llama8b

      llmx convert meta-llama/Llama-3.1-8B-Instruct -o ckpt/llama8b

      llmx convert Qwen/Qwen3-8B@main -o ckpt/qwen3-8b

      llmx convert ./Llama-3.1-8B-Instruct -o ckpt/dummy --dummy-weights
    """
    settings = resolve_settings("convert", recipe=recipe, flags={"dtype": dtype}, defaults=DEFAULTS)
    if print_config:
        emit_json(settings.to_dict())
        return
    target = require_out(out_dir, "llmx convert MODEL -o ckpt/")
    _check_local_config(hf_dir)
    from llmx.ingest.convert import convert

    start = time.perf_counter()
    with progress_bars() as bars:
        path = convert(hf_dir, target, dtype=settings["dtype"], dummy_weights=dummy_weights, force=force,
                       trust_remote_code=trust_remote_code, progress=stage_callback(bars))
    summary = checkpoint_summary(Path(path), time.perf_counter() - start)
    if json_output:
        emit_json(summary)
        return
    model = summary["model"]
    out().print(f"[bold green]converted[/] {hf_dir} -> {summary['path']}: {model['family']} "
                f"({model['architecture']}), {model['num_layers']} layers, hidden {model['hidden_size']}, "
                f"{summary['dtype']}, {format_bytes(summary['size_bytes'])} in {summary['seconds']:.1f} s",
                highlight=False)
    if dummy_weights:
        print_info("weights are random (--dummy-weights): use this checkpoint for speed, not for text.")


def checkpoint_summary(path: Path, seconds: float) -> dict:
    """What a user wants to see of a fresh checkpoint, read from its llmx.json and file sizes."""
    meta = json.loads((path / "llmx.json").read_text())
    size = sum(f.stat().st_size for f in path.glob("rank*.safetensors"))
    return {"path": str(path), "seconds": round(seconds, 3), "model": meta["model"], "dtype": meta["dtype"],
            "quantization": meta.get("quantization"), "size_bytes": size}


def _check_local_config(source: str) -> None:
    """Refuse a local folder whose config.json llmx cannot convert before torch and transformers load (seconds):
    the architecture, sizes and fields are validated by the same code convert runs."""
    config = Path(source) / "config.json"
    if config.is_file():
        from llmx.formats.families import read_hf_config

        read_hf_config(config)
