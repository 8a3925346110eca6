"""PPO hyperparameters: the YAML file keyed by environment id, schedules, and env kwargs kept apart.

As RL Zoo's ``hyperparams/ppo.yml``: one entry per environment id, read with
``yaml.safe_load``; ``lin_<x>`` is a linear schedule from ``x`` to 0; a key that is
neither a PPO argument, a run setting nor an environment argument is an error that
names its closest match.
"""

from __future__ import annotations

import difflib
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import yaml

__all__ = [
    "ACTIVATIONS",
    "CONFIG_DIR",
    "ENV_IDS",
    "Hyperparams",
    "activation_name",
    "check_keys",
    "load_config",
    "policy_kwargs",
    "schedule",
    "split_hyperparams",
]

CONFIG_DIR = Path(__file__).resolve().parent.parent / "configs"
"""Where the shipped ``ppo.yml`` lives."""

ENV_IDS = {
    "budget": "tokenopt/TokenBudget-v0",
    "stream": "tokenopt/TokenBudgetStream-v0",
    "probe": "tokenopt/TokenBudgetProbe-v0",
}
"""``tokenopt train --env NAME``: the registered environment id of each name."""

ACTIVATIONS: dict[str, type[torch.nn.Module]] = {"tanh": torch.nn.Tanh, "relu": torch.nn.ReLU}
"""The hidden-layer activations a policy may use, by the name the runtime policy stores."""

PPO_KEYS = {
    "n_steps", "batch_size", "n_epochs", "gamma", "gae_lambda", "learning_rate", "ent_coef", "clip_range",
    "vf_coef", "max_grad_norm", "target_kl",
}  # fmt: skip
"""Keys passed to PPO's constructor."""
RUN_KEYS = {
    "n_timesteps", "n_envs", "normalize", "policy_kwargs", "policy", "pretrain_epochs", "pretrain_temperature",
    "pretrain_lr", "pretrain_objective",
}  # fmt: skip
"""Keys that set up the run around PPO (``pretrain_*``: the actor's warm start by classification on the
table, :func:`tokenopt.agents.ppo.warm_start.pretrain_actor`; ``--env budget`` only)."""
ENV_KEYS = {"escalate_mode", "reward_baseline", "reward_scale"}
"""Environment arguments accepted beside the hyperparameters, as RL Zoo's ``env_kwargs``:
``escalate_mode`` (``--env probe`` only) gives TokenBudgetProbe-v0 its escalate action;
``reward_baseline`` and ``reward_scale`` (``--env budget`` only) shape TokenBudget-v0's training reward."""


def activation_name(module: torch.nn.Module) -> str | None:
    """The stored name of an activation module (None when it is not one of :data:`ACTIVATIONS`)."""
    for name, kind in ACTIVATIONS.items():
        if type(module) is kind:
            return name
    return None


def load_config(path: str | Path, env_id: str) -> dict[str, Any]:
    """The hyperparameters for ``env_id`` in a YAML file keyed by environment id.

    Raises:
        ValueError: the file has no entry for the environment.
    """
    data = yaml.safe_load(Path(path).read_text(encoding="utf-8")) or {}
    if env_id not in data:
        raise ValueError(f"{path} has no hyperparameters for {env_id}; it has {sorted(data)}")
    return dict(data[env_id])


def schedule(value: Any) -> Any:
    """``lin_<x>`` as a linear schedule from ``x`` to 0 (SB3 calls it with the progress remaining)."""
    if isinstance(value, str) and value.startswith("lin_"):
        start = float(value[4:])
        return lambda progress_remaining: progress_remaining * start
    return value


def check_keys(hyperparams: dict[str, Any], where: str) -> None:
    """Refuse unknown keys, naming the closest known one.

    Raises:
        ValueError: a key is not a PPO argument, a run setting or an environment argument.
    """
    known = sorted(PPO_KEYS | RUN_KEYS | ENV_KEYS)
    for key in hyperparams:
        if key not in known:
            close = difflib.get_close_matches(key, known, n=1)
            hint = f"; did you mean {close[0]!r}?" if close else ""
            raise ValueError(f"unknown hyperparameter {key!r} in {where}{hint}")


def policy_kwargs(raw: dict[str, Any]) -> dict[str, Any]:
    """SB3's ``policy_kwargs`` from the YAML's: activation by name, weight decay, one net_arch for pi and vf.

    Raises:
        ValueError: an unknown activation.
    """
    kwargs = dict(raw)
    activation = kwargs.pop("activation_fn", "tanh")
    if activation not in ACTIVATIONS:
        raise ValueError(f"activation_fn {activation!r} is not one of {sorted(ACTIVATIONS)}")
    kwargs["activation_fn"] = ACTIVATIONS[activation]
    weight_decay = float(kwargs.pop("weight_decay", 0.0))
    kwargs["optimizer_kwargs"] = {"weight_decay": weight_decay} if weight_decay else {}
    net_arch = kwargs.pop("net_arch", [64, 64])
    kwargs["net_arch"] = {"pi": list(net_arch), "vf": list(net_arch)}
    return kwargs


@dataclass
class Hyperparams:
    """A YAML entry split by destination: PPO's arguments, the run's settings, the environment's."""

    ppo_kwargs: dict[str, Any] = field(default_factory=dict)
    """Keyword arguments of PPO, schedules resolved."""
    policy_kwargs: dict[str, Any] = field(default_factory=dict)
    """SB3's policy_kwargs (see :func:`policy_kwargs`)."""
    env_kwargs: dict[str, Any] = field(default_factory=dict)
    """Keyword arguments of the environment (``escalate_mode``)."""
    n_envs: int = 8
    """Environment copies in the DummyVecEnv."""
    n_timesteps: int = 60000
    """Environment steps when the command line gives none."""
    normalize: bool = True
    """VecNormalize on observations."""
    pretrain_epochs: int = 0
    """Epochs of the actor's warm start by classification on the table (0: none)."""
    pretrain_temperature: float = 0.2
    """Temperature of the softmax over each train query's action rewards (the classification targets)."""
    pretrain_lr: float = 3e-3
    """Adam learning rate of that warm start."""
    pretrain_objective: str = "cross_entropy"
    """``cross_entropy`` to the softmax targets, or ``expected_reward`` (plus temperature x entropy)."""


def split_hyperparams(hyperparams: dict[str, Any]) -> Hyperparams:
    """Split a checked YAML entry (with its overrides applied) by destination."""
    settings = dict(hyperparams)
    env_kwargs = {key: settings.pop(key) for key in sorted(ENV_KEYS) if key in settings}
    n_envs = int(settings.pop("n_envs", 8))
    n_timesteps = int(settings.pop("n_timesteps", 60000))
    normalize = bool(settings.pop("normalize", True))
    pretrain_epochs = int(settings.pop("pretrain_epochs", 0))
    pretrain_temperature = float(settings.pop("pretrain_temperature", 0.2))
    pretrain_lr = float(settings.pop("pretrain_lr", 3e-3))
    pretrain_objective = str(settings.pop("pretrain_objective", "cross_entropy"))
    if pretrain_objective not in ("cross_entropy", "expected_reward"):
        raise ValueError(f"pretrain_objective must be cross_entropy or expected_reward; got {pretrain_objective!r}")
    if pretrain_epochs < 0:
        raise ValueError(f"pretrain_epochs must be >= 0 (0: no warm start by classification); got {pretrain_epochs}")
    if not pretrain_temperature > 0:
        raise ValueError(f"pretrain_temperature must be > 0 (a reward scale, e.g. 0.05); got {pretrain_temperature}")
    if not pretrain_lr > 0:
        raise ValueError(f"pretrain_lr must be > 0, e.g. 1e-3; got {pretrain_lr}")
    kwargs = policy_kwargs(settings.pop("policy_kwargs", {}))
    settings.pop("policy", None)
    ppo_kwargs: dict[str, Callable[[float], float] | Any] = {key: schedule(value) for key, value in settings.items()}
    return Hyperparams(
        ppo_kwargs, kwargs, env_kwargs, n_envs, n_timesteps, normalize, pretrain_epochs, pretrain_temperature,
        pretrain_lr, pretrain_objective,
    )  # fmt: skip
