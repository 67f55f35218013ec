"""`llmx run`: generate text from an engine for one prompt or a file of prompts (batched together)."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Annotated, Any, Optional

import typer

from llmx.cli._console import emit_json, out, print_error, print_info
from llmx.cli._options import JsonOption, KvCacheFractionOption, PrintConfigOption, RecipeOption, SyncStepsOption
from llmx.cli._settings import resolve_settings
from llmx.common.errors import LlmxError
from llmx.common.text import check_utf8_argument, read_utf8
from llmx.runtime.sequence import SamplingParams

# Library modules that `llmx --help` does not need are imported inside the commands that use them: --help
# imports every command module and must stay under 0.6 s (torch, transformers and pydantic alone take more).

DEFAULTS: dict[str, Any] = {
    "max_new_tokens": 128,
    "temperature": 0.0,
    "top_k": 0,
    "top_p": 1.0,
    "seed": None,
    "stop": [],
    "min_tokens": 0,
    "ignore_eos": False,
    "presence_penalty": 0.0,
    "frequency_penalty": 0.0,
    "repetition_penalty": 1.0,
    "logprobs": None,
    "n": 1,
    "chat": False,
    "kv_cache_tokens": None,
    "kv_cache_fraction": 0.9,
}


def run_command(
    engine: Annotated[Path, typer.Argument(metavar="ENGINE", show_default=False, help="Engine directory (from `llmx build`).")],
    prompt: Annotated[Optional[str], typer.Option(
        "--prompt", "-p", show_default=False, help="The prompt text.")] = None,
    prompts_file: Annotated[Optional[Path], typer.Option(
        metavar="FILE", show_default=False,
        help="Many prompts, generated together by the batching runtime: a .jsonl file of {\"prompt\": ...} lines, "
             "or any other text file with one prompt per non-empty line.")] = None,
    chat: Annotated[Optional[bool], typer.Option(
        "--chat/--no-chat", show_default=False,
        help="Wrap each prompt as a user message with the tokenizer's chat template [default: no].")] = None,
    max_new_tokens: Annotated[Optional[int], typer.Option(
        min=1, show_default=False, help=f"Most tokens to generate per prompt [default: {DEFAULTS['max_new_tokens']}].")] = None,
    temperature: Annotated[Optional[float], typer.Option(
        min=0.0, show_default=False, help="Sampling temperature; 0 is greedy [default: 0].")] = None,
    top_k: Annotated[Optional[int], typer.Option(
        min=0, show_default=False, help="Sample among the k likeliest tokens; 0 disables [default: 0].")] = None,
    top_p: Annotated[Optional[float], typer.Option(
        show_default=False, help="Nucleus sampling mass in (0, 1]; 1 disables [default: 1].")] = None,
    seed: Annotated[Optional[int], typer.Option(
        min=0, show_default=False, help="Seed for sampling; each prompt's draw is reproducible on its own [default: none].")] = None,
    stop: Annotated[Optional[list[str]], typer.Option(
        metavar="STR", show_default=False, help="Stop when the output ends with STR (cut from the text); repeat for several.")] = None,
    min_tokens: Annotated[Optional[int], typer.Option(
        min=0, show_default=False, help="Generate at least this many tokens before an EOS or stop token may end "
                                        "the output [default: 0].")] = None,
    ignore_eos: Annotated[Optional[bool], typer.Option(
        "--ignore-eos/--no-ignore-eos", show_default=False,
        help="Keep generating past EOS tokens, up to --max-new-tokens [default: no].")] = None,
    presence_penalty: Annotated[Optional[float], typer.Option(
        min=-2.0, max=2.0, show_default=False,
        help="Subtract this from the logit of every token already generated [default: 0].")] = None,
    frequency_penalty: Annotated[Optional[float], typer.Option(
        min=-2.0, max=2.0, show_default=False,
        help="Subtract this times its count from the logit of every token already generated [default: 0].")] = None,
    repetition_penalty: Annotated[Optional[float], typer.Option(
        show_default=False, help="Divide the positive (multiply the negative) logits of tokens in the prompt or "
                                 "output by this; > 1 discourages repeats, 1 disables [default: 1].")] = None,
    logprobs: Annotated[Optional[int], typer.Option(
        min=0, max=20, show_default=False,
        help="With --json: each generated token's log-probability and this many likeliest alternatives "
             "[default: none].")] = None,
    n: Annotated[Optional[int], typer.Option(
        "--n", min=1, show_default=False,
        help="Completions per prompt; with --seed S completion i samples with seed S + i [default: 1].")] = None,
    stream: Annotated[bool, typer.Option(
        "--stream", help="Print text as it is generated (several prompts: each piece is tagged [i]).")] = False,
    kv_cache_tokens: Annotated[Optional[int], typer.Option(
        min=1, show_default=False,
        help="KV-cache size in tokens (sizing on CPU) [default: max batch x max seq len, capped at 2 GiB; "
             "on GPU the free memory].")] = None,
    kv_cache_fraction: KvCacheFractionOption = None,
    sync_steps: SyncStepsOption = False,
    recipe: RecipeOption = None,
    print_config: PrintConfigOption = False,
    json_output: JsonOption = False,
) -> None:
    """Generate text. Every prompt goes through the in-flight batching runtime together.

    A prompt the engine cannot serve (e.g. longer than its max seq len) prints its error and makes the exit
    code non-zero; the other prompts still print.

    Examples:

      llmx run engines/llama8b --prompt "The capital of France is" --max-new-tokens 16

      llmx run engines/llama8b --chat --prompt "Write a haiku about GPUs." --temperature 0.7 --seed 1 --stream

      llmx run engines/llama8b --prompts-file prompts.jsonl --json > outputs.json
    """
    flags = {"max_new_tokens": max_new_tokens, "temperature": temperature, "top_k": top_k, "top_p": top_p,
             "seed": seed, "stop": stop or None, "min_tokens": min_tokens, "ignore_eos": ignore_eos,
             "presence_penalty": presence_penalty, "frequency_penalty": frequency_penalty,
             "repetition_penalty": repetition_penalty, "logprobs": logprobs, "n": n, "chat": chat,
             "kv_cache_tokens": kv_cache_tokens, "kv_cache_fraction": kv_cache_fraction}
    settings = resolve_settings("run", recipe=recipe, flags=flags, defaults=DEFAULTS)
    if print_config:
        emit_json(settings.to_dict())
        return
    if stream and json_output:
        raise LlmxError("--stream and --json do not mix: --json prints one document when everything is done; drop one.")
    if settings["logprobs"] is not None and not json_output:
        raise LlmxError("--logprobs prints its numbers in the --json document only; add --json.")
    # n completions of a prompt are n requests of the batch, prompt i's choices at [i * n, (i + 1) * n).
    choices = settings["n"]
    prompts = [p for p in _collect_prompts(prompt, prompts_file) for _ in range(choices)]
    params = [_sampling_params(settings.values).for_choice(i % choices) for i in range(len(prompts))]
    labels = [f"{i // choices}.{i % choices}" if choices > 1 else str(i) for i in range(len(prompts))]

    from llmx.runtime.engine import LLM

    llm = LLM(engine, kv_cache_tokens=settings["kv_cache_tokens"], kv_cache_fraction=settings["kv_cache_fraction"],
              async_steps=not sync_steps)
    start = time.perf_counter()
    if stream:
        outputs = _stream(llm, prompts, params, settings["chat"], labels)
    else:
        outputs = llm.generate(prompts, params, chat=settings["chat"])
    seconds = time.perf_counter() - start
    failed = [i for i, o in enumerate(outputs) if o.error]
    if json_output:
        records = [_output_record(i // choices, p, o, llm.tokenizer)
                   | ({"choice": i % choices} if choices > 1 else {})
                   for i, (p, o) in enumerate(zip(prompts, outputs))]
        emit_json({"outputs": records, "seconds": round(seconds, 4), "stats": llm.stats()})
    elif not stream:
        _print_outputs(prompts, outputs, labels)
    for i in failed:
        print_error(f"prompt {labels[i]}: {outputs[i].error}" if len(prompts) > 1 else outputs[i].error)
    if not json_output:
        tokens = sum(len(o.output_token_ids) for o in outputs)
        print_info(f"{len(prompts)} prompt(s), {tokens} tokens generated in {seconds:.2f} s "
                   f"({tokens / max(seconds, 1e-9):.1f} tok/s) on {llm.stats()['device_name']}")
    if failed:
        raise typer.Exit(2)


def _collect_prompts(prompt: str | None, prompts_file: Path | None) -> list[str]:
    if (prompt is None) == (prompts_file is None):
        raise LlmxError("pass exactly one of --prompt TEXT or --prompts-file FILE.")
    if prompt is not None:
        return [check_utf8_argument(prompt, option="--prompt")]
    if not prompts_file.is_file():
        raise LlmxError(f"{prompts_file}: no such file; pass a .jsonl file of {{\"prompt\": ...}} lines or a text "
                        "file with one prompt per line.")
    lines = read_utf8(prompts_file, what="prompts file").splitlines()
    if prompts_file.suffix == ".jsonl":
        prompts = [_jsonl_prompt(prompts_file, n, line) for n, line in enumerate(lines, 1) if line.strip()]
    else:
        prompts = [line for line in lines if line.strip()]
    if not prompts:
        raise LlmxError(f"{prompts_file}: holds no prompts; write one prompt per line.")
    return prompts


def _jsonl_prompt(path: Path, line_no: int, line: str) -> str:
    try:
        record = json.loads(line)
    except json.JSONDecodeError as exc:
        raise LlmxError(f"{path}:{line_no}: not valid JSON ({exc.msg}); each line must be {{\"prompt\": \"...\"}}.") from exc
    if not isinstance(record, dict) or not isinstance(record.get("prompt"), str):
        raise LlmxError(f"{path}:{line_no}: needs a string field \"prompt\".")
    return record["prompt"]


def _sampling_params(values: dict[str, Any]):
    try:
        return SamplingParams(max_new_tokens=values["max_new_tokens"], temperature=values["temperature"],
                              top_k=values["top_k"], top_p=values["top_p"], seed=values["seed"],
                              stop=tuple(values["stop"]), min_tokens=values["min_tokens"],
                              ignore_eos=values["ignore_eos"], presence_penalty=values["presence_penalty"],
                              frequency_penalty=values["frequency_penalty"],
                              repetition_penalty=values["repetition_penalty"], logprobs=values["logprobs"])
    except ValueError as exc:
        raise LlmxError(f"{exc}; fix the sampling option.") from exc


def _stream(llm, prompts: list[str], params: list, chat: bool, labels: list[str]) -> list:
    """Print new text as it arrives; returns the final output of each prompt in prompt order."""
    console = out()
    index_of = {llm.add_request(p, sp, chat=chat): i for i, (p, sp) in enumerate(zip(prompts, params))}
    final: dict[int, Any] = {}
    current = None
    while len(final) < len(prompts):
        for piece in llm.step():
            index = index_of[piece.request_id]
            if piece.new_text:
                if len(prompts) > 1 and current != index:
                    console.print(f"\n[bold][{labels[index]}][/] ", end="", highlight=False)
                console.print(piece.new_text, end="", markup=False, highlight=False)
                current = index
            if piece.finished:
                final[index] = piece
    console.print()
    return [final[i] for i in range(len(prompts))]


def _print_outputs(prompts: list[str], outputs: list, labels: list[str]) -> None:
    console = out()
    if len(prompts) == 1:
        if not outputs[0].error:
            console.print(outputs[0].text, markup=False, highlight=False)
        return
    for i, (prompt, output) in enumerate(zip(prompts, outputs)):
        if output.error:
            continue
        console.print(f"[bold][{labels[i]}][/] [dim]{_shorten(prompt)}[/]", highlight=False)
        console.print(output.text, markup=False, highlight=False)
        console.print()


def _shorten(text: str, width: int = 60) -> str:
    from rich.markup import escape

    flat = " ".join(text.split())
    return escape(flat if len(flat) <= width else flat[: width - 3] + "...")


def _output_record(index: int, prompt: str, output, tokenizer) -> dict[str, Any]:
    metrics = output.metrics
    record = {"index": index, "prompt": prompt, "text": output.text, "output_token_ids": output.output_token_ids,
              "num_prompt_tokens": len(output.prompt_token_ids), "num_output_tokens": len(output.output_token_ids),
              "finish_reason": output.finish_reason, "error": output.error,
              "ttft_s": metrics.ttft, "e2e_s": metrics.e2e}
    if output.logprobs is not None:
        name = tokenizer.convert_ids_to_tokens if tokenizer is not None else str
        record["logprobs"] = [{"token_id": lp.token_id, "token": name(lp.token_id), "logprob": lp.logprob,
                               "top": [{"token_id": t, "token": name(t), "logprob": v} for t, v in lp.top]}
                              for lp in output.logprobs]
    return record
