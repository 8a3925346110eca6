"""Hyperparameter tuning of PPO on an outcome table with Optuna.

``tokenopt tune --table DIR --sampler tpe --trials N`` trains one run per trial
into ``OUT/trial-NNN`` with hyperparameters drawn from a small search space
(learning rate, entropy bonus, epochs, minibatch size, clip range, network width
and depth), reports the validation score after every validation so that a
median pruner can stop hopeless trials early (Akiba et al., "Optuna", KDD 2019),
and writes the best trial's full hyperparameter set as ``OUT/best.yml``, a file
``tokenopt train --config`` reads. Trials live in an SQLite study: running the
same command again resumes it and runs only the trials still missing.
"""

from __future__ import annotations

import dataclasses
import logging
import math
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from tokenopt.agents.common.hyperparams import ENV_IDS, load_config
from tokenopt.agents.ppo.train import TrainConfig, train

__all__ = [
    "GRID",
    "SAMPLERS",
    "TuneConfig",
    "TuneResult",
    "objective_value",
    "suggest_hyperparams",
    "trials_to_run",
    "tune",
]

logger = logging.getLogger(__name__)

SAMPLERS = ("tpe", "random", "grid")
OBJECTIVES = ("reward", "tokens")
GRID: dict[str, list[Any]] = {"learning_rate": [3e-4, 1e-3, 3e-3], "net_width": [32, 64, 128]}
"""The grid sampler's search space; the other hyperparameters keep the base YAML's values."""
EM_PENALTY_TOKENS = 1000.0
"""With ``--objective tokens``, each EM point beyond the floor costs as much as this many tokens."""


@dataclass
class TuneConfig:
    """Settings of ``tokenopt tune`` (the trials' shared training settings are a :class:`TrainConfig`)."""

    sampler: str = "tpe"
    """``tpe``, ``random`` or ``grid`` (learning rate x network width)."""
    trials: int = 20
    """Total trials the study should hold, counting those of earlier runs (completed or pruned)."""
    study_name: str = "tokenopt-tune"
    """Name of the Optuna study in the storage."""
    storage: str | None = None
    """Optuna storage URL; None: ``sqlite:///OUT/study.db``."""
    out: str = "runs/tune"
    """Folder of the trial runs, the study database and ``best.yml``."""
    objective: str = "reward"
    """``reward`` (maximise validation reward) or ``tokens`` (minimise validation tokens; needs an EM floor)."""
    seed: int = 0
    """Seed of the sampler (offset by the trials already in the study) and of training."""

    def validate(self, base: TrainConfig) -> None:
        """Check the settings against the accepted values.

        Raises:
            ValueError: a bad value, named with the accepted ones.
        """
        if self.sampler not in SAMPLERS:
            raise ValueError(f"--sampler {self.sampler!r} is not one of {list(SAMPLERS)}")
        if self.objective not in OBJECTIVES:
            raise ValueError(f"--objective {self.objective!r} is not one of {list(OBJECTIVES)}")
        if self.trials < 1:
            raise ValueError(f"--trials must be at least 1; got {self.trials}")
        if self.objective == "tokens" and base.em_floor is None:
            raise ValueError("--objective tokens needs --em-floor POINTS (else the cheapest action always wins)")
        if base.em_floor is not None and base.em_floor < 0:
            raise ValueError(f"--em-floor must be >= 0 EM points; got {base.em_floor}")
        if base.total_timesteps is not None and base.total_timesteps < base.eval_freq:
            raise ValueError(
                f"--timesteps {base.total_timesteps} is below --eval-freq {base.eval_freq}: no validation would run; "
                f"use at least {base.eval_freq} steps"
            )


@dataclass
class TuneResult:
    """The study after this run."""

    study_name: str
    storage: str
    trials_run: int
    """Trials this call ran."""
    trials_finished: int
    """Completed or pruned trials in the study."""
    trials_pruned: int
    best_trial: int
    best_value: float
    best_params: dict[str, Any]
    best_metrics: dict[str, float]
    best_run_dir: str
    best_config: Path
    """``OUT/best.yml``."""


def objective_value(metrics: dict[str, float], objective: str, em_floor: float | None) -> float:
    """The score a trial maximises, from validation metrics.

    ``reward``: the validation reward. ``tokens``: minus the mean billed tokens,
    less :data:`EM_PENALTY_TOKENS` per EM point beyond the floor.
    """
    if objective == "reward":
        return float(metrics["reward"])
    excess = max(0.0, metrics.get("em_drop_points", 0.0) - (em_floor if em_floor is not None else math.inf))
    return -float(metrics["tokens"]) - EM_PENALTY_TOKENS * excess


def trials_to_run(requested: int, finished: int, grid_size: int | None = None) -> int:
    """Trials still missing for a study to hold ``requested`` (at most the grid's size)."""
    target = requested if grid_size is None else min(requested, grid_size)
    return max(0, target - finished)


def suggest_hyperparams(trial: Any, sampler: str, base: dict[str, Any]) -> dict[str, Any]:
    """Hyperparameter overrides for one trial; ``base`` is the YAML entry they override.

    The learning rate keeps the base's form: a linear schedule ``lin_<value>`` when
    the base has one, else a constant.
    """
    base_kwargs = dict(base.get("policy_kwargs") or {})
    depth = len(base_kwargs.get("net_arch", [64, 64]))
    if sampler == "grid":
        learning_rate = trial.suggest_float("learning_rate", 1e-4, 3e-3, log=True)
        width = trial.suggest_categorical("net_width", GRID["net_width"])
        overrides: dict[str, Any] = {}
    else:
        learning_rate = trial.suggest_float("learning_rate", 1e-4, 3e-3, log=True)
        overrides = {
            "ent_coef": trial.suggest_float("ent_coef", 0.0, 0.05),
            "n_epochs": trial.suggest_categorical("n_epochs", [5, 10, 20]),
            "batch_size": trial.suggest_categorical("batch_size", [64, 128, 256]),
            "clip_range": trial.suggest_float("clip_range", 0.1, 0.3),
        }
        width = trial.suggest_categorical("net_width", [32, 64, 128])
        depth = trial.suggest_categorical("net_depth", [1, 2])
    schedule = isinstance(base.get("learning_rate"), str) and str(base["learning_rate"]).startswith("lin_")
    overrides["learning_rate"] = f"lin_{learning_rate:.6g}" if schedule else float(learning_rate)
    overrides["policy_kwargs"] = base_kwargs | {"net_arch": [int(width)] * int(depth)}
    return overrides


def _make_sampler(name: str, seed: int) -> Any:
    import optuna

    if name == "tpe":
        return optuna.samplers.TPESampler(seed=seed)
    if name == "random":
        return optuna.samplers.RandomSampler(seed=seed)
    return optuna.samplers.GridSampler(GRID, seed=seed)


def _study_settings(base: TrainConfig, config: TuneConfig) -> dict[str, Any]:
    return {
        "table": str(Path(base.table).resolve()),
        "env": base.env,
        "objective": config.objective,
        "em_floor": base.em_floor,
        "cost_weight": base.cost_weight,
        "total_timesteps": base.total_timesteps,
    }


def _train_flags(base: TrainConfig) -> str:
    """The ``tokenopt train`` options that reproduce a trial's settings beyond its hyperparameters."""
    flags = ""
    if base.cost_weight != TrainConfig.cost_weight:
        flags += f" --cost-weight {base.cost_weight:g}"
    if base.em_floor is not None:
        flags += f" --em-floor {base.em_floor:g}"
    if base.eval_freq != TrainConfig.eval_freq:
        flags += f" --eval-freq {base.eval_freq}"
    if base.seed != TrainConfig.seed:
        flags += f" --seed {base.seed}"
    return flags


def tune(
    base: TrainConfig,
    config: TuneConfig,
    progress: Callable[[int, int, dict[str, float]], None] | None = None,
) -> TuneResult:
    """Run (or resume) a study and write ``OUT/best.yml``.

    Args:
        base: training settings shared by the trials; ``hyperparams`` are fixed
            overrides under the searched ones, ``out`` is replaced per trial.
        config: sampler, number of trials, storage and objective.
        progress: called after every validation with (trial number, steps, metrics).

    Raises:
        ValueError: bad settings, a resumed study made with other settings, or no
            completed trial.
    """
    import optuna
    from optuna.trial import TrialState

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    config.validate(base)
    base = dataclasses.replace(base, seed=config.seed)
    if base.env not in ENV_IDS:
        raise ValueError(f"unknown env {base.env!r}: expected one of {sorted(ENV_IDS)}")
    env_id = ENV_IDS[base.env]
    base_hyperparams = load_config(base.config_file, env_id) | base.hyperparams
    out = Path(config.out)
    out.mkdir(parents=True, exist_ok=True)
    url = config.storage or f"sqlite:///{(out / 'study.db').resolve()}"
    storage = optuna.storages.RDBStorage(url)
    study = optuna.create_study(
        storage=storage,
        study_name=config.study_name,
        direction="maximize",
        load_if_exists=True,
        pruner=optuna.pruners.MedianPruner(n_startup_trials=2, n_warmup_steps=1),
    )
    settings = _study_settings(base, config)
    saved = study.user_attrs.get("tokenopt")
    if saved is None:
        study.set_user_attr("tokenopt", settings)
    elif saved != settings:
        changed = {key: (saved.get(key), value) for key, value in settings.items() if saved.get(key) != value}
        raise ValueError(
            f"study {config.study_name!r} in {url} was made with other settings {changed} (saved, now); "
            "pass the same ones to resume it, or a new --study-name"
        )
    # A trial left running by an interrupted tuner never finishes; fail it so that
    # it is run again (one tuning process per study).
    study_id = storage.get_study_id_from_name(config.study_name)
    for stale in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        trial_id = storage.get_trial_id_from_study_id_trial_number(study_id, stale.number)
        storage.set_trial_state_values(trial_id, TrialState.FAIL)
    finished_states = (TrialState.COMPLETE, TrialState.PRUNED)
    finished = len(study.get_trials(deepcopy=False, states=finished_states))
    grid_size = math.prod(len(values) for values in GRID.values()) if config.sampler == "grid" else None
    missing = trials_to_run(config.trials, finished, grid_size)
    # Offset the seed by the history, so a resumed random or TPE sampler does not
    # replay the first run's draws.
    study.sampler = _make_sampler(config.sampler, config.seed + len(study.trials))

    def objective(trial: optuna.Trial) -> float:
        hyperparams = base.hyperparams | suggest_hyperparams(trial, config.sampler, base_hyperparams)
        run_dir = out / f"trial-{trial.number:03d}"
        trial.set_user_attr("run_dir", str(run_dir))
        trial.set_user_attr("hyperparams", hyperparams)
        validations = 0

        def report(steps: int, _: int, metrics: dict[str, float]) -> None:
            nonlocal validations
            trial.report(objective_value(metrics, config.objective, base.em_floor), step=validations)
            validations += 1
            if progress is not None:
                progress(trial.number, steps, metrics)
            if trial.should_prune():
                raise optuna.TrialPruned(f"pruned after {validations} validations ({steps} steps)")

        trial_config = dataclasses.replace(base, out=str(run_dir), hyperparams=hyperparams)
        result = train(trial_config, progress=report)
        if not result.best_metrics:
            raise ValueError(f"trial {trial.number} ran no validation; raise --timesteps above --eval-freq")
        trial.set_user_attr("metrics", {key: float(value) for key, value in result.best_metrics.items()})
        return objective_value(result.best_metrics, config.objective, base.em_floor)

    if missing:
        study.optimize(objective, n_trials=missing, gc_after_trial=True)
    complete = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
    if not complete:
        raise ValueError(f"study {config.study_name!r} has no completed trial yet; run more --trials")
    best = study.best_trial
    best_hyperparams = load_config(base.config_file, env_id) | dict(best.user_attrs["hyperparams"])
    if base.total_timesteps is not None:
        best_hyperparams["n_timesteps"] = int(base.total_timesteps)
    best_path = out / "best.yml"
    header = (
        f"# tokenopt tune: best trial {best.number} of study {config.study_name!r} "
        f"({config.objective} objective value {best.value:.6g}); run it with\n"
        f"# tokenopt train --table {base.table} --config {best_path}{_train_flags(base)}\n"
    )
    body = yaml.safe_dump({env_id: best_hyperparams}, sort_keys=False, default_flow_style=None)
    best_path.write_text(header + body, encoding="utf-8")
    finished_trials = study.get_trials(deepcopy=False, states=finished_states)
    return TuneResult(
        study_name=config.study_name,
        storage=url,
        trials_run=len(finished_trials) - finished,
        trials_finished=len(finished_trials),
        trials_pruned=sum(trial.state == TrialState.PRUNED for trial in finished_trials),
        best_trial=best.number,
        best_value=float(best.value),  # type: ignore[arg-type]
        best_params=dict(best.params),
        best_metrics=dict(best.user_attrs.get("metrics", {})),
        best_run_dir=str(best.user_attrs["run_dir"]),
        best_config=best_path,
    )
