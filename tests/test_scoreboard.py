"""`tokenopt eval`: the replayed baselines, the curves and the report."""

import json
import shutil

import numpy as np
import pytest
from typer.testing import CliRunner

from tokenopt.agents.evaluation.baselines import (
    ReplayTable,
    adaptive_consistency_points,
    dynasor_points,
    fixed_points,
    router_points,
    tale_points,
)
from tokenopt.agents.evaluation.scoreboard import area_under, curve_at, envelope, tokens_to_reach
from tokenopt.agents.export import export_run
from tokenopt.agents.ppo.train import TrainConfig, train
from tokenopt.cli import app


@pytest.fixture(scope="module")
def replay(demo_table):
    return ReplayTable.load(demo_table)


def test_envelope_is_concave_and_drops_dominated_points():
    tokens = np.array([1.0, 2.0, 3.0, 4.0, 10.0, 5.0])
    em = np.array([0.2, 0.3, 0.7, 0.6, 0.8, 0.75])
    xs, ys = envelope(tokens, em)
    # (2, 0.3) lies under the chord from (1, 0.2) to (3, 0.7); (4, 0.6) is dominated.
    assert xs.tolist() == [1.0, 3.0, 5.0, 10.0]
    slopes = np.diff(ys) / np.diff(xs)
    assert np.all(np.diff(slopes) <= 1e-12)
    assert curve_at((xs, ys), 2.0) == pytest.approx(0.45)
    assert curve_at((xs, ys), 0.5) == -np.inf
    assert curve_at((xs, ys), 50.0) == pytest.approx(0.8)
    assert tokens_to_reach((xs, ys), 0.45) == pytest.approx(2.0)
    assert tokens_to_reach((xs, ys), 0.9) is None
    assert area_under((xs, ys), 10.0) == pytest.approx(
        np.trapezoid(np.interp(np.linspace(1, 10, 100001), xs, ys), np.linspace(1, 10, 100001)) / 10.0, abs=1e-4
    )


def test_fixed_points_match_the_matrix(replay):
    points = fixed_points(replay)
    assert [p.setting for p in points] == replay.matrix.actions
    assert points[3].em == pytest.approx(replay.matrix.exact_match[:, 3].mean())


def test_adaptive_consistency_decided_rule_keeps_the_vote_and_bills_less(replay):
    sc = [j for j, name in enumerate(replay.matrix.actions) if name.endswith("/sc5")]
    points = {p.setting: p for p in adaptive_consistency_points(replay)}
    for j in sc:
        decided = points[f"{replay.matrix.actions[j]}, decided"]
        # Stopping once the leader cannot be overtaken returns the full vote's answer ...
        assert np.array_equal(decided.exact_match, replay.matrix.exact_match[:, j])
        # ... for fewer samples, never more.
        assert np.all(decided.billed_tokens <= replay.matrix.billed_tokens[:, j] + 1e-9)
        assert decided.tokens < replay.matrix.billed_tokens[:, j].mean()
        looser = points[f"{replay.matrix.actions[j]}, Beta >= 0.75"]
        assert looser.tokens <= decided.tokens + 1e-9


def test_dynasor_bills_every_probe(replay):
    points = dynasor_points(replay)
    ladder = replay.ladder("greedy")
    point = next(p for p in points if p.setting == "greedy, from b0, 2 agree")
    rows = np.arange(len(point.actions))
    # An exit at budget b bills the reasoning up to b plus at least two probes (cue + answer each).
    assert np.all(point.billed_tokens >= replay.reasoning_tokens[rows, point.actions] + 2 * 2 - 1e-9)
    assert set(np.unique(point.actions)) <= set(ladder)
    stricter = next(p for p in points if p.setting == "greedy, from b0, 3 agree")
    assert stricter.tokens >= point.tokens


def test_tale_margin_spends_more_and_router_spans_cheap_to_strong(replay):
    train_r, val_r, test_r = (replay.subset(s) for s in ("train", "val", "test"))
    tale = {p.setting: p for p in tale_points(train_r, val_r, [test_r])[0]}
    assert tale["greedy, margin 2"].tokens >= tale["greedy, margin 0"].tokens
    assert tale["greedy, margin 2"].em >= tale["greedy, margin 0"].em
    routes = router_points(train_r, val_r, [test_r])[0]
    assert len(routes) >= 11
    tokens = [p.tokens for p in routes]
    assert max(tokens) > 2 * min(tokens)


@pytest.fixture(scope="module")
def small_run(tmp_path_factory, demo_table):
    run = tmp_path_factory.mktemp("eval") / "run"
    train(TrainConfig(table=str(demo_table), out=str(run), total_timesteps=8192, eval_freq=4096))
    export_run(run)
    return run


def test_eval_cli_writes_the_report_plots_and_tensorboard(tmp_path, small_run, demo_table):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    out = tmp_path / "eval"
    args = ["eval", str(small_run), "--table", str(demo_table), "--out", str(out)]
    result = CliRunner().invoke(app, [*args, "--cost-weights", "0.005,0.01", "--total-timesteps", "4096"])
    assert result.exit_code == 0, result.output
    report = json.loads((out / "report.json").read_text())
    assert [w["cost_weight"] for w in report["per_weight"]] == [0.005, 0.01]
    methods = {r["method"] for r in report["per_weight"][0]["rows"]}
    assert methods == {
        "tokenopt policy", "oracle", "fixed", "TALE-style", "Dynasor-style", "DEER-style",
        "Adaptive-Consistency-style", "RouteLLM-style", "CLEAR-style",
    }  # fmt: skip
    oracle = next(r for r in report["per_weight"][1]["rows"] if r["method"] == "oracle")
    assert oracle["gap_recovered"] == pytest.approx(1.0)
    assert all(r["reward"] <= oracle["reward"] + 1e-9 for r in report["per_weight"][1]["rows"])
    assert report["bar"]["weights"] == 2
    assert (out / "sweep" / "lambda-0.005" / "policy" / "policy.json").is_file()
    for name in ("report.md", "em_vs_tokens.png", "action_mix.png"):
        assert (out / name).stat().st_size > 1000, name
    assert "Cost weight 0.005" in (out / "report.md").read_text()
    events = EventAccumulator(str(out / "tb")).Reload()
    assert "scoreboard/em_vs_tokens" in events.Tags()["images"]
    assert len(events.Scalars("scoreboard/tokenopt_policy/reward")) == 2


def test_eval_refuses_a_policy_for_another_action_table(tmp_path, small_run, demo_table):
    policy = tmp_path / "policy"
    shutil.copytree(small_run / "policy", policy)
    spec = json.loads((policy / "policy.json").read_text())
    spec["actions"] = spec["actions"][:-1]
    (policy / "policy.json").write_text(json.dumps(spec))
    result = CliRunner().invoke(app, ["eval", str(policy), "--table", str(demo_table), "--out", str(tmp_path / "o")])
    assert result.exit_code == 2
    assert "action table" in result.output


def test_eval_refuses_an_old_schema_and_an_empty_split(tmp_path, small_run, demo_table):
    old = tmp_path / "old"
    shutil.copytree(demo_table, old)
    manifest = json.loads((old / "manifest.json").read_text())
    manifest["schema_version"] = 1
    (old / "manifest.json").write_text(json.dumps(manifest))
    result = CliRunner().invoke(app, ["eval", str(small_run), "--table", str(old), "--out", str(tmp_path / "o")])
    assert result.exit_code == 2 and "schema version 1" in result.output
    args = ["eval", str(small_run), "--table", str(demo_table), "--split", "holdout", "--out", str(tmp_path / "o")]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 2 and "holdout" in result.output
