"""PPO training, export and the numpy runtime on a demo outcome table."""

import json
import subprocess
import sys
import textwrap

import numpy as np
import pyarrow.parquet as pq
import pytest
import yaml

from tokenopt.agents.common.evaluation import evaluate_policy
from tokenopt.agents.export import export_run
from tokenopt.agents.ppo.train import TrainConfig, train
from tokenopt.cost import CostModel
from tokenopt.runtime import BudgetPolicy, PolicyLoadError
from tokenopt.table import OutcomeMatrix


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory, demo_table):
    run = tmp_path_factory.mktemp("train") / "run"
    result = train(TrainConfig(table=str(demo_table), out=str(run), total_timesteps=30_000, eval_freq=4096))
    export_run(run)
    return run, result


def test_short_training_beats_the_best_fixed_action(trained_run, demo_table):
    _, result = trained_run
    best = result.best_metrics
    assert best["reward"] > best["best_fixed_reward"]
    assert best["gap_recovered"] > 0.3
    rows, _ = evaluate_policy(trained_run[0] / "policy", demo_table, "test")
    by_method = {row.method: row for row in rows}
    assert by_method["tokenopt policy"].reward > max(r.reward for r in rows if r.method.startswith("fixed "))


def test_run_folder_records_config_and_command(trained_run):
    run, _ = trained_run
    config = yaml.safe_load((run / "config.yml").read_text())
    assert config["resolved_hyperparams"]["n_steps"] == 128
    assert (run / "command.txt").read_text().startswith("tokenopt")
    assert (run / "checkpoints" / "best_model.zip").is_file()


def test_tensorboard_has_the_validation_scalars(trained_run):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    run, _ = trained_run
    events = EventAccumulator(str(run / "tb")).Reload()
    scalars = set(events.Tags()["scalars"])
    for tag in ("eval/em", "eval/tokens", "eval/reward", "eval/gap_recovered", "train/lambda", "eval/overfit_gap"):
        assert tag in scalars, tag
    assert len(events.Scalars("eval/reward")) >= 3
    assert "rollout/ep_rew_mean" in scalars or "train/loss" in scalars
    images = set(events.Tags()["images"])
    assert {"figures/em_vs_tokens", "figures/action_mix"} <= images


def test_runtime_matches_model_predict(trained_run, demo_table):
    from stable_baselines3 import PPO
    from stable_baselines3.common.vec_env import VecNormalize

    run, _ = trained_run
    policy = BudgetPolicy.load(run / "policy")
    model = PPO.load(run / "checkpoints" / "best_model.zip", device="cpu")
    import pickle

    normalizer: VecNormalize = pickle.loads((run / "checkpoints" / "vecnormalize.pkl").read_bytes())
    matrix = OutcomeMatrix.from_table(demo_table)
    rng = np.random.default_rng(0)
    observations = matrix.features[rng.integers(len(matrix.ids), size=1000)]
    observations = observations + rng.normal(0, 0.5, observations.shape).astype(np.float32)
    expected, _ = model.predict(normalizer.normalize_obs(observations), deterministic=True)
    chosen = policy.probabilities(observations).argmax(axis=1)
    np.testing.assert_array_equal(chosen, expected)


def test_runtime_features_equal_the_collected_ones(trained_run, demo_table):
    run, _ = trained_run
    policy = BudgetPolicy.load(run / "policy")
    features = pq.read_table(demo_table / "features.parquet")
    questions = pq.read_table(demo_table / "queries.parquet", columns=["question"]).column("question").to_pylist()
    stored = np.array(features.column("features").to_pylist()[:50], dtype=np.float32)
    np.testing.assert_array_equal(policy.features.batch(questions[:50]), stored)
    decision = policy.decide(questions[0])
    assert decision.max_new_tokens == decision.budget + 9
    assert decision.probabilities.sum() == pytest.approx(1.0)


def test_runtime_imports_numpy_only(trained_run):
    run, _ = trained_run
    script = textwrap.dedent(
        f"""
        import sys
        from tokenopt.runtime import BudgetPolicy
        policy = BudgetPolicy.load({str(run / "policy")!r})
        print(policy.decide("C 3+4*2-5?").action)
        heavy = [name for name in ("torch", "transformers", "stable_baselines3", "gymnasium", "pyarrow")
                 if name in sys.modules]
        print(heavy)
        """
    )
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True)
    action, heavy = result.stdout.strip().splitlines()
    assert action.startswith("b")
    assert heavy == "[]"


def test_bad_artifacts_are_refused(trained_run, tmp_path):
    import shutil

    run, _ = trained_run
    copy = tmp_path / "policy"
    shutil.copytree(run / "policy", copy)
    weights = copy / "policy.npz"
    data = bytearray(weights.read_bytes())
    data[-100] ^= 0xFF
    weights.write_bytes(bytes(data))
    with pytest.raises(PolicyLoadError, match="does not match the sha256"):
        BudgetPolicy.load(copy)
    shutil.copy(run / "policy" / "policy.npz", weights)
    spec = json.loads((copy / "policy.json").read_text())
    (copy / "policy.json").write_text(json.dumps(spec | {"format_version": 99}))
    with pytest.raises(PolicyLoadError, match="format version 99"):
        BudgetPolicy.load(copy)
    other_spec = spec | {"feature_spec": spec["feature_spec"] | {"version": 7}}
    (copy / "policy.json").write_text(json.dumps(other_spec))
    with pytest.raises(PolicyLoadError, match="feature spec mismatch"):
        BudgetPolicy.load(copy)
    weights.unlink()
    with pytest.raises(PolicyLoadError, match="policy.npz is missing"):
        BudgetPolicy.load(copy)


def test_unknown_hyperparameter_names_its_closest_match(demo_table, tmp_path):
    with pytest.raises(ValueError, match="unknown hyperparameter 'ent_coeff'.*'ent_coef'"):
        train(TrainConfig(table=str(demo_table), out=str(tmp_path / "r"), hyperparams={"ent_coeff": 0.1}))


def test_token_target_adapts_lambda(demo_table, tmp_path):
    run = tmp_path / "constrained"
    result = train(
        TrainConfig(
            table=str(demo_table), out=str(run), total_timesteps=24_000, eval_freq=4096, cost_weight=0.001,
            token_target=6.0,
        )
    )  # fmt: skip
    assert result.cost_weight > 0.001
    summary = json.loads((run / "training.json").read_text())
    assert summary["cost_weight"] > 0.001
    matrix = OutcomeMatrix.from_table(demo_table).subset("val")
    unconstrained_tokens = matrix.billed_tokens.mean(axis=0).max()
    assert result.best_metrics["tokens"] < unconstrained_tokens
    assert CostModel(result.cost_weight).cost_weight == result.cost_weight


def test_maskable_ppo_trains_and_exports(demo_table, tmp_path):
    run = tmp_path / "maskable"
    result = train(
        TrainConfig(table=str(demo_table), out=str(run), algo="maskable_ppo", total_timesteps=8192, eval_freq=4096)
    )
    assert result.timesteps >= 8192
    export_run(run)
    assert BudgetPolicy.load(run / "policy").decide("M 1 9 3?").action.startswith("b")


def test_stream_training_exports_a_policy_with_budget_inputs(demo_table, tmp_path):
    run = tmp_path / "stream"
    result = train(TrainConfig(table=str(demo_table), out=str(run), env="stream", total_timesteps=8192, eval_freq=4096))
    assert 0.0 <= result.best_metrics["em"] <= 1.0
    assert result.best_metrics["tokens"] > 0
    export_run(run)
    policy = BudgetPolicy.load(run / "policy")
    assert policy.extra_inputs == ["budget_left_fraction", "queries_left_fraction"]
    with pytest.raises(ValueError, match="also needs the inputs"):
        policy.decide("C 1+2?")
    decision = policy.decide("C 1+2?", extras=np.array([0.5, 0.25]))
    assert decision.probabilities.shape == (len(policy.actions),)


def test_onnx_export_gives_the_same_actions(trained_run, demo_table):
    import onnxruntime

    run, _ = trained_run
    export_run(run, onnx=True)
    policy = BudgetPolicy.load(run / "policy")
    matrix = OutcomeMatrix.from_table(demo_table)
    observations = matrix.features[:300].astype(np.float64)
    normalized = np.clip((observations - policy.obs_mean) / np.sqrt(policy.obs_var + policy.epsilon), -10, 10)
    session = onnxruntime.InferenceSession(str(run / "policy" / "policy.onnx"))
    (logits,) = session.run(None, {"observation": normalized.astype(np.float32)})
    np.testing.assert_array_equal(logits.argmax(axis=1), policy.probabilities(observations).argmax(axis=1))
