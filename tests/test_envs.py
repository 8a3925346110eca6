"""The Gymnasium environments on a demo outcome table."""

import pickle
import shutil
import warnings

import gymnasium as gym
import numpy as np
import pytest
from gymnasium.utils.env_checker import check_env
from stable_baselines3.common.env_checker import check_env as sb3_check_env

import tokenopt.envs  # noqa: F401
from tokenopt.envs import TableSource, TokenBudgetEnv, TokenBudgetStreamEnv
from tokenopt.table import OutcomeMatrix


@pytest.mark.parametrize("env_id", ["tokenopt/TokenBudget-v0", "tokenopt/TokenBudgetStream-v0"])
def test_checkers_pass_without_warnings(demo_table, env_id):
    env = gym.make(env_id, table=str(demo_table))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        check_env(env.unwrapped, skip_render_check=True)
        sb3_check_env(env.unwrapped, warn=True)


def _rollout(env, seed, steps=40):
    observation, _ = env.reset(seed=seed)
    env.action_space.seed(seed)
    trace = []
    for _ in range(steps):
        action = env.action_space.sample()
        observation, reward, terminated, truncated, info = env.step(action)
        trace.append((float(reward), info["query_id"], info["action"], observation.tobytes()))
        if terminated or truncated:
            observation, _ = env.reset()
    return trace


@pytest.mark.parametrize("env_class", [TokenBudgetEnv, TokenBudgetStreamEnv])
def test_one_seed_gives_identical_rollouts_and_the_env_pickles(demo_table, env_class):
    first = _rollout(env_class(table=str(demo_table)), seed=3)
    assert first == _rollout(env_class(table=str(demo_table)), seed=3)
    assert first != _rollout(env_class(table=str(demo_table)), seed=4)
    env = env_class(table=str(demo_table))
    clone = pickle.loads(pickle.dumps(env))
    assert _rollout(clone, seed=3) == first


def test_reward_is_em_minus_cost(demo_table):
    env = TokenBudgetEnv(table=str(demo_table), cost_weight=0.05)
    env.reset(seed=0, options={"query_index": 5})
    _, reward, terminated, truncated, info = env.step(3)
    assert terminated and not truncated
    assert reward == pytest.approx(info["em"] - 0.05 * info["billed_tokens"])
    assert info["action"] == env.actions[3].name


def test_multidiscrete_actions_address_the_same_table(demo_table):
    flat = TokenBudgetEnv(table=str(demo_table))
    grid = TokenBudgetEnv(table=str(demo_table), action_type="multidiscrete")
    n_budgets = len(grid.budgets)
    for index in range(len(flat.actions)):
        flat.reset(seed=0, options={"query_index": 7})
        grid.reset(seed=0, options={"query_index": 7})
        _, _, _, _, a = flat.step(index)
        _, _, _, _, b = grid.step(np.array([index % n_budgets, index // n_budgets]))
        assert a["action"] == b["action"]
    assert grid.action_masks().shape == (n_budgets + len(grid.modes),)


def test_stream_never_overspends(demo_table):
    env = TokenBudgetStreamEnv(table=str(demo_table), stream_length=16, total_budget=60.0)
    rng = np.random.default_rng(0)
    for episode in range(20):
        env.reset(seed=episode)
        spent, done = 0.0, False
        while not done:
            _, _, done, _, info = env.step(int(rng.integers(len(env.actions))))
            spent += info["billed_tokens"]
            assert info["budget_left"] >= 0
        assert spent <= 60.0


def test_bad_configuration_is_named(demo_table, tmp_path):
    with pytest.raises(FileNotFoundError, match="not an outcome table"):
        TokenBudgetEnv(table=str(tmp_path))
    with pytest.raises(ValueError, match="unknown split 'dev'"):
        TokenBudgetEnv(table=str(demo_table), split="dev")
    with pytest.raises(ValueError, match="collect the table with the same --budgets and --modes"):
        TokenBudgetEnv(table=str(demo_table), budgets=[0, 8])
    matrix = OutcomeMatrix.from_table(demo_table)
    matrix.features[np.flatnonzero(matrix.splits == "train")[4], 2] = np.nan
    with pytest.raises(ValueError, match="feature 2 of query row .* is nan"):
        TableSource(matrix, "train")
    empty = tmp_path / "empty"
    shutil.copytree(demo_table, empty)
    shutil.rmtree(empty / "outcomes")
    with pytest.raises(ValueError, match="no outcome shards"):
        TokenBudgetEnv(table=str(empty))


def test_live_lm_backend_agrees_with_the_table_for_greedy(demo_table, demo_lm):
    from tokenopt.data import load_questions
    from tokenopt.envs import LiveLMSource

    queries = load_questions(demo_table.parent / "questions.jsonl")
    live = LiveLMSource(queries[:40], demo_lm, split="val")
    table = TableSource(str(demo_table), "val")
    row_of = {query_id: i for i, query_id in enumerate(table.query_ids)}
    env = TokenBudgetEnv(source=live)
    greedy = [i for i, action in enumerate(env.actions) if action.mode == "greedy"]
    for query in range(min(4, len(live.query_ids))):
        for action in greedy:
            env.reset(seed=0, options={"query_index": query})
            _, _, _, _, info = env.step(action)
            expected = table.outcome(row_of[info["query_id"]], action)
            assert (info["em"], info["billed_tokens"]) == (expected.exact_match, expected.billed_tokens)
    np.testing.assert_array_equal(live.features[0], table.features[row_of[live.query_ids[0]]])
    assert live.action_mask(0).all()
