"""The `llmx` command: registers one typer command per stage and turns errors into one-line messages.

Only typer and the command modules (which import nothing heavy at module level) load here, so
`llmx --help` answers without importing torch or transformers.
"""

from __future__ import annotations

import sys
import traceback
from typing import Annotated, NoReturn, Sequence

import typer

from llmx.cli import bench, build, convert, pipeline, quantize, quickstart, run, serve
from llmx.cli import eval as eval_
from llmx.cli._console import print_error
from llmx.common import env
from llmx.common.errors import LlmxError, describe_exception

DEBUG_ENV = env.LLMX_DEBUG.name
# Set by `llmx --debug`, read when an error reaches run_cli (the callback runs before the command).
_debug_flag = False

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


@app.callback()
def _global_options(debug: Annotated[bool, typer.Option(
        "--debug", help=f"On an error, print the full traceback before the one-line message (also: {DEBUG_ENV}=1).")]
                    = False) -> None:
    global _debug_flag
    _debug_flag = debug


def debug_enabled() -> bool:
    """--debug, or LLMX_DEBUG=1. Asked while an error is reported, so a value that does not parse counts as off
    instead of raising a second error."""
    if _debug_flag:
        return True
    try:
        return env.LLMX_DEBUG.read()
    except LlmxError:
        return False


app.command("convert", no_args_is_help=True)(convert.convert_command)
app.command("quantize", no_args_is_help=True)(quantize.quantize_command)
app.command("build", no_args_is_help=True)(build.build_command)
app.command("run", no_args_is_help=True)(run.run_command)
app.command("serve", no_args_is_help=True)(serve.serve_command)
app.command("bench", no_args_is_help=True)(bench.bench_command)
app.command("eval", no_args_is_help=True)(eval_.eval_command)
app.command("quickstart")(quickstart.quickstart_command)
app.command("pipeline", no_args_is_help=True)(pipeline.pipeline_command)


def run_cli(argv: Sequence[str] | None = None) -> int:
    """Run the CLI on `argv` (default sys.argv[1:]) and return the exit code instead of exiting.

    The one place exceptions become what users see: LlmxError (bad input, failed gate) prints
    `error: <message>` and returns its exit code; usage errors (unknown option, bad value) print one line
    too; Ctrl-C returns 130; an error of the environment (a full disk, a read-only or missing path, a
    file-size limit, out of memory: common.errors.describe_exception) prints one sentence and returns 2.
    Anything else is a bug and propagates with its traceback. With --debug or LLMX_DEBUG=1 the traceback
    of every error is printed before its message.
    """
    global _debug_flag
    _debug_flag = False
    command = typer.main.get_command(app)
    try:
        code = command.main(args=list(argv) if argv is not None else None, prog_name="llmx", standalone_mode=False)
    except typer.TyperException as exc:  # usage errors: unknown option, bad value, missing argument
        message = exc.format_message()
        if message:  # empty when a command run without arguments has already printed its help
            hint = f" (see `{exc.ctx.command_path} --help`)" if getattr(exc, "ctx", None) is not None else ""
            print_error(message + hint)
        return exc.exit_code
    except (typer.Abort, KeyboardInterrupt):  # typer returns 130 for Ctrl-C inside a command; these come from outside
        if debug_enabled():
            traceback.print_exc()
        print_error("interrupted.")
        return 130
    except Exception as exc:
        message = describe_exception(exc)
        if message is None:
            raise
        if debug_enabled():
            traceback.print_exc()
        print_error(message)
        return exc.exit_code if isinstance(exc, LlmxError) else 2
    return code if isinstance(code, int) else 0


def main(argv: Sequence[str] | None = None) -> NoReturn:
    sys.exit(run_cli(argv))
