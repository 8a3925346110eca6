"""Honest figures: intervals over queries, the noise warning, the do-no-harm fallback, eval on any table."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pytest
from typer.testing import CliRunner

from tokenopt.agents.common.evaluation import query_questions
from tokenopt.agents.common.statistics import (
    bootstrap_intervals,
    paired_bootstrap_lower_bound,
    paired_bootstrap_means,
    seed_and_query_bootstrap,
)
from tokenopt.agents.evaluation.gate import GateConfig, run_gate
from tokenopt.agents.evaluation.no_harm import (
    apply_no_harm,
    no_harm_verdict,
    oracle_noise,
    split_figures,
    write_fallback_policy,
)
from tokenopt.cli import app
from tokenopt.cost import CostModel
from tokenopt.runtime import BudgetPolicy
from tokenopt.table import OutcomeMatrix, gap_recovered, load_outcomes, reference_rewards
from tokenopt.table.schema import MANIFEST_FILE, OUTCOMES_DIR, shard_path, write_json_atomic, write_table_atomic

runner = CliRunner(env={"COLUMNS": "2000"})


def _output(result) -> str:
    return " ".join(result.output.split())


# --- statistics (fast) ----------------------------------------------------------------------------------------------


def test_paired_bootstrap_means_resample_every_row_with_the_same_queries():
    rng = np.random.default_rng(0)
    a = rng.normal(size=300)
    means = paired_bootstrap_means(np.stack([a, a + 1.0, 2 * a]), resamples=400, seed=5)
    assert means.shape == (400, 3)
    # the same indices for every row: the differences of resampled means are exactly the shift
    assert np.allclose(means[:, 1] - means[:, 0], 1.0) and np.allclose(means[:, 2], 2 * means[:, 0])
    # a 1-D column gives the lower bound's own resampled means (one implementation, unchanged draws)
    single = paired_bootstrap_means(a, resamples=400, seed=5)
    assert np.allclose(single, means[:, 0], rtol=0, atol=1e-12)
    low, high = paired_bootstrap_lower_bound(a, 0.95, 400, seed=5)
    assert (low, high) == pytest.approx((np.quantile(single, 0.05), np.quantile(single, 0.95)), abs=1e-12)
    with pytest.raises(ValueError, match="at least one resample"):
        paired_bootstrap_means(a, resamples=0, seed=0)


def test_bootstrap_intervals_cover_the_mean_and_narrow_with_more_queries():
    rng = np.random.default_rng(1)
    small, large = rng.normal(0.3, 1.0, size=50), rng.normal(0.3, 1.0, size=5000)
    narrow = bootstrap_intervals({"x": large}, seed=0)["x"]
    wide = bootstrap_intervals({"x": small}, seed=0)["x"]
    assert narrow.low < large.mean() < narrow.high and wide.low < small.mean() < wide.high
    assert wide.half_width > 5 * narrow.half_width  # sqrt(100) = 10 times, up to the draw
    assert bootstrap_intervals({"x": small}, seed=0) == bootstrap_intervals({"x": small}, seed=0)
    ratio = bootstrap_intervals({"top": large, "bottom": large + 1.0}, ratios={"r": ("top", "bottom")})["r"]
    assert ratio.value == pytest.approx(large.mean() / (large.mean() + 1.0))
    assert ratio.low < ratio.value < ratio.high
    with pytest.raises(ValueError, match="one value per query"):
        bootstrap_intervals({"a": small, "b": large})
    with pytest.raises(ValueError, match="confidence"):
        bootstrap_intervals({"a": small}, confidence=1.5)


def test_the_seed_and_query_bootstrap_widens_with_the_seeds_luck_and_keeps_queries_paired():
    rng = np.random.default_rng(2)
    queries = rng.normal(0.5, 1.0, size=400)  # what every seed shares: each query's difficulty
    calm = np.stack([queries + rng.normal(0, 0.01, 400) for _ in range(3)])
    lucky = np.stack([queries + shift for shift in (-0.1, 0.0, 0.1)])  # each seed lucky or not on every query
    over_queries = bootstrap_intervals({"d": lucky.mean(axis=0) - calm.mean(axis=0)})["d"]
    both = seed_and_query_bootstrap(lucky, calm, seed=0)
    assert both.value == pytest.approx(lucky.mean() - calm.mean())
    # the queries are paired (their shared difficulty cancels), so without seed luck the interval is tiny ...
    assert seed_and_query_bootstrap(calm[:2], calm[1:], seed=0).half_width < 0.01
    # ... and the seeds' luck, which a bootstrap of the per-query mean cannot see, widens it many times
    assert over_queries.half_width < 0.005 and both.half_width > 5 * over_queries.half_width
    assert both.low < both.value < both.high
    assert seed_and_query_bootstrap(lucky, calm, seed=0) == both
    with pytest.raises(ValueError, match="same queries"):
        seed_and_query_bootstrap(lucky, calm[:, :10])


def _matrix(exact_match: np.ndarray, billed: np.ndarray) -> OutcomeMatrix:
    n, k = exact_match.shape
    actions = [f"b{4 * j}/greedy" for j in range(k)]
    return OutcomeMatrix([f"q{i}" for i in range(n)], np.array(["val"] * n, dtype=object), actions,
                         exact_match.astype(float), billed.astype(float), np.zeros(n))  # fmt: skip


def test_split_figures_match_the_point_figures_and_the_oracle_beats_fixed_only_with_a_clear_margin():
    rng = np.random.default_rng(2)
    n = 400
    # two actions: the cheap one right on 40% of queries, the dear one on the other 60% (and on some of the 40%)
    cheap_right = rng.random(n) < 0.4
    exact = np.stack([cheap_right, ~cheap_right | (rng.random(n) < 0.5)], axis=1).astype(float)
    billed = np.stack([np.zeros(n), np.full(n, 10.0)], axis=1)
    matrix, cost = _matrix(exact, billed), CostModel(0.01)
    oracle_columns = matrix.rewards(cost).argmax(axis=1)
    rows = np.arange(n)
    figures = split_figures(matrix, exact[rows, oracle_columns], billed[rows, oracle_columns], cost)
    oracle_reward, best_fixed = reference_rewards(matrix, cost)
    assert figures["reward"].value == pytest.approx(oracle_reward)
    assert figures["gap_recovered"].value == pytest.approx(1.0)
    assert figures["tokens"].low < figures["tokens"].value < figures["tokens"].high
    fixed = int(np.argmax(matrix.rewards(cost).mean(axis=0)))
    at_fixed = split_figures(matrix, exact[:, fixed], billed[:, fixed], cost)
    assert at_fixed["gap_recovered"].value == pytest.approx(gap_recovered(best_fixed, best_fixed, oracle_reward))
    # the oracle clears the fixed action by far more than the noise: it ships; the fixed action itself does not
    assert no_harm_verdict(matrix, oracle_columns, cost, "val").beats_fixed
    same = no_harm_verdict(matrix, np.full(n, fixed), cost, "val")
    assert not same.beats_fixed and same.reward_diff == 0.0 and "not above 0" in same.reason
    assert not oracle_noise(matrix, cost, "val").within_noise


def test_the_noise_warning_fires_when_the_oracle_margin_is_a_few_lucky_queries():
    n = 60
    exact = np.zeros((n, 2))
    exact[:, 0] = 1.0
    exact[:2, 1], exact[:2, 0] = 1.0, 0.0  # the dear action is better on 2 queries of 60
    billed = np.stack([np.zeros(n), np.full(n, 5.0)], axis=1)
    check = oracle_noise(_matrix(exact, billed), CostModel(0.01), "test", seed=0)
    assert check.within_noise and check.warning is not None
    assert "within the split's noise" in check.warning and "gap recovered can move by 1.0" in check.warning
    assert check.margin == pytest.approx(2 * 0.95 / 60)
    flat = oracle_noise(_matrix(np.ones((n, 2)), billed), CostModel(0.01), "test")
    assert flat.within_noise and flat.margin == 0.0  # no margin at all: within any noise


# --- a greedy-only table, eval, train's fallback, gate, serve (slow: they need the demo table) -------------------


def _derive_table(source: Path, out: Path, keep: set[str]) -> Path:
    """A copy of an outcome table with only the actions in ``keep`` (as if collected with fewer of them)."""
    out.mkdir(parents=True)
    for name in ("features.parquet", "queries.parquet"):
        shutil.copy(source / name, out / name)
    outcomes = load_outcomes(source)
    kept = outcomes.filter(pc.is_in(outcomes.column("action"), value_set=pa.array(sorted(keep))))
    (out / OUTCOMES_DIR).mkdir()
    write_table_atomic(kept, shard_path(out, 0))
    manifest = json.loads((source / MANIFEST_FILE).read_text())
    manifest["actions"] = [a for a in manifest["actions"] if a["name"] in keep]
    manifest["settings"]["modes"] = list(dict.fromkeys(a["mode"] for a in manifest["actions"]))
    manifest["settings"]["budgets"] = sorted({a["budget"] for a in manifest["actions"]})
    manifest |= {"rows": kept.num_rows, "shards": 1}
    write_json_atomic(manifest, out / MANIFEST_FILE)
    return out


@pytest.fixture(scope="module")
def greedy_table(tmp_path_factory, demo_table) -> Path:
    """The demo table with only its greedy rows: what a user with a slow model starts with."""
    actions = json.loads((demo_table / MANIFEST_FILE).read_text())["actions"]
    greedy = {a["name"] for a in actions if a["mode"] == "greedy"}
    return _derive_table(demo_table, tmp_path_factory.mktemp("greedy") / "table", greedy)


def _train(table: Path, out: Path, *extra: str) -> str:
    args = ["train", "--table", str(table), "--out", str(out), "--eval-freq", "1024", *extra]
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    return _output(result)


@pytest.fixture(scope="module")
def greedy_run(tmp_path_factory, greedy_table) -> tuple[Path, str]:
    """``tokenopt train`` for 4,096 steps on the greedy table at lambda 0.01 (run folder, printed output)."""
    run = tmp_path_factory.mktemp("greedy_run") / "run"
    return run, _train(greedy_table, run, "--total-timesteps", "4096")


@pytest.fixture(scope="module")
def fallback_run(tmp_path_factory, greedy_table) -> tuple[Path, str]:
    """Training at lambda 2 per token, where no query gains from reasoning: answering directly (b0) earns the most
    on every query, so no policy can beat the best fixed action and train must fall back to it."""
    run = tmp_path_factory.mktemp("fallback_run") / "run"
    return run, _train(greedy_table, run, "--total-timesteps", "2048", "--cost-weight", "2")


def test_eval_runs_on_a_greedy_only_table_and_says_what_it_left_out(tmp_path, greedy_run, greedy_table):
    run, _ = greedy_run
    out = tmp_path / "eval"
    args = ["eval", str(run), "--table", str(greedy_table), "--out", str(out), "--cost-weights", "0.01"]
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    text = _output(result)
    assert "Adaptive-Consistency-style: left out, the table has no sc<k> mode" in text
    report = json.loads((out / "report.json").read_text())
    assert set(report["left_out"]) == {"Adaptive-Consistency-style"}
    rows = report["per_weight"][0]["rows"]
    methods = [r["method"] for r in rows]
    assert "Adaptive-Consistency-style" not in methods and "fixed" in methods and "DEER-style" in methods
    for r in rows:  # every figure comes with an interval around it
        for key in ("em", "tokens", "reward", "gap_recovered"):
            low, high = r["ci"][key]
            assert low - 1e-9 <= r[key] <= high + 1e-9, (r["method"], key)
    policy = rows[0]
    for r in rows[1:]:
        assert r["policy_minus"]["diff"] == pytest.approx(policy["reward"] - r["reward"])
    oracle = next(r for r in rows if r["method"] == "oracle")
    assert oracle["policy_minus"]["ci"][1] <= 1e-12  # the oracle is never beaten on any resample
    markdown = (out / "report.md").read_text()
    assert "Adaptive-Consistency-style: left out, the table has no sc<k> mode" in markdown
    assert f"{policy['reward']:.3f} [{policy['ci']['reward'][0]:.3f}, {policy['ci']['reward'][1]:.3f}]" in markdown
    assert "noise" in report["per_weight"][0]


def test_eval_runs_on_a_table_of_one_budget_per_mode(tmp_path, demo_table):
    table = _derive_table(demo_table, tmp_path / "table", {"b16/greedy", "b16/sc5", "b16/beam3"})
    _train(table, tmp_path / "run", "--total-timesteps", "1024")
    out = tmp_path / "eval"
    result = runner.invoke(app, ["eval", str(tmp_path / "run"), "--table", str(table), "--out", str(out),
                                 "--cost-weights", "0.01"])  # fmt: skip
    assert result.exit_code == 0, result.output
    report = json.loads((out / "report.json").read_text())
    assert report["left_out"] == {
        "Dynasor-style": "no mode of the table has 2 or more budgets, so no 2 probes can agree"
    }
    assert "Dynasor-style: left out, no mode of the table has 2 or more budgets" in _output(result)
    methods = {r["method"] for r in report["per_weight"][0]["rows"]}
    assert {"DEER-style", "Adaptive-Consistency-style", "TALE-style", "fixed"} <= methods
    deer = next(r for r in report["per_weight"][0]["rows"] if r["method"] == "DEER-style")
    assert ", from b16, " in deer["setting"]  # its ladder starts where the table does


def test_train_keeps_a_policy_that_beats_the_best_fixed_action_beyond_the_noise(greedy_run):
    run, printed = greedy_run
    record = json.loads((run / "no_harm.json").read_text())
    assert record["verdict"]["beats_fixed"] and record["verdict"]["lower_bound"] > 0 and not record["fallback"]
    assert "do no harm: passed" in printed and "95% bootstrap intervals" in printed
    low, high = record["figures"]["reward"][1:]
    assert low < record["verdict"]["policy_reward"] < high
    assert BudgetPolicy.load(run / "policy").fallback is None and not (run / "policy-learned").exists()


def test_train_falls_back_to_the_best_fixed_action_when_it_cannot_beat_it(fallback_run, greedy_table):
    run, printed = fallback_run
    record = json.loads((run / "no_harm.json").read_text())
    verdict = record["verdict"]
    assert verdict["lower_bound"] <= 0 and not verdict["beats_fixed"] and record["fallback"]
    assert verdict["fixed_action"] == "b0/greedy"
    assert "do no harm:" in printed and f"always picks {verdict['fixed_action']}" in printed
    assert "--no-fallback" in printed and "95% bootstrap intervals" in printed
    assert record["noise"]["within_noise"] and "within the split's noise" in printed  # the oracle has no margin
    fallback = BudgetPolicy.load(run / "policy")
    assert fallback.fallback is not None and fallback.fallback["action"] == verdict["fixed_action"]
    assert fallback.fallback["verdict"]["lower_bound"] == verdict["lower_bound"]
    texts = list(query_questions(greedy_table).values())[:200]
    assert {d.action for d in fallback.decide_batch(texts)} == {verdict["fixed_action"]}
    learned = BudgetPolicy.load(run / "policy-learned")
    assert learned.fallback is None and len({d.action for d in learned.decide_batch(texts)}) >= 1
    # the fallback's val reward is the fixed action's, which the learned one did not beat
    matrix = OutcomeMatrix.from_table(greedy_table).subset("val")
    column = matrix.actions.index(verdict["fixed_action"])
    assert matrix.rewards(CostModel(2.0))[:, column].mean() == pytest.approx(verdict["fixed_reward"])
    # the gate applies the same rule: the learned policy fails it, the fallback passes it
    gate = run_gate(
        run / "policy-learned", run / "policy", GateConfig(table=str(greedy_table), cost_weight=2.0, max_em_drop=100.0)
    )
    assert gate.no_harm is not None and not gate.no_harm["beats_fixed"] and not gate.passed
    assert any("do no harm (failed" in reason for reason in gate.reasons)
    back = run_gate(
        run / "policy", run / "policy-learned", GateConfig(table=str(greedy_table), cost_weight=2.0, max_em_drop=100.0)
    )
    assert back.no_harm is None and any("is a fallback" in reason for reason in back.reasons)
    learned = run / "policy-learned"
    off = run_gate(learned, learned, GateConfig(table=str(greedy_table), cost_weight=2.0, beat_fixed=False))
    assert off.passed and off.no_harm is None


def test_an_ensemble_that_cannot_beat_the_best_fixed_action_is_not_shipped(tmp_path, greedy_table):
    # As fallback_run, with two seeds and --ensemble: what is shipped (OUT/policy, the ensemble) falls back too.
    out = tmp_path / "ens"
    printed = _train(greedy_table, out, "--total-timesteps", "2048", "--cost-weight", "2", "--seeds", "2", "--ensemble")
    record = json.loads((out / "no_harm.json").read_text())
    assert record["fallback"] and not record["verdict"]["beats_fixed"]
    assert record["verdict"]["fixed_action"] == "b0/greedy"
    shipped, learned = BudgetPolicy.load(out / "policy"), BudgetPolicy.load(out / "policy-learned")
    assert shipped.fallback is not None and shipped.fallback["action"] == "b0/greedy"
    assert len(learned.members) == 2 and learned.fallback is None
    texts = list(query_questions(greedy_table).values())[:100]
    assert {d.action for d in shipped.decide_batch(texts)} == {"b0/greedy"}
    assert f"ensemble of the 2 seeds ({out / 'policy'}):" in printed and "always picks b0/greedy" in printed
    assert f"The ensemble ({out / 'policy-learned'})" in printed
    # the members keep their learned policies, as before
    for seed in (0, 1):
        assert BudgetPolicy.load(out / f"seed-{seed}" / "policy").fallback is None


def test_no_fallback_keeps_the_learned_policy_and_a_rerun_restores_it(fallback_run, tmp_path):
    run, _ = fallback_run
    copy = tmp_path / "run"
    shutil.copytree(run, copy)
    config = copy / "config.yml"
    config.write_text(config.read_text().replace(str(run), str(copy)))
    record = apply_no_harm(copy, fallback=False)
    assert record is not None and not record["fallback"]
    assert BudgetPolicy.load(copy / "policy").fallback is None and not (copy / "policy-learned").exists()
    # `tokenopt export` applies the same rule, and --no-fallback exports the learned policy
    exported = runner.invoke(app, ["export", str(copy)])
    assert exported.exit_code == 0, exported.output
    assert BudgetPolicy.load(copy / "policy").fallback is not None and (copy / "policy-learned").is_dir()
    assert "always picks b0/greedy" in _output(exported)
    exported = runner.invoke(app, ["export", str(copy), "--no-fallback"])
    assert exported.exit_code == 0, exported.output
    assert BudgetPolicy.load(copy / "policy").fallback is None and not (copy / "policy-learned").exists()
    assert "Exported the learned policy anyway" in _output(exported)
    with pytest.raises(ValueError, match="not in the policy's action table"):
        write_fallback_policy(copy / "policy", tmp_path / "bad", "b99/greedy", {})


def test_the_server_loads_a_fallback_policy_and_answers_with_its_action(fallback_run, tmp_path):
    import httpx
    from serving import running_server

    from tokenopt.serve import ServeConfig

    run, _ = fallback_run
    action = BudgetPolicy.load(run / "policy").fallback["action"]  # type: ignore[index]
    config = ServeConfig(policy=run / "policy", log=tmp_path / "decisions.sqlite", device="cpu", port=0)
    with running_server(config) as (url, _):
        for question in ("A 3 4?", "M 1 9 1?"):
            response = httpx.post(f"{url}/v1/completions", json={"model": "demo", "prompt": question}, timeout=60)
            assert response.status_code == 200, response.text
            assert response.json()["tokenopt"]["action"] == action
