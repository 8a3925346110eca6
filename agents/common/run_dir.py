"""The run folder: where ``tokenopt train`` writes and what export, warm starts and eval read."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

__all__ = ["RunDir"]


@dataclass(frozen=True)
class RunDir:
    """The files of one run folder, ``runs/<name>/`` (as RL Zoo's experiment folders).

    Attributes are paths; nothing is created until a writer asks for it.
    """

    path: Path

    def __init__(self, path: str | Path) -> None:
        object.__setattr__(self, "path", Path(path))

    @property
    def config(self) -> Path:
        """``config.yml``: the resolved settings and hyperparameters."""
        return self.path / "config.yml"

    @property
    def command(self) -> Path:
        """``command.txt``: the command line that made the run."""
        return self.path / "command.txt"

    @property
    def training(self) -> Path:
        """``training.json``: the best validation metrics and how training ended."""
        return self.path / "training.json"

    @property
    def checkpoints(self) -> Path:
        """``checkpoints/``: the best model so far and its observation normalisation."""
        return self.path / "checkpoints"

    @property
    def best_model(self) -> Path:
        """``checkpoints/best_model.zip``: SB3's checkpoint of the best validated model."""
        return self.checkpoints / "best_model.zip"

    @property
    def vecnormalize(self) -> Path:
        """``checkpoints/vecnormalize.pkl``: SB3's VecNormalize statistics (read offline only)."""
        return self.checkpoints / "vecnormalize.pkl"

    @property
    def feature_spec(self) -> Path:
        """``features.json``: the feature spec fitted on the train split (``--features`` other than prompt-text)."""
        return self.path / "features.json"

    @property
    def feature_arrays(self) -> Path:
        """``features.npz``: the fitted spec's arrays (the lm-hidden projection), plain arrays."""
        return self.path / "features.npz"

    @property
    def tensorboard(self) -> Path:
        """``tb/``: TensorBoard event files."""
        return self.path / "tb"

    @property
    def policy(self) -> Path:
        """``policy/``: the exported runtime policy."""
        return self.path / "policy"

    def is_run(self) -> bool:
        """Whether the folder holds a run's settings."""
        return self.config.is_file()

    def is_trained(self) -> bool:
        """Whether the folder holds a trained model."""
        return self.best_model.is_file()

    def require_trained(self) -> None:
        """Raise unless the run has a model, its normalisation and its settings.

        Raises:
            FileNotFoundError: a file is missing; the message says how to train the run.
        """
        for required in (self.best_model, self.vecnormalize, self.config):
            if not required.is_file():
                raise FileNotFoundError(
                    f"{required} is missing: train the run first with `tokenopt train --out {self.path}`"
                )
