"""Running the server: decode slots, the scheduler, the API, and uvicorn with a draining shutdown.

On SIGTERM (or Ctrl-C) the engine stops taking requests (503) at once, uvicorn closes its listening socket, the
requests in flight finish and are answered, and `serve` returns 0. On a multi-host job every process builds the
same slots; process 0 serves and broadcasts, the others follow until process 0 stops."""
from __future__ import annotations

import logging
import signal
import sys
from typing import Any, Callable, Sequence

import jax

from jaxmoe.serve.app import Api, create_app
from jaxmoe.serve.engine import Engine
from jaxmoe.serve.multihost import Broadcaster, follow
from jaxmoe.serve.slots import DecodeSlots, chat_preamble, describe

log = logging.getLogger(__name__)


def build_engine(model, tokenizer, eos_ids: Sequence[int], max_batch: int, max_seq_len: int,
                 max_queue: int = 256, prefix_cache: bool = True) -> Engine:
    """Decode slots for `model` (every program compiled now) and a scheduler over them, not yet started. On a
    multi-host job call it on every process; process 0's engine broadcasts each call to the others.
    prefix_cache: prefill the chat template's preamble once (`chat_preamble`) for every prompt that starts
    with it."""
    prefix = chat_preamble(tokenizer) if prefix_cache else []
    slots = DecodeSlots(model, max_batch, max_seq_len, prefix=prefix)
    device = Broadcaster(slots) if jax.process_count() > 1 else slots
    return Engine(device, tokenizer, eos_ids, max_queue)


def serve(model, tokenizer, model_name: str, eos_ids: Sequence[int], host: str = "127.0.0.1", port: int = 8000,
          max_batch: int = 8, max_seq_len: int = 1024, api_key: str | None = None, max_queue: int = 256,
          on_ready: Callable[[dict[str, Any]], None] | None = None, prefix_cache: bool = True) -> int:
    """Serve `model` over the OpenAI API until SIGTERM/SIGINT; returns 0 after draining. `on_ready(info)` is
    called (on process 0) once every program is compiled and the port is about to open."""
    import uvicorn

    engine = build_engine(model, tokenizer, eos_ids, max_batch, max_seq_len, max_queue, prefix_cache)
    slots = engine.device if isinstance(engine.device, DecodeSlots) else engine.device.slots
    if jax.process_index() != 0:
        steps = follow(slots)
        log.info("process %d: followed %d steps", jax.process_index(), steps)
        return 0
    engine.start()
    api = Api(engine, tokenizer, model_name, max_seq_len, api_key)
    config = uvicorn.Config(create_app(api), host=host, port=port, log_level="warning", lifespan="off",
                            access_log=False)
    server = _draining_server(config, engine)
    if on_ready is not None:
        on_ready({"model": model_name, "host": host, "port": port, **describe(slots)})
    # uvicorn re-raises the signal it caught once it has shut down; a no-op handler in place of the default one
    # keeps that from killing the process, so a drained server exits 0.
    previous = {s: signal.signal(s, lambda *_: None) for s in (signal.SIGTERM, signal.SIGINT)}
    try:
        server.run()
    finally:
        engine.stop()
        for s, h in previous.items():
            signal.signal(s, h)
    if engine.error is not None:
        print(f"jaxmoe serve: the engine failed: {engine.error}", file=sys.stderr)
        return 1
    return 0


def _draining_server(config, engine: Engine):
    """A uvicorn.Server whose exit signal first tells the engine to refuse new requests (uvicorn then stops
    listening and waits for the open requests)."""
    import uvicorn

    class Server(uvicorn.Server):
        def handle_exit(self, sig, frame) -> None:
            engine.drain()
            super().handle_exit(sig, frame)

    return Server(config)
