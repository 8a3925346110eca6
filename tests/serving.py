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
from pathlib import Path
from typing import Any

import httpx
import uvicorn

from tokenopt.serve import ServeConfig, create_app


@contextlib.contextmanager
def running_server(config: ServeConfig, backend: Any = None) -> Iterator[tuple[str, Any]]:
    """Serve ``config`` on 127.0.0.1 at a free port; yield (base URL, the FastAPI app)."""
    app = create_app(config, backend)
    server = uvicorn.Server(
        uvicorn.Config(app, host="127.0.0.1", port=0, log_level="warning", timeout_keep_alive=config.keep_alive)
    )  # as tokenopt serve runs it
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
def serve_processes(
    *arguments: Sequence[str], timeout: float = 180.0, log_dir: Path | None = None
) -> Iterator[list[str]]:
    """Run one ``tokenopt serve ARGUMENTS`` per argument list, each on 127.0.0.1 at a free port; yield their base URLs.

    The processes start together and are yielded once each ``/readyz`` says 200; they are
    stopped with SIGTERM (then killed) on exit. One that dies before it is ready, or is
    not ready within ``timeout`` seconds, fails with the end of its output. With
    ``log_dir`` process ``i`` writes its output to ``log_dir/serve-<i>.log`` (for long
    runs: a pipe nobody reads would fill and stall the server); without it, stderr is
    kept in a pipe for that message.
    """
    environment = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    processes: list[subprocess.Popen[str]] = []
    urls: list[str] = []
    logs: list[Path | None] = []

    def output(index: int) -> str:
        log = logs[index]
        if log is not None:
            return log.read_text(encoding="utf-8", errors="replace")[-4000:]
        stderr = processes[index].stderr
        return stderr.read() if stderr is not None and processes[index].poll() is not None else ""

    try:
        for index, given in enumerate(arguments):
            port = free_port()
            command = [sys.executable, "-m", "tokenopt.cli", "serve", *given, "--port", str(port)]
            log = None if log_dir is None else log_dir / f"serve-{index}.log"
            logs.append(log)
            if log is None:
                process = subprocess.Popen(
                    command, env=environment, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True
                )
            else:
                with log.open("w", encoding="utf-8") as sink:  # the child keeps its own descriptor
                    process = subprocess.Popen(
                        command, env=environment, stdout=sink, stderr=subprocess.STDOUT, text=True
                    )
            processes.append(process)
            urls.append(f"http://127.0.0.1:{port}")
        deadline = time.monotonic() + timeout
        for index, (process, url) in enumerate(zip(processes, urls, strict=True)):
            while True:
                try:
                    if httpx.get(f"{url}/readyz", timeout=2).status_code == 200:
                        break
                except httpx.TransportError:
                    pass
                if process.poll() is not None:
                    raise RuntimeError(f"tokenopt serve exited with {process.returncode}: {output(index)}")
                if time.monotonic() > deadline:
                    raise RuntimeError(f"tokenopt serve was not ready within {timeout:.0f} s: {output(index)}")
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
