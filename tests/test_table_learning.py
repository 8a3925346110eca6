"""Learning that uses the whole table: the per-query reward baseline and the warm start by classification.

A small seeded outcome matrix in memory (the real :class:`OutcomeMatrix`, no LM), on which
the best action is a function of the features, so a classifier can learn it.
"""

import warnings

import numpy as np
import pytest
import torch
from gymnasium.utils.env_checker import check_env

from tokenopt.agents.ppo.train import TrainConfig, train
from tokenopt.agents.ppo.warm_start import pretrain_actor, soft_targets
from tokenopt.cost import CostModel
from tokenopt.envs import TableSource, TokenBudgetEnv
from tokenopt.table import OutcomeMatrix, evaluate_actions

ACTIONS = ["b0/greedy", "b4/greedy", "b8/greedy", "b16/greedy"]


def _matrix(queries: int = 600, seed: int = 0) -> OutcomeMatrix:
    """Queries whose difficulty (one feature) sets the smallest budget that answers them right."""
    rng = np.random.default_rng(seed)
    difficulty = rng.integers(0, len(ACTIONS), size=queries)
    features = np.column_stack(
        [np.clip(difficulty + rng.normal(0, 0.15, queries), 0, None), rng.uniform(0, 1, (queries, 3))]
    ).astype(np.float32)
    budgets = np.array([0, 4, 8, 16], dtype=np.float64)
    exact = (np.arange(len(ACTIONS))[None, :] >= difficulty[:, None]).astype(np.float64)
    billed = np.tile(budgets + 2.0, (queries, 1))
    splits = np.array(["train"] * (queries // 2) + ["val"] * (queries // 4) + ["test"] * (queries - 3 * queries // 4))
    return OutcomeMatrix(
        [f"q{i}" for i in range(queries)], splits.astype(object), list(ACTIONS), exact, billed, np.full(queries, 5.0),
        features,
    )  # fmt: skip


@pytest.mark.parametrize("baseline", ["mean", "best_fixed"])
def test_shaping_subtracts_the_per_query_baseline_and_keeps_the_unshaped_reward(baseline):
    matrix = _matrix()
    cost = CostModel(0.02)
    rewards = matrix.subset("train").rewards(cost)
    expected_baseline = rewards.mean(axis=1) if baseline == "mean" else rewards[:, rewards.mean(axis=0).argmax()]
    shaped = TokenBudgetEnv(source=TableSource(matrix, "train"), cost_weight=0.02, reward_baseline=baseline)
    plain = TokenBudgetEnv(source=TableSource(matrix, "train"), cost_weight=0.02)
    for seed in range(20):
        _, info = shaped.reset(seed=seed)
        plain.reset(seed=seed)
        row = shaped.source.query_ids.index(info["query_id"])
        action = seed % len(ACTIONS)
        _, reward, _, _, step_info = shaped.step(action)
        _, plain_reward, _, _, plain_info = plain.step(action)
        # The unshaped reward is the table's; the training reward is it minus b(q).
        assert step_info["unshaped_reward"] == pytest.approx(rewards[row, action])
        assert plain_reward == pytest.approx(rewards[row, action]) and plain_info["baseline"] == 0.0
        assert step_info["baseline"] == pytest.approx(expected_baseline[row])
        assert reward == pytest.approx(rewards[row, action] - expected_baseline[row])
    # b(q) does not depend on the action: the shaped rewards of one query differ exactly as the unshaped ones.
    shaped.reset(options={"query_index": 3})
    differences = []
    for action in range(len(ACTIONS)):
        shaped.reset(options={"query_index": 3})
        differences.append(shaped.step(action)[1] - rewards[3, action])
    assert np.ptp(differences) == pytest.approx(0.0, abs=1e-12) and differences[0] != 0.0
    # A new lambda (the Lagrangian callback) recomputes b(q).
    shaped.set_cost_weight(0.04)
    assert shaped.baselines() != pytest.approx(expected_baseline)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        check_env(shaped, skip_render_check=True)


def test_spread_scaling_divides_each_price_by_its_own_spread_and_keeps_every_best_action():
    matrix = _matrix()
    train_rewards = {w: matrix.subset("train").rewards(CostModel(w)) for w in (0.005, 0.3)}
    spread = {w: float(r.std(axis=1).mean()) for w, r in train_rewards.items()}
    # The spread grows with the price: without scaling, the high prices' advantages would dominate a batch.
    assert spread[0.3] > 1.5 * spread[0.005]
    scaled = TokenBudgetEnv(
        source=TableSource(matrix, "train"), cost_weight_range=(0.005, 0.3), reward_scale="spread"
    )  # fmt: skip
    for w in (0.005, 0.3):
        training_rewards = []
        for action in range(len(ACTIONS)):
            _, info = scaled.reset(options={"query_index": 5, "cost_weight": w})
            _, reward, _, _, step_info = scaled.step(action)
            assert step_info["unshaped_reward"] == pytest.approx(train_rewards[w][5, action])
            assert reward == pytest.approx(train_rewards[w][5, action] / spread[w])
            training_rewards.append(reward)
        # s depends on lambda alone: at each price the query's best action is the unscaled one.
        assert int(np.argmax(training_rewards)) == int(np.argmax(train_rewards[w][5]))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        check_env(scaled, skip_render_check=True)


def test_shaping_is_refused_where_it_cannot_apply():
    with pytest.raises(ValueError, match="unknown reward_baseline 'median'"):
        TokenBudgetEnv(source=TableSource(_matrix(), "train"), reward_baseline="median")
    with pytest.raises(ValueError, match="reward_baseline applies to --env budget"):
        train(TrainConfig(table="no-such-table", env="stream", hyperparams={"reward_baseline": "mean"}))
    with pytest.raises(ValueError, match="unknown reward_scale 'std': expected one of none, spread"):
        TokenBudgetEnv(source=TableSource(_matrix(), "train"), reward_scale="std")
    with pytest.raises(ValueError, match="reward_scale applies to --env budget"):
        train(TrainConfig(table="no-such-table", env="probe", hyperparams={"reward_scale": "spread"}))
    with pytest.raises(ValueError, match="pretrain_objective must be cross_entropy or expected_reward"):
        train(TrainConfig(table="no-such-table", hyperparams={"pretrain_epochs": 5, "pretrain_objective": "kl"}))
    with pytest.raises(ValueError, match="pretrain_temperature must be > 0"):
        train(TrainConfig(table="no-such-table", hyperparams={"pretrain_epochs": 5, "pretrain_temperature": 0}))


def test_soft_targets_are_a_softmax_that_sharpens_to_the_best_action():
    rewards = np.array([[0.9, 0.8, 0.1], [0.0, 0.0, 1.0]])
    soft, sharp = soft_targets(rewards, 1.0), soft_targets(rewards, 0.01)
    assert soft.sum(axis=1) == pytest.approx([1.0, 1.0])
    assert soft[0, 0] > soft[0, 1] > soft[0, 2] and soft[0, 0] < 0.5
    assert sharp.argmax(axis=1).tolist() == [0, 2] and sharp.max(axis=1) == pytest.approx([1.0, 1.0], abs=1e-4)


def _model(matrix: OutcomeMatrix, seed: int = 0):
    from stable_baselines3 import PPO
    from stable_baselines3.common.env_util import make_vec_env
    from stable_baselines3.common.vec_env import VecNormalize

    torch.set_num_threads(1)
    vec_env = make_vec_env(
        TokenBudgetEnv, n_envs=2, seed=seed, env_kwargs={"source": TableSource(matrix, "train"), "cost_weight": 0.02}
    )
    vec_env = VecNormalize(vec_env, norm_obs=True, norm_reward=False, clip_obs=10.0)
    model = PPO("MlpPolicy", vec_env, seed=seed, n_steps=64, batch_size=64, device="cpu")
    return model, vec_env


def _best_action_probability(model, vec_env, matrix: OutcomeMatrix, cost: CostModel) -> tuple[float, float]:
    """Mean probability of each query's best action, and how often the greedy action is it."""
    observations = torch.as_tensor(vec_env.normalize_obs(matrix.features), dtype=torch.float32)
    with torch.no_grad():
        probabilities = model.policy.get_distribution(observations).distribution.probs.numpy()
    best = matrix.rewards(cost).argmax(axis=1)
    rows = np.arange(len(best))
    return float(probabilities[rows, best].mean()), float((probabilities.argmax(axis=1) == best).mean())


@pytest.mark.parametrize("objective", ["cross_entropy", "expected_reward"])
def test_warm_start_by_classification_moves_the_actor_to_the_best_action(objective):
    matrix = _matrix()
    train_split, val_split = matrix.subset("train"), matrix.subset("val")
    cost = CostModel(0.02)
    model, vec_env = _model(matrix)
    vec_env.obs_rms.mean = train_split.features.mean(axis=0).astype(np.float64)
    vec_env.obs_rms.var = train_split.features.var(axis=0).astype(np.float64)
    before, before_agreement = _best_action_probability(model, vec_env, val_split, cost)
    record = pretrain_actor(
        model, vec_env, train_split, val_split, cost, epochs=100, temperature=0.02, lr=3e-3, seed=0, objective=objective
    )
    assert record["objective"] == objective
    after, after_agreement = _best_action_probability(model, vec_env, val_split, cost)
    # A fresh actor is near uniform over the 4 actions; the fitted one puts most of its mass on each
    # held-out query's best action and picks it greedily on most of them.
    assert before < 0.4 and after > 0.6 and after_agreement > 0.7 > before_agreement
    assert 1 <= record["kept_epoch"] <= 100 and record["train_oracle_agreement"] > 0.7
    greedy = model.predict(vec_env.normalize_obs(val_split.features), deterministic=True)[0]
    oracle, fixed = val_split.oracle_reward(cost), val_split.best_fixed(cost)[1]
    assert evaluate_actions(val_split, greedy, cost)["reward"] > fixed + 0.5 * (oracle - fixed)
    # The observation normalisation is the train features'; the critic learnt the expected reward.
    assert vec_env.obs_rms.mean == pytest.approx(train_split.features.mean(axis=0), rel=1e-5)
    with torch.no_grad():
        values = model.policy.predict_values(
            torch.as_tensor(vec_env.normalize_obs(val_split.features), dtype=torch.float32)
        ).numpy()
    expected = val_split.rewards(cost).max(axis=1)
    assert np.abs(values.ravel() - expected).mean() < 0.25 < np.abs(expected).mean()


def test_warm_start_by_classification_is_deterministic():
    matrix = _matrix(queries=200)
    weights = []
    for _ in range(2):
        model, vec_env = _model(matrix, seed=3)
        pretrain_actor(model, vec_env, matrix.subset("train"), matrix.subset("val"), CostModel(), 5, 0.05, seed=3)
        weights.append(torch.cat([p.detach().ravel() for p in model.policy.parameters()]))
    assert torch.equal(weights[0], weights[1])
