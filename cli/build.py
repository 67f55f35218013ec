"""`llmx build`: llmx checkpoint -> engine directory (sharded, laid out for the runtime's kernels)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any, Literal, Optional

import typer

from llmx.cli._console import emit_json, out, print_info, print_warning, progress_bars, resolve_device, stage_callback
from llmx.cli._options import JsonOption, PrintConfigOption, RecipeOption, require_out
from llmx.cli._settings import resolve_settings

# Library modules that `llmx --help` does not need are imported inside the commands that use them: --help
# imports every command module and must stay under 0.6 s (torch, transformers and pydantic alone take more).

# Mirrors llmx.formats.config.BuildConfig's defaults (a test keeps them equal); "auto" picks cuda when visible.
DEFAULTS: dict[str, Any] = {
    "tp": 1,
    "pp": 1,
    "max_batch_size": 64,
    "max_seq_len": 4096,
    "max_num_tokens": 8192,
    "kv_block_size": 16,
    "device": "auto",
}


def _int_option(help_text: str, key: str) -> Any:
    return typer.Option(min=1, show_default=False, help=f"{help_text} [default: {DEFAULTS[key]}].")


def build_command(
    ckpt: Annotated[Path, typer.Argument(
        metavar="CKPT", show_default=False, help="llmx checkpoint (from `llmx convert` or `llmx quantize`).")],
    out_dir: Annotated[Optional[Path], typer.Option(
        "-o", "--out", metavar="ENGINE", show_default=False, help="Engine directory to write (required).")] = None,
    tp: Annotated[Optional[int], _int_option("Tensor-parallel size (must divide the attention and KV heads)", "tp")] = None,
    pp: Annotated[Optional[int], _int_option("Pipeline-parallel size (must divide the layers)", "pp")] = None,
    max_batch_size: Annotated[Optional[int], _int_option("Most requests in flight at once", "max_batch_size")] = None,
    max_seq_len: Annotated[Optional[int], _int_option("Longest prompt + output a request may have", "max_seq_len")] = None,
    max_num_tokens: Annotated[Optional[int], _int_option(
        "Token budget of one step (prefill chunks + decodes)", "max_num_tokens")] = None,
    kv_block_size: Annotated[Optional[int], _int_option("Tokens per paged KV-cache block", "kv_block_size")] = None,
    device: Annotated[Optional[Literal["cuda", "cpu", "auto"]], typer.Option(
        show_default=False, help="Device the engine runs on [default: auto = cuda when a GPU is visible].")] = None,
    force: Annotated[bool, typer.Option(
        "--force", help="Rebuild even when the inputs are unchanged, and replace an output directory that llmx "
                        "did not write.")] = False,
    expert_parallel: Annotated[bool, typer.Option(
        "--expert-parallel", help="Mixtures of experts: each of the --tp ranks holds num_experts / tp whole experts "
                                  "instead of a 1/tp slice of every expert (attention and dense MLPs stay split by "
                                  "tp). The experts must divide by --tp.")] = False,
    tune: Annotated[bool, typer.Option(
        "--tune/--no-tune", help="Time the tile configs of the quantized formats' Triton GEMMs on this GPU for the "
                                 "engine's shapes and store the fastest in engine.json (CUDA builds only; results "
                                 "are cached per user in $LLMX_CACHE_DIR or ~/.cache/llmx). --no-tune: the runtime "
                                 "uses default tiles.")] = True,
    recipe: RecipeOption = None,
    print_config: PrintConfigOption = False,
    json_output: JsonOption = False,
) -> None:
    """Build an engine: shard the checkpoint for --tp/--pp, fuse q/k/v and gate/up, and record the build settings.

    A build whose inputs (checkpoint content, options, llmx version) are unchanged reuses the existing engine
    instead of rebuilding, and says so. The engine only runs on the device kind and world size it was built for.
    A CUDA build of an int4, int8 or nvfp4 checkpoint also tunes its GEMM tiles for this GPU (--no-tune skips).

    Examples:

      llmx build ckpt/llama8b-fp8 -o engines/llama8b --max-batch-size 256 --max-seq-len 8192

      llmx build ckpt/llama70b -o engines/llama70b --tp 4

      llmx build ckpt/tiny -o engines/tiny --device cpu --max-seq-len 512
    """
    flags = {"tp": tp, "pp": pp, "max_batch_size": max_batch_size, "max_seq_len": max_seq_len,
             "max_num_tokens": max_num_tokens, "kv_block_size": kv_block_size, "device": device}
    settings = resolve_settings("build", recipe=recipe, flags=flags, defaults=DEFAULTS)
    if print_config:
        emit_json(settings.to_dict())
        return
    target = require_out(out_dir, f"llmx build {ckpt} -o engines/{ckpt.name}")
    from llmx.build.engine import build_engine
    from llmx.formats.config import BuildConfig, Mapping

    values = settings.values
    build = BuildConfig(max_batch_size=values["max_batch_size"], max_seq_len=values["max_seq_len"],
                        max_num_tokens=values["max_num_tokens"], kv_block_size=values["kv_block_size"],
                        device=resolve_device(values["device"]))
    mapping = Mapping(tp=values["tp"], pp=values["pp"], ep=values["tp"] if expert_parallel else 1)
    with progress_bars() as bars:
        result = build_engine(ckpt, target, build, mapping, force=force, recipe=settings.recipe,
                              progress=stage_callback(bars), tune=tune)
    tuning = result.tuning
    summary = {"path": str(result.path), "reused": result.reused, "seconds": round(result.seconds, 3),
               "build": build.to_dict(), "mapping": mapping.to_dict(),
               "tuning": tuning.summary() if tuning is not None else None}
    for warning in tuning.warnings if tuning is not None else ():
        print_warning(warning)
    if json_output:
        emit_json(summary)
        return
    if result.reused:
        out().print(f"[bold green]reused[/] engine {result.path}: its inputs are unchanged (pass --force to rebuild)",
                    highlight=False)
    else:
        out().print(f"[bold green]built[/] engine {result.path} for {build.device}, tp={mapping.tp} pp={mapping.pp}, "
                    f"max batch {build.max_batch_size}, max seq len {build.max_seq_len} in {result.seconds:.1f} s",
                    highlight=False)
    if tuning is not None and tuning.skipped:
        print_info(f"note: {tuning.skipped}")
    elif tuning is not None:
        out().print(f"tuned GEMM tiles for {tuning.entries} (kernel, M bucket, N, K) shapes: {tuning.timed} timed now, "
                    f"{tuning.cached} from the cache, in {tuning.seconds:.1f} s", highlight=False)
