"""The server under load, under fuzzed bodies, and as the `tokenopt serve` command."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import openai
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from serving import free_port, running_server

from tokenopt.demo.suite import SuiteConfig, generate_suite
from tokenopt.serve import ServeConfig, read_decisions

QUESTIONS = [item["question"] for item in generate_suite(SuiteConfig(n_queries=200, seed=31))]


async def _load(url: str, total: int, concurrency: int) -> list[tuple[int, dict | None, str]]:
    """Send ``total`` requests, ``concurrency`` at a time.

    Every 40th is malformed JSON and every 25th carries a value the LM would choke on
    (a negative or huge seed, a model that is not a string): these must fail alone.
    """
    gate = asyncio.Semaphore(concurrency)
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    async with httpx.AsyncClient(base_url=url, timeout=120, limits=limits) as client:

        async def one(i: int) -> tuple[int, dict | None, str]:
            async with gate:
                if i % 40 == 39:
                    response = await client.post("/v1/completions", content=b'{"prompt": ')
                    return response.status_code, None, "malformed"
                if i % 25 == 12:
                    poison = ({"seed": -1}, {"seed": 10**30}, {"model": 12345}, {"stop": ["\ud800"]})[i % 4]
                    content = json.dumps({"prompt": "M 3 8 1 5?", **poison}).encode()  # ASCII, surrogates escaped
                    response = await client.post("/v1/completions", content=content)
                    return response.status_code, response.json(), "poisoned"
                endpoint = "/v1/completions" if i % 2 else "/v1/chat/completions"
                question = QUESTIONS[i % len(QUESTIONS)]
                body = {"prompt": question} if i % 2 else {"messages": [{"role": "user", "content": question}]}
                body["user"] = f"user-{i % 97}"
                response = await client.post(endpoint, json=body)
                return response.status_code, response.json(), endpoint

        return await asyncio.gather(*(one(i) for i in range(total)))


def test_load_2000_requests_at_concurrency_64(tmp_path, demo_policy):
    config = ServeConfig(policy=demo_policy, log=tmp_path / "decisions.sqlite", device="cpu", port=0, threads=1)
    with running_server(config) as (url, app):
        results = asyncio.run(_load(url, total=2000, concurrency=64))
        backend = app.state.tokenopt.backend
        batched = backend.batched_requests / max(1, backend.batches)
    statuses = [status for status, _, _ in results]
    assert not [s for s in statuses if s >= 500]
    assert statuses.count(400) == 50 + 20  # the malformed ones and the lone surrogates
    poisoned = [status for status, _, kind in results if kind == "poisoned"]
    assert len(poisoned) == 80 and all(400 <= status < 500 for status in poisoned)
    # No failure crossed from a poisoned request to another: every other request was served.
    assert [status for status, _, kind in results if kind not in ("malformed", "poisoned")] == [200] * 1870
    served = [(body, endpoint) for status, body, endpoint in results if status == 200]
    assert len(served) == 1870
    for body, endpoint in served:
        assert body["object"] == ("text_completion" if endpoint == "/v1/completions" else "chat.completion")
        choice = body["choices"][0]
        text = choice["text"] if endpoint == "/v1/completions" else choice["message"]["content"]
        assert isinstance(text, str) and choice["finish_reason"] == "stop"
        usage = body["usage"]
        assert usage["total_tokens"] == usage["prompt_tokens"] + usage["completion_tokens"] > 0
        assert usage["completion_tokens"] == body["tokenopt"]["billed_tokens"]
    ids = {body["id"] for body, _ in served}
    assert len(ids) == 1870
    rows = read_decisions(tmp_path / "decisions.sqlite")
    assert set(rows.id) == ids and len(rows) == 1870  # no lost and no extra log rows
    assert batched > 1.5  # concurrent requests were decoded together


JSON_SCALARS = (
    st.none() | st.booleans() | st.integers(-(2**40), 2**40) | st.floats(allow_nan=False) | st.text(max_size=30)
)
JSON_VALUES = st.recursive(
    JSON_SCALARS, lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4)
)
KEYS = ["prompt", "messages", "max_tokens", "n", "temperature", "stream", "user", "seed", "stop", "tokenopt", "model"]
BODIES = st.dictionaries(st.sampled_from(KEYS), JSON_VALUES, max_size=6) | JSON_VALUES
ANY_TEXT = st.text(st.characters(codec=None, exclude_categories=()), max_size=12)
"""Any code point, lone surrogates included (JSON carries them as \\udXXX escapes)."""
LM_BODIES = st.fixed_dictionaries(
    {"prompt": ANY_TEXT | st.sampled_from(["M 3 8 1 5?", "C 3+4*2-5?", "V x1 x2?"])},
    optional={
        "seed": st.integers(-(2**70), 2**70),
        "temperature": st.floats(-1, 3, allow_nan=False) | st.integers(-2, 5),
        "n": st.integers(-2, 20),
        "stop": st.lists(ANY_TEXT, max_size=5) | ANY_TEXT,
        "max_tokens": st.integers(-3, 64),
        "stream": st.booleans(),
        "tokenopt": st.fixed_dictionaries({"bypass": st.booleans()}),
        "top_p": st.sampled_from([1, 0.5]),
    },
)
"""Bodies whose values reach the LM when they pass validation: seeds, temperatures, n, stops, unicode."""
MESSAGES = st.lists(
    st.fixed_dictionaries({"role": st.sampled_from(["user", "system", "assistant", 3]), "content": JSON_VALUES}),
    max_size=3,
)


@pytest.fixture(scope="module")
def fuzz_server(tmp_path_factory, demo_policy):
    folder = tmp_path_factory.mktemp("fuzz")
    config = ServeConfig(
        policy=demo_policy, log=folder / "decisions.sqlite", device="cpu", port=0, timeout=30, threads=1
    )
    with running_server(config) as (url, _):
        with httpx.Client(base_url=url, timeout=60) as client:
            yield client


@settings(max_examples=150, deadline=None, derandomize=True, suppress_health_check=list(HealthCheck))
@given(body=BODIES, messages=MESSAGES, chat=st.booleans())
def test_fuzzed_bodies_never_get_a_5xx(fuzz_server, body, messages, chat):
    if chat and isinstance(body, dict):
        body = {**body, "messages": messages}
    if isinstance(body, dict) and isinstance(body.get("max_tokens"), int):
        body["max_tokens"] = min(body["max_tokens"], 64)  # keep the LM's work small; huge values are tested apart
    endpoint = "/v1/chat/completions" if chat else "/v1/completions"
    response = fuzz_server.post(endpoint, content=json.dumps(body).encode())
    assert response.status_code < 500, response.text
    payload = response.json() if not (isinstance(body, dict) and body.get("stream") is True) else None
    if response.status_code != 200 and payload is not None:
        assert isinstance(payload["error"]["message"], str)


@settings(max_examples=120, deadline=None, derandomize=True, suppress_health_check=list(HealthCheck))
@given(body=LM_BODIES)
def test_fuzzed_values_that_reach_the_lm_never_get_a_5xx(fuzz_server, body):
    response = fuzz_server.post("/v1/completions", content=json.dumps(body).encode())
    assert response.status_code < 500, response.text
    if response.status_code != 200:
        assert isinstance(response.json()["error"]["message"], str)


def test_huge_max_tokens_on_bypass_is_a_4xx(fuzz_server):
    body = {"prompt": "M 1 2?", "max_tokens": 1_000_000, "tokenopt": {"bypass": True}}
    response = fuzz_server.post("/v1/completions", json=body)
    assert response.status_code == 413 and "context" in response.json()["error"]["message"]


def test_serve_command_with_openai_client_and_sighup_reload(tmp_path, demo_policy):
    port = free_port()
    log = tmp_path / "decisions.sqlite"
    command = [sys.executable, "-m", "tokenopt.cli", "serve", "--policy", str(demo_policy), "--port", str(port)]
    env = {**os.environ, "TOKENOPT_API_KEY": "k1"}
    process = subprocess.Popen([*command, "--log", str(log), "--device", "cpu"], env=env, stderr=subprocess.PIPE)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 90
        while True:
            try:
                if httpx.get(f"{url}/readyz").status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert process.poll() is None, process.stderr.read().decode() if process.stderr else ""
            assert time.monotonic() < deadline, "the server did not become ready"
            time.sleep(0.2)
        client = openai.OpenAI(base_url=f"{url}/v1", api_key="k1", max_retries=0)
        reply = client.chat.completions.create(model="demo", messages=[{"role": "user", "content": QUESTIONS[0]}])
        assert reply.choices[0].message.content and reply.model_extra["tokenopt"]["arm"] == "A"
        process.send_signal(signal.SIGHUP)
        headers = {"Authorization": "Bearer k1"}
        for _ in range(50):
            if 'tokenopt_policy_reloads_total{result="ok"} 1.0' in httpx.get(f"{url}/metrics", headers=headers).text:
                break
            time.sleep(0.1)
        else:
            pytest.fail("SIGHUP did not reload the policy")
        assert client.completions.create(model="demo", prompt=QUESTIONS[1]).choices[0].text
    finally:
        process.send_signal(signal.SIGTERM)
        process.wait(timeout=30)
    # uvicorn shuts down gracefully, then re-raises the signal it caught.
    assert process.returncode in (0, -signal.SIGTERM)
    assert len(read_decisions(log)) == 2


def test_serve_command_refuses_an_open_non_loopback_bind(tmp_path, demo_policy):
    result = subprocess.run(
        [sys.executable, "-m", "tokenopt.cli", "serve", "--policy", str(demo_policy), "--host", "0.0.0.0"],
        capture_output=True,
        text=True,
        env={key: value for key, value in os.environ.items() if key != "TOKENOPT_API_KEY"},
        timeout=120,
    )
    assert result.returncode == 2 and "api-key" in result.stderr


def test_serve_command_names_a_broken_policy(tmp_path, demo_policy):
    (tmp_path / "policy.json").write_text((Path(demo_policy) / "policy.json").read_text())
    (tmp_path / "policy.npz").write_bytes(b"not the weights")
    result = subprocess.run(
        [sys.executable, "-m", "tokenopt.cli", "serve", "--policy", str(tmp_path), "--log", str(tmp_path / "l.db")],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 2 and "sha256" in result.stderr
