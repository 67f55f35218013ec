"""`llmx serve`: an OpenAI-compatible HTTP server over one engine (Starlette on uvicorn, prometheus-client).

`protocol` validates requests into sampling parameters and writes responses and stream chunks; `engine_loop`
drives `LLM.step` on one thread that requests join as they arrive; `metrics` is the Prometheus registry;
`app` holds the routes; `server` runs uvicorn with a graceful stop.
"""
