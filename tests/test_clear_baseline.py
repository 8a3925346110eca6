"""The CLEAR-style baseline: one shadow price shares a total budget; the stream policy is compared with it."""

import json

import numpy as np
import pytest

from tokenopt.agents.common.statistics import paired_bootstrap_lower_bound
from tokenopt.agents.evaluation.baselines import (
    ClearModel,
    ReplayTable,
    clear_allocation,
    clear_points,
    clear_stream_point,
    fixed_points,
    stream_environment,
    stream_orders,
    stream_policy_point,
)


def _random_batch(seed: int = 0, queries: int = 60, actions: int = 6) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    return rng.random((queries, actions)), rng.integers(1, 40, size=(queries, actions)).astype(float)


def test_allocation_meets_the_budget_and_a_larger_budget_never_lowers_utility():
    utility, cost = _random_batch()
    floor, top = cost.min(axis=1).sum(), cost[np.arange(len(cost)), utility.argmax(axis=1)].sum()
    previous = -np.inf
    for budget in np.linspace(floor, top + 50, 60):
        allocation = clear_allocation(utility, cost, float(budget))
        assert allocation.spent <= budget + 1e-9
        assert allocation.spent == pytest.approx(cost[np.arange(len(cost)), allocation.columns].sum())
        assert allocation.utility >= previous - 1e-9
        previous = allocation.utility
    unbound = clear_allocation(utility, cost, float(top))
    assert unbound.shadow_price == 0.0
    assert unbound.utility == pytest.approx(utility.max(axis=1).sum())  # the budget does not bind
    bound = clear_allocation(utility, cost, float(floor + (top - floor) / 3))
    assert bound.shadow_price > 0 and bound.utility < unbound.utility


def test_the_budget_goes_where_the_predicted_marginal_gain_is_larger():
    # 20 queries gain 0.5 from the dearer action, 20 gain only 0.1; both cost 1 or 11 tokens.
    utility = np.array([[0.2, 0.7]] * 20 + [[0.2, 0.3]] * 20)
    cost = np.array([[1.0, 11.0]] * 40)
    allocation = clear_allocation(utility, cost, total_budget=40 + 10 * 20)
    assert allocation.columns[:20].tolist() == [1] * 20  # every large-gain query is upgraded
    assert allocation.columns[20:].tolist() == [0] * 20
    # The price lies between the two gains per token (0.1 / 10 and 0.5 / 10).
    assert 0.01 - 1e-9 <= allocation.shadow_price <= 0.05 + 1e-9
    # With room for only 5 upgrades, they all go to the large-gain queries, tied ones in batch order.
    few = clear_allocation(utility, cost, total_budget=40 + 10 * 5 + 3)
    assert few.columns.tolist() == [1] * 5 + [0] * 35
    assert few.spent == 90.0


def test_the_budget_is_met_in_billed_tokens_when_decisions_weigh_predicted_costs():
    utility, cost = _random_batch(1)
    billed = cost * np.random.default_rng(2).uniform(0.5, 1.5, size=cost.shape)
    budget = float(billed.min(axis=1).sum() + 300)
    allocation = clear_allocation(utility, cost, budget, billed=billed)
    assert allocation.spent == pytest.approx(billed[np.arange(len(billed)), allocation.columns].sum())
    assert allocation.spent <= budget


@pytest.mark.parametrize(
    ("utility", "cost", "budget", "message"),
    [
        (np.ones((3, 2)), np.ones((3, 2)), -1.0, "finite number >= 0; got -1"),
        (np.ones((3, 2)), np.ones((3, 2)), float("nan"), "finite number >= 0"),
        (np.ones((0, 2)), np.ones((0, 2)), 10.0, "at least one query"),
        (np.ones((3, 2)), np.ones((3, 3)), 10.0, "one shape"),
        (np.ones((3, 2)), -np.ones((3, 2)), 10.0, "must be >= 0"),
        (np.ones((3, 2)), np.full((3, 2), 5.0), 14.0, "below 15, the bill of the cheapest action"),
    ],
)
def test_bad_input_gets_a_clear_error(utility, cost, budget, message):
    with pytest.raises(ValueError, match=message):
        clear_allocation(utility, cost, budget)


# --- on the demo table -----------------------------------------------------------


@pytest.fixture(scope="module")
def splits(demo_table):
    replay = ReplayTable.load(demo_table)
    return replay.subset("train"), replay.subset("val"), replay.subset("test")


def test_clear_points_spend_at_most_each_fixed_action_and_beat_max_budget_greedy(splits):
    train, val, test = splits
    points = clear_points(train, val, [test])[0]
    fixed = fixed_points(test)
    assert [p.setting for p in points] == [f"at the spend of {f.setting}" for f in fixed]
    for clear, action in zip(points, fixed, strict=True):
        assert clear.billed_tokens.sum() <= action.billed_tokens.sum() + 1e-6
    # At the spend of max-budget greedy, the allocation is more accurate by more than the split's noise.
    reference = test.ladder("greedy")[-1]
    difference = points[reference].exact_match - fixed[reference].exact_match
    assert paired_bootstrap_lower_bound(difference, confidence=0.95, resamples=2000, seed=0)[0] > 0


def test_clear_per_stream_keeps_each_stream_within_the_environments_budget(splits):
    train, val, test = splits
    env = stream_environment(test)
    point = clear_stream_point(ClearModel.fit(train, val), test, env.total_budget, env.stream_length, passes=1)
    n = len(test.matrix.ids)
    order = stream_orders(n, env.stream_length, passes=1, seed=0)[0][:n]
    for start in range(0, n, env.stream_length):
        stream = order[start : start + env.stream_length]
        assert point.billed_tokens[stream].sum() <= env.total_budget * len(stream) / env.stream_length + 1e-6
    # The budget is used: the allocation is not the cheapest action everywhere.
    assert point.billed_tokens.sum() > test.matrix.billed_tokens.min(axis=1).sum()


@pytest.fixture(scope="module")
def stream_run(tmp_path_factory, demo_table):
    from tokenopt.agents.export import export_run
    from tokenopt.agents.ppo.train import TrainConfig, train

    run = tmp_path_factory.mktemp("stream") / "run"
    train(TrainConfig(table=str(demo_table), out=str(run), env="stream", total_timesteps=4096, eval_freq=4096))
    export_run(run)
    return run


def test_stream_policy_replay_keeps_each_stream_within_its_budget(splits, stream_run):
    from tokenopt.envs import TableSource, TokenBudgetStreamEnv
    from tokenopt.runtime import BudgetPolicy

    test = splits[2]
    point = stream_policy_point(BudgetPolicy.load(stream_run / "policy"), test, passes=1)
    env = TokenBudgetStreamEnv(source=TableSource(test.matrix, "test"))
    streams = -(-len(test.matrix.ids) // env.stream_length)
    assert point.billed_tokens.sum() <= streams * env.total_budget + 1e-6
    assert set(np.unique(point.exact_match)) <= {0.0, 1.0}
    again = stream_policy_point(BudgetPolicy.load(stream_run / "policy"), test, passes=1)
    assert np.array_equal(point.billed_tokens, again.billed_tokens)  # seeded
    with pytest.raises(ValueError, match="options\\['order'\\] must hold 16"):
        env.reset(options={"order": [0, 1]})


def test_eval_compares_the_stream_policy_with_clear_at_its_total_spend(tmp_path, demo_table, demo_policy, stream_run):
    from tokenopt.agents.evaluation.scoreboard import ScoreboardConfig, run_scoreboard

    config = ScoreboardConfig(
        policy=str(demo_policy), table=str(demo_table), out=str(tmp_path / "eval"), cost_weights=(0.01,),
        cost_weight=0.01, plots=False, stream_run=str(stream_run), stream_passes=2,
    )  # fmt: skip
    report = run_scoreboard(config)
    assert "CLEAR-style" in {row["method"] for row in report["per_weight"][0]["rows"]}
    assert "CLEAR-style" in report["curves"]
    stream = report["stream"]
    rows = {row["method"]: row for row in stream["rows"]}
    expected = {"tokenopt stream policy", "CLEAR-style", "CLEAR-style, per stream", "fixed"}
    assert set(rows) | set(stream["left_out"]) == expected
    for method, row in rows.items():
        assert row["ci"]["em"][0] <= row["em"] <= row["ci"]["em"][1]
        if method != "CLEAR-style, per stream":  # that one spends the environment's budget, not the policy's spend
            assert row["total_tokens"] <= stream["total_tokens"] + 1e-6, method
    clear = rows["CLEAR-style"]
    assert clear["stream_minus"]["diff"] == pytest.approx(rows["tokenopt stream policy"]["em"] - clear["em"])
    saved = json.loads((tmp_path / "eval" / "report.json").read_text())
    assert saved["stream"]["total_tokens"] == pytest.approx(stream["total_tokens"])
    markdown = (tmp_path / "eval" / "report.md").read_text()
    assert "## Stream policy against CLEAR-style at the same total budget" in markdown


def test_eval_refuses_a_per_query_policy_as_the_stream_run(tmp_path, demo_table, demo_policy):
    from tokenopt.agents.evaluation.scoreboard import ScoreboardConfig, run_scoreboard

    config = ScoreboardConfig(
        policy=str(demo_policy), table=str(demo_table), out=str(tmp_path / "eval"), cost_weights=(0.01,),
        cost_weight=0.01, plots=False, stream_run=str(demo_policy),
    )  # fmt: skip
    with pytest.raises(ValueError, match="not a stream policy"):
        run_scoreboard(config)
