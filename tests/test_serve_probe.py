"""A probe controller served by the demo-LM server: reason, probe, answer or continue."""

from __future__ import annotations

import hashlib
import json
import shutil
import sqlite3

import httpx
import numpy as np
import pytest
from serving import running_server

from tokenopt.actions import parse_mode
from tokenopt.demo.suite import SuiteConfig, generate_suite
from tokenopt.runtime import BudgetPolicy, PolicyLoadError
from tokenopt.serve import ServeConfig, create_app

QUESTIONS = [item["question"] for item in generate_suite(SuiteConfig(n_queries=16, seed=41))]


@pytest.fixture(scope="module")
def probe_policy(probe_run):
    return probe_run / "policy"


def _replay(policy, lm, question):
    """The session run by hand on the decoder's outcome at each checkpoint."""
    session = policy.start(question)
    mode = parse_mode(session.settings.mode)
    probes, steps = 0, []
    while True:
        budget = session.next_budget
        outcome = lm.complete([lm.encode_prompt(question)], mode, budget, seeds=[7])[0].outcome
        probes += outcome.cue_tokens + outcome.answer_tokens
        spent = outcome.reasoning_tokens + session.settings.probe_token_price * probes
        decision = session.observe(outcome.answer, outcome.answer_logprob, spent, outcome.natural_stop)
        steps.append((budget, decision))
        if decision == "answer":
            return steps, outcome, outcome.reasoning_tokens + probes


def test_served_probe_controller_follows_its_session(tmp_path, probe_policy, demo_lm):
    policy = BudgetPolicy.load(probe_policy)
    config = ServeConfig(policy=probe_policy, log=tmp_path / "log.sqlite", device="cpu", port=0)
    exits = set()
    with running_server(config) as (url, _):
        for question in QUESTIONS:
            body = httpx.post(f"{url}/v1/completions", json={"prompt": question, "seed": 7}, timeout=60).json()
            steps, outcome, billed = _replay(policy, demo_lm, question)
            extra = body["tokenopt"]
            assert extra["budget"] == steps[-1][0] and extra["answer"] == outcome.answer
            assert extra["action"] == f"probe/b{steps[-1][0]}/{policy.probe.mode}"
            assert body["usage"]["completion_tokens"] == billed
            with sqlite3.connect(tmp_path / "log.sqlite") as connection:
                logged = connection.execute(
                    "SELECT budget, decision FROM checkpoints WHERE request_id = ? ORDER BY step", (body["id"],)
                ).fetchall()
            assert logged == steps
            exits.add(len(steps))
        capped = httpx.post(f"{url}/v1/completions", json={"prompt": QUESTIONS[0], "max_tokens": 9}).json()
        assert capped["tokenopt"]["budget"] == 0  # no checkpoint past max_tokens minus the answer's room
    assert max(exits) > 1  # the controller continued on some queries


def test_served_controller_escalates_to_its_escalate_mode(tmp_path, probe_policy, demo_lm):
    # The trained controller with an output layer that always says escalate, to beam3.
    folder = tmp_path / "escalate"
    shutil.copytree(probe_policy, folder)
    spec = json.loads((folder / "policy.json").read_text())
    with np.load(folder / "policy.npz") as data:
        arrays = dict(data)
    head = spec["members"][0]["layers"][-1]
    arrays[head["weight"]] = np.zeros((arrays[head["weight"]].shape[0], 3), dtype=np.float32)
    arrays[head["bias"]] = np.array([-10.0, -10.0, 10.0], dtype=np.float32)
    head["shape"] = list(arrays[head["weight"]].shape)
    np.savez(folder / "policy.npz", **arrays)
    spec["weights_sha256"] = hashlib.sha256((folder / "policy.npz").read_bytes()).hexdigest()
    spec["probe"]["escalate_mode"] = "beam3"
    (folder / "policy.json").write_text(json.dumps(spec))
    config = ServeConfig(policy=folder, log=tmp_path / "log.sqlite", device="cpu", port=0)
    with running_server(config) as (url, _):
        for question in QUESTIONS[:4]:
            body = httpx.post(f"{url}/v1/completions", json={"prompt": question, "seed": 7}, timeout=60).json()
            prompt = [demo_lm.encode_prompt(question)]
            probe = demo_lm.complete(prompt, parse_mode("greedy"), 0, seeds=[7])[0].outcome
            escalated = demo_lm.complete(prompt, parse_mode("beam3"), 0, seeds=[7])[0].outcome
            extra = body["tokenopt"]
            if probe.natural_stop:  # the session answers there without asking
                assert extra["action"] == "probe/b0/greedy"
                continue
            assert extra["action"] == "probe/b0/beam3" and extra["answer"] == escalated.answer
            so_far = probe.reasoning_tokens + probe.cue_tokens + probe.answer_tokens
            assert body["usage"]["completion_tokens"] == so_far + escalated.billed_tokens
            with sqlite3.connect(tmp_path / "log.sqlite") as connection:
                logged = connection.execute(
                    "SELECT budget, decision FROM checkpoints WHERE request_id = ?", (body["id"],)
                ).fetchall()
            assert logged == [(0, "escalate")]


def test_probe_controller_behind_an_upstream_is_refused(tmp_path, probe_policy):
    config = ServeConfig(policy=probe_policy, log=tmp_path / "log.sqlite", upstream="http://127.0.0.1:9")
    with pytest.raises(PolicyLoadError, match="probe controller"):
        create_app(config)
