"""`llmx serve`: an OpenAI-compatible HTTP server over one engine."""

from __future__ import annotations

import errno
import socket
from pathlib import Path
from typing import Annotated, Any, Optional

import typer

from llmx.cli._console import emit_json, print_info
from llmx.cli._options import KvCacheFractionOption, PrintConfigOption, RecipeOption
from llmx.cli._settings import resolve_settings
from llmx.common import env
from llmx.common.errors import LlmxError

# Library modules that `llmx --help` does not need are imported inside the commands that use them: --help
# imports every command module and must stay under 0.6 s (torch, transformers and pydantic alone take more).

# The KV-cache settings come from the recipe's `run` section: serving runs the engine as `llmx run` does.
DEFAULTS: dict[str, Any] = {"kv_cache_tokens": None, "kv_cache_fraction": 0.9}


def serve_command(
    engine: Annotated[Path, typer.Argument(metavar="ENGINE", show_default=False,
                                           help="Engine directory (from `llmx build`).")],
    host: Annotated[str, typer.Option(help="Address to listen on; 0.0.0.0 exposes the server to the network.")]
    = "127.0.0.1",
    port: Annotated[int, typer.Option(min=1, max=65535, help="TCP port to listen on.")] = 8000,
    api_key: Annotated[Optional[str], typer.Option(
        envvar=env.LLMX_API_KEY.name, show_default=False,
        help="Require `Authorization: Bearer KEY` on /v1 routes (also from $LLMX_API_KEY) [default: none].")] = None,
    served_model_name: Annotated[Optional[str], typer.Option(
        show_default=False, help="The model name clients send and /v1/models lists [default: the engine "
                                 "directory's name].")] = None,
    max_queue: Annotated[int, typer.Option(
        min=0, help="Requests held beyond a full batch (the engine's max batch size); more answer 429.")] = 1024,
    grace_period: Annotated[float, typer.Option(
        min=0.0, help="On SIGINT/SIGTERM, seconds open requests get to finish before they are aborted.")] = 30.0,
    kv_cache_tokens: Annotated[Optional[int], typer.Option(
        min=1, show_default=False,
        help="KV-cache size in tokens [default: on CPU max batch x max seq len, capped at 2 GiB; on GPU the "
             "free memory].")] = None,
    kv_cache_fraction: KvCacheFractionOption = None,
    recipe: RecipeOption = None,
    print_config: PrintConfigOption = False,
) -> None:
    """Serve an engine over the OpenAI API: /v1/completions, /v1/chat/completions (streamed or not),
    /v1/models, /health and /metrics (Prometheus). Requests join the running batch as they arrive.

    Stops gracefully on SIGINT/SIGTERM and exits 0. Needs the `serve` extra: `pip install 'llmx[serve]'`.

    Examples:

      llmx serve engines/llama8b --port 8000

      curl localhost:8000/v1/completions -H 'Content-Type: application/json'
        -d '{"model": "llama8b", "prompt": "Hello", "max_tokens": 16}'
    """
    flags = {"kv_cache_tokens": kv_cache_tokens, "kv_cache_fraction": kv_cache_fraction}
    settings = resolve_settings("run", recipe=recipe, flags=flags, defaults=DEFAULTS)
    if print_config:
        emit_json(settings.to_dict())
        return
    try:
        from llmx.serve.server import serve
    except ImportError as exc:
        raise LlmxError(f"`llmx serve` needs the serve extra ({exc.name} is missing): "
                        "pip install 'llmx[serve]'.") from exc
    if api_key is not None and not api_key.strip():
        raise LlmxError("--api-key (or $LLMX_API_KEY) is empty; give a key or unset it.")
    _check_port_free(host, port)
    name = served_model_name or Path(engine).resolve().name

    from llmx.runtime.engine import LLM

    # Requests to a server rarely give max_tokens (chat then defaults to the context left) and mostly end early on
    # EOS: reserving KV for every request's limit would admit a few sequences at a time. So the server admits
    # optimistically with a watermark and preempts when the cache runs out, as vLLM does.
    llm = LLM(engine, kv_cache_tokens=settings["kv_cache_tokens"], kv_cache_fraction=settings["kv_cache_fraction"],
              admission="watermark")
    serve(llm, host=host, port=port, model_name=name, api_key=api_key, max_queue=max_queue,
          grace_period=grace_period,
          on_ready=lambda: print_info(f"serving {name} on http://{host}:{port}/v1 "
                                      f"({llm.stats()['device_name']}, max batch {llm.scheduler.max_num_seqs})"))
    print_info("server stopped.")


def _check_port_free(host: str, port: int) -> None:
    """Refuse a port already in use with one line, before the engine spends time loading."""
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except socket.gaierror as exc:
        raise LlmxError(f"--host {host}: not an address this machine can listen on ({exc.strerror}).") from exc
    family, _, _, _, address = infos[0]
    with socket.socket(family, socket.SOCK_STREAM) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind(address)
        except OSError as exc:
            if exc.errno == errno.EADDRINUSE:
                raise LlmxError(f"port {port} on {host} is in use; pick another with --port.") from exc
            raise LlmxError(f"cannot listen on {host}:{port} ({exc.strerror}); pick another --host/--port.") from exc
