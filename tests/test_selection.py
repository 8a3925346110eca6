"""Model selection: the deployment gate, K-fold cross-validation and Optuna tuning."""

import json
import shutil

import numpy as np
import pytest
import torch
import yaml
from measures import policy_columns, questions_of, table_metrics
from typer.testing import CliRunner

from tokenopt.agents.common.hyperparams import ENV_IDS, check_keys, load_config
from tokenopt.agents.evaluation.cv import fold_splits
from tokenopt.agents.evaluation.gate import GateConfig, paired_bootstrap_lower_bound, run_gate
from tokenopt.agents.export import export_policy, export_run
from tokenopt.agents.ppo.train import TrainConfig, train
from tokenopt.agents.ppo.tune import GRID, objective_value, trials_to_run
from tokenopt.cli import app
from tokenopt.runtime import BudgetPolicy, PolicyLoadError
from tokenopt.table import OutcomeMatrix

runner = CliRunner(env={"COLUMNS": "2000"})  # rich wraps error messages at the console width
TINY = ["--timesteps", "4096", "--eval-freq", "2048"]


def _output(result):
    """The command's output with rich's line wrapping undone."""
    return " ".join(result.output.split())


@pytest.fixture(scope="module")
def tiny_policy(tmp_path_factory, demo_table):
    """A policy trained for 4,096 steps, exported."""
    run = tmp_path_factory.mktemp("gate") / "run"
    train(TrainConfig(table=str(demo_table), out=str(run), total_timesteps=4096, eval_freq=2048))
    return export_run(run)


@pytest.fixture(scope="module")
def worse_policy(tmp_path_factory, tiny_policy):
    """The tiny policy's network rewired to always pick the costliest action (b32/sc5)."""
    from stable_baselines3 import PPO

    model = PPO.load(tiny_policy.parent / "checkpoints" / "best_model.zip", device="cpu")
    reference = BudgetPolicy.load(tiny_policy)
    costliest = [action["name"] for action in reference.actions].index("b32/sc5")
    with torch.no_grad():
        model.policy.action_net.weight.zero_()
        model.policy.action_net.bias.fill_(-50.0)
        model.policy.action_net.bias[costliest] = 50.0
    return export_policy(
        [model],
        reference.obs_mean,
        reference.obs_var,
        tmp_path_factory.mktemp("worse") / "policy",
        actions=reference.actions,
        feature_spec=reference.spec["feature_spec"],  # type: ignore[arg-type]
    )


# --- gate ---------------------------------------------------------------------------------------------------------


def test_bootstrap_bound_is_seeded_and_exact_for_constant_differences():
    rng = np.random.default_rng(1)
    differences = rng.normal(0.1, 1.0, size=400)
    first = paired_bootstrap_lower_bound(differences, 0.95, 500, seed=3)
    assert first == paired_bootstrap_lower_bound(differences, 0.95, 500, seed=3)
    assert first[0] < differences.mean() < first[1]
    assert paired_bootstrap_lower_bound(np.full(50, 0.25), 0.95, 100, seed=0) == pytest.approx((0.25, 0.25))
    with pytest.raises(ValueError, match="at least one query"):
        paired_bootstrap_lower_bound(np.array([]), 0.95, 10, seed=0)


def test_gate_passes_a_policy_against_itself(tiny_policy, demo_table, tmp_path):
    report = tmp_path / "gate.json"
    result = runner.invoke(
        app,
        [
            "gate",
            str(tiny_policy),
            str(tiny_policy),
            "--table",
            str(demo_table),
            "--json",
            str(report),
            "--no-beat-fixed",
        ],  # fmt: skip
    )
    assert result.exit_code == 0, result.output
    assert "verdict: PASS" in _output(result)
    data = json.loads(report.read_text())
    assert data["passed"] is True
    assert data["reward_diff"] == 0.0
    assert data["reward_lower_bound"] == 0.0
    assert data["new"]["em"] == data["old"]["em"]


def test_gate_fails_a_clearly_worse_policy(tiny_policy, worse_policy, demo_table):
    result = run_gate(worse_policy, tiny_policy, GateConfig(table=str(demo_table)))
    assert not result.passed
    assert result.new.action_counts == {"b32/sc5": result.queries}
    assert result.reward_upper_bound < 0
    assert any("below" in reason for reason in result.reasons)
    cli = runner.invoke(app, ["gate", str(worse_policy), str(tiny_policy), "--table", str(demo_table)])
    assert cli.exit_code == 1, cli.output
    assert "verdict: FAIL" in _output(cli)
    # the other way round NEW is far better on reward; its EM is allowed any drop only with a wide margin
    better = run_gate(tiny_policy, worse_policy, GateConfig(table=str(demo_table), max_em_drop=100.0, beat_fixed=False))
    assert better.passed and better.reward_lower_bound > 0


def test_gate_refuses_a_policy_of_another_action_table(tiny_policy, demo_table, tmp_path):
    other = tmp_path / "other"
    shutil.copytree(tiny_policy, other)
    spec = json.loads((other / "policy.json").read_text())
    spec["actions"][-1]["name"] = "b64/beam3"
    (other / "policy.json").write_text(json.dumps(spec))
    result = runner.invoke(app, ["gate", str(other), str(tiny_policy), "--table", str(demo_table)])
    assert result.exit_code == 2
    assert "action table" in _output(result) and "b64/beam3" in _output(result)
    spec["feature_spec"]["alphabet"] = spec["feature_spec"]["alphabet"][::-1]
    spec["actions"][-1]["name"] = "b32/beam3"
    (other / "policy.json").write_text(json.dumps(spec))
    with pytest.raises(ValueError, match=r"feature spec differs from the table's in \['alphabet'"):
        run_gate(other, tiny_policy, GateConfig(table=str(demo_table)))


def test_gate_errors_on_empty_split_missing_policy_and_bad_settings(tiny_policy, demo_table, tmp_path):
    result = runner.invoke(app, ["gate", str(tiny_policy), str(tiny_policy), "--table", str(demo_table),
                                 "--split", "holdout"])  # fmt: skip
    assert result.exit_code == 2
    assert "no query in split 'holdout'" in _output(result)
    result = runner.invoke(app, ["gate", str(tmp_path / "nowhere"), str(tiny_policy), "--table", str(demo_table)])
    assert result.exit_code == 2
    assert "policy.json is missing" in _output(result)
    with pytest.raises(PolicyLoadError):
        run_gate(tmp_path / "nowhere", tiny_policy, GateConfig(table=str(demo_table)))
    with pytest.raises(ValueError, match=r"--confidence must be in \(0, 1\)"):
        run_gate(tiny_policy, tiny_policy, GateConfig(table=str(demo_table), confidence=1.5))


# --- cross-validation ---------------------------------------------------------------------------------------------


def test_fold_splits_partition_the_ids():
    ids = [f"q{i}" for i in range(103)]
    columns = fold_splits(ids, 4, seed=2)
    assert len(columns) == 4
    tests = [set(np.array(ids)[column == "test"]) for column in columns]
    assert set().union(*tests) == set(ids)
    assert sum(len(t) for t in tests) == len(ids)
    for column in columns:
        assert set(column) == {"train", "val", "test"}
        non_test = int((column != "test").sum())
        assert int((column == "val").sum()) == round(0.2 * non_test)
    again = fold_splits(ids, 4, seed=2)
    assert all((a == b).all() for a, b in zip(columns, again, strict=True))
    assert any((a != b).any() for a, b in zip(columns, fold_splits(ids, 4, seed=3), strict=True))


def test_cv_reports_two_folds_with_disjoint_train_and_test(demo_table, tmp_path):
    out = tmp_path / "cv"
    result = runner.invoke(app, ["cv", "--table", str(demo_table), "--folds", "2", "--out", str(out), *TINY])
    assert result.exit_code == 0, result.output
    data = json.loads((out / "cv.json").read_text())
    assert len(data["folds"]) == 2
    assert set(data["summary"]) == {"em", "tokens", "reward", "gap_recovered"}
    matrix, questions = OutcomeMatrix.from_table(demo_table), questions_of(demo_table)
    row_of = {query_id: i for i, query_id in enumerate(matrix.ids)}
    test_sets, recomputed = [], []
    for fold in (1, 2):
        splits = json.loads((out / f"fold-{fold}" / "splits.json").read_text())
        train_ids, val_ids, test_ids = (set(splits[name]) for name in ("train", "val", "test"))
        assert not train_ids & test_ids and not val_ids & test_ids and not train_ids & val_ids
        test_sets.append(test_ids)
        # The fold's test figures, recomputed from its exported policy on its own test queries.
        queries = matrix.take(np.array(sorted(row_of[query_id] for query_id in test_ids)))
        policy = BudgetPolicy.load(out / f"fold-{fold}" / "policy")
        recomputed.append(table_metrics(queries, policy_columns(policy, queries, questions), data["cost_weight"]))
    assert not test_sets[0] & test_sets[1]
    for fold, expected in zip(data["folds"], recomputed, strict=True):
        assert fold["test_queries"] == len(test_sets[fold["fold"] - 1])
        assert {key: fold["test_metrics"][key] for key in expected} == pytest.approx(expected, abs=1e-9)
    # mean ± std over the folds (sample std), from the recomputed figures; the table prints them.
    for metric in ("em", "tokens", "reward", "gap_recovered"):
        values = [expected[metric] for expected in recomputed]
        summary = {"mean": float(np.mean(values)), "std": float(np.std(values, ddof=1))}
        assert data["summary"][metric] == pytest.approx(summary, abs=1e-9), metric
    em = data["summary"]["em"]
    assert f"| mean ± std | | | | {em['mean']:.3f} ± {em['std']:.3f} |" in _output(result)


def test_cv_refuses_bad_fold_counts(demo_table, tmp_path):
    result = runner.invoke(app, ["cv", "--table", str(demo_table), "--folds", "100000", "--out", str(tmp_path)])
    assert result.exit_code == 2
    assert "100000" in _output(result) and "number of queries" in _output(result)
    assert "1500" in _output(result)
    result = runner.invoke(app, ["cv", "--table", str(demo_table), "--folds", "1", "--out", str(tmp_path)])
    assert result.exit_code == 2
    assert "between 2" in _output(result) and "got 1" in _output(result)


# --- tuning -------------------------------------------------------------------------------------------------------


def test_trial_budget_and_objective():
    assert trials_to_run(5, 2) == 3
    assert trials_to_run(5, 7) == 0
    grid = int(np.prod([len(v) for v in GRID.values()]))
    assert trials_to_run(100, 0, grid) == grid
    assert trials_to_run(100, grid, grid) == 0
    metrics = {"reward": 0.5, "tokens": 8.0, "em_drop_points": 2.0}
    assert objective_value(metrics, "reward", None) == 0.5
    assert objective_value(metrics, "tokens", 3.0) == -8.0
    assert objective_value(metrics, "tokens", 1.0) == -8.0 - 1000.0


def test_tune_writes_a_loadable_best_config_and_resumes(demo_table, tmp_path):
    import optuna

    out = tmp_path / "tune"
    args = ["tune", "--table", str(demo_table), "--sampler", "random", "--out", str(out), *TINY]
    first = runner.invoke(app, [*args, "--trials", "2"])
    assert first.exit_code == 0, first.output
    assert "best trial" in _output(first)
    env_id = ENV_IDS["budget"]
    hyperparams = load_config(out / "best.yml", env_id)
    check_keys(hyperparams, "best.yml")
    assert hyperparams["n_timesteps"] == 4096
    assert str(hyperparams["learning_rate"]).startswith("lin_")
    assert hyperparams["policy_kwargs"]["activation_fn"] == "tanh"
    assert set(hyperparams) == set(load_config(TrainConfig().config_file, env_id))
    storage = f"sqlite:///{out / 'study.db'}"
    assert len(optuna.load_study(study_name="tokenopt-tune", storage=storage).trials) == 2
    second = runner.invoke(app, [*args, "--trials", "3"])
    assert second.exit_code == 0, second.output
    trials = optuna.load_study(study_name="tokenopt-tune", storage=storage).trials
    assert len(trials) == 3
    assert len({json.dumps(t.params, sort_keys=True) for t in trials}) == 3
    assert "ran 1 trials" in _output(second)
    assert sorted(p.name for p in out.glob("trial-*")) == ["trial-000", "trial-001", "trial-002"]
    best = yaml.safe_load((out / "best.yml").read_text())
    assert list(best) == [env_id]
    # the same study with another objective is refused rather than mixed
    other = runner.invoke(app, [*args, "--trials", "4", "--cost-weight", "0.02"])
    assert other.exit_code == 2
    assert "other settings" in _output(other)


def test_tune_refuses_bad_settings(demo_table, tmp_path):
    base = ["tune", "--table", str(demo_table), "--out", str(tmp_path)]
    result = runner.invoke(app, [*base, "--sampler", "cmaes"])
    assert result.exit_code == 2 and "'cmaes'" in _output(result) and "tpe" in _output(result)
    result = runner.invoke(app, [*base, "--objective", "tokens"])
    assert result.exit_code == 2 and "--em-floor" in _output(result)
    result = runner.invoke(app, [*base, "--trials", "0"])
    assert result.exit_code == 2 and "at least 1" in _output(result)
