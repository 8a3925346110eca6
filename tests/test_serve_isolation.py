"""One request never breaks another: bad values are refused before batching; a failing batch is retried alone."""

from __future__ import annotations

import asyncio
import json
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest
from serving import running_server

from tokenopt.demo.suite import SuiteConfig, generate_suite
from tokenopt.serve import ServeConfig
from tokenopt.serve.backends import BackendError, LocalBackend

QUESTIONS = [item["question"] for item in generate_suite(SuiteConfig(n_queries=24, seed=31))]


def test_a_failing_batch_is_retried_request_by_request(demo_lm):
    # A seed the sampler refuses reaches the LM directly here (the server refuses it before), batched with
    # normal requests: only its own request fails, and the others get what they get when served alone.
    backend = LocalBackend(demo_lm, max_batch=16, batch_wait_ms=200.0)

    async def serve_all() -> list[object]:
        requests = [backend.generate(q, 8, "sc5", seed=3) for q in QUESTIONS[:6]]
        requests.insert(2, backend.generate(QUESTIONS[6], 8, "sc5", seed=-1))
        return await asyncio.gather(*requests, return_exceptions=True)

    async def serve_alone(question: str) -> object:
        return await backend.generate(question, 8, "sc5", seed=3)

    try:
        mixed = asyncio.run(serve_all())
        retried_batches = backend.batches
        alone = [asyncio.run(serve_alone(q)) for q in QUESTIONS[:6]]
    finally:
        backend.close()
    assert isinstance(mixed[2], BackendError)
    # The seven arrived together; their batch failed, and the six others were then decoded one by one.
    assert retried_batches == 6
    served = mixed[:2] + mixed[3:]
    assert not any(isinstance(result, BaseException) for result in served), served
    assert [r.text for r in served] == [r.text for r in alone]  # type: ignore[attr-defined]
    assert [r.billed_tokens for r in served] == [r.billed_tokens for r in alone]  # type: ignore[attr-defined]


@pytest.fixture(scope="module")
def server(tmp_path_factory, demo_policy):
    folder = tmp_path_factory.mktemp("isolation")
    config = ServeConfig(policy=demo_policy, log=folder / "decisions.sqlite", device="cpu", port=0, batch_wait_ms=50.0)
    with running_server(config) as (url, app):
        yield url, app


def _post(url: str, body: object) -> httpx.Response:
    content = body if isinstance(body, bytes) else json.dumps(body).encode()
    return httpx.post(
        f"{url}/v1/completions", content=content, headers={"content-type": "application/json"}, timeout=60
    )


def test_poisoned_values_fail_alone_with_a_4xx(server):
    url, _ = server
    poisoned = [
        {"prompt": "M 3 8 1 5?", "seed": -1},
        {"prompt": "M 3 8 1 5?", "seed": 10**30, "tokenopt": {"bypass": True}, "max_tokens": 4},
        {"prompt": "M 3 8 1 5?", "model": 12345},
    ]
    normal = [{"prompt": question, "seed": 1} for question in QUESTIONS[:16]]
    bodies = [body for _ in range(3) for body in (*poisoned, *normal)]
    with ThreadPoolExecutor(max_workers=24) as pool:
        responses = list(pool.map(lambda body: _post(url, body), bodies))
    for body, response in zip(bodies, responses, strict=True):
        if body in poisoned:
            assert response.status_code == 422, response.text
            error = response.json()["error"]
            assert error["param"] in {"seed", "model"} and error["type"] == "invalid_request_error"
        else:
            assert response.status_code == 200, response.text


@pytest.mark.parametrize(
    ("raw", "needle"),
    [
        (b'{"prompt": "x", "user": ' + b"[" * 1000 + b"]" * 1000 + b"}", "nests"),
        (b'{"prompt": "x", "seed": ' + b"9" * 5000 + b"}", "cannot be read"),
        (b'{"prompt": "x\\ud800"}', "lone surrogate"),
        (b'{"prompt": "x", "stop": ["\\udfff"]}', "lone surrogate"),
    ],
)
def test_malformed_bodies_get_an_openai_shaped_400(server, raw: bytes, needle: str):
    url, _ = server
    response = _post(url, raw)
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert needle in error["message"] and error["type"] == "invalid_request_error" and error["code"] == 400
    # The connection and the server stay usable.
    assert _post(url, {"prompt": QUESTIONS[0]}).status_code == 200


def test_nesting_within_the_limit_is_read(server):
    url, _ = server
    body = {"prompt": QUESTIONS[1], "tokenopt": {"bypass": False}, "stop": ["\n\n"]}
    assert _post(url, body).status_code == 200


def test_an_idle_connection_outlives_a_client_pools_expiry(server):
    # A pooled client (httpx: 5 s; a load balancer: 60 s) reuses an idle connection until its own expiry. Were
    # the server to close it first (uvicorn's default: 5 s), a request sent on it at that moment would fail with a
    # reset. tokenopt serve keeps idle connections --keep-alive seconds (75): after 6 s idle the same connection
    # (the same local port) serves the next request.
    url, _ = server
    statuses, ports = [], []
    with httpx.Client(base_url=url, limits=httpx.Limits(keepalive_expiry=60), timeout=60) as client:
        for pause in (6, 0):
            response = client.get("/healthz")
            statuses.append(response.status_code)
            ports.append(response.extensions["network_stream"].get_extra_info("client_addr")[1])  # while it is open
            time.sleep(pause)
    assert statuses == [200, 200]
    assert ports[0] == ports[1]
