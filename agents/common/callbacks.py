"""Training callbacks: validation, the Lagrangian lambda, the best checkpoint and early stopping."""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import numpy as np

from tokenopt.agents.common.run_dir import RunDir

if TYPE_CHECKING:
    from tokenopt.agents.ppo.train import TrainConfig

__all__ = ["MAX_COST_WEIGHT", "Predictor", "Validator", "validation_callback"]

MAX_COST_WEIGHT = 1e3
"""Bound of the dual ascent on lambda: past it a token costs more than a thousand exact matches, and a
large step size would otherwise overflow (seen with dual_lr 0.2)."""


class Predictor:
    """Deterministic actions for raw observations, through VecNormalize's statistics."""

    def __init__(self, model: Any, vec_normalize: Any) -> None:
        self.model = model
        self.vec_normalize = vec_normalize

    def __call__(self, observations: np.ndarray) -> np.ndarray:
        """The deterministic action of each raw observation."""
        normalized = self.vec_normalize.normalize_obs(observations) if self.vec_normalize is not None else observations
        actions, _ = self.model.predict(normalized, deterministic=True)
        return np.asarray(actions).reshape(-1)


Validator = Callable[[Any, Any], tuple[dict[str, float], dict[str, float]]]
"""Called with (model, VecNormalize); returns (validation metrics, train-sample metrics)."""


def validation_callback(
    config: TrainConfig,
    run_dir: RunDir,
    validate: Validator,
    vec_env: Any,
    hparams: dict[str, Any],
    progress: Callable[[int, int, dict[str, float]], None] | None,
    validate_at_start: bool = False,
) -> Any:
    """The callback that validates every ``eval_freq`` steps, adapts lambda, keeps the best model and stops early.

    Args:
        config: the run's settings (constraint, dual step, patience, eval frequency).
        run_dir: where the best model and its normalisation are saved.
        validate: the environment's validator (see :mod:`tokenopt.agents.ppo.validators`).
        vec_env: the training VecNormalize (its statistics are saved with the model; lambda is set on it).
        hparams: what TensorBoard's HParams tab shows.
        progress: called after every validation with (steps, 0, metrics).
        validate_at_start: validate (and keep as the best so far) the model as training
            starts, e.g. an actor warm-started by classification.
    """
    from stable_baselines3.common.callbacks import BaseCallback
    from stable_baselines3.common.logger import HParam

    class ValidationCallback(BaseCallback):
        """Validate, adapt lambda, keep the best model and stop early."""

        def __init__(self) -> None:
            super().__init__()
            self.cost_weight = config.cost_weight
            self.best_score = -np.inf
            self.best_metrics: dict[str, float] = {}
            self.stale = 0
            self.stopped_early = False
            self.last_eval = 0

        def _on_training_start(self) -> None:
            metrics = {"eval/reward": 0.0, "eval/em": 0.0, "eval/tokens": 0.0, "eval/gap_recovered": 0.0}
            self.logger.record("hparams", HParam(hparams, metrics), exclude=("stdout", "log", "json", "csv"))
            if validate_at_start:
                self._validate()

        def _score(self, metrics: dict[str, float]) -> float:
            if config.em_floor is not None:
                feasible = metrics["em_drop_points"] <= config.em_floor
                return -metrics["tokens"] if feasible else -1e6 - metrics["em_drop_points"]
            if config.token_target is not None:
                feasible = metrics["tokens"] <= config.token_target
                return metrics["em"] if feasible else -1e6 - metrics["tokens"]
            return metrics["reward"]

        def _update_lambda(self, metrics: dict[str, float]) -> None:
            if config.em_floor is not None:
                slack = config.em_floor - metrics["em_drop_points"]  # > 0: EM to spare
                # Multiplicative steps: from lambda 0 they would stay at 0, so they start from a tiny price.
                self.cost_weight = max(self.cost_weight, 1e-6) * float(np.exp(config.dual_lr * slack))
                self.cost_weight = min(self.cost_weight, MAX_COST_WEIGHT)
            elif config.token_target is not None:
                excess = (metrics["tokens"] - config.token_target) / max(config.token_target, 1e-9)
                self.cost_weight = max(1e-6, self.cost_weight * float(np.exp(10 * config.dual_lr * excess)))
                self.cost_weight = min(self.cost_weight, MAX_COST_WEIGHT)
            else:
                return
            vec_env.env_method("set_cost_weight", self.cost_weight)

        def _on_step(self) -> bool:
            if self.num_timesteps - self.last_eval < config.eval_freq:
                return True
            return self._validate()

        def _validate(self) -> bool:
            self.last_eval = self.num_timesteps
            metrics, train_metrics = validate(self.model, vec_env)
            for key in ("em", "tokens", "reward", "gap_recovered"):
                self.logger.record(f"eval/{key}", metrics[key])
            self.logger.record("eval/train_reward", train_metrics["reward"])
            self.logger.record("eval/overfit_gap", train_metrics["reward"] - metrics["reward"])
            self.logger.record("train/lambda", self.cost_weight)
            score = self._score(metrics)
            if score > self.best_score + 1e-4:
                self.best_score, self.best_metrics, self.stale = score, metrics, 0
                self.model.save(run_dir.best_model)
                vec_env.save(str(run_dir.vecnormalize))
                self.best_metrics["cost_weight"] = self.cost_weight
            else:
                self.stale += 1
            self._update_lambda(metrics)
            self.logger.dump(self.num_timesteps)
            if progress is not None:
                progress(self.num_timesteps, 0, metrics)
            if self.stale >= config.patience and config.em_floor is None and config.token_target is None:
                self.stopped_early = True
                return False
            return True

    return ValidationCallback()
