"""``tokenopt/TokenBudgetProbe-v0``: replaying the probes of an outcome table."""

import pickle
import warnings

import gymnasium as gym
import numpy as np
import pytest
from gymnasium.utils.env_checker import check_env
from measures import assert_beats, per_query_reward, questions_of
from stable_baselines3.common.env_checker import check_env as sb3_check_env

import tokenopt.envs  # noqa: F401
from tokenopt.envs import TokenBudgetProbeEnv
from tokenopt.probe import PROBE_INPUTS
from tokenopt.probe import ProbeAction as Action
from tokenopt.table import OutcomeMatrix, ReplayTable

ANSWER, CONTINUE, ESCALATE = Action.ANSWER, Action.CONTINUE, Action.ESCALATE


@pytest.fixture(scope="module")
def replay(demo_table):
    return ReplayTable.load(demo_table, OutcomeMatrix.from_table(demo_table))


def test_checkers_pass_without_warnings(demo_table):
    env = gym.make("tokenopt/TokenBudgetProbe-v0", table=str(demo_table))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        check_env(env.unwrapped, skip_render_check=True)
        sb3_check_env(env.unwrapped, warn=True)


def _episode(env, query, policy):
    observation, _ = env.reset(seed=0, options={"query": query})
    total, steps = 0.0, 0
    while True:
        observation, reward, terminated, truncated, info = env.step(policy(observation))
        total += reward
        steps += 1
        if terminated or truncated:
            return total, info, steps


def test_answering_at_once_is_the_budget_0_action(replay):
    env = TokenBudgetProbeEnv(replay=replay, split="test", cost_weight=0.01)
    test = replay.subset("test")
    first = test.ladder("greedy")[0]
    for query in range(0, 60, 7):
        total, info, steps = _episode(env, query, lambda _: ANSWER)
        assert steps == 1
        assert info["billed_tokens"] == pytest.approx(test.matrix.billed_tokens[query, first])
        assert info["em"] == test.matrix.exact_match[query, first]
        assert total == pytest.approx(info["em"] - 0.01 * info["billed_tokens"])


def test_continuing_bills_the_reasoning_and_every_probe(replay):
    env = TokenBudgetProbeEnv(replay=replay, split="test", cost_weight=0.01)
    test = replay.subset("test")
    ladder = test.ladder("greedy")
    for query in range(0, 60, 5):
        total, info, steps = _episode(env, query, lambda _: CONTINUE)
        stop = next(k for k, j in enumerate(ladder) if test.natural_stop[query, j] or k == len(ladder) - 1)
        column = ladder[stop]
        expected = test.reasoning_tokens[query, column] + test.probe_tokens[query, ladder[: stop + 1]].sum()
        assert info["checkpoint"] == stop and steps == max(stop, 1)
        assert info["billed_tokens"] == pytest.approx(expected)
        assert info["em"] == test.matrix.exact_match[query, column]
        assert total == pytest.approx(info["em"] - 0.01 * expected)
    # Free probes: the bill is exactly that of the fixed action at the exit budget.
    free = TokenBudgetProbeEnv(replay=replay, split="test", cost_weight=0.01, probe_token_price=0.0)
    for query in range(0, 60, 5):
        _, info, _ = _episode(free, query, lambda _: CONTINUE)
        column = ladder[info["checkpoint"]]
        assert info["billed_tokens"] == pytest.approx(test.matrix.billed_tokens[query, column])


def test_observation_reports_the_probes(replay):
    env = TokenBudgetProbeEnv(replay=replay, split="test")
    test = replay.subset("test")
    ladder = test.ladder("greedy")
    dim = test.matrix.features.shape[1]
    query = next(i for i in range(len(test.matrix.ids)) if not test.natural_stop[i, ladder[1]])
    observation, _ = env.reset(options={"query": query})
    observation, *_ = env.step(CONTINUE)
    probes = dict(zip(PROBE_INPUTS, observation[dim:], strict=True))
    agree = test.answers[query, ladder[0]] == test.answers[query, ladder[1]]
    assert probes["agrees_with_last"] == float(agree)
    assert probes["answer_changes_fraction"] == float(not agree)
    assert probes["checkpoint_fraction"] == pytest.approx(1 / (len(ladder) - 1))
    assert probes["probe_logprob"] == pytest.approx(test.answer_logprob[query, ladder[1]])


def test_seeded_and_picklable(demo_table):
    def run(env):
        rewards = []
        env.action_space.seed(3)
        env.reset(seed=3)
        for _ in range(30):
            _, reward, terminated, _, _ = env.step(env.action_space.sample())
            rewards.append(reward)
            if terminated:
                env.reset()
        return rewards

    env = TokenBudgetProbeEnv(table=demo_table)
    assert run(env) == run(TokenBudgetProbeEnv(table=demo_table))
    assert run(pickle.loads(pickle.dumps(env))) == run(env)


def test_bad_settings_are_named(demo_table, replay):
    with pytest.raises(ValueError, match="mode 'sc9'"):
        TokenBudgetProbeEnv(replay=replay, mode="sc9")
    with pytest.raises(ValueError, match="split"):
        TokenBudgetProbeEnv(replay=replay, split="dev")
    with pytest.raises(ValueError, match="exactly one"):
        TokenBudgetProbeEnv(table=demo_table, replay=replay)
    with pytest.raises(ValueError, match="probe_token_price"):
        TokenBudgetProbeEnv(replay=replay, probe_token_price=-1)
    env = TokenBudgetProbeEnv(replay=replay)
    env.reset(seed=0)
    with pytest.raises(ValueError, match="not 0"):
        env.step(np.int64(2))


def test_learned_controller_beats_the_two_probes_agree_rule(probe_training, replay, demo_table):
    from tokenopt.agents.evaluation.baselines import dynasor_points, probe_controller_point
    from tokenopt.runtime import BudgetPolicy

    run, result = probe_training
    val = replay.subset("val")
    policy = BudgetPolicy.load(run / "policy")
    controller = probe_controller_point(policy, val, questions_of(demo_table))
    rule = next(p for p in dynasor_points(val) if p.setting == "greedy, from b0, 2 agree")
    mine = per_query_reward(controller.exact_match, controller.billed_tokens)
    # The learned stop beats the rule it generalises, on the same queries and bill, by more than the noise.
    assert_beats(mine, per_query_reward(rule.exact_match, rule.billed_tokens), "controller against 2 agree")
    # Training's best validation reward is the exported controller's on val.
    assert result.best_metrics["reward"] == pytest.approx(mine.mean(), abs=1e-9)
    assert policy.extra_inputs == PROBE_INPUTS
    assert policy.probabilities(np.zeros((1, val.matrix.features.shape[1] + len(PROBE_INPUTS)))).shape == (1, 2)
    with pytest.raises(ValueError, match="answer or continue"):
        policy.decide("C 3+4?", extras=np.zeros(len(PROBE_INPUTS)))


def test_escalating_env_passes_the_checkers(demo_table):
    env = gym.make("tokenopt/TokenBudgetProbe-v0", table=str(demo_table), escalate_mode="beam3")
    assert env.action_space == gym.spaces.Discrete(3)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        check_env(env.unwrapped, skip_render_check=True)
        sb3_check_env(env.unwrapped, warn=True)


def test_escalating_bills_everything_so_far_plus_the_fixed_action(replay):
    env = TokenBudgetProbeEnv(replay=replay, split="test", cost_weight=0.01, escalate_mode="beam3")
    test = replay.subset("test")
    ladder, beam = test.ladder("greedy"), test.ladder("beam3")
    assert env.escalate_columns == beam
    moving = [i for i in range(len(test.matrix.ids)) if not test.natural_stop[i, ladder[:2]].any()][:10]
    assert moving
    for query in moving:
        for continues in (0, 1):
            actions = iter([CONTINUE] * continues + [ESCALATE])
            total, info, steps = _episode(env, query, lambda _, actions=actions: next(actions))
            column = beam[continues]
            # The greedy trace and its probes so far, then beam3 reasoning afresh from the prompt.
            probes = test.probe_tokens[query, ladder[: continues + 1]].sum()
            so_far = test.reasoning_tokens[query, ladder[continues]] + probes
            expected = so_far + test.matrix.billed_tokens[query, column]
            assert steps == continues + 1 and info["escalated"] and info["checkpoint"] == continues
            assert info["budget"] == test.budgets[column]
            assert info["billed_tokens"] == pytest.approx(expected)
            assert info["em"] == test.matrix.exact_match[query, column]
            assert total == pytest.approx(info["em"] - 0.01 * expected)


def test_escalating_env_is_seeded_and_picklable(demo_table):
    def run(env):
        rewards = []
        env.action_space.seed(5)
        env.reset(seed=5)
        for _ in range(40):
            _, reward, terminated, _, _ = env.step(env.action_space.sample())
            rewards.append(reward)
            if terminated:
                env.reset()
        return rewards

    env = TokenBudgetProbeEnv(table=demo_table, escalate_mode="beam3")
    assert run(env) == run(TokenBudgetProbeEnv(table=demo_table, escalate_mode="beam3"))
    assert run(pickle.loads(pickle.dumps(env))) == run(env)


def test_bad_escalate_settings_are_named(replay, demo_table, tmp_path):
    from tokenopt.agents.ppo.train import TrainConfig, train

    with pytest.raises(ValueError, match="escalate_mode applies to --env probe, not --env budget"):
        train(TrainConfig(table=str(demo_table), out=str(tmp_path / "a"), hyperparams={"escalate_mode": "beam3"}))
    with pytest.raises(ValueError, match="escalate_mode 'beam9' is not in the table"):
        escalate = {"escalate_mode": "beam9"}
        train(TrainConfig(table=str(demo_table), out=str(tmp_path / "b"), env="probe", hyperparams=escalate))
    with pytest.raises(ValueError, match="escalate_mode 'beam9' is not in the table"):
        TokenBudgetProbeEnv(replay=replay, escalate_mode="beam9")
    with pytest.raises(ValueError, match="escalate_mode 'greedy' is the reasoning mode itself"):
        TokenBudgetProbeEnv(replay=replay, escalate_mode="greedy")
    env = TokenBudgetProbeEnv(replay=replay, escalate_mode="beam3")
    env.reset(seed=0)
    with pytest.raises(ValueError, match=r"not 0, 1 or 2 \(escalate\)"):
        env.step(np.int64(3))


def test_escalating_controller_beats_the_stopping_one(probe_training, escalating_probe_training, replay, demo_table):
    from tokenopt.agents.evaluation.baselines import probe_controller_point
    from tokenopt.runtime import BudgetPolicy

    val, questions = replay.subset("val"), questions_of(demo_table)
    stopping = BudgetPolicy.load(probe_training[0] / "policy")
    run, escalating = escalating_probe_training
    policy = BudgetPolicy.load(run / "policy")

    def rewards(controller):
        point = probe_controller_point(controller, val, questions)
        return per_query_reward(point.exact_match, point.billed_tokens)

    # On the demo greedy is wrong at every budget on the vote family, beam3 right even at budget 0:
    # only a controller that can leave the greedy trace recovers those queries. It beats the stopping
    # controller on the same val queries by more than the noise.
    mine = rewards(policy)
    assert_beats(mine, rewards(stopping), "escalating against stopping controller")
    assert escalating.best_metrics["reward"] == pytest.approx(mine.mean(), abs=1e-9)
    assert policy.probe.escalate_mode == "beam3"
    dim = policy.features.dim + len(PROBE_INPUTS)
    assert policy.probabilities(np.zeros((1, dim))).shape == (1, 3)
