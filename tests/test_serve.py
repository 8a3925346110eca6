"""The OpenAI-compatible server on loopback: the demo LM, the proxy, the log, metrics and limits."""

from __future__ import annotations

import json
import shutil
import sqlite3
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import numpy as np
import openai
import pytest
from serving import running_server

from tokenopt.actions import parse_mode
from tokenopt.demo.suite import SuiteConfig, generate_suite
from tokenopt.runtime import BudgetPolicy, PolicyLoadError
from tokenopt.serve import ServeConfig, create_app, read_decisions

QUESTIONS = [item["question"] for item in generate_suite(SuiteConfig(n_queries=40, seed=21))]


def _config(tmp_path: Path, policy: Path, **overrides) -> ServeConfig:
    settings = {"policy": policy, "log": tmp_path / "decisions.sqlite", "device": "cpu", "port": 0}
    settings.update(overrides)
    return ServeConfig(**settings)


@pytest.fixture(scope="module")
def server(tmp_path_factory, demo_policy):
    folder = tmp_path_factory.mktemp("serve")
    with running_server(_config(folder, demo_policy)) as (url, app):
        yield url, app, folder / "decisions.sqlite"


def test_openai_client_gets_the_policys_decision_and_the_forced_outcome(server, demo_policy, demo_lm):
    url, _, log = server
    client = openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0)
    policy = BudgetPolicy.load(demo_policy)
    seen_modes = set()
    for question in QUESTIONS[:12]:
        raw = client.completions.with_raw_response.create(model="demo", prompt=question, seed=3)
        response = raw.parse()
        decision = policy.decide(question)
        extra = response.model_extra["tokenopt"]
        assert extra["action"] == decision.action and extra["budget"] == decision.budget
        header = raw.headers["x-tokenopt-decision"]
        assert header.startswith(f"arm=A; policy={policy.policy_id}; action={decision.action}")
        # The served text is what the same decoder returns for that action, billed the same.
        prompt = demo_lm.encode_prompt(question)
        expected = demo_lm.complete([prompt], parse_mode(decision.mode), decision.budget, [3])[0]
        assert response.choices[0].text == expected.text
        assert response.usage.completion_tokens == expected.outcome.billed_tokens == extra["billed_tokens"]
        assert response.usage.prompt_tokens == len(demo_lm.encode_prompt(question))
        seen_modes.add(decision.mode)
    chat = client.chat.completions.create(model="demo", messages=[{"role": "user", "content": QUESTIONS[0]}], seed=3)
    assert chat.choices[0].message.role == "assistant"
    assert chat.model_extra["tokenopt"]["action"] == policy.decide(QUESTIONS[0]).action
    rows = read_decisions(log)
    assert len(rows) >= 13 and set(rows.arm) == {"A"}
    assert np.allclose(rows.features[0], policy.features(QUESTIONS[0]).astype(np.float32))


def test_client_max_tokens_caps_the_completion(server):
    url, _, _ = server
    client = openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0)
    for question in QUESTIONS[:10]:
        response = client.completions.create(model="demo", prompt=question, max_tokens=6, seed=1)
        extra = response.model_extra["tokenopt"]
        # Billed tokens over the mode's sequences; each sequence stays within max_tokens.
        width = parse_mode(extra["mode"]).width
        assert response.usage.completion_tokens <= 6 * width
        assert extra["budget"] <= 6
    too_small = httpx.post(f"{url}/v1/completions", json={"prompt": QUESTIONS[0], "max_tokens": 1})
    assert too_small.status_code == 422 and "max_tokens" in too_small.json()["error"]["message"]


def test_bypass_turns_the_policy_off(server, demo_lm):
    url, _, _ = server
    for request in (
        {"json": {"prompt": QUESTIONS[1], "max_tokens": 12, "tokenopt": {"bypass": True}}},
        {"json": {"prompt": QUESTIONS[1], "max_tokens": 12}, "headers": {"X-Tokenopt-Bypass": "1"}},
    ):
        body = httpx.post(f"{url}/v1/completions", **request).json()
        plain = demo_lm.generate_plain(demo_lm.tokenizer(QUESTIONS[1])["input_ids"], 12)[0]
        assert body["tokenopt"]["bypass"] is True and body["tokenopt"]["policy_id"] == "bypass"
        assert body["choices"][0]["text"] == plain.text
        assert body["usage"]["completion_tokens"] == len(plain.token_ids) <= 12


def test_streaming_returns_the_same_text_in_chunks(server):
    url, _, _ = server
    client = openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0)
    whole = client.completions.create(model="demo", prompt=QUESTIONS[2], seed=5)
    chunks = list(client.completions.create(model="demo", prompt=QUESTIONS[2], seed=5, stream=True))
    assert len(chunks) > 3
    assert "".join(c.choices[0].text for c in chunks if c.choices) == whole.choices[0].text
    assert chunks[-1].model_extra["tokenopt"]["action"] == whole.model_extra["tokenopt"]["action"]
    chat = list(
        client.chat.completions.create(
            model="demo", messages=[{"role": "user", "content": QUESTIONS[2]}], seed=5, stream=True
        )
    )
    assert "".join(c.choices[0].delta.content or "" for c in chat) == whole.choices[0].text


def test_feedback_reaches_the_log_and_the_metrics(server):
    url, _, log = server
    body = httpx.post(f"{url}/v1/completions", json={"prompt": QUESTIONS[3]}).json()
    answer = body["tokenopt"]["answer"]
    attached = httpx.post(f"{url}/v1/feedback", json={"id": body["id"], "gold": answer})
    assert attached.json() == {"id": body["id"], "arm": "A", "correct": True}
    other = httpx.post(f"{url}/v1/completions", json={"prompt": QUESTIONS[4]}).json()
    assert httpx.post(f"{url}/v1/feedback", json={"id": other["id"], "correct": False}).status_code == 200
    assert httpx.post(f"{url}/v1/feedback", json={"id": "cmpl-unknown", "correct": True}).status_code == 404
    assert httpx.post(f"{url}/v1/feedback", json={"id": body["id"]}).status_code == 422
    rows = read_decisions(log)
    by_id = dict(zip(rows.id, rows.correct, strict=True))
    assert by_id[body["id"]] == 1.0 and by_id[other["id"]] == 0.0
    metrics = httpx.get(f"{url}/metrics").text
    assert 'tokenopt_feedback_total{arm="A",correct="true"} 1.0' in metrics
    assert 'tokenopt_feedback_em{arm="A"} 0.5' in metrics
    assert 'tokenopt_requests_total{arm="A",endpoint="completions",status="200"}' in metrics
    assert "tokenopt_request_latency_seconds_bucket" in metrics and "tokenopt_billed_tokens_total" in metrics
    assert httpx.get(f"{url}/healthz").text == "ok"
    assert httpx.get(f"{url}/readyz").json()["ready"] is True


@pytest.mark.parametrize(
    ("content", "status", "word"),
    [
        (b"{not json", 400, "JSON"),
        (b"[1, 2]", 400, "object"),
        (json.dumps({"prompt": 7}).encode(), 422, "prompt"),
        (json.dumps({"prompt": "x", "max_tokens": "9"}).encode(), 422, "max_tokens"),
        (json.dumps({"prompt": "x", "max_tokens": 0}).encode(), 422, "max_tokens"),
        (json.dumps({"prompt": "x", "n": 3}).encode(), 422, "n"),
        (json.dumps({"prompt": "x", "temperature": 9}).encode(), 422, "temperature"),
        (json.dumps({"prompt": "x", "tokenopt": {"bypass": "yes"}}).encode(), 422, "bypass"),
        (json.dumps({"prompt": "x" * 40_000}).encode(), 413, "characters"),
    ],
)
def test_bad_requests_get_clear_4xx(server, content, status, word):
    url, _, _ = server
    response = httpx.post(f"{url}/v1/completions", content=content, headers={"Content-Type": "application/json"})
    assert response.status_code == status
    assert word in response.json()["error"]["message"]


def test_chat_without_user_message_is_422(server):
    url, _, _ = server
    response = httpx.post(f"{url}/v1/chat/completions", json={"messages": [{"role": "system", "content": "hi"}]})
    assert response.status_code == 422 and "user" in response.json()["error"]["message"]


def test_ab_arms_are_stable_per_user_and_split_by_share(tmp_path, demo_policy):
    policy_b = tmp_path / "policy_b"
    shutil.copytree(demo_policy, policy_b)
    spec = json.loads((policy_b / "policy.json").read_text())
    spec["policy_id"] = "candidate"
    (policy_b / "policy.json").write_text(json.dumps(spec))
    with running_server(_config(tmp_path, demo_policy, policy_b=policy_b, split=0.5)) as (url, app):
        arms = {}
        with httpx.Client() as client:
            for user in range(60):
                first = client.post(f"{url}/v1/completions", json={"prompt": QUESTIONS[0], "user": f"u{user}"}).json()
                again = client.post(
                    f"{url}/v1/completions", json={"prompt": QUESTIONS[1]}, headers={"X-Tokenopt-User": f"u{user}"}
                ).json()
                assert first["tokenopt"]["arm"] == again["tokenopt"]["arm"]
                arms[user] = first["tokenopt"]["arm"]
        share_b = sum(arm == "B" for arm in arms.values()) / len(arms)
        assert 0.3 < share_b < 0.7  # Binomial(60, 0.5): outside with probability < 0.2%
        ids = {arm.name: arm.policy.policy_id for arm in app.state.tokenopt.arms.values()}
        assert ids == {"A": BudgetPolicy.load(demo_policy).policy_id, "B": "candidate"}
    rows = read_decisions(tmp_path / "decisions.sqlite")
    assert set(rows.arm) == {"A", "B"}
    assert rows.arms["B"]["policy_id"] == "candidate"


def test_api_key_is_required_and_non_loopback_needs_it(tmp_path, demo_policy):
    with pytest.raises(ValueError, match="api-key"):
        ServeConfig(policy=demo_policy, host="0.0.0.0")
    ServeConfig(policy=demo_policy, host="0.0.0.0", insecure=True)
    with running_server(_config(tmp_path, demo_policy, api_key="s3cret")) as (url, _):
        assert httpx.post(f"{url}/v1/completions", json={"prompt": "M 1 2?"}).status_code == 401
        wrong = httpx.post(f"{url}/v1/completions", json={"prompt": "M 1 2?"}, headers={"Authorization": "Bearer s3"})
        assert wrong.status_code == 401
        client = openai.OpenAI(base_url=f"{url}/v1", api_key="s3cret", max_retries=0)
        assert client.completions.create(model="demo", prompt="M 1 2?").choices[0].text
        assert httpx.get(f"{url}/healthz").status_code == 200
        assert httpx.post(f"{url}/admin/reload").status_code == 401


def test_capacity_gives_429_and_timeout_504(tmp_path, demo_policy):
    with running_server(_config(tmp_path, demo_policy, max_concurrency=1, max_queue=0)) as (url, _):
        with ThreadPoolExecutor(12) as pool:
            statuses = list(
                pool.map(lambda q: httpx.post(f"{url}/v1/completions", json={"prompt": q}, timeout=60), QUESTIONS[:12])
            )
        codes = [r.status_code for r in statuses]
        assert 429 in codes and 200 in codes and set(codes) <= {200, 429}
        assert all(r.headers["Retry-After"] == "1" for r in statuses if r.status_code == 429)
    with running_server(_config(tmp_path / "t", demo_policy, timeout=0.001)) as (url, _):
        response = httpx.post(f"{url}/v1/completions", json={"prompt": QUESTIONS[0]})
        assert response.status_code == 504 and "timeout" in response.json()["error"]["message"]
    rows = read_decisions(tmp_path / "t" / "decisions.sqlite")
    assert list(rows.status) == [504]  # a decided request that timed out is still logged


def test_policy_failing_its_hash_stops_start_up_and_reload_keeps_the_old_one(tmp_path, demo_policy):
    broken = tmp_path / "broken"
    shutil.copytree(demo_policy, broken)
    weights = np.load(broken / "policy.npz")
    arrays = {name: weights[name] for name in weights.files}
    first = sorted(arrays)[0]
    arrays[first] = arrays[first] + 1.0
    np.savez(broken / "policy.npz", **arrays)
    with pytest.raises(PolicyLoadError, match="sha256"):
        create_app(_config(tmp_path, broken))
    live = tmp_path / "live"
    shutil.copytree(demo_policy, live)
    with running_server(_config(tmp_path, live, api_key="k")) as (url, _):
        headers = {"Authorization": "Bearer k"}
        shutil.copy(broken / "policy.npz", live / "policy.npz")
        failed = httpx.post(f"{url}/admin/reload", headers=headers)
        assert failed.status_code == 409 and "sha256" in failed.json()["error"]["message"]
        assert httpx.post(f"{url}/v1/completions", json={"prompt": "M 1 2?"}, headers=headers).status_code == 200
        shutil.copy(demo_policy / "policy.npz", live / "policy.npz")
        assert httpx.post(f"{url}/admin/reload", headers=headers).json()["reloaded"] is True
        metrics = httpx.get(f"{url}/metrics", headers=headers).text
        assert 'tokenopt_policy_reloads_total{result="failed"} 1.0' in metrics
        assert 'tokenopt_policy_reloads_total{result="ok"} 1.0' in metrics


def test_proxy_in_front_of_an_upstream_matches_the_local_server_for_greedy(tmp_path, demo_policy, demo_lm):
    upstream_dir, proxy_dir = tmp_path / "upstream", tmp_path / "proxy"
    with running_server(_config(upstream_dir, demo_policy)) as (upstream, _):
        with running_server(_config(proxy_dir, demo_policy, upstream=upstream, upstream_model="demo")) as (url, _):
            policy = BudgetPolicy.load(demo_policy)
            checked = 0
            for question in QUESTIONS:
                decision = policy.decide(question)
                if decision.mode != "greedy":
                    continue
                body = httpx.post(f"{url}/v1/completions", json={"prompt": question}, timeout=60).json()
                local = demo_lm.complete([demo_lm.encode_prompt(question)], parse_mode("greedy"), decision.budget)[0]
                assert body["tokenopt"]["action"] == decision.action
                assert body["tokenopt"]["answer"] == local.outcome.answer
                assert body["tokenopt"]["forced"] == (not local.outcome.natural_stop)
                checked += 1
            assert checked >= 5
    # Bypassed requests reached the upstream as plain completions and were logged there.
    upstream_rows = read_decisions(upstream_dir / "decisions.sqlite")
    assert set(upstream_rows.policy_id) == {"bypass"} and len(upstream_rows) >= checked


def test_unreachable_upstream_is_a_clear_502(tmp_path, demo_policy):
    config = _config(tmp_path, demo_policy, upstream="http://127.0.0.1:9", timeout=5)
    with running_server(config) as (url, _):
        for question in QUESTIONS[:6]:
            response = httpx.post(f"{url}/v1/completions", json={"prompt": question}, timeout=30)
            assert response.status_code == 502
            assert "unreachable" in response.json()["error"]["message"]
    with sqlite3.connect(tmp_path / "decisions.sqlite") as connection:
        assert {row[0] for row in connection.execute("SELECT status FROM decisions")} == {502}


def test_bypass_returns_token_logprobs_when_asked(server, demo_lm):
    url, _, _ = server
    body = {"prompt": QUESTIONS[5], "max_tokens": 10, "logprobs": 1, "tokenopt": {"bypass": True}}
    choice = httpx.post(f"{url}/v1/completions", json=body).json()["choices"][0]
    plain = demo_lm.generate_plain(demo_lm.tokenizer(QUESTIONS[5])["input_ids"], 10)[0]
    assert "".join(choice["logprobs"]["tokens"]) == choice["text"] == plain.text
    assert choice["logprobs"]["token_logprobs"] == pytest.approx(plain.token_logprobs, abs=1e-5)
    assert all(value <= 0 for value in choice["logprobs"]["token_logprobs"])


def test_a_log_from_a_newer_schema_is_refused(tmp_path):
    from tokenopt.decisions import LOG_VERSION, DecisionLog

    DecisionLog(tmp_path / "log.sqlite").close()
    with sqlite3.connect(tmp_path / "log.sqlite") as connection:
        connection.execute("UPDATE meta SET value = ? WHERE key = 'log_version'", (str(LOG_VERSION + 1),))
    with pytest.raises(ValueError, match="version"):
        read_decisions(tmp_path / "log.sqlite")
    with pytest.raises(ValueError, match="version"):
        DecisionLog(tmp_path / "log.sqlite")
    (tmp_path / "junk.sqlite").write_text("not a database")
    with pytest.raises(ValueError, match="not a tokenopt decision log"):
        read_decisions(tmp_path / "junk.sqlite")


def test_bypass_samples_n_choices_and_the_proxy_votes_over_them(tmp_path, server, demo_policy, demo_lm):
    url, _, _ = server
    body = {"prompt": QUESTIONS[6], "max_tokens": 12, "n": 3, "temperature": 1.0, "seed": 4}
    reply = httpx.post(f"{url}/v1/completions", json=body, headers={"X-Tokenopt-Bypass": "1"}).json()
    plain = demo_lm.generate_plain(demo_lm.tokenizer(QUESTIONS[6])["input_ids"], 12, n=3, temperature=1.0, seed=4)
    assert [c["text"] for c in reply["choices"]] == [p.text for p in plain]
    assert reply["usage"]["completion_tokens"] == sum(len(p.token_ids) for p in plain)
    refused = httpx.post(f"{url}/v1/completions", json={"prompt": "M 1 2?", "n": 2, "temperature": 1.0})
    assert refused.status_code == 422 and "policy picks" in refused.json()["error"]["message"]
    greedy_n = httpx.post(f"{url}/v1/completions", json={**body, "temperature": 0}, headers={"X-Tokenopt-Bypass": "1"})
    assert greedy_n.status_code == 422
    # A proxy in front of this server serves sc<k> with n = k and votes on the forced answers.
    import asyncio

    from tokenopt.scoring import majority_vote
    from tokenopt.serve.backends import UpstreamBackend

    async def sc3(question: str) -> object:
        backend = UpstreamBackend(url, model="demo")
        try:
            return await backend.generate(question, 8, "sc3", seed=4)
        finally:
            await backend.aclose()

    # QUESTIONS[3] (vote family): the three samples answer by themselves, two of them alike but not the first;
    # QUESTIONS[6]: every sample runs out of budget and is forced.
    for question, forcings in ((QUESTIONS[3], 0), (QUESTIONS[6], 3)):
        generation = asyncio.run(sc3(question))
        # What the proxy should have done, with the demo LM: 3 samples of at most 8 tokens (seed 4); a sample
        # that wrote the cue and finished its answer (a newline, or the LM stopped) is read as is, any other is
        # forced: prompt + reasoning + cue, greedy, at most 8 answer tokens, up to a newline.
        samples = demo_lm.generate_plain(demo_lm.tokenizer(question)["input_ids"], 8, n=3, temperature=1.0, seed=4)
        answers, billed, forced = [], sum(len(sample.token_ids) for sample in samples), 0
        for sample in samples:
            reasoning, cue, after = sample.text.partition("=")
            if cue and ("\n" in after or sample.finish_reason == "stop"):
                answers.append(after.split("\n")[0].strip())
                continue
            prompt = demo_lm.tokenizer(question + reasoning + "=")["input_ids"]
            answer = demo_lm.generate_plain(prompt, 8, stop=["\n"])[0]
            answers.append(answer.text.strip())
            billed += len(answer.token_ids)
            forced += 1
        assert forced == forcings and len(set(answers)) == (2 if forcings == 0 else 1), answers
        # The vote is tokenopt's majority vote over the three answers; the bill is every sequence's tokens.
        assert generation.answer == answers[majority_vote(answers)]
        assert generation.billed_tokens == billed
        assert generation.mode == "sc3" and generation.forced == (forced > 0)


def test_greedy_streams_live_and_errors_before_the_first_token_keep_their_status(server, demo_policy):
    url, _, _ = server
    policy = BudgetPolicy.load(demo_policy)
    question = next(q for q in QUESTIONS if policy.decide(q).action == "b32/greedy")
    whole = httpx.post(f"{url}/v1/completions", json={"prompt": question}).json()
    pieces = []
    with httpx.stream("POST", f"{url}/v1/completions", json={"prompt": question, "stream": True}) as response:
        assert response.status_code == 200 and response.headers["x-tokenopt-decision"].startswith("arm=A")
        for line in response.iter_lines():
            if not line.startswith("data: {"):
                continue
            event = json.loads(line[6:])
            pieces.append(event["choices"][0]["text"])
            final = event
    assert "".join(pieces) == whole["choices"][0]["text"]
    assert final["tokenopt"]["action"] == "b32/greedy" and final["choices"][0]["finish_reason"] == "stop"
    # Token by token, not the whole answer in one event. (Whether the request is still in flight when the client reads
    # the first piece is a race: a loaded client can read it after the server has sent everything.)
    assert sum(1 for piece in pieces if piece) > 1
    refused = httpx.post(f"{url}/v1/completions", json={"prompt": question, "stream": True, "max_tokens": 1})
    assert refused.status_code == 422 and "max_tokens" in refused.json()["error"]["message"]
