"""Run the app on uvicorn: load the engine, start its loop, serve until SIGINT/SIGTERM, stop gracefully.

On a signal uvicorn stops accepting connections and lets open requests finish for up to the grace period;
requests still open then are cancelled (which aborts their engine requests). The engine loop then stops and
the LLM closes (other ranks of a multi-rank engine exit with it), and the process exits 0.
"""

from __future__ import annotations

import asyncio
import contextlib
import signal

import uvicorn

from llmx.serve.app import ServeState, create_app
from llmx.serve.engine_loop import EngineLoop
from llmx.serve.metrics import ServerMetrics

_SHUTDOWN_MARGIN_S = 10.0  # after the grace period, time for aborted streams to send their last event


class _Server(uvicorn.Server):
    """uvicorn's server, except that a SIGINT/SIGTERM also starts the engine's drain (open requests get the
    grace period, then are aborted, so their streams end with an error event instead of being cut), and that
    the signal is not raised again after the graceful stop (uvicorn re-raises it, which would end the process
    with the signal's status instead of 0)."""

    def __init__(self, config: uvicorn.Config, on_signal):
        super().__init__(config)
        self._on_signal = on_signal

    def handle_exit(self, sig, frame) -> None:
        self._on_signal()
        super().handle_exit(sig, frame)

    @contextlib.contextmanager
    def capture_signals(self):
        previous = {sig: signal.signal(sig, self.handle_exit) for sig in (signal.SIGINT, signal.SIGTERM)}
        try:
            yield
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)


def serve(llm, *, host: str, port: int, model_name: str, api_key: str | None, max_queue: int,
          grace_period: float, on_ready=None) -> None:
    metrics = ServerMetrics(model_name)
    engine = EngineLoop(llm, metrics)
    state = ServeState(llm=llm, engine=engine, metrics=metrics, model_name=model_name, api_key=api_key,
                       max_queue=max_queue)

    @contextlib.asynccontextmanager
    async def lifespan(app):
        engine.start()
        if on_ready is not None:
            on_ready()
        try:
            yield
        finally:
            await asyncio.to_thread(engine.stop)

    # uvicorn's own limit is a backstop: the engine aborts what is open at grace_period, and the streams end.
    config = uvicorn.Config(create_app(state, lifespan), host=host, port=port, log_level="warning",
                            timeout_graceful_shutdown=grace_period + _SHUTDOWN_MARGIN_S, access_log=False,
                            lifespan="on")
    _Server(config, lambda: engine.drain(grace_period)).run()
