"""The one OpenAI-compatible client (`tokenopt.lm.openai_client`), against a scripted server on loopback.

The fake upstream is a real HTTP server (stdlib ``http.server`` in a thread). Each
``/v1/completions`` request takes the next scripted :class:`Reply` (a status and a body,
a dropped connection, or a reply slower than the client's timeout), then a valid
completion; ``/v1/models`` answers a scripted listing. Every request is recorded with
its arrival time, path, headers and body.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import pytest

from tokenopt.lm.openai_client import OpenAIClient, UpstreamError, Usage, read_usage

COMPLETION = {
    "id": "cmpl-fake",
    "object": "text_completion",
    "choices": [{"index": 0, "text": "ab=7\n", "finish_reason": "stop"}],
    "usage": {"prompt_tokens": 5, "completion_tokens": 4, "total_tokens": 9},
}
BODY = {"model": "fake-lm", "prompt": "Q3 7?", "max_tokens": 8}


@dataclass
class Reply:
    """What the fake answers one completions request."""

    status: int = 200
    body: object = field(default_factory=lambda: COMPLETION)
    raw: bytes | None = None
    """Bytes to send instead of ``body`` as JSON."""
    drop: bool = False
    """Close the connection without an answer."""
    delay_s: float = 0.0
    """Wait this long before answering."""


def failing(status: int) -> Reply:
    """An error reply in OpenAI's shape."""
    return Reply(status, {"error": {"message": f"scripted {status}"}})


@dataclass
class Seen:
    at: float
    path: str
    headers: dict[str, str]
    body: object


@dataclass
class FakeUpstream:
    """A scripted OpenAI-compatible server (see the module docstring)."""

    script: list[Reply] = field(default_factory=list)
    models: tuple[int, object] = (200, {"object": "list", "data": [{"id": "fake-lm", "max_model_len": 64}]})
    seen: list[Seen] = field(default_factory=list)
    url: str = ""

    def __post_init__(self) -> None:
        self._lock = threading.Lock()

    def next_reply(self, path: str, headers: dict[str, str], raw: bytes) -> Reply:
        with self._lock:
            self.seen.append(Seen(time.monotonic(), path, headers, json.loads(raw) if raw else None))
            if path == "/v1/models":
                return Reply(status=self.models[0], body=self.models[1])
            if path != "/v1/completions":
                return Reply(status=404, body={"error": {"message": f"no route {path}"}})
            return self.script.pop(0) if self.script else Reply()

    @contextlib.contextmanager
    def running(self) -> Iterator[FakeUpstream]:
        fake = self

        class Handler(BaseHTTPRequestHandler):
            def _reply(self, raw: bytes) -> None:
                headers = {name.lower(): value for name, value in self.headers.items()}
                reply = fake.next_reply(self.path, headers, raw)
                time.sleep(reply.delay_s)
                if reply.drop:
                    return  # HTTP/1.0: the connection closes with no response
                data = reply.raw if reply.raw is not None else json.dumps(reply.body).encode()
                with contextlib.suppress(OSError):  # the client may have timed out and left
                    self.send_response(reply.status)
                    self.send_header("Content-Type", "application/json")
                    self.send_header("Content-Length", str(len(data)))
                    self.end_headers()
                    self.wfile.write(data)

            def do_GET(self) -> None:  # noqa: N802 (http.server's name)
                self._reply(b"")

            def do_POST(self) -> None:  # noqa: N802
                self._reply(self.rfile.read(int(self.headers.get("Content-Length", 0))))

            def log_message(self, format: str, *args: Any) -> None:  # noqa: A002
                pass

        server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        server.daemon_threads = True
        thread = threading.Thread(target=server.serve_forever, daemon=True)
        thread.start()
        self.url = f"http://127.0.0.1:{server.server_address[1]}"
        try:
            yield self
        finally:
            server.shutdown()
            server.server_close()
            thread.join(timeout=10)

    def completions(self) -> list[Seen]:
        return [seen for seen in self.seen if seen.path == "/v1/completions"]


def _client(url: str, **settings: Any) -> OpenAIClient:
    options: dict[str, Any] = {"retries": 3, "backoff_s": 0.05, "timeout_s": 5.0}
    options.update(settings)
    return OpenAIClient(url, **options)


def _complete(client: OpenAIClient, body: dict[str, Any] = BODY) -> dict[str, Any]:
    async def once() -> dict[str, Any]:
        async with client:
            return await client.complete(body)

    return asyncio.run(once())


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


# -- retries ------------------------------------------------------------------------------


def test_429_and_5xx_are_retried_with_exponential_backoff():
    script = [failing(429), failing(500), failing(503)]
    with FakeUpstream(script=script).running() as fake:
        client = _client(fake.url, retries=3, backoff_s=0.05)
        assert _complete(client) == COMPLETION
    statuses = [429, 500, 503, 200]
    assert len(fake.completions()) == len(statuses)
    assert all(seen.body == BODY for seen in fake.completions())  # the same request each time
    arrivals = [seen.at for seen in fake.completions()]
    waits = [later - earlier for earlier, later in zip(arrivals, arrivals[1:], strict=False)]
    # 0.05 s, then twice as long each time. Lower bounds only: a sleep never ends early.
    assert [wait >= bound for wait, bound in zip(waits, [0.045, 0.095, 0.195], strict=True)] == [True] * 3, waits
    assert (client.stats.requests, client.stats.retries) == (1, 3)
    assert client.stats.forward_tokens == 5 + 4


def test_connection_errors_and_timeouts_are_retried():
    script = [Reply(drop=True), Reply(delay_s=1.5)]
    with FakeUpstream(script=script).running() as fake:
        client = _client(fake.url, retries=2, timeout_s=0.5)
        assert _complete(client) == COMPLETION
    assert len(fake.completions()) == 3
    assert (client.stats.requests, client.stats.retries) == (1, 2)


def test_retries_run_out_with_the_last_reason():
    with FakeUpstream(script=[failing(503)] * 3).running() as fake:
        client = _client(fake.url, retries=2)
        with pytest.raises(UpstreamError, match=r"answered 503.*scripted.*after 2 retries") as caught:
            _complete(client, BODY)
    assert fake.url in str(caught.value)
    assert len(fake.completions()) == 3 and client.stats.requests == 0

    client = _client(f"http://127.0.0.1:{_free_port()}", retries=2, backoff_s=0.01)
    with pytest.raises(UpstreamError, match=r"unreachable: ConnectError.*after 2 retries"):
        _complete(client)
    assert client.stats.retries == 2


@pytest.mark.parametrize("status", [400, 401, 404, 422])
def test_a_4xx_other_than_429_is_not_retried(status):
    with FakeUpstream(script=[failing(status)]).running() as fake:
        client = _client(fake.url)
        with pytest.raises(UpstreamError, match=rf"answered {status}: .*scripted {status}"):
            _complete(client)
    assert len(fake.completions()) == 1
    assert client.stats.retries == 0


# -- response validation ---------------------------------------------------------------------


@pytest.mark.parametrize(
    ("reply", "reason"),
    [
        (Reply(raw=b"<html>gateway</html>"), "answered 200 with malformed JSON: .*gateway"),
        (Reply(body=[COMPLETION]), "without a completions body"),
        (Reply(body={"object": "text_completion"}), "without a completions body"),
        (Reply(body={"choices": []}), "without a completions body"),
        (Reply(body={"choices": "ab=7"}), "without a completions body"),
        (Reply(body={"choices": [{"index": 0, "finish_reason": "stop"}]}), "without a completions body"),
        (Reply(body={"choices": [{"index": 0, "text": None}]}), "without a completions body"),
        (Reply(body={"choices": [{"index": 0, "text": "ab"}, "cd"]}), "without a completions body"),
    ],
)
def test_a_malformed_200_is_refused_with_the_reason_and_not_retried(reply, reason):
    with FakeUpstream(script=[reply]).running() as fake:
        client = _client(fake.url)
        with pytest.raises(UpstreamError, match=reason):
            _complete(client)
    assert len(fake.completions()) == 1
    assert (client.stats.requests, client.stats.retries, client.stats.forward_tokens) == (0, 0, 0)


def test_usage_is_read_by_one_rule():
    assert read_usage(COMPLETION) == Usage(prompt_tokens=5, completion_tokens=4)
    assert read_usage({}) == read_usage({"usage": None}) == Usage(0, 0)
    assert read_usage({"usage": {"prompt_tokens": "5", "completion_tokens": -3}}) == Usage(0, 0)


# -- headers, URL and /v1/models ----------------------------------------------------------------


@pytest.mark.parametrize("suffix", ["", "/", "/v1", "/v1/"])
def test_the_key_and_the_bypass_header_go_with_every_request_to_v1(suffix):
    with FakeUpstream().running() as fake:
        client = _client(fake.url + suffix, api_key="k-secret")
        assert client.url == f"{fake.url}/v1"
        assert client.list_models()[0]["id"] == "fake-lm"
        _complete(client)
    assert [seen.path for seen in fake.seen] == ["/v1/models", "/v1/completions"]
    for seen in fake.seen:
        assert seen.headers.get("authorization") == "Bearer k-secret"
        assert seen.headers.get("x-tokenopt-bypass") == "1"


def test_without_a_key_no_authorization_header_is_sent():
    with FakeUpstream().running() as fake:
        client = _client(fake.url)
        client.list_models()
        _complete(client)
    assert len(fake.seen) == 2
    assert all("authorization" not in seen.headers and seen.headers["x-tokenopt-bypass"] == "1" for seen in fake.seen)


def test_models_are_listed_and_a_server_without_the_route_lists_none():
    listing = {"data": [{"id": "first", "max_model_len": 4096}, "junk", {"id": "second"}]}
    with FakeUpstream(models=(200, listing)).running() as fake:
        assert _client(fake.url).list_models() == [{"id": "first", "max_model_len": 4096}, {"id": "second"}]
    with FakeUpstream(models=(404, {"error": {"message": "no route"}})).running() as fake:
        assert _client(fake.url).list_models() == []
    with FakeUpstream(models=(401, {"error": {"message": "bad key"}})).running() as fake:
        with pytest.raises(UpstreamError, match=r"refused the API key \(401\)"):
            _client(fake.url).list_models()
    with pytest.raises(UpstreamError, match="cannot reach the upstream"):
        _client(f"http://127.0.0.1:{_free_port()}").list_models()


def test_one_client_serves_one_event_loop_after_another():
    with FakeUpstream().running() as fake:
        client = _client(fake.url, max_connections=2)
        assert _complete(client) == _complete(client) == COMPLETION
    assert client.stats.requests == 2


def test_bad_settings_are_refused_at_construction():
    with pytest.raises(ValueError, match="retries and backoff must be >= 0; got -1"):
        OpenAIClient("http://127.0.0.1:1", retries=-1, backoff_s=0.5, timeout_s=1.0)
    with pytest.raises(ValueError, match="timeout must be > 0"):
        OpenAIClient("http://127.0.0.1:1", retries=1, backoff_s=0.5, timeout_s=0.0)
    with pytest.raises(ValueError, match="max_connections must be >= 1"):
        OpenAIClient("http://127.0.0.1:1", retries=1, backoff_s=0.5, timeout_s=1.0, max_connections=0)


# -- collection and the proxy share it --------------------------------------------------------


def test_collection_and_the_proxy_share_the_client_and_its_error():
    import tokenopt.lm.openai_client as client_module
    import tokenopt.lm.upstream as collection
    import tokenopt.serve.backends as proxy

    assert collection.UpstreamError is proxy.UpstreamError is client_module.UpstreamError
    assert not issubclass(proxy.BackendError, UpstreamError)  # the proxy answers 502 for it, 500 for the LM's
    with FakeUpstream().running() as fake:
        lm = collection.UpstreamLM(fake.url + "/v1/", api_key="k")
        backend = proxy.UpstreamBackend(fake.url, model="fake-lm", api_key="k")
    assert type(lm.client) is type(backend.client) is OpenAIClient
    assert lm.url == backend.url == f"{fake.url}/v1"
    assert lm.max_context == 64  # read from /v1/models
    assert lm.stats is lm.client.stats
    # Each with its own retry settings (documented in the client module).
    assert (lm.client.retries, lm.client.backoff_s) == (5, 0.5)
    assert (backend.client.retries, backend.client.backoff_s) == (2, 0.2)


def test_the_proxy_fails_with_the_clients_error_after_its_two_retries():
    from tokenopt.serve.backends import UpstreamBackend

    async def serve(url: str) -> object:
        backend = UpstreamBackend(url, model="fake-lm")
        try:
            return await backend.generate("Q3 7?", 8, "greedy")
        finally:
            await backend.aclose()

    with FakeUpstream(script=[failing(502)] * 3).running() as fake:
        with pytest.raises(UpstreamError, match=r"answered 502.*after 2 retries"):
            asyncio.run(serve(fake.url))
    assert len(fake.completions()) == 3
    assert all(seen.headers["x-tokenopt-bypass"] == "1" for seen in fake.completions())


def test_the_proxy_imports_the_client_without_torch():
    code = "import sys, tokenopt.serve.backends; print(sorted({'torch', 'transformers'} & set(sys.modules)))"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True)
    assert result.stdout.strip() == "[]", result.stdout
