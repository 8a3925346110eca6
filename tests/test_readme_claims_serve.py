"""README claims of `tokenopt serve`: readiness, exploration propensities, prompt logging,
the streamed usage chunk, and upstream failures answered 502 by the proxy.

The policy is trained briefly on a small table (60 demo queries, greedy at five budgets,
collected with the embedded LM), so that the server serves a real exported policy; its
quality does not matter to these claims. Upstreams are stdlib HTTP servers on loopback.
"""

from __future__ import annotations

import contextlib
import json
import sqlite3
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import openai
import pytest
from fastapi.testclient import TestClient
from serving import free_port, running_server, stop

from tokenopt.demo.suite import SuiteConfig, generate_suite, write_jsonl
from tokenopt.runtime import BudgetPolicy
from tokenopt.serve import ServeConfig, create_app, read_decisions

QUESTIONS = [item["question"] for item in generate_suite(SuiteConfig(n_queries=80, seed=41))]


@pytest.fixture(scope="module")
def policy(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A policy over b0..b32/greedy, exported from a one-rollout PPO run on a 60-query table."""
    from tokenopt.agents.export import export_run
    from tokenopt.agents.ppo.train import TrainConfig, train
    from tokenopt.collect import CollectConfig, collect

    root = tmp_path_factory.mktemp("serve_claims")
    write_jsonl(generate_suite(SuiteConfig(n_queries=60, seed=3)), root / "questions.jsonl")
    collect(CollectConfig(out=str(root / "table"), data=str(root / "questions.jsonl"), modes=["greedy"], device="cpu"))
    train(TrainConfig(table=str(root / "table"), out=str(root / "run"), total_timesteps=1024, eval_freq=1024))
    return export_run(root / "run")


def _config(folder: Path, policy: Path, **overrides: Any) -> ServeConfig:
    settings: dict[str, Any] = {"policy": policy, "log": folder / "decisions.sqlite", "device": "cpu", "port": 0}
    settings.update(overrides)
    return ServeConfig(**settings)


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory, policy: Path) -> Iterator[tuple[str, Path]]:
    """The demo LM behind the policy, default settings (no exploration, no prompt logging)."""
    folder = tmp_path_factory.mktemp("serve_default")
    with running_server(_config(folder, policy)) as (url, _):
        yield url, folder / "decisions.sqlite"


# -- 8. GET /readyz -------------------------------------------------------------------------------


def test_readyz_is_503_until_the_app_serves_and_200_with_the_policies_after(tmp_path, policy):
    app = create_app(_config(tmp_path, policy))
    policy_id = BudgetPolicy.load(policy).policy_id
    before = TestClient(app).get("/readyz")  # no lifespan: the app has not started serving
    assert before.status_code == 503 and before.json()["ready"] is False
    with TestClient(app) as client:  # runs the lifespan, as uvicorn does before it binds
        ready = client.get("/readyz")
        assert ready.status_code == 200
        assert ready.json()["ready"] is True and ready.json()["policies"] == {"A": policy_id}
        assert client.get("/healthz").text == "ok"
    after = TestClient(app).get("/readyz")  # the lifespan has ended: shutting down
    assert after.status_code == 503 and after.json()["ready"] is False


def test_readyz_answers_503_while_tokenopt_serve_loads_its_model(tmp_path, policy):
    port = free_port()
    command = [sys.executable, "-m", "tokenopt.cli", "serve", "--policy", str(policy), "--port", str(port)]
    command += ["--log", str(tmp_path / "decisions.sqlite"), "--device", "cpu", "--threads", "1"]
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    answers: list[int | None] = []  # None: nothing listening yet
    try:
        deadline = time.monotonic() + 180
        while time.monotonic() < deadline and process.poll() is None:
            try:
                response = httpx.get(f"http://127.0.0.1:{port}/readyz", timeout=2)
            except httpx.TransportError:
                answers.append(None)
                time.sleep(0.02)
                continue
            answers.append(response.status_code)
            if response.status_code == 200:
                ready = response.json()
                break
        assert 200 in answers, f"the server never became ready: {answers[-5:]}"
        assert ready["policies"] == {"A": BudgetPolicy.load(policy).policy_id}
        assert 503 in answers[: answers.index(200)], "no 503 before the model was loaded"
    finally:
        stop(process)


# -- 9. --explore EPS: logged propensities -------------------------------------------------------


def _expected_propensity(policy: BudgetPolicy, features: np.ndarray, action: int, explore: float) -> float:
    """The serving rule: the greedy action with probability 1 - EPS, else one of the n actions uniformly."""
    greedy = int(np.argmax(policy.probabilities(features[None, :].astype(np.float64))[0]))
    return (1.0 - explore) * float(action == greedy) + explore / len(policy.actions)


def test_explore_logs_each_rows_propensity_under_the_serving_rule(tmp_path, policy, server):
    explore = 0.5
    runtime = BudgetPolicy.load(policy)
    n_actions = len(runtime.actions)
    assert n_actions == 5
    served: dict[str, str] = {}
    flagged: dict[str, bool] = {}
    with running_server(_config(tmp_path, policy, explore=explore, seed=1)) as (url, _):
        with httpx.Client(timeout=60) as client:
            for question in QUESTIONS[:60]:
                body = client.post(f"{url}/v1/completions", json={"prompt": question}).json()
                served[body["id"]] = body["tokenopt"]["action"]
                flagged[body["id"]] = body["tokenopt"]["explored"]
    rows = read_decisions(tmp_path / "decisions.sqlite")
    assert sorted(rows.id) == sorted(served) and [served[i] for i in rows.id] == rows.action
    expected = [
        _expected_propensity(runtime, features, int(action), explore)
        for features, action in zip(rows.features, rows.action_index, strict=True)
    ]
    np.testing.assert_allclose(rows.propensity, expected, rtol=1e-12)
    explored = np.isclose(rows.propensity, explore / n_actions)
    kept = np.isclose(rows.propensity, 1.0 - explore + explore / n_actions)
    assert np.all(explored | kept)
    # The response says which requests were served another action than the policy's own pick.
    assert [flagged[i] for i in rows.id] == explored.tolist()
    # A non-greedy action comes with probability EPS (n-1)/n = 0.4: Binomial(60, 0.4) has mean 24,
    # sd 3.8; outside [8, 40] with probability < 1e-4. No exploration (0) or always (48) fail.
    assert 8 <= int(explored.sum()) <= 40
    assert len(set(rows.action)) >= 3

    # Without --explore every decision is the greedy one, logged with propensity 1.
    url, log = server
    for question in QUESTIONS[60:66]:
        httpx.post(f"{url}/v1/completions", json={"prompt": question}, timeout=60)
    plain = read_decisions(log)
    decided = ~plain.bypass
    assert decided.sum() >= 6 and np.all(plain.propensity[decided] == 1.0)
    greedy = runtime.probabilities(plain.features[decided].astype(np.float64)).argmax(axis=1)
    np.testing.assert_array_equal(plain.action_index[decided], greedy)


# -- 10. --log-prompts ------------------------------------------------------------------------------

MARKED = ["Marker1ZebraOrchid N 071329?", "Marker2ZebraOrchid M 8 3 8 1?", "Marker3ZebraOrchid C 2*7-5?"]
SYSTEM = "Marker4SystemQuokka answer briefly"


def _send_marked_requests(url: str) -> None:
    with httpx.Client(timeout=60) as client:
        assert client.post(f"{url}/v1/completions", json={"prompt": MARKED[0]}).status_code == 200
        chat = {"messages": [{"role": "system", "content": SYSTEM}, {"role": "user", "content": MARKED[1]}]}
        assert client.post(f"{url}/v1/chat/completions", json=chat).status_code == 200
        bypass = {"prompt": MARKED[2], "max_tokens": 4, "tokenopt": {"bypass": True}}
        assert client.post(f"{url}/v1/completions", json=bypass).status_code == 200
        # Decided, then refused (max_tokens leaves no room for the answer): logged with its status.
        assert client.post(f"{url}/v1/completions", json={"prompt": MARKED[0], "max_tokens": 1}).status_code == 422


def _logged_prompts(log: Path) -> list[tuple[int, str | None]]:
    with contextlib.closing(sqlite3.connect(log)) as connection:
        return connection.execute("SELECT status, prompt FROM decisions ORDER BY created").fetchall()


def test_prompts_are_in_the_decision_log_only_with_log_prompts(tmp_path, policy):
    with_prompts, without = tmp_path / "with", tmp_path / "without"
    with running_server(_config(with_prompts, policy, log_prompts=True)) as (url, _):
        _send_marked_requests(url)
    with running_server(_config(without, policy)) as (url, _):
        _send_marked_requests(url)

    logged = _logged_prompts(with_prompts / "decisions.sqlite")
    assert [status for status, _ in logged] == [200, 200, 200, 422]
    assert [prompt for _, prompt in logged] == [MARKED[0], f"{SYSTEM}\n{MARKED[1]}", MARKED[2], MARKED[0]]

    logged = _logged_prompts(without / "decisions.sqlite")
    assert [status for status, _ in logged] == [200, 200, 200, 422]
    assert [prompt for _, prompt in logged] == [None] * 4
    # Nowhere in the log's files either (the database, its WAL and shared memory).
    files = sorted(without.glob("decisions.sqlite*"))
    assert files
    for path in files:
        data = path.read_bytes()
        for marker in (b"ZebraOrchid", b"Quokka"):
            assert marker not in data, (path.name, marker)


# -- 11. stream_options.include_usage ---------------------------------------------------------------


def _events(url: str, endpoint: str, body: dict[str, Any]) -> list[dict[str, Any]]:
    events = []
    with httpx.stream("POST", f"{url}/v1/{endpoint}", json=body, timeout=60) as response:
        assert response.status_code == 200
        lines = [line for line in response.iter_lines() if line.startswith("data: ")]
    assert lines[-1] == "data: [DONE]"
    for line in lines[:-1]:
        events.append(json.loads(line[len("data: ") :]))
    return events


def _streamed_text(events: list[dict[str, Any]]) -> str:
    pieces = []
    for event in events:
        for choice in event.get("choices", []):
            pieces.append(choice.get("text") or (choice.get("delta") or {}).get("content") or "")
    return "".join(pieces)


def _check_usage_chunk(url: str, endpoint: str, request: dict[str, Any]) -> None:
    whole = httpx.post(f"{url}/v1/{endpoint}", json=request, timeout=60).json()
    with_usage = _events(url, endpoint, {**request, "stream": True, "stream_options": {"include_usage": True}})
    carrying = [event for event in with_usage if event.get("usage") is not None]
    assert len(carrying) == 1 and carrying[0] is with_usage[-1]  # one usage chunk, the last before [DONE]
    assert carrying[0]["choices"] == [] and carrying[0]["usage"] == whole["usage"]
    assert carrying[0]["usage"]["completion_tokens"] == whole["tokenopt"]["billed_tokens"] > 0
    for options in ({}, {"stream_options": {"include_usage": False}}):
        plain = _events(url, endpoint, {**request, "stream": True, **options})
        assert all(event.get("usage") is None for event in plain)
        # The same text (how many chunks carry it depends on how fast the tokens come), without the usage chunk.
        assert _streamed_text(plain) == _streamed_text(with_usage[:-1])
        assert plain[-1]["tokenopt"] == with_usage[-2]["tokenopt"]


@pytest.mark.parametrize("endpoint", ["completions", "chat/completions"])
def test_include_usage_adds_the_usage_chunk_and_only_then(server, endpoint):
    url, _ = server
    question = QUESTIONS[66]
    request: dict[str, Any] = {"seed": 3}
    if endpoint == "completions":
        request["prompt"] = question
    else:
        request["messages"] = [{"role": "user", "content": question}]
    _check_usage_chunk(url, endpoint, request)


def test_openai_client_reads_the_streamed_usage(server):
    url, _ = server
    client = openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0)
    whole = client.completions.create(model="demo", prompt=QUESTIONS[67], seed=4)
    chunks = list(
        client.completions.create(
            model="demo", prompt=QUESTIONS[67], seed=4, stream=True, stream_options={"include_usage": True}
        )
    )
    assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens == whole.usage.completion_tokens
    assert all(chunk.usage is None for chunk in chunks[:-1])


# -- 12. the proxy answers upstream failures with 502 ------------------------------------------------


@contextlib.contextmanager
def _fake_upstream(behaviour: str, delay_s: float = 0.0) -> Iterator[tuple[str, list[dict[str, Any]]]]:
    """A completions server: ``ok`` (reasons with "r" up to max_tokens, answers 7 after the cue),
    ``fail`` (503 to every completion) or ``slow`` (answers ``ok`` after ``delay_s``)."""
    seen: list[dict[str, Any]] = []

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self) -> None:  # noqa: N802 (http.server's name)
            body = json.loads(self.rfile.read(int(self.headers.get("Content-Length", 0))))
            seen.append(body)
            if behaviour == "slow":
                time.sleep(delay_s)
            if behaviour == "fail":
                status, payload = 503, {"error": {"message": "overloaded"}}
            else:
                prompt, max_tokens = str(body["prompt"]), int(body["max_tokens"])
                text, finish = ("7", "stop") if prompt.endswith("=") else ("r" * max_tokens, "length")
                usage = {"prompt_tokens": len(prompt), "completion_tokens": len(text)}
                usage["total_tokens"] = usage["prompt_tokens"] + usage["completion_tokens"]
                choice = {"index": 0, "text": text, "logprobs": None, "finish_reason": finish}
                status, payload = 200, {"id": "cmpl-up", "object": "text_completion", "choices": [choice]}
                payload["usage"] = usage
            data = json.dumps(payload).encode()
            with contextlib.suppress(OSError):  # the proxy may have given up on a slow answer
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

        def log_message(self, format: str, *args: Any) -> None:  # noqa: A002
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    server.daemon_threads = True
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}", seen
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=10)


def _statuses(log: Path) -> list[int]:
    return [int(status) for status in read_decisions(log).status]


def test_an_upstream_that_times_out_is_answered_504_and_logged(tmp_path, policy):
    # docs/serve.md: an upstream slower than --timeout is a gateway timeout (504), as a reverse proxy answers.
    with _fake_upstream("slow", delay_s=4.0) as (upstream, seen):
        config = _config(tmp_path, policy, upstream=upstream, upstream_model="fake", timeout=1.0)
        with running_server(config) as (url, _):
            started = time.monotonic()
            response = httpx.post(f"{url}/v1/completions", json={"prompt": QUESTIONS[0]}, timeout=30)
            elapsed = time.monotonic() - started
        assert seen, "the proxy never reached the upstream"
    assert response.status_code == 504, response.json()
    assert "timeout" in response.json()["error"]["message"].lower()
    assert elapsed < 3.0  # answered at the server's timeout, not after the upstream's delay
    assert _statuses(tmp_path / "decisions.sqlite") == [504]


def test_an_upstream_that_fails_is_retried_twice_then_answered_502(tmp_path, policy):
    with _fake_upstream("fail") as (upstream, seen):
        config = _config(tmp_path, policy, upstream=upstream, upstream_model="fake", timeout=30)
        with running_server(config) as (url, _):
            response = httpx.post(f"{url}/v1/completions", json={"prompt": QUESTIONS[1]}, timeout=60)
    assert response.status_code == 502
    assert "answered 503" in response.json()["error"]["message"]
    assert len(seen) == 3 and all(body == seen[0] for body in seen)  # the request and two retries
    assert _statuses(tmp_path / "decisions.sqlite") == [502]


def test_the_proxy_streams_the_usage_chunk_too(tmp_path, policy):
    """The proxy streams a response decoded as a whole (no token-by-token path): the same usage rule."""
    with _fake_upstream("ok") as (upstream, _):
        config = _config(tmp_path, policy, upstream=upstream, upstream_model="fake")
        with running_server(config) as (url, _):
            _check_usage_chunk(url, "completions", {"prompt": QUESTIONS[2]})
