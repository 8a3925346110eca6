"""Validators: how a policy in training is scored on the val split, one per environment."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import numpy as np

from tokenopt.agents.common.callbacks import Predictor, Validator
from tokenopt.cost import CostModel, parse_cost_weight_range, with_price
from tokenopt.table import OutcomeMatrix, evaluate_actions, evaluate_outcomes

if TYPE_CHECKING:
    from tokenopt.agents.ppo.train import TrainConfig

__all__ = ["PRICE_GRID_POINTS", "budget_validator", "price_grid", "probe_validator", "stream_validator"]


PRICE_GRID_POINTS = 5
"""Cost weights a price-conditioned policy is validated at: log-spaced over its range, ends included."""


def price_grid(cost_weight_range: tuple[float, float]) -> list[float]:
    """The cost weights a price-conditioned policy is validated at (log-spaced over the range)."""
    return [float(w) for w in np.geomspace(*cost_weight_range, PRICE_GRID_POINTS)]


def budget_validator(config: TrainConfig, val: OutcomeMatrix, train_sample: OutcomeMatrix) -> Validator:
    """Validation on TokenBudget-v0: every val query once, actions looked up in the table.

    A price-conditioned policy (``cost_weight_range``) is validated at every weight of
    :func:`price_grid`; each metric is the mean over the grid (the reward: the mean over
    log-spaced prices, what the policy is trained for), and ``reward@W`` gives each weight's.
    """
    reference = val.max_budget_greedy()
    reference_em = float(val.exact_match[:, reference].mean())
    assert val.features is not None and train_sample.features is not None
    val_features, train_features = val.features, train_sample.features
    conditioned = bool(config.cost_weight_range)
    weights = price_grid(parse_cost_weight_range(config.cost_weight_range)) if conditioned else [config.cost_weight]

    def score(predict: Predictor, matrix: OutcomeMatrix, features: np.ndarray, em: float | None) -> dict[str, float]:
        if not conditioned:
            return evaluate_actions(matrix, predict(features), config.cost_model(), em)
        per_weight = [
            evaluate_actions(matrix, predict(with_price(features, w)), config.cost_model(w), em) for w in weights
        ]
        metrics = {key: float(np.mean([m[key] for m in per_weight])) for key in per_weight[0]}
        return metrics | {f"reward@{w:g}": m["reward"] for w, m in zip(weights, per_weight, strict=True)}

    def validate(model: Any, vec_env: Any) -> tuple[dict[str, float], dict[str, float]]:
        predict = Predictor(model, vec_env)
        return score(predict, val, val_features, reference_em), score(predict, train_sample, train_features, None)

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
