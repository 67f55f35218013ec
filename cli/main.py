"""The `llmx` command: registers one typer command per stage and turns errors into one-line messages.

Only typer and the command modules (which import nothing heavy at module level) load here, so
`llmx --help` answers without importing torch or transformers.
"""

from __future__ import annotations

import sys
from typing import NoReturn, Sequence

import typer

from llmx.cli import bench, build, convert, pipeline, quantize, quickstart, run
from llmx.cli import eval as eval_
from llmx.cli._console import print_error
from llmx.common.errors import LlmxError

app = typer.Typer(
    name="llmx",
    help="Hugging Face LLM checkpoints to fast inference: convert -> quantize -> build -> run / bench / eval.\n\n"
         "Start with `llmx quickstart`; every command explains itself with --help.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    rich_markup_mode="markdown",
    context_settings={"help_option_names": ["-h", "--help"]},
)

app.command("convert", no_args_is_help=True)(convert.convert_command)
app.command("quantize", no_args_is_help=True)(quantize.quantize_command)
app.command("build", no_args_is_help=True)(build.build_command)
app.command("run", no_args_is_help=True)(run.run_command)
app.command("bench", no_args_is_help=True)(bench.bench_command)
app.command("eval", no_args_is_help=True)(eval_.eval_command)
app.command("quickstart")(quickstart.quickstart_command)
app.command("pipeline", no_args_is_help=True)(pipeline.pipeline_command)


def run_cli(argv: Sequence[str] | None = None) -> int:
    """Run the CLI on `argv` (default sys.argv[1:]) and return the exit code instead of exiting.

    LlmxError (bad input, failed gate) prints `error: <message>` and returns its exit code; usage errors
    (unknown option, bad value) print one line too. Anything else is a bug and propagates with its traceback.
    """
    command = typer.main.get_command(app)
    try:
        code = command.main(args=list(argv) if argv is not None else None, prog_name="llmx", standalone_mode=False)
    except LlmxError as exc:
        print_error(exc.message)
        return exc.exit_code
    except typer.TyperException as exc:  # usage errors: unknown option, bad value, missing argument
        message = exc.format_message()
        if message:  # empty when a command run without arguments has already printed its help
            hint = f" (see `{exc.ctx.command_path} --help`)" if getattr(exc, "ctx", None) is not None else ""
            print_error(message + hint)
        return exc.exit_code
    except typer.Abort:
        print_error("aborted.")
        return 130
    return code if isinstance(code, int) else 0


def main(argv: Sequence[str] | None = None) -> NoReturn:
    sys.exit(run_cli(argv))
