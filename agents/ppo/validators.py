"""Validators: how a policy in training is scored on the val split, one per environment."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import numpy as np

from tokenopt.agents.common.callbacks import Predictor, Validator
from tokenopt.cost import CostModel
from tokenopt.table import OutcomeMatrix, evaluate_actions, evaluate_outcomes

if TYPE_CHECKING:
    from tokenopt.agents.ppo.train import TrainConfig

__all__ = ["budget_validator", "probe_validator", "stream_validator"]


def budget_validator(config: TrainConfig, val: OutcomeMatrix, train_sample: OutcomeMatrix) -> Validator:
    """Validation on TokenBudget-v0: every val query once, actions looked up in the table."""
    reference = val.max_budget_greedy()
    reference_em = float(val.exact_match[:, reference].mean())
    report_cost = config.cost_model()
    assert val.features is not None and train_sample.features is not None
    val_features, train_features = val.features, train_sample.features

    def validate(model: Any, vec_env: Any) -> tuple[dict[str, float], dict[str, float]]:
        predict = Predictor(model, vec_env)
        metrics = evaluate_actions(val, predict(val_features), report_cost, reference_em)
        return metrics, evaluate_actions(train_sample, predict(train_features), report_cost)

    return validate


def stream_validator(config: TrainConfig, matrix: OutcomeMatrix, episodes: int = 40) -> Validator:
    """Validation on TokenBudgetStream-v0: seeded streams of val (and train) queries."""
    from tokenopt.envs import TableSource, TokenBudgetStreamEnv

    envs = {split: TokenBudgetStreamEnv(source=TableSource(matrix, split)) for split in ("val", "train")}
    reference_em = float(matrix.subset("val").exact_match[:, matrix.max_budget_greedy()].mean())

    def run(model: Any, vec_env: Any, env: Any) -> dict[str, float]:
        predict = Predictor(model, vec_env)
        exact = tokens = 0.0
        steps = 0
        for episode in range(episodes):
            observation, _ = env.reset(seed=config.seed * 7919 + episode)
            done = False
            while not done:
                observation, _, done, _, info = env.step(int(predict(observation[None, :])[0]))
                exact += info["em"]
                tokens += info["billed_tokens"]
                steps += 1
        em = exact / steps
        return {
            "em": em,
            "tokens": tokens / steps,
            "reward": em,
            "gap_recovered": float("nan"),
            "em_drop_points": 100.0 * (reference_em - em),
        }

    def validate(model: Any, vec_env: Any) -> tuple[dict[str, float], dict[str, float]]:
        return run(model, vec_env, envs["val"]), run(model, vec_env, envs["train"])

    return validate


def probe_validator(config: TrainConfig, replay: Any, escalate_mode: str | None = None) -> Validator:
    """Validation on TokenBudgetProbe-v0: one episode per val query (and per train sample query).

    Gap recovered compares with the full action table's best fixed action and oracle,
    as for TokenBudget-v0, so the two controllers' figures are comparable.
    """
    from tokenopt.envs import TokenBudgetProbeEnv

    cost_model = CostModel(config.cost_weight, config.token_price)
    envs = {
        split: TokenBudgetProbeEnv(
            replay=replay,
            split=split,
            cost_weight=config.cost_weight,
            token_price=config.token_price,
            escalate_mode=escalate_mode,
        )
        for split in ("val", "train")
    }
    reference_em = float(replay.subset("val").matrix.exact_match[:, replay.matrix.max_budget_greedy()].mean())
    rows = {split: np.arange(min(len(env.replay.matrix.ids), 600)) for split, env in envs.items()}

    def run(model: Any, vec_env: Any, split: str) -> dict[str, float]:
        env = envs[split]
        predict = Predictor(model, vec_env)
        exact, tokens = [], []
        for i in rows[split]:
            observation, _ = env.reset(options={"query": int(i)})
            while True:
                observation, _, done, _, info = env.step(int(predict(observation[None, :])[0]))
                if done:
                    break
            exact.append(info["em"])
            tokens.append(info["billed_tokens"])
        matrix = env.replay.matrix.take(rows[split])
        return evaluate_outcomes(matrix, np.array(exact), np.array(tokens), cost_model, reference_em)

    def validate(model: Any, vec_env: Any) -> tuple[dict[str, float], dict[str, float]]:
        return run(model, vec_env, "val"), run(model, vec_env, "train")

    return validate
