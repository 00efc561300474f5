"""`jaxmoe serve`: an OpenAI-compatible server with continuous batching, on one device or a multi-host mesh.

    slots.py      decode slots over one KV cache: bucketed prefill, insert into a row, decode step, sampling
    engine.py     the scheduler thread: queue, admission between steps, stop strings, cancellation
    app.py        the Starlette routes (/v1/completions, /v1/chat/completions, /v1/models, /health, /metrics)
    metrics.py    Prometheus text
    multihost.py  process 0 broadcasts each device call; the other processes follow
    server.py     `serve(...)`: all of it under uvicorn, draining on SIGTERM

The model arrives loaded (the CLI loads it); nothing here reads checkpoint formats.
"""
from __future__ import annotations
