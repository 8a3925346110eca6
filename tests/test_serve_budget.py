"""Budget control on a real server on loopback: the controller's lambda reaches the policy, the log,
/metrics and the state file; arms have their own controllers; bad budgets stop start-up."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import httpx
import numpy as np
import pytest
from serving import running_server

from tokenopt.demo.suite import SuiteConfig, generate_suite
from tokenopt.runtime import BudgetPolicy
from tokenopt.serve import ServeConfig, read_decisions
from tokenopt.serve.backends import LocalBackend
from tokenopt.serve.budget import BUDGET_FORMS, load_state
from tokenopt.serve.serving import _stable_fraction

PRICED_RANGE = (0.003, 0.05)
"""The lambda range the ``conditioned_policy`` fixture is trained for."""
QUESTIONS = [item["question"] for item in generate_suite(SuiteConfig(n_queries=200, seed=23))]

# A mean of 1 billed token a request is below anything the policy can spend: lambda rises at
# every update (by the clip), a few requests apart, so the tests see it move within a few dozen.
OVERSPENT = {
    "target_mean_tokens": 1.0,
    "budget_interval": 0.001,
    "budget_min_requests": 3,
    "budget_clip": 0.1,
}


def _config(folder: Path, policy: Path, **overrides) -> ServeConfig:
    settings = {"policy": policy, "log": folder / "decisions.sqlite", "device": "cpu", "port": 0}
    settings.update(overrides)
    return ServeConfig(**settings)


def _gauges(url: str) -> dict[str, float]:
    """``name{labels}`` -> value of every sample /metrics exposes."""
    samples = {}
    for line in httpx.get(f"{url}/metrics").text.splitlines():
        if line and not line.startswith("#"):
            name, value = line.rsplit(" ", 1)
            samples[name] = float(value)
    return samples


def _user_in(arm: str, split: float) -> str:
    """A user key the server's stable hash sends to ``arm``."""
    for number in range(1000):
        key = f"user-{number}"
        if (_stable_fraction(key) < split) == (arm == "B"):
            return key
    raise AssertionError("no user key found")


def _ask(url: str, questions: list[str], user: str = "u") -> None:
    for question in questions:
        response = httpx.post(
            f"{url}/v1/completions", json={"prompt": question, "seed": 1}, headers={"X-Tokenopt-User": user}
        )
        assert response.status_code == 200, response.text


def test_a_budgeted_server_decides_at_its_lambda_and_keeps_it_across_a_restart(tmp_path, conditioned_policy, demo_lm):
    policy = BudgetPolicy.load(conditioned_policy)
    config = _config(tmp_path, conditioned_policy, **{**OVERSPENT, "budget_clip": 0.02})  # mid-range after 30 requests
    with running_server(config, LocalBackend(demo_lm)) as (url, _):
        start = _gauges(url)
        assert start['tokenopt_cost_weight{arm="A"}'] == policy.cost_weight
        assert (start['tokenopt_cost_weight_min{arm="A"}'], start['tokenopt_cost_weight_max{arm="A"}']) == PRICED_RANGE
        assert start['tokenopt_spend_target_tokens_per_request{arm="A"}'] == 1.0
        _ask(url, QUESTIONS[:30])
        after = _gauges(url)
    rows = read_decisions(config.log)
    weights = rows.cost_weight
    assert len(rows) == 30 and not np.isnan(weights).any()
    # Overspending raises lambda, request after request, within the policy's range.
    assert weights[0] == policy.cost_weight and np.all(np.diff(weights) >= 0) and weights[-1] > weights[0]
    assert PRICED_RANGE[0] <= weights.min() and weights.max() < PRICED_RANGE[1]
    assert after['tokenopt_cost_weight{arm="A"}'] > weights[-1]  # the last request's spend moved it once more
    assert after['tokenopt_spend_tokens_per_request{arm="A"}'] > 1.0
    # Each request was decided at the lambda logged with it.
    for question, action, weight in zip(QUESTIONS[:30], rows.action, weights, strict=True):
        assert action == policy.decide(question, cost_weight=float(weight)).action
    # The state file holds the last lambda; a restarted server resumes there.
    saved = load_state(config.budget_state_path())
    assert saved == {"A": pytest.approx(after['tokenopt_cost_weight{arm="A"}'], rel=1e-12)}
    restarted = _config(tmp_path, conditioned_policy, **{**OVERSPENT, "budget_clip": 0.02})
    with running_server(restarted, LocalBackend(demo_lm)) as (url, _):
        assert _gauges(url)['tokenopt_cost_weight{arm="A"}'] == pytest.approx(saved["A"], rel=1e-12)
        _ask(url, QUESTIONS[30:31])
    assert read_decisions(config.log).cost_weight[-1] == pytest.approx(saved["A"], rel=1e-12)


def test_the_price_changes_what_is_served(tmp_path, conditioned_policy, demo_lm):
    # Questions on which the policy picks another action at its highest price than at its default.
    policy = BudgetPolicy.load(conditioned_policy)
    high = PRICED_RANGE[1]
    sensitive = [q for q in QUESTIONS[40:] if policy.decide(q).action != policy.decide(q, cost_weight=high).action]
    assert sensitive, "the priced policy decides alike at every price"
    config = _config(tmp_path, conditioned_policy, **OVERSPENT)
    with running_server(config, LocalBackend(demo_lm)) as (url, _):
        _ask(url, QUESTIONS[:20])  # 17 updates of +0.1 take lambda from 0.01 to its bound, 0.05
        assert _gauges(url)['tokenopt_cost_weight{arm="A"}'] == high
        _ask(url, sensitive[:10])
    rows = read_decisions(config.log)
    assert list(rows.cost_weight[20:]) == [high] * len(sensitive[:10])
    assert rows.action[20:] == [policy.decide(q, cost_weight=high).action for q in sensitive[:10]]


def test_the_server_serves_the_price_fallback_where_do_no_harm_set_one(tmp_path, conditioned_policy, demo_lm):
    # Above lambda 0.02 the policy falls back to a fixed action (as `tokenopt train` writes it where the
    # learned policy did not beat the best fixed action on val): the server must serve that action there.
    learned = BudgetPolicy.load(conditioned_policy)
    high = PRICED_RANGE[1]
    picked = [learned.decide(q, cost_weight=high).action for q in QUESTIONS[40:60]]
    fixed = next(str(a["name"]) for a in learned.actions if str(a["name"]) not in picked)
    served = tmp_path / "policy"
    shutil.copytree(conditioned_policy, served)
    spec = json.loads((served / "policy.json").read_text())
    spec["price_fallback"] = [{"low": 0.02, "high": high, "action": fixed}]
    (served / "policy.json").write_text(json.dumps(spec))
    policy = BudgetPolicy.load(served)
    config = _config(tmp_path, served, **OVERSPENT)
    with running_server(config, LocalBackend(demo_lm)) as (url, _):
        _ask(url, QUESTIONS[:20])  # lambda climbs from 0.01 through 0.02 to its bound
        _ask(url, QUESTIONS[40:60])
    rows = read_decisions(config.log)
    weights = rows.cost_weight
    assert (weights < 0.02).any() and (weights[20:] == high).all()
    for question, action, weight in zip(QUESTIONS[:20] + QUESTIONS[40:60], rows.action, weights, strict=True):
        assert action == policy.decide(question, cost_weight=float(weight)).action
        if weight >= 0.02:
            assert action == fixed
    assert (rows.propensity == 1.0).all()


def test_ab_arms_keep_separate_controllers(tmp_path, conditioned_policy, demo_lm):
    config = _config(tmp_path, conditioned_policy, policy_b=conditioned_policy, split=0.5, **OVERSPENT)
    default = BudgetPolicy.load(conditioned_policy).cost_weight
    with running_server(config, LocalBackend(demo_lm)) as (url, _):
        _ask(url, QUESTIONS[:20], user=_user_in("A", 0.5))
        first = _gauges(url)
        assert first['tokenopt_cost_weight{arm="A"}'] > default
        assert first['tokenopt_cost_weight{arm="B"}'] == default  # B served nothing: its price has not moved
        _ask(url, QUESTIONS[20:40], user=_user_in("B", 0.5))
        second = _gauges(url)
    assert second['tokenopt_cost_weight{arm="B"}'] > default
    assert second['tokenopt_cost_weight{arm="A"}'] == first['tokenopt_cost_weight{arm="A"}']
    rows = read_decisions(config.log)
    assert list(rows.arm) == ["A"] * 20 + ["B"] * 20
    # Both arms' lambdas are kept.
    assert set(load_state(config.budget_state_path())) == {"A", "B"}


def test_a_rate_budget_is_split_between_arms_and_replicas(tmp_path, conditioned_policy, demo_lm):
    arms = {"policy_b": conditioned_policy, "split": 0.25}
    config = _config(tmp_path, conditioned_policy, **arms, token_budget="36k/min", replicas=3)
    with running_server(config, LocalBackend(demo_lm)) as (url, _):
        gauges = _gauges(url)
    # 600 tokens/s over 3 replicas is 200 each; A is sent 75 % of the users, B 25 %.
    assert gauges['tokenopt_spend_target_tokens_per_second{arm="A"}'] == pytest.approx(150.0)
    assert gauges['tokenopt_spend_target_tokens_per_second{arm="B"}'] == pytest.approx(50.0)
    assert not any(name.startswith("tokenopt_spend_target_tokens_per_request") for name in gauges)


def _serve(*arguments: str, tmp_path: Path) -> subprocess.CompletedProcess[str]:
    command = [sys.executable, "-m", "tokenopt.cli", "serve", "--log", str(tmp_path / "d.sqlite"), *arguments]
    env = {**os.environ, "COLUMNS": "400"}
    return subprocess.run(command, capture_output=True, text=True, timeout=120, env=env)


@pytest.mark.parametrize("budget", ["2M/day", "2G/h", "1000", "-5/s", "lots"])
def test_bad_budget_strings_are_refused_at_start_up(tmp_path, conditioned_policy, budget):
    result = _serve("--policy", str(conditioned_policy), "--token-budget", budget, tmp_path=tmp_path)
    message = " ".join(result.stderr.split())
    assert result.returncode == 2, result.stderr
    assert repr(budget) in message and BUDGET_FORMS in message


def test_a_budget_needs_a_price_conditioned_policy_and_one_form(tmp_path, demo_policy, conditioned_policy):
    fixed = _serve("--policy", str(demo_policy), "--token-budget", "2M/h", tmp_path=tmp_path)
    assert fixed.returncode == 2 and "price-conditioned" in " ".join(fixed.stderr.split())
    assert "--cost-weight-range" in fixed.stderr
    both = _serve(
        "--policy", str(conditioned_policy), "--token-budget", "2M/h", "--target-mean-tokens", "12", tmp_path=tmp_path
    )
    assert both.returncode == 2 and "not both" in both.stderr
    broken = tmp_path / "d.budget.json"
    broken.write_text("{half a file")
    state = _serve("--policy", str(conditioned_policy), "--token-budget", "2M/h", tmp_path=tmp_path)
    assert state.returncode == 2 and "d.budget.json" in state.stderr and "delete it" in state.stderr


def test_a_fixed_policy_logs_the_lambda_it_was_trained_at(tmp_path, demo_policy, demo_lm):
    config = _config(tmp_path, demo_policy)
    trained = json.loads((Path(demo_policy) / "policy.json").read_text())["metadata"]["cost_weight"]
    with running_server(config, LocalBackend(demo_lm)) as (url, _):
        _ask(url, QUESTIONS[:2])
        assert not re.search(r"^tokenopt_cost_weight\{", httpx.get(f"{url}/metrics").text, re.MULTILINE)
    assert list(read_decisions(config.log).cost_weight) == [trained, trained]


def test_a_reload_keeps_lambda_and_refuses_a_fixed_policy(tmp_path, conditioned_policy, demo_policy, demo_lm):
    served = tmp_path / "policy"
    shutil.copytree(conditioned_policy, served)
    config = _config(tmp_path, served, **OVERSPENT)
    with running_server(config, LocalBackend(demo_lm)) as (url, _):
        _ask(url, QUESTIONS[:10])
        before = _gauges(url)['tokenopt_cost_weight{arm="A"}']
        assert httpx.post(f"{url}/admin/reload").status_code == 200
        assert _gauges(url)['tokenopt_cost_weight{arm="A"}'] == before  # the controller outlives the reload
        shutil.rmtree(served)
        shutil.copytree(demo_policy, served)
        refused = httpx.post(f"{url}/admin/reload")
        assert refused.status_code == 409 and "price-conditioned" in refused.json()["error"]["message"]
        _ask(url, QUESTIONS[10:11])  # still served by the price-conditioned policy, at its lambda
    assert read_decisions(config.log).cost_weight[-1] >= before
