"""Every decided request is logged exactly once, streamed or not, read to the end or dropped by its client."""

from __future__ import annotations

import json
import socket
import time
from urllib.parse import urlparse

import httpx
import pytest
from serving import running_server

from tokenopt.demo.suite import SuiteConfig, generate_suite
from tokenopt.runtime import BudgetPolicy
from tokenopt.serve import ServeConfig, read_decisions

QUESTIONS = [item["question"] for item in generate_suite(SuiteConfig(n_queries=200, seed=41))]


def _wait_for_rows(log, count: int, timeout: float = 30.0):
    deadline = time.monotonic() + timeout
    while True:
        rows = read_decisions(log)
        if len(rows.id) >= count or time.monotonic() > deadline:
            return rows
        time.sleep(0.1)


@pytest.fixture(scope="module")
def served(tmp_path_factory, demo_policy):
    folder = tmp_path_factory.mktemp("logging")
    # Requests wait half a second for a batch to fill, so a client can leave before its response starts.
    config = ServeConfig(policy=demo_policy, log=folder / "decisions.sqlite", device="cpu", port=0, batch_wait_ms=500.0)
    with running_server(config) as (url, _):
        yield url, folder / "decisions.sqlite"


def _by_mode(policy_dir, greedy: bool, count: int) -> list[str]:
    policy = BudgetPolicy.load(policy_dir)
    chosen = [q for q in QUESTIONS if (policy.decide(q).mode == "greedy") == greedy and policy.decide(q).budget > 0]
    assert len(chosen) >= count, "the demo policy should pick this kind of action for some suite questions"
    return chosen[:count]


def _decisions_made(url: str) -> float:
    """How many requests the server's policy has decided (the count of its decision-latency histogram)."""
    for line in httpx.get(f"{url}/metrics").text.splitlines():
        if line.startswith("tokenopt_policy_latency_seconds_count"):
            return float(line.rsplit(" ", 1)[1])
    return 0.0


def _leave_before_the_response(url: str, question: str, request_id: str) -> None:
    """Send a streamed request on a raw socket and close it once the server has decided it.

    The server has then read the request (so it is logged), and the request waits in the batcher, whose
    half-second window outlasts the client: its response cannot have started when the client leaves.
    """
    address = urlparse(url)
    body = json.dumps({"prompt": question, "stream": True, "user": request_id}).encode()
    head = (
        f"POST /v1/completions HTTP/1.1\r\nHost: {address.hostname}\r\nContent-Type: application/json\r\n"
        f"Content-Length: {len(body)}\r\n\r\n"
    ).encode()
    before = _decisions_made(url)
    with socket.create_connection((address.hostname, address.port)) as connection:
        connection.sendall(head + body)
        deadline = time.monotonic() + 30.0
        while _decisions_made(url) <= before and time.monotonic() < deadline:
            time.sleep(0.005)


def _drop_after_first_event(url: str, question: str) -> str:
    with httpx.stream("POST", f"{url}/v1/completions", json={"prompt": question, "stream": True}, timeout=60) as r:
        assert r.status_code == 200
        request_id = r.headers["x-request-id"]
        for _ in r.iter_lines():
            break  # the client reads one event and leaves
    return request_id


def _read_whole(url: str, question: str) -> str:
    with httpx.stream("POST", f"{url}/v1/completions", json={"prompt": question, "stream": True}, timeout=60) as r:
        lines = [line for line in r.iter_lines() if line]
        assert lines[-1] == "data: [DONE]"
        return r.headers["x-request-id"]


def test_streams_dropped_or_read_are_each_logged_once_with_their_status(served, demo_policy):
    url, log = served
    greedy = _by_mode(demo_policy, greedy=True, count=6)
    voting = _by_mode(demo_policy, greedy=False, count=6)
    for k, question in enumerate(greedy[:3] + voting[:3]):
        _leave_before_the_response(url, question, f"left-{k}")
    dropped = [_drop_after_first_event(url, q) for q in (greedy[3], voting[3])]
    read = [_read_whole(url, q) for q in greedy[4:] + voting[4:]]
    plain = [httpx.post(f"{url}/v1/completions", json={"prompt": q}, timeout=60).json()["id"] for q in greedy[:2]]
    total = 6 + len(dropped) + len(read) + len(plain)
    rows = _wait_for_rows(log, total)
    assert len(rows.id) == len(set(rows.id)) == total  # every decided request once, nothing extra
    status = dict(zip(rows.id, rows.status, strict=True))
    # The clients that left before their response started: their own status, 499.
    left = [request_id for request_id in rows.id if request_id not in set(dropped + read + plain)]
    assert [status[request_id] for request_id in left] == [499] * 6
    # A client that leaves after the first event may leave before or after the last one went out.
    assert all(status[request_id] in (200, 499) for request_id in dropped)
    assert all(status[request_id] == 200 for request_id in read + plain)
    metrics = httpx.get(f"{url}/metrics").text
    assert 'status="499"' in metrics
