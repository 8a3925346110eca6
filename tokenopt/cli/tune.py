"""``tokenopt tune``: PPO hyperparameters tuned with Optuna."""

from __future__ import annotations

import json
from dataclasses import replace
from typing import Any

import typer

from tokenopt.cli.common import REQUIRED, ConfigOptions, Flag, config_options, fail, progress
from tokenopt.cli.train import CONFIG_FILE_FLAG, SET_FLAG, TRAIN_CONFIG

__all__ = ["TUNE_OPTIONS", "TUNE_TRAIN_OPTIONS", "tune_command"]

TUNE_OPTIONS = ConfigOptions(
    "tokenopt.agents.ppo.tune:TuneConfig",
    fields=("sampler", "trials", "study_name", "storage", "out", "objective", "seed"),
    paths=("out",),
)

TUNE_TRAIN_OPTIONS = ConfigOptions(
    TRAIN_CONFIG,
    fields=("table", "total_timesteps", "em_floor", "cost_weight", "eval_freq", "config_file", "hyperparams"),
    flags={
        "table": Flag(default=REQUIRED),
        "total_timesteps": Flag(name="--timesteps", help="PPO steps per trial. Default: n_timesteps from the YAML."),
        "config_file": CONFIG_FILE_FLAG,
        "hyperparams": replace(SET_FLAG, help="Fixed hyperparameter override key=value (repeatable)."),
    },
    paths=("table",),
)
"""The trials' shared training settings (a :class:`~tokenopt.agents.ppo.train.TrainConfig`)."""


@config_options(settings=TUNE_TRAIN_OPTIONS, tune_settings=TUNE_OPTIONS)
def tune_command(*, settings: dict[str, Any], tune_settings: dict[str, Any]) -> None:
    """Tune PPO hyperparameters with Optuna (resumable); write the best set as OUT/best.yml."""
    from tokenopt.agents.ppo.train import TrainConfig
    from tokenopt.agents.ppo.tune import TuneConfig, tune

    try:
        base = TrainConfig(**settings)
        config = TuneConfig(**tune_settings)
        with progress() as bars:
            task = bars.add_task("tune", total=None)

            def report(trial: int, steps: int, metrics: dict[str, float]) -> None:
                description = f"tune trial {trial} ({steps} steps, val reward {metrics['reward']:.3f})"
                bars.update(task, description=description)

            result = tune(base, config, progress=report)
    except (ValueError, FileNotFoundError) as error:
        fail(error)
    metrics = result.best_metrics
    typer.echo(
        f"study {result.study_name!r}: ran {result.trials_run} trials, {result.trials_finished} finished "
        f"({result.trials_pruned} pruned)\n"
        f"best trial {result.best_trial} ({result.best_run_dir}): "
        f"{config.objective} objective {result.best_value:.4f}; "
        f"validation EM {metrics.get('em', 0):.3f}, tokens {metrics.get('tokens', 0):.2f}, "
        f"reward {metrics.get('reward', 0):.3f}\n"
        f"params: {json.dumps(result.best_params)}\n"
        f"best config: {result.best_config} (tokenopt train --table {base.table} --config {result.best_config})"
    )
