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
def serve_processes(*arguments: Sequence[str], timeout: float = 180.0) -> Iterator[list[str]]:
    """Run one ``tokenopt serve ARGUMENTS`` per argument list, each on 127.0.0.1 at a free port; yield their base URLs.

    The processes start together and are yielded once each ``/readyz`` says 200; they are
    stopped with SIGTERM (then killed) on exit. One that dies before it is ready fails
    with its stderr.
    """
    environment = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    processes: list[subprocess.Popen[str]] = []
    urls: list[str] = []
    try:
        for given in arguments:
            port = free_port()
            command = [sys.executable, "-m", "tokenopt.cli", "serve", *given, "--port", str(port)]
            processes.append(
                subprocess.Popen(command, env=environment, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
            )
            urls.append(f"http://127.0.0.1:{port}")
        deadline = time.monotonic() + timeout
        for process, url in zip(processes, urls, strict=True):
            while True:
                try:
                    if httpx.get(f"{url}/readyz", timeout=2).status_code == 200:
                        break
                except httpx.TransportError:
                    pass
                if process.poll() is not None:
                    stderr = process.stderr.read() if process.stderr else ""
                    raise RuntimeError(f"tokenopt serve exited with {process.returncode}: {stderr}")
                if time.monotonic() > deadline:
                    raise RuntimeError(f"tokenopt serve was not ready within {timeout:.0f} s")
                time.sleep(0.1)
        yield urls
    finally:
        stop(*processes)


def stop(*processes: subprocess.Popen[Any]) -> None:
    """SIGTERM every process, then wait up to 30 s each before killing it."""
    for process in processes:
        process.terminate()
    for process in processes:
        try:
            process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
