"""Run a tokenopt server on loopback inside the test process (uvicorn in a thread)."""

from __future__ import annotations

import contextlib
import threading
import time
from collections.abc import Iterator
from typing import Any

import uvicorn

from tokenopt.serve import ServeConfig, create_app


@contextlib.contextmanager
def running_server(config: ServeConfig, backend: Any = None) -> Iterator[tuple[str, Any]]:
    """Serve ``config`` on 127.0.0.1 at a free port; yield (base URL, the FastAPI app)."""
    app = create_app(config, backend)
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=0, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 60
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            raise RuntimeError("the test server did not start")
        time.sleep(0.02)
    port = server.servers[0].sockets[0].getsockname()[1]
    try:
        yield f"http://127.0.0.1:{port}", app
    finally:
        server.should_exit = True
        thread.join(timeout=30)
