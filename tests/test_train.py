"""PPO training, export and the numpy runtime on a demo outcome table."""

import json
import subprocess
import sys
import textwrap

import numpy as np
import pyarrow.parquet as pq
import pytest
import yaml
from measures import assert_beats, per_query_reward, policy_columns, questions_of

from tokenopt.agents.common.evaluation import evaluate_policy
from tokenopt.agents.export import export_run
from tokenopt.agents.ppo.train import TrainConfig, train
from tokenopt.runtime import BudgetPolicy, PolicyLoadError
from tokenopt.table import OutcomeMatrix


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory, demo_table):
    run = tmp_path_factory.mktemp("train") / "run"
    result = train(TrainConfig(table=str(demo_table), out=str(run), total_timesteps=30_000, eval_freq=4096))
    export_run(run)
    return run, result


def test_short_training_beats_the_best_fixed_action(trained_run, demo_table):
    run, result = trained_run
    policy = BudgetPolicy.load(run / "policy")
    matrix, questions = OutcomeMatrix.from_table(demo_table), questions_of(demo_table)
    for split in ("val", "test"):
        queries = matrix.subset(split)
        rewards = per_query_reward(queries.exact_match, queries.billed_tokens)
        columns = policy_columns(policy, queries, questions)
        best_fixed = int(rewards.mean(axis=0).argmax())  # the split's own best fixed action, picked in hindsight
        # The policy beats it on the same queries by more than the split's noise.
        mine = rewards[np.arange(len(columns)), columns]
        assert_beats(mine, rewards[:, best_fixed], f"{split}: policy against {queries.actions[best_fixed]}")
        if split == "val":
            # Training's best validation figures are the exported policy's.
            assert result.best_metrics["reward"] == pytest.approx(mine.mean(), abs=1e-9)
            assert result.best_metrics["best_fixed_reward"] == pytest.approx(rewards[:, best_fixed].mean(), abs=1e-9)
    rows, _ = evaluate_policy(run / "policy", demo_table, "test")
    assert rows[0].method == "tokenopt policy" and rows[0].reward == pytest.approx(mine.mean(), abs=1e-9)


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
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    run = tmp_path / "constrained"
    result = train(
        TrainConfig(
            table=str(demo_table), out=str(run), total_timesteps=24_000, eval_freq=2048, cost_weight=0.001,
            token_target=6.0, dual_lr=0.1,
        )
    )  # fmt: skip
    events = EventAccumulator(str(run / "tb")).Reload()
    tokens = [event.value for event in events.Scalars("eval/tokens")]
    weights = [event.value for event in events.Scalars("train/lambda")]  # lambda in force at each validation
    assert len(tokens) == len(weights) >= 10
    # Dual ascent: lambda rises after every validation above the target and falls after every one below.
    for spent, before, after in zip(tokens, weights, weights[1:], strict=False):
        assert (after > before) == (spent > 6.0), (tokens, weights)
    assert result.cost_weight > 0.001  # the untrained policy spends more than 6 tokens, so lambda went up first
    final = json.loads((run / "training.json").read_text())["cost_weight"]  # after the last validation's step
    assert (final > weights[-1]) == (tokens[-1] > 6.0)
    # The kept policy meets the target on val (up to the split's noise: two standard errors of its mean tokens),
    # and training's figures are the exported policy's.
    export_run(run)
    val = OutcomeMatrix.from_table(demo_table).subset("val")
    rows = np.arange(len(val.ids))
    columns = policy_columns(BudgetPolicy.load(run / "policy"), val, questions_of(demo_table))
    spent = val.billed_tokens[rows, columns]
    assert result.best_metrics["tokens"] == pytest.approx(spent.mean(), abs=1e-9)
    assert spent.mean() <= 6.0 + 2 * spent.std(ddof=1) / np.sqrt(len(spent)), spent.mean()
    # Within the target it answers better than any fixed action that meets the target, beyond the noise.
    within = [j for j in range(len(val.actions)) if val.billed_tokens[:, j].mean() <= 6.0]
    best = max(within, key=lambda j: val.exact_match[:, j].mean())
    assert_beats(val.exact_match[rows, columns], val.exact_match[:, best], f"EM against {val.actions[best]}")


def test_maskable_ppo_takes_only_the_actions_the_masks_allow(demo_table, tmp_path, monkeypatch):
    import tokenopt.envs
    from tokenopt.envs import TableSource, TokenBudgetEnv

    class HidingSource(TableSource):
        """Hides every sc5 action, and the budgets over 8 on every other query (as a context limit would)."""

        def action_mask(self, query):
            mask = super().action_mask(query)
            for j, action in enumerate(self.actions):
                if action.mode == "sc5" or (query % 2 == 0 and action.budget > 8):
                    mask[j] = False
            return mask

    allowed = []  # per environment step: whether the agent's action was one the mask allowed

    def recording_step(self, action, step=TokenBudgetEnv.step):
        allowed.append(bool(self.action_masks()[int(np.asarray(action).reshape(-1)[0])]))
        return step(self, action)

    monkeypatch.setattr(TokenBudgetEnv, "step", recording_step)
    monkeypatch.setattr(tokenopt.envs, "TableSource", HidingSource)  # train() builds its sources from here
    # The recorder sees a hidden action (the environment itself would swap it for the cheapest).
    env = TokenBudgetEnv(source=HidingSource(demo_table, "train"))
    env.reset(seed=0)
    env.step(env.actions.index(next(a for a in env.actions if a.mode == "sc5")))
    assert allowed == [False]
    allowed.clear()
    run = tmp_path / "maskable"
    result = train(
        TrainConfig(table=str(demo_table), out=str(run), algo="maskable_ppo", total_timesteps=8192, eval_freq=4096)
    )
    assert result.timesteps >= 8192 and len(allowed) == result.timesteps
    # A third or more of the actions is hidden on every query; an agent that ignored the masks (PPO,
    # near-uniform at first) would take thousands of them in 8,192 steps. MaskablePPO takes none.
    assert all(allowed), f"{allowed.count(False)} of {len(allowed)} steps took a hidden action"
    export_run(run)
    assert BudgetPolicy.load(run / "policy").decide("M 1 9 3?").action.startswith("b")


def test_stream_training_exports_a_policy_with_budget_inputs(demo_table, tmp_path):
    from tokenopt.envs import TableSource, TokenBudgetStreamEnv

    run = tmp_path / "stream"
    result = train(TrainConfig(table=str(demo_table), out=str(run), env="stream", total_timesteps=8192, eval_freq=4096))
    export_run(run)
    policy = BudgetPolicy.load(run / "policy")
    assert policy.extra_inputs == ["budget_left_fraction", "queries_left_fraction"]
    with pytest.raises(ValueError, match="also needs the inputs"):
        policy.decide("C 1+2?")
    # The exported policy on the validation's own val streams (16 queries sharing half the tokens of
    # max-budget greedy), against the simple rule of spending the largest greedy budget while it lasts.
    matrix = OutcomeMatrix.from_table(demo_table)
    env = TokenBudgetStreamEnv(source=TableSource(matrix, "val"))
    names = [action.name for action in env.actions]

    def streams(choose):
        exact = []
        for episode in range(40):
            observation, _ = env.reset(seed=episode)  # the validator's seeds (training seed 0)
            done, correct = False, 0.0
            while not done:
                observation, _, done, _, info = env.step(choose(observation))
                correct += info["em"]
            exact.append(correct / env.stream_length)
        return np.array(exact)

    mine = streams(lambda observation: int(policy.probabilities(observation[None, :])[0].argmax()))
    assert result.best_metrics["em"] == pytest.approx(mine.mean(), abs=1e-9)  # the validation's figure
    assert_beats(mine, streams(lambda _: names.index("b32/greedy")), "stream policy against b32/greedy")
    # Its decisions depend on the budget left: the same queries with all or none of the budget left.
    features = matrix.subset("val").features.astype(np.float64)
    full, spent = (
        np.column_stack([features, np.full(len(features), left), np.full(len(features), 0.5)]) for left in (1.0, 0.0)
    )
    assert (policy.probabilities(full).argmax(axis=1) != policy.probabilities(spent).argmax(axis=1)).any()


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
