"""Run a tokenopt server on loopback: inside the test process (uvicorn in a thread) or as a `tokenopt serve` process."""

from __future__ import annotations

import contextlib
import os
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator, Sequence
from typing import Any

import httpx
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


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on now."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


@contextlib.contextmanager
def serve_process(arguments: Sequence[str], timeout: float = 180.0) -> Iterator[str]:
    """Run ``tokenopt serve ARGUMENTS`` on 127.0.0.1 at a free port until ``/readyz`` says 200; yield its base URL.

    The process is stopped with SIGTERM (then killed) on exit; a process that dies before it
    is ready fails with its stderr.
    """
    port = free_port()
    command = [sys.executable, "-m", "tokenopt.cli", "serve", *arguments, "--port", str(port)]
    environment = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    process = subprocess.Popen(command, env=environment, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + timeout
        while True:
            try:
                if httpx.get(f"{url}/readyz", timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            if process.poll() is not None:
                raise RuntimeError(f"tokenopt serve exited with {process.returncode}: {process.stderr.read()}")
            if time.monotonic() > deadline:
                raise RuntimeError(f"tokenopt serve was not ready within {timeout:.0f} s")
            time.sleep(0.1)
        yield url
    finally:
        process.terminate()
        try:
            process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
