"""A probe controller served by the demo-LM server: reason, probe, answer or continue."""

from __future__ import annotations

import sqlite3

import httpx
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


def test_probe_controller_behind_an_upstream_is_refused(tmp_path, probe_policy):
    config = ServeConfig(policy=probe_policy, log=tmp_path / "log.sqlite", upstream="http://127.0.0.1:9")
    with pytest.raises(PolicyLoadError, match="probe controller"):
        create_app(config)
