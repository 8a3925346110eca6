"""Seed ensembles (policy format 2) and warm starts (``tokenopt train --init-from``)."""

import json
import pickle
import shutil

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
import yaml
from measures import policy_metrics
from typer.testing import CliRunner

from tokenopt.agents.export import export_ensemble, export_run
from tokenopt.agents.ppo.train import TrainConfig, train
from tokenopt.agents.ppo.warm_start import layerwise_lr_algo, layerwise_optimizer, load_init_source, warm_start
from tokenopt.cli import app
from tokenopt.cost import CostModel
from tokenopt.runtime import FORMAT_VERSION, BudgetPolicy, PolicyLoadError
from tokenopt.table import OutcomeMatrix, load_manifest

TINY = ["--total-timesteps", "4096", "--eval-freq", "2048"]


@pytest.fixture(scope="module")
def seed_runs(tmp_path_factory, demo_table):
    """`tokenopt train --seeds 2 --ensemble` with tiny trainings: OUT, and the CLI's result."""
    out = tmp_path_factory.mktemp("seeds") / "out"
    command = ["train", "--table", str(demo_table), "--out", str(out), "--seeds", "2", "--ensemble", "--seed", "3"]
    result = CliRunner().invoke(app, [*command, *TINY])
    return out, result


@pytest.fixture(scope="module")
def questions(demo_table):
    return pq.read_table(demo_table / "queries.parquet", columns=["question"]).column("question").to_pylist()[:200]


def _fresh_model(demo_table, *, algo_class=None, seed=11, **ppo_kwargs):
    """A new PPO model on the demo table with train()'s default network, and its VecNormalize."""
    from stable_baselines3 import PPO
    from stable_baselines3.common.env_util import make_vec_env
    from stable_baselines3.common.vec_env import VecNormalize

    from tokenopt.envs import TableSource, TokenBudgetEnv

    matrix = OutcomeMatrix.from_table(demo_table)
    vec_env = make_vec_env(TokenBudgetEnv, n_envs=2, seed=seed, env_kwargs={"source": TableSource(matrix, "train")})
    vec_env = VecNormalize(vec_env, norm_reward=False, clip_obs=10.0)
    policy_kwargs = {"net_arch": {"pi": [64, 64], "vf": [64, 64]}, "activation_fn": torch.nn.Tanh}
    kwargs = {"n_steps": 64, "batch_size": 64, "n_epochs": 2, "gamma": 0.0} | ppo_kwargs
    model = (algo_class or PPO)("MlpPolicy", vec_env, policy_kwargs=policy_kwargs, seed=seed, device="cpu", **kwargs)
    return model, vec_env


def _action_names(demo_table):
    return [action["name"] for action in load_manifest(demo_table)["actions"]]


def test_cli_trains_the_seeds_and_reports_the_ensemble(seed_runs, demo_table):
    out, result = seed_runs
    assert result.exit_code == 0, result.output
    for seed in (3, 4):
        assert (out / f"seed-{seed}" / "checkpoints" / "best_model.zip").is_file()
        assert yaml.safe_load((out / f"seed-{seed}" / "config.yml").read_text())["seed"] == seed
        assert (out / f"seed-{seed}" / "policy" / "policy.json").is_file()
    report = json.loads((out / "ensemble.json").read_text())
    assert [single["policy"] for single in report["singles"]] == ["seed 3", "seed 4"]
    assert report["split"] == "test" and report["queries"] > 0
    assert report["queries"] == int((OutcomeMatrix.from_table(demo_table).splits == "test").sum())
    # Every entry is that policy's test figures, recomputed here from the table's columns.
    policies = [out / "seed-3" / "policy", out / "seed-4" / "policy", out / "policy"]
    for entry, policy in zip([*report["singles"], report["ensemble"]], policies, strict=True):
        expected = policy_metrics(policy, demo_table, "test", report["cost_weight"])
        assert {key: entry[key] for key in expected} == pytest.approx(expected, abs=1e-9), entry["policy"]
    for key in ("em", "tokens", "reward", "gap_recovered"):
        mean = np.mean([single[key] for single in report["singles"]])
        assert report["mean_single"][key] == pytest.approx(mean, abs=1e-12), key
    assert report["best_single"] == max(report["singles"], key=lambda single: single["reward"])["policy"]
    assert "| ensemble |" in result.output and "| seed 4 |" in result.output
    # with 95% intervals over the test queries, and the paired difference to the best fixed action
    test = OutcomeMatrix.from_table(demo_table).subset("test")
    best_fixed = float(test.rewards(CostModel(report["cost_weight"])).mean(axis=0).max())
    for entry in [*report["singles"], report["ensemble"]]:
        for key in ("em", "tokens", "reward", "gap_recovered"):
            low, high = entry["ci"][key]
            assert low - 1e-9 <= entry[key] <= high + 1e-9 and low < high, (entry["policy"], key)
        assert entry["reward"] - entry["reward_minus_best_fixed"][0] == pytest.approx(best_fixed, abs=1e-9)
    assert f"| reward minus best fixed {report['best_fixed_action']} |" in result.output


def test_ensemble_probabilities_are_the_mean_of_its_members(seed_runs, questions):
    out, _ = seed_runs
    ensemble = BudgetPolicy.load(out / "policy")
    singles = [BudgetPolicy.load(out / f"seed-{seed}" / "policy") for seed in (3, 4)]
    assert json.loads((out / "policy" / "policy.json").read_text())["format_version"] == 2 <= FORMAT_VERSION
    assert len(ensemble.members) == 2
    # Each member keeps its own run's statistics, which differ between seeds.
    assert not np.allclose(singles[0].obs_mean, singles[1].obs_mean)
    for member, single in zip(ensemble.member_normalization, singles, strict=True):
        np.testing.assert_array_equal(member[0], single.obs_mean)
        np.testing.assert_array_equal(member[1], single.obs_var)
    observations = singles[0].features.batch(questions).astype(np.float64)
    expected = (singles[0].probabilities(observations) + singles[1].probabilities(observations)) / 2
    np.testing.assert_allclose(ensemble.probabilities(observations), expected, rtol=0, atol=1e-12)
    decisions = ensemble.decide_batch(questions[:20])
    np.testing.assert_allclose(np.stack([d.probabilities for d in decisions]), expected[:20], rtol=0, atol=1e-12)


def test_single_exports_stay_version_1_and_version_1_files_load(seed_runs, questions, tmp_path):
    out, _ = seed_runs
    single = out / "seed-3" / "policy"
    spec = json.loads((single / "policy.json").read_text())
    assert spec["format_version"] == 1
    assert all("obs_mean" not in member for member in spec["members"])
    copy = tmp_path / "v1"
    shutil.copytree(single, copy)
    (copy / "policy.json").write_text(json.dumps({**spec, "format_version": 1}))
    observations = BudgetPolicy.load(single).features.batch(questions).astype(np.float64)
    np.testing.assert_array_equal(
        BudgetPolicy.load(copy).probabilities(observations), BudgetPolicy.load(single).probabilities(observations)
    )


def test_a_member_array_missing_from_the_weights_is_refused(seed_runs, tmp_path):
    out, _ = seed_runs
    copy = tmp_path / "broken"
    shutil.copytree(out / "policy", copy)
    spec = json.loads((copy / "policy.json").read_text())
    spec["members"][1]["obs_mean"] = "m7_obs_mean"
    (copy / "policy.json").write_text(json.dumps(spec))
    with pytest.raises(PolicyLoadError, match="no array 'm7_obs_mean'"):
        BudgetPolicy.load(copy)


def test_ensemble_needs_two_runs(seed_runs, tmp_path):
    out, _ = seed_runs
    with pytest.raises(ValueError, match="at least two runs"):
        export_ensemble([out / "seed-3"], tmp_path / "policy")


def test_members_collected_with_another_prompt_format_are_refused(seed_runs, demo_table, tmp_path):
    # Same actions and features, but the table was collected with another prompt: a server would prompt
    # the LM one way for both members, so they do not make one policy.
    out, _ = seed_runs
    table = tmp_path / "table"
    table.mkdir()
    manifest = json.loads((demo_table / "manifest.json").read_text())
    manifest["settings"]["prompt_template"] = "Q: {question}"
    (table / "manifest.json").write_text(json.dumps(manifest))
    other = tmp_path / "seed-4"
    shutil.copytree(out / "seed-4", other)
    config = yaml.safe_load((other / "config.yml").read_text())
    (other / "config.yml").write_text(yaml.safe_dump({**config, "table": str(table)}))
    with pytest.raises(ValueError, match=r"cannot ensemble .*seed-4 with .*seed-3: their prompt_format differ"):
        export_ensemble([out / "seed-3", other], tmp_path / "policy")


def test_cli_refuses_an_ensemble_of_one(demo_table, tmp_path):
    result = CliRunner().invoke(app, ["train", "--table", str(demo_table), "--out", str(tmp_path), "--ensemble"])
    assert result.exit_code == 2
    assert "--seeds 2 or more" in result.output


def test_warm_start_from_a_run_copies_actor_critic_and_normalisation(seed_runs, demo_table):
    from stable_baselines3 import PPO

    out, _ = seed_runs
    run = out / "seed-3"
    source_model = PPO.load(run / "checkpoints" / "best_model.zip", device="cpu")
    model, vec_env = _fresh_model(demo_table)
    record = warm_start(model, vec_env, load_init_source(run), _action_names(demo_table))
    assert record["kind"] == "run" and record["copied"] == ["actor", "critic", "normalization"]
    source_state, state = source_model.policy.state_dict(), model.policy.state_dict()
    copied = [key for key in state if key.startswith(("mlp_extractor.", "action_net.", "value_net."))]
    assert any(key.startswith("mlp_extractor.value_net.") for key in copied)
    for key in copied:
        assert torch.equal(state[key], source_state[key]), key
    normalizer = pickle.loads((run / "checkpoints" / "vecnormalize.pkl").read_bytes())
    np.testing.assert_array_equal(vec_env.obs_rms.mean, normalizer.obs_rms.mean)
    np.testing.assert_array_equal(vec_env.obs_rms.var, normalizer.obs_rms.var)
    assert vec_env.obs_rms.count == normalizer.obs_rms.count


def test_warm_start_from_a_policy_folder_copies_the_actor_only(seed_runs, demo_table):
    out, _ = seed_runs
    policy = BudgetPolicy.load(out / "seed-4" / "policy")
    model, vec_env = _fresh_model(demo_table)
    critic_before = {k: v.clone() for k, v in model.policy.state_dict().items() if "value_net" in k}
    record = warm_start(model, vec_env, load_init_source(out / "seed-4" / "policy"), _action_names(demo_table))
    assert record["copied"] == ["actor", "normalization"]
    linears = [m for m in model.policy.mlp_extractor.policy_net if isinstance(m, torch.nn.Linear)]
    for module, (weight, bias, _) in zip([*linears, model.policy.action_net], policy.members[0], strict=True):
        np.testing.assert_array_equal(module.weight.detach().numpy(), weight.T.astype(np.float32))
        np.testing.assert_array_equal(module.bias.detach().numpy(), bias.astype(np.float32))
    for key, value in critic_before.items():
        assert torch.equal(model.policy.state_dict()[key], value), key
    np.testing.assert_array_equal(vec_env.obs_rms.mean, policy.obs_mean)


def test_warm_start_with_other_features_names_both_shapes(seed_runs, demo_table, tmp_path):
    out, _ = seed_runs
    n = BudgetPolicy.load(out / "seed-3" / "policy").features.dim
    config = TrainConfig(
        table=str(demo_table), out=str(tmp_path / "stream"), env="stream", total_timesteps=2048,
        init_from=str(out / "seed-3"),
    )  # fmt: skip
    with pytest.raises(ValueError, match=rf"its actor is {n} features .* this run's is {n + 2} features"):
        train(config)
    with pytest.raises(ValueError, match="ensemble of 2 members"):
        load_init_source(out / "policy")
    with pytest.raises(FileNotFoundError, match="neither a run folder"):
        load_init_source(tmp_path)


def test_hidden_layers_get_the_scaled_learning_rate_after_an_update(seed_runs, demo_table, tmp_path):
    from stable_baselines3 import PPO

    out, _ = seed_runs
    model, vec_env = _fresh_model(demo_table, algo_class=layerwise_lr_algo(PPO), learning_rate=lambda p: 1e-3 * p)
    warm_start(model, vec_env, load_init_source(out / "seed-3"), _action_names(demo_table))
    layerwise_optimizer(model.policy, 0.3)
    model.learn(total_timesteps=256)
    hidden, heads = model.policy.optimizer.param_groups
    schedule_lr = 1e-3 * model._current_progress_remaining
    assert heads["lr"] == pytest.approx(schedule_lr) and schedule_lr < 1e-3
    assert hidden["lr"] == pytest.approx(0.3 * heads["lr"])
    assert {id(p) for p in hidden["params"]} == {id(p) for p in model.policy.mlp_extractor.parameters()}
    # Its checkpoints load with plain PPO (one optimizer group), as export_run does.
    model.save(tmp_path / "layerwise.zip")
    loaded = PPO.load(tmp_path / "layerwise.zip", device="cpu")
    assert len(loaded.policy.optimizer.param_groups) == 1
    for key, value in model.policy.state_dict().items():
        assert torch.equal(loaded.policy.state_dict()[key], value), key
    adam = model.policy.optimizer.state
    for parameter, loaded_parameter in zip(model.policy.parameters(), loaded.policy.parameters(), strict=True):
        assert torch.equal(adam[parameter]["exp_avg"], loaded.policy.optimizer.state[loaded_parameter]["exp_avg"])


def test_train_init_from_records_the_source_and_exports(seed_runs, demo_table, tmp_path):
    out, _ = seed_runs
    run = tmp_path / "warm"
    result = train(
        TrainConfig(
            table=str(demo_table), out=str(run), total_timesteps=2048, eval_freq=1024,
            init_from=str(out / "seed-3" / "policy"), init_lr_scale=0.5,
        )
    )  # fmt: skip
    assert result.timesteps >= 2048
    summary = json.loads((run / "training.json").read_text())
    assert summary["init_from"]["path"] == str(out / "seed-3" / "policy")
    assert summary["init_from"]["kind"] == "policy" and summary["init_from"]["init_lr_scale"] == 0.5
    config = yaml.safe_load((run / "config.yml").read_text())
    assert config["init_from"] == str(out / "seed-3" / "policy") and config["init_lr_scale"] == 0.5
    export_run(run)
    # The exported policy is the warm-started run's best model: its actor's weights, its normalisation, its
    # decisions (a warm start trains with two optimizer groups; its checkpoint loads with plain PPO).
    from stable_baselines3 import PPO

    model = PPO.load(run / "checkpoints" / "best_model.zip", device="cpu")
    normalizer = pickle.loads((run / "checkpoints" / "vecnormalize.pkl").read_bytes())
    exported = BudgetPolicy.load(run / "policy")
    linears = [m for m in model.policy.mlp_extractor.policy_net if isinstance(m, torch.nn.Linear)]
    for module, (weight, bias, _) in zip([*linears, model.policy.action_net], exported.members[0], strict=True):
        np.testing.assert_array_equal(weight.T.astype(np.float32), module.weight.detach().numpy())
        np.testing.assert_array_equal(bias.astype(np.float32), module.bias.detach().numpy())
    np.testing.assert_array_equal(exported.obs_mean, normalizer.obs_rms.mean)
    np.testing.assert_array_equal(exported.obs_var, normalizer.obs_rms.var)
    matrix = OutcomeMatrix.from_table(demo_table)
    rng = np.random.default_rng(0)
    observations = matrix.features[rng.integers(len(matrix.ids), size=1000)]
    observations = observations + rng.normal(0, 0.5, observations.shape).astype(np.float32)
    expected, _ = model.predict(normalizer.normalize_obs(observations), deterministic=True)
    np.testing.assert_array_equal(exported.probabilities(observations).argmax(axis=1), expected)
    with pytest.raises(ValueError, match="init_lr_scale must be > 0, got 0.0"):
        train(TrainConfig(table=str(demo_table), out=str(tmp_path / "bad"), init_from=str(run), init_lr_scale=0.0))
