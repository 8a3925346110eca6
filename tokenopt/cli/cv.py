"""``tokenopt cv``: K-fold cross-validation over query ids."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import typer

from tokenopt.cli.common import REQUIRED, ConfigOptions, Flag, config_options, console, fail, progress
from tokenopt.cli.train import CONFIG_FILE_FLAG, SET_FLAG, TRAIN_CONFIG

__all__ = ["CV_TRAIN_OPTIONS", "cv_command"]

CV_TRAIN_OPTIONS = ConfigOptions(
    TRAIN_CONFIG,
    fields=("table", "total_timesteps", "cost_weight", "eval_freq", "patience", "config_file", "hyperparams"),
    flags={
        "table": Flag(default=REQUIRED),
        "total_timesteps": Flag(name="--timesteps", help="PPO steps per fold. Default: n_timesteps from the YAML."),
        "config_file": CONFIG_FILE_FLAG,
        "hyperparams": SET_FLAG,
    },
    paths=("table",),
)
"""The fold runs' training settings (each fold trains one :class:`~tokenopt.agents.ppo.train.TrainConfig`)."""


@config_options(settings=CV_TRAIN_OPTIONS)
def cv_command(
    *,
    settings: dict[str, Any],
    folds: Annotated[int, typer.Option(help="K: number of folds (2 to the number of queries).")],
    out: Annotated[Path, typer.Option(help="Folder of the fold runs (fold-k/) and cv.json.")] = Path("runs/cv"),
    seed: Annotated[int, typer.Option(help="Seed of the fold assignment and of training.")] = 0,
) -> None:
    """K-fold cross-validation over query ids: train one policy per fold, test it on its fold."""
    from tokenopt.agents.evaluation.cv import cross_validate, format_cv
    from tokenopt.agents.ppo.train import TrainConfig

    try:
        config = TrainConfig(**settings)
        with progress() as bars:
            task = bars.add_task("cv", total=None)

            def report(fold: int, steps: int, metrics: dict[str, float]) -> None:
                description = f"cv fold {fold}/{folds} ({steps} steps, val reward {metrics['reward']:.3f})"
                bars.update(task, description=description)

            result = cross_validate(config, folds, out=out, seed=seed, progress=report)
    except (ValueError, FileNotFoundError) as error:
        fail(error)
    typer.echo(
        f"{folds}-fold cross-validation on {settings['table']} (test fold of each, lambda {config.cost_weight:g}):\n"
    )
    typer.echo(format_cv(result))
    console.print(f"cv.json and the fold runs are in {out} ({result.seconds:.0f} s)")
