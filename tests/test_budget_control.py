"""The spend controller: budget strings, the bounded dual-ascent update, and its saved state."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

from tokenopt.serve.budget import (
    BUDGET_FORMS,
    ControlSettings,
    SpendController,
    SpendTarget,
    load_state,
    parse_token_budget,
    save_state,
    spend_target,
)


class FakeClock:
    """A clock the test moves by hand, so every update happens at a known time."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


SETTINGS = ControlSettings(window=10.0, interval=2.0, step=0.25, clip=0.1, min_requests=5)


def _run(controller: SpendController, clock: FakeClock, tokens: float, seconds: float, per_second: int = 10) -> None:
    """Serve ``per_second`` requests of ``tokens`` billed tokens each, for ``seconds``."""
    for _ in range(int(seconds * per_second)):
        clock.now += 1.0 / per_second
        controller.observe(tokens)


@pytest.mark.parametrize(
    ("text", "per_second"),
    [("500/s", 500.0), ("30k/min", 500.0), ("2M/h", 2e6 / 3600), ("1.5k/s", 1500.0), (" 120 / min ", 2.0)],
)
def test_budget_strings_become_tokens_per_second(text, per_second):
    target = parse_token_budget(text)
    assert target.kind == "rate" and math.isclose(target.value, per_second)


@pytest.mark.parametrize("text", ["500", "500/day", "-5/s", "0/s", "abc/s", "5 tokens/s", "2G/h", "", "5/s/s"])
def test_bad_budget_strings_are_refused_with_the_accepted_forms(text):
    with pytest.raises(ValueError) as caught:
        parse_token_budget(text)
    assert repr(text) in str(caught.value) and BUDGET_FORMS in str(caught.value)


def test_a_budget_and_a_mean_target_exclude_each_other():
    with pytest.raises(ValueError, match="not both"):
        spend_target("2M/h", 300.0)
    with pytest.raises(ValueError, match="positive"):
        spend_target(None, 0.0)
    assert spend_target(None, None) is None
    mean = spend_target(None, 300.0)
    assert mean is not None and mean.kind == "mean" and mean.value == 300.0


def test_a_rate_is_split_between_replicas_and_a_mean_is_not():
    rate, mean = parse_token_budget("900/s"), SpendTarget("mean", 30.0, "30")
    assert rate.share(1 / 3).value == pytest.approx(300.0)
    assert mean.share(1 / 3).value == 30.0
    with pytest.raises(ValueError, match=r"\(0, 1\]"):
        rate.share(0.0)


@pytest.mark.parametrize(
    "settings",
    [
        {"window": 0.0},
        {"interval": 0.0},
        {"window": 5.0, "interval": 6.0},
        {"step": -0.1},
        {"clip": 0.0},
        {"min_requests": 0},
    ],
)
def test_bad_settings_are_refused(settings):
    with pytest.raises(ValueError, match="budget"):
        ControlSettings(**settings)


def test_lambda_grows_with_overspend_and_falls_with_underspend():
    clock = FakeClock()
    target = SpendTarget("rate", 100.0, "100/s")  # 10 requests/s: 10 tokens a request is on target
    over = SpendController(target, (1e-4, 1.0), 0.01, SETTINGS, clock)
    _run(over, clock, tokens=20.0, seconds=12)
    assert over.cost_weight > 0.01
    clock = FakeClock()
    under = SpendController(target, (1e-4, 1.0), 0.01, SETTINGS, clock)
    _run(under, clock, tokens=5.0, seconds=12)
    assert under.cost_weight < 0.01
    # More overspend moves lambda further (below the clip), on target not at all.
    moves = {}
    for tokens in (10.0, 10.5, 11.0):
        clock = FakeClock()
        controller = SpendController(target, (1e-4, 1.0), 0.01, SETTINGS, clock)
        _run(controller, clock, tokens=tokens, seconds=10.05)
        assert controller.updates >= 1
        moves[tokens] = math.log(controller.cost_weight / 0.01)
    assert moves[10.0] == pytest.approx(0.0, abs=1e-9)
    assert 0 < moves[10.5] < moves[11.0]


def test_each_update_is_clipped_and_lambda_stays_within_its_bounds():
    clock = FakeClock()
    target = SpendTarget("mean", 10.0, "10 tokens/request")
    controller = SpendController(target, (0.001, 0.05), 0.01, SETTINGS, clock)
    previous = controller.cost_weight
    for _ in range(40):  # 100x overspend: each update is the clip, then lambda rests at the bound
        _run(controller, clock, tokens=1000.0, seconds=2.0)
        step = math.log(controller.cost_weight / previous)
        assert step <= SETTINGS.clip + 1e-12
        previous = controller.cost_weight
    assert controller.cost_weight == pytest.approx(0.05) and controller.at_bound() == "high"
    for _ in range(80):  # nothing spent: down to the low bound, never below
        _run(controller, clock, tokens=0.0, seconds=2.0)
        assert controller.cost_weight >= 0.001 - 1e-15
    assert controller.cost_weight == pytest.approx(0.001) and controller.at_bound() == "low"
    # A starting lambda outside the bounds is clipped into them.
    assert SpendController(target, (0.001, 0.05), 3.0, SETTINGS, clock).cost_weight == pytest.approx(0.05)


def test_no_update_before_the_interval_or_with_too_few_requests():
    clock = FakeClock()
    controller = SpendController(SpendTarget("rate", 1.0, "1/s"), (1e-3, 1.0), 0.01, SETTINGS, clock)
    for _ in range(4):  # 4 requests (fewer than min_requests) over 20 s, each far over the target
        clock.now += 5.0
        assert controller.observe(1000.0) is False
    assert controller.cost_weight == 0.01 and controller.updates == 0


def test_the_spend_is_measured_over_the_sliding_window():
    clock = FakeClock()
    controller = SpendController(SpendTarget("rate", 50.0, "50/s"), (1e-3, 1.0), 0.01, SETTINGS, clock)
    assert controller.measured() is None
    _run(controller, clock, tokens=10.0, seconds=20)  # 100 tokens/s, for longer than the 10 s window
    assert controller.measured() == pytest.approx(100.0, rel=0.02)
    clock.now += 5.0  # half a window of silence halves the rate
    assert controller.measured() == pytest.approx(50.0, rel=0.03)
    clock.now += 10.0
    assert controller.measured() == 0.0
    mean = SpendController(SpendTarget("mean", 5.0, "5"), (1e-3, 1.0), 0.01, SETTINGS, clock)
    for tokens in (2.0, 4.0, 9.0):
        clock.now += 1.0
        mean.observe(tokens)
    assert mean.measured() == pytest.approx(5.0)


def test_dual_ascent_settles_on_the_lambda_that_meets_the_target():
    # A policy whose spend falls as lambda rises (elasticity 0.5): tokens = 10 * (0.01 / lambda) ** 0.5.
    # At 120 tokens/s and 10 requests/s the target is 12 tokens a request, met at lambda = 0.01 / 1.44.
    clock = FakeClock()
    controller = SpendController(SpendTarget("rate", 120.0, "120/s"), (1e-4, 1.0), 0.01, SETTINGS, clock)
    for _ in range(4000):
        clock.now += 0.1
        controller.observe(10.0 * (0.01 / controller.cost_weight) ** 0.5)
    assert controller.cost_weight == pytest.approx(0.01 / 1.44, rel=0.05)
    assert controller.measured() == pytest.approx(120.0, rel=0.05)


def test_the_state_round_trips_and_is_written_atomically(tmp_path):
    clock = FakeClock()
    controllers = {
        "A": SpendController(parse_token_budget("100/s"), (1e-3, 0.1), 0.02, SETTINGS, clock),
        "B": SpendController(parse_token_budget("100/s"), (1e-3, 0.1), 0.005, SETTINGS, clock),
    }
    path = tmp_path / "state" / "budget.json"
    assert load_state(path) == {}
    save_state(path, controllers, {"A": "pa", "B": "pb"})
    assert load_state(path) == pytest.approx({"A": 0.02, "B": 0.005})
    document = json.loads(path.read_text())
    assert document["arms"]["A"]["policy_id"] == "pa" and document["arms"]["B"]["target"] == "100/s"
    assert [p.name for p in path.parent.iterdir()] == ["budget.json"]  # no temporary file left behind


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ("{not json", "cannot be read"),
        ('{"format": "other"}', "not a tokenopt budget state"),
        ('{"format": "tokenopt-spend-state", "version": 9, "arms": {}}', "version 9"),
        ('{"format": "tokenopt-spend-state", "version": 1, "arms": {"A": {"cost_weight": -1}}}', "positive"),
    ],
)
def test_a_broken_state_file_is_refused_with_the_fix(tmp_path, content, message):
    path = tmp_path / "budget.json"
    path.write_text(content)
    with pytest.raises(ValueError, match=message):
        load_state(path)


def test_serve_config_refuses_a_bad_budget_and_splits_a_rate_between_replicas(tmp_path):
    from tokenopt.serve.config import ServeConfig

    with pytest.raises(ValueError) as caught:
        ServeConfig(policy=tmp_path, token_budget="2M per hour")
    assert BUDGET_FORMS in str(caught.value)
    with pytest.raises(ValueError, match="replicas"):
        ServeConfig(policy=tmp_path, token_budget="2M/h", replicas=0)
    with pytest.raises(ValueError, match="budget interval"):
        ServeConfig(policy=tmp_path, token_budget="2M/h", budget_window=5.0, budget_interval=10.0)
    fleet = ServeConfig(policy=tmp_path, token_budget="900/s", replicas=3).spend_target()
    assert fleet is not None and fleet.value == pytest.approx(300.0)
    mean = ServeConfig(policy=tmp_path, target_mean_tokens=12.0, replicas=3).spend_target()
    assert mean is not None and mean.value == 12.0
    config = ServeConfig(policy=tmp_path, log=tmp_path / "serve" / "decisions.sqlite")
    assert config.budget_state_path() == tmp_path / "serve" / "decisions.budget.json"


def test_a_decision_log_written_before_lambda_was_recorded_still_loads(tmp_path):
    import sqlite3

    from tokenopt.decisions import DecisionLog, DecisionRecord, read_decisions

    # The decisions table as logs were written before the cost_weight column.
    path = tmp_path / "old.sqlite"
    columns = [
        "id TEXT PRIMARY KEY", "arm TEXT NOT NULL", "policy_id TEXT NOT NULL", "endpoint TEXT NOT NULL",
        "bypass INTEGER NOT NULL", "action TEXT NOT NULL", "action_index INTEGER NOT NULL", "budget INTEGER NOT NULL",
        "mode TEXT NOT NULL", "propensity REAL NOT NULL", "features BLOB NOT NULL", "prompt_tokens INTEGER NOT NULL",
        "reasoning_tokens INTEGER NOT NULL", "answer_tokens INTEGER NOT NULL", "billed_tokens INTEGER NOT NULL",
        "forced INTEGER NOT NULL", "answer TEXT NOT NULL", "latency_ms REAL NOT NULL", "policy_ms REAL NOT NULL",
        "status INTEGER NOT NULL", "user_key TEXT NOT NULL", "prompt TEXT", "created REAL NOT NULL",
        "correct INTEGER", "gold TEXT", "feedback_at REAL",
    ]  # fmt: skip
    connection = sqlite3.connect(path)
    connection.execute("CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT NOT NULL)")
    connection.execute("INSERT INTO meta VALUES ('log_version', '1')")
    connection.execute(f"CREATE TABLE decisions ({', '.join(columns)})")
    features = bytes(4 * 3)
    old_row = ("old", "A", "p", "completions", 0, "b4/greedy", 1, 4, "greedy", 1.0, features)
    connection.execute(
        "INSERT INTO decisions VALUES (?,?,?,?,?,?,?,?,?,?,?,0,4,2,6,0,'7',1.0,0.1,200,'u',NULL,1.0,NULL,NULL,NULL)",
        old_row,
    )
    connection.commit()
    connection.close()
    old = read_decisions(path)
    assert len(old) == 1 and np.isnan(old.cost_weight[0])
    # A server appending to it adds the column and keeps the old row.
    log = DecisionLog(path)
    log.append(DecisionRecord("new", "A", "p", "completions", False, "b4/greedy", 1, 4, "greedy", 1.0, features,
                              created=2.0, cost_weight=0.02))  # fmt: skip
    log.close()
    both = read_decisions(path)
    assert both.id == ["old", "new"] and np.isnan(both.cost_weight[0]) and both.cost_weight[1] == 0.02
