"""A price-conditioned policy: lambda drawn per episode and observed, one export for every price."""

from __future__ import annotations

import json

import numpy as np
import pytest

from tokenopt.cost import parse_cost_weight_range, with_price
from tokenopt.envs import TokenBudgetEnv
from tokenopt.runtime import BudgetPolicy, PolicyLoadError


@pytest.mark.parametrize(
    ("text", "needle"),
    [("0.01", "LOW:HIGH"), ("a:b", "two numbers"), ("0:0.1", "0 < LOW < HIGH"), ("0.1:0.01", "0 < LOW < HIGH")],
)
def test_bad_ranges_are_refused_with_the_accepted_form(text, needle):
    with pytest.raises(ValueError, match=needle):
        parse_cost_weight_range(text)


def test_env_draws_lambda_per_episode_and_prices_the_reward_with_it(demo_table):
    env = TokenBudgetEnv(table=str(demo_table), split="train", cost_weight_range="0.005:0.05")
    assert env.observation_space.shape == (env.source.features.shape[1] + 1,)
    seen = []
    for episode in range(40):
        observation, _ = env.reset(seed=episode, options={"query_index": 3})
        weight = float(np.exp(observation[-1]))
        assert observation[:-1] == pytest.approx(env.source.features[3])
        assert 0.005 * (1 - 1e-5) <= weight <= 0.05 * (1 + 1e-5)
        _, reward, _, _, info = env.step(5)
        assert info["cost_weight"] == pytest.approx(weight, rel=1e-5)
        assert reward == pytest.approx(info["em"] - info["cost_weight"] * info["billed_tokens"])
        seen.append(weight)
    assert np.log(max(seen)) - np.log(min(seen)) > 0.7 * np.log(10)  # it covers the range, log-uniformly
    observation, _ = env.reset(seed=0, options={"query_index": 3, "cost_weight": 0.02})
    assert observation[-1] == pytest.approx(np.log(0.02))
    assert env.observation_space.contains(observation)


def test_one_export_decides_at_every_price_of_its_range(conditioned_policy, demo_table, demo_policy):
    from tokenopt.agents.common.evaluation import policy_choices, query_questions
    from tokenopt.table import OutcomeMatrix

    policy = BudgetPolicy.load(conditioned_policy)
    spec = json.loads((conditioned_policy / "policy.json").read_text())
    assert policy.cost_weight_range == (0.003, 0.05) and spec["format_version"] == 3
    assert policy.cost_weight == pytest.approx(0.01)

    test = OutcomeMatrix.from_table(demo_table).subset("test")
    questions = query_questions(demo_table)
    rows = np.arange(len(test.ids))
    tokens = []
    for weight in (0.003, 0.01, 0.05):
        chosen = policy_choices(policy, test, questions, weight)
        tokens.append(float(test.billed_tokens[rows, chosen].mean()))
    # A higher price of a token buys fewer of them.
    assert tokens[0] > tokens[1] > tokens[2]

    prompts = [questions[q] for q in test.ids[:20]]
    features = policy.features.batch(prompts, None).astype(np.float64)
    for weight in (0.003, 0.02):
        one = [policy.decide(prompt, cost_weight=weight) for prompt in prompts]
        batch = policy.decide_batch(prompts, cost_weight=weight)
        raw = policy.probabilities(with_price(features, weight))
        assert [d.action for d in one] == [d.action for d in batch]
        assert np.allclose([d.probabilities for d in one], raw, atol=1e-9)
    assert policy.decide(prompts[0]).action == policy.decide(prompts[0], cost_weight=0.01).action

    with pytest.raises(ValueError, match=r"outside the policy's range 0.003:0.05"):
        policy.decide(prompts[0], cost_weight=0.2)
    with pytest.raises(ValueError, match="trained for one cost weight"):
        BudgetPolicy.load(demo_policy).decide(prompts[0], cost_weight=0.01)


def test_scoreboard_draws_the_conditioned_policy_beside_the_per_weight_one(
    conditioned_policy, demo_policy, demo_table, tmp_path
):
    from tokenopt.agents.evaluation.scoreboard import CONDITIONED, ScoreboardConfig, run_scoreboard

    config = ScoreboardConfig(
        policy=str(demo_policy), table=str(demo_table), out=str(tmp_path / "eval"), cost_weights=(0.01,),
        conditioned=str(conditioned_policy), plots=False,
    )  # fmt: skip
    report = run_scoreboard(config)
    entry = report["per_weight"][0]
    row = next(r for r in entry["rows"] if r["method"] == CONDITIONED)
    policy_row = entry["rows"][0]
    low, high = entry["conditioned_minus_policy"]["ci"]
    assert low <= row["reward"] - policy_row["reward"] <= high
    assert CONDITIONED in report["curves"] and CONDITIONED in (tmp_path / "eval" / "report.md").read_text()

    # The conditioned policy as the main one: no sweep to train, and weights outside its range are refused.
    outside = ScoreboardConfig(
        policy=str(conditioned_policy), table=str(demo_table), out=str(tmp_path / "o"), cost_weights=(0.1,),
        plots=False,
    )  # fmt: skip
    with pytest.raises(ValueError, match=r"lie outside it"):
        run_scoreboard(outside)


def test_do_no_harm_holds_at_every_price(conditioned_policy, tmp_path):
    import shutil

    from tokenopt.agents.evaluation.no_harm import apply_no_harm, format_no_harm

    run = tmp_path / "run"
    shutil.copytree(conditioned_policy.parent, run)
    result = apply_no_harm(run)
    assert result is not None and result["price_conditioned"]
    assert [v["cost_weight"] for v in result["verdicts"]] == pytest.approx([0.003, 0.00603, 0.01225, 0.02466, 0.05],
                                                                            rel=1e-2)  # fmt: skip
    failed = [v for v in result["verdicts"] if not v["beats_fixed"]]
    assert result["fallback"] == bool(failed) and bool(result["price_fallback"]) == bool(failed)
    assert "do no harm at every price" in format_no_harm(result)

    # A price interval of the fallback picks its fixed action there, and the network decides elsewhere.
    spec = json.loads((run / "policy" / "policy.json").read_text())
    spec["price_fallback"] = [{"low": 0.003, "high": 0.004, "action": "b32/greedy"}]
    (run / "policy" / "policy.json").write_text(json.dumps(spec))
    policy, learned = BudgetPolicy.load(run / "policy"), BudgetPolicy.load(conditioned_policy)
    prompt = "C 3+4*2-5?"
    assert policy.decide(prompt, cost_weight=0.0035).action == "b32/greedy"
    assert policy.decide_batch([prompt, prompt], cost_weight=np.array([0.0035, 0.03]))[0].action == "b32/greedy"
    assert policy.decide(prompt, cost_weight=0.03).action == learned.decide(prompt, cost_weight=0.03).action
    spec["price_fallback"] = [{"low": 0.001, "high": 0.004, "action": "b32/greedy"}]
    (run / "policy" / "policy.json").write_text(json.dumps(spec))
    with pytest.raises(PolicyLoadError, match="must lie in 0.003:0.05"):
        BudgetPolicy.load(run / "policy")
