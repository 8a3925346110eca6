"""Warm starts of a PPO agent: from an earlier run or policy, or by classification on the table.

``tokenopt train --init-from``: a new run (another cost weight, more data, a refreshed table) starts from an old
policy's weights instead of from scratch. The actor (``mlp_extractor.policy_net`` and
``action_net``) is copied when its shapes match, the critic too when the source is a
run checkpoint, and the observation normalisation is copied so the copied layers see
inputs on the scale they were trained on. The hidden layers then learn more slowly
than the output heads (layer-wise learning rates, as in ULMFiT's discriminative
fine-tuning, Howard & Ruder 2018): what the hidden layers learnt about the features
carries over, while the heads adapt to the new reward.

``pretrain_epochs`` (a hyperparameter): before PPO, :func:`pretrain_actor` fits the actor
by cost-sensitive classification on the outcome table. Every train query has every
action's outcome, so the target of a query is a softmax of its action rewards over a
temperature (a temperature near 0 is the oracle's one-hot choice; a larger one spreads
the mass over near-ties), and the actor minimises the cross-entropy to it. The critic is
fitted at the same time to the expected training reward of the actor's distribution.
PPO then continues from there; it sees the same network and observation normalisation.
"""

from __future__ import annotations

import json
import logging
import pickle
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

import numpy as np
import torch
import yaml

from tokenopt.agents.common.hyperparams import activation_name
from tokenopt.agents.common.run_dir import RunDir
from tokenopt.cost import CostModel
from tokenopt.runtime import POLICY_SPEC_FILE
from tokenopt.table import OutcomeMatrix

__all__ = [
    "InitSource",
    "layerwise_lr_algo",
    "layerwise_optimizer",
    "load_init_source",
    "PRETRAIN_OBJECTIVES",
    "pretrain_actor",
    "soft_targets",
    "warm_start",
]

logger = logging.getLogger(__name__)

DEFAULT_POLICY_OBS_COUNT = 10_000.0
"""Observations assumed behind a policy folder's normalisation when it does not record them."""

_HIDDEN_PREFIXES = ("mlp_extractor.", "features_extractor.", "pi_features_extractor.", "vf_features_extractor.")
_CRITIC_PREFIXES = ("mlp_extractor.value_net.", "value_net.")


@dataclass
class InitSource:
    """What a warm start copies from: actor layers, maybe the critic, and the normalisation."""

    path: Path
    """The run or policy folder."""
    kind: str
    """``run`` (a checkpoint: actor and critic) or ``policy`` (an export: actor only)."""
    actor: list[tuple[np.ndarray, np.ndarray]]
    """(weight, bias) of each Linear layer of the actor, weights as torch stores them (outputs x inputs)."""
    hidden_activation: str | None
    """Activation of the actor's hidden layers (``tanh``, ``relu``), when known."""
    critic: dict[str, torch.Tensor] | None
    """The critic's state-dict entries (``mlp_extractor.value_net.*``, ``value_net.*``), for a run."""
    obs_mean: np.ndarray
    """Observation normalisation mean."""
    obs_var: np.ndarray
    """Observation normalisation variance."""
    obs_count: float
    """Observations behind the normalisation statistics."""
    actions: list[str] | None
    """Names of the source's actions, when known."""

    @property
    def n_features(self) -> int:
        """Inputs of the actor's first layer."""
        return int(self.actor[0][0].shape[1])

    @property
    def n_actions(self) -> int:
        """Outputs of the actor's last layer."""
        return int(self.actor[-1][0].shape[0])


def load_init_source(path: str | Path) -> InitSource:
    """Read a run folder (``checkpoints/best_model.zip``) or an exported policy folder.

    Raises:
        FileNotFoundError: the path is neither a trained run nor a policy folder.
        ValueError: the checkpoint has no MLP actor, or the policy is an ensemble.
    """
    path = Path(path)
    if RunDir(path).is_trained():
        return _load_run_source(path)
    if (path / POLICY_SPEC_FILE).is_file():
        return _load_policy_source(path)
    raise FileNotFoundError(
        f"--init-from {path}: neither a run folder (with checkpoints/best_model.zip) "
        "nor a policy folder (with policy.json and policy.npz)"
    )


def _load_run_source(path: Path) -> InitSource:
    from stable_baselines3.common.save_util import load_from_zip_file

    run = RunDir(path)
    checkpoint, stats_path = run.best_model, run.vecnormalize
    if not stats_path.is_file():
        raise FileNotFoundError(f"--init-from {path}: {stats_path} is missing; the run's normalisation is needed too")
    _, params, _ = load_from_zip_file(checkpoint, load_data=False, device="cpu")
    # SB3 annotates the params as tensors; each entry is a module's state dict.
    state = cast(dict[str, torch.Tensor], params["policy"])
    hidden = sorted(
        {int(key.split(".")[2]) for key in state if key.startswith("mlp_extractor.policy_net.")},
    )
    if "action_net.weight" not in state:
        raise ValueError(f"--init-from {checkpoint}: no action_net in the checkpoint; expected an SB3 MlpPolicy")
    actor = [
        (
            state[f"mlp_extractor.policy_net.{i}.weight"].numpy().copy(),
            state[f"mlp_extractor.policy_net.{i}.bias"].numpy().copy(),
        )
        for i in hidden
    ]
    actor.append((state["action_net.weight"].numpy().copy(), state["action_net.bias"].numpy().copy()))
    critic = {key: value.clone() for key, value in state.items() if key.startswith(_CRITIC_PREFIXES)}
    # VecNormalize statistics are SB3's own training checkpoint (a pickle), read offline
    # here exactly as the export does; nothing a server loads is a pickle.
    with stats_path.open("rb") as handle:
        normalizer = pickle.load(handle)
    if not hasattr(normalizer, "obs_rms"):
        raise ValueError(f"--init-from {path}: the run was trained without observation normalisation")
    activation: str | None = None
    actions: list[str] | None = None
    config_path, summary_path = run.config, run.training
    if config_path.is_file():
        config = yaml.safe_load(config_path.read_text(encoding="utf-8")) or {}
        kwargs = (config.get("resolved_hyperparams") or {}).get("policy_kwargs") or {}
        activation = str(kwargs.get("activation_fn", "tanh"))
    if summary_path.is_file():
        actions = [str(a["name"]) for a in json.loads(summary_path.read_text(encoding="utf-8")).get("actions", [])]
    return InitSource(
        path=path,
        kind="run",
        actor=actor,
        hidden_activation=activation,
        critic=critic,
        obs_mean=np.asarray(normalizer.obs_rms.mean, dtype=np.float64),
        obs_var=np.asarray(normalizer.obs_rms.var, dtype=np.float64),
        obs_count=float(normalizer.obs_rms.count),
        actions=actions or None,
    )


def _load_policy_source(path: Path) -> InitSource:
    from tokenopt.runtime import BudgetPolicy

    policy = BudgetPolicy.load(path)
    if len(policy.members) != 1:
        raise ValueError(
            f"--init-from {path}: an ensemble of {len(policy.members)} members; warm start takes a single policy "
            "(one of its runs, or a policy exported with `tokenopt export RUN`)"
        )
    layers = policy.members[0]
    activations = {activation for _, _, activation in layers[:-1]}
    obs_mean, obs_var = policy.member_normalization[0]
    normalization: dict[str, Any] = policy.spec["normalization"]  # type: ignore[assignment]
    return InitSource(
        path=path,
        kind="policy",
        # The export stores weights as (inputs x outputs) for ``x @ W``; torch's Linear holds (outputs x inputs).
        actor=[(weight.T.astype(np.float32), bias.astype(np.float32)) for weight, bias, _ in layers],
        hidden_activation=activations.pop() if len(activations) == 1 else None,
        critic=None,
        obs_mean=obs_mean.copy(),
        obs_var=obs_var.copy(),
        obs_count=float(normalization.get("count", DEFAULT_POLICY_OBS_COUNT)),
        actions=[str(action["name"]) for action in policy.actions],
    )


def _actor_modules(policy: Any) -> tuple[list[torch.nn.Linear], str | None]:
    linears = [m for m in policy.mlp_extractor.policy_net if isinstance(m, torch.nn.Linear)]
    activations = {activation_name(m) for m in policy.mlp_extractor.policy_net}
    activations.discard(None)
    names = sorted(a for a in activations if a is not None)
    return [*linears, policy.action_net], names[0] if len(names) == 1 else None


def _describe(shapes: list[tuple[int, ...]]) -> str:
    hidden = [shape[0] for shape in shapes[:-1]]
    return f"{shapes[0][1]} features -> hidden {hidden} -> {shapes[-1][0]} actions"


def warm_start(model: Any, vec_env: Any, source: InitSource, actions: list[str] | None = None) -> dict[str, Any]:
    """Initialise a fresh SB3 (Maskable)PPO model and its VecNormalize from a source.

    Args:
        model: the new model, before training.
        vec_env: its ``VecNormalize`` wrapper (observation normalisation on).
        source: what to copy, from :func:`load_init_source`.
        actions: the new run's action names, checked against the source's when known.

    Returns:
        What was copied, for the run's ``training.json``.

    Raises:
        ValueError: the feature dimension, action count, action names, hidden sizes or
            activation differ between the source and the new model (naming both), or
            the new run does not normalise observations.
    """
    modules, activation = _actor_modules(model.policy)
    target_shapes = [tuple(module.weight.shape) for module in modules]
    source_shapes = [tuple(weight.shape) for weight, _ in source.actor]
    if source_shapes != target_shapes:
        raise ValueError(
            f"--init-from {source.path}: its actor is {_describe(source_shapes)} but this run's is "
            f"{_describe(target_shapes)}; the feature dimension and the action count must match (same table "
            "features, action table and env), and so must net_arch"
        )
    if actions is not None and source.actions is not None and list(actions) != list(source.actions):
        raise ValueError(
            f"--init-from {source.path}: its actions {source.actions} differ from this table's {list(actions)}"
        )
    if source.hidden_activation is not None and activation is not None and source.hidden_activation != activation:
        raise ValueError(
            f"--init-from {source.path}: its hidden layers use {source.hidden_activation}, this run's {activation}; "
            f"set policy_kwargs.activation_fn to {source.hidden_activation}"
        )
    if not getattr(vec_env, "norm_obs", False) or not hasattr(vec_env, "obs_rms"):
        raise ValueError(f"--init-from {source.path} needs observation normalisation: set normalize: true")
    if vec_env.obs_rms.mean.shape != source.obs_mean.shape:
        raise ValueError(
            f"--init-from {source.path}: its normalisation has {source.obs_mean.shape[0]} inputs, "
            f"this run's observations {vec_env.obs_rms.mean.shape[0]}"
        )
    with torch.no_grad():
        for module, (weight, bias) in zip(modules, source.actor, strict=True):
            module.weight.copy_(torch.as_tensor(weight, dtype=module.weight.dtype))
            module.bias.copy_(torch.as_tensor(bias, dtype=module.bias.dtype))
    copied = ["actor"]
    if source.critic is not None:
        target_state = model.policy.state_dict()
        for key, value in source.critic.items():
            if key not in target_state or tuple(target_state[key].shape) != tuple(value.shape):
                expected = tuple(target_state[key].shape) if key in target_state else "no such layer"
                raise ValueError(
                    f"--init-from {source.path}: critic layer {key} has shape {tuple(value.shape)}, "
                    f"this run's {expected}; the critic's net_arch must match"
                )
        model.policy.load_state_dict(source.critic, strict=False)
        copied.append("critic")
    vec_env.obs_rms.mean = source.obs_mean.astype(np.float64).copy()
    vec_env.obs_rms.var = source.obs_var.astype(np.float64).copy()
    vec_env.obs_rms.count = source.obs_count
    copied.append("normalization")
    logger.info("warm start from %s (%s): copied %s", source.path, source.kind, ", ".join(copied))
    return {"path": str(source.path), "kind": source.kind, "copied": copied, "obs_count": source.obs_count}


def layerwise_optimizer(policy: Any, hidden_lr_scale: float) -> None:
    """Give a policy's optimizer two parameter groups: hidden layers and output heads.

    The hidden group (the MLP extractor) carries ``lr_scale=hidden_lr_scale``, the heads
    (``action_net``, ``value_net``) ``lr_scale=1``; a model of :func:`layerwise_lr_algo`
    applies the scales after SB3's schedule sets the learning rate. The optimizer is
    rebuilt, so call this before training (its state is still empty).

    Raises:
        ValueError: a scale that is not positive.
    """
    if not hidden_lr_scale > 0:
        raise ValueError(f"init_lr_scale must be > 0, got {hidden_lr_scale}")
    hidden: list[torch.nn.Parameter] = []
    heads: list[torch.nn.Parameter] = []
    for name, parameter in policy.named_parameters():
        (hidden if name.startswith(_HIDDEN_PREFIXES) else heads).append(parameter)
    lr = float(policy.optimizer.param_groups[0]["lr"])
    policy.optimizer = policy.optimizer_class(
        [
            {"params": hidden, "lr": lr * hidden_lr_scale, "lr_scale": hidden_lr_scale},
            {"params": heads, "lr": lr, "lr_scale": 1.0},
        ],
        lr=lr,
        **policy.optimizer_kwargs,
    )


def _single_group_state(optimizer: torch.optim.Optimizer, parameters: list[torch.nn.Parameter]) -> dict[str, Any]:
    """The optimizer's state as if it had one parameter group over ``parameters`` in order.

    Plain ``PPO.load`` builds a one-group optimizer and refuses a state dict with
    another number of groups; this keeps warm-started checkpoints loadable anywhere.
    """
    state = optimizer.state_dict()
    in_groups = [p for group in optimizer.param_groups for p in group["params"]]
    position = {id(p): i for i, p in enumerate(parameters)}
    renumber = {old: position[id(p)] for old, p in enumerate(in_groups)}
    heads = optimizer.param_groups[-1]
    merged = {key: value for key, value in state["param_groups"][-1].items() if key not in ("params", "lr_scale")}
    merged["lr"] = heads["lr"]
    merged["params"] = sorted(renumber.values())
    return {"state": {renumber[k]: v for k, v in state["state"].items()}, "param_groups": [merged]}


def layerwise_lr_algo(algo_class: type) -> type:
    """A subclass of an SB3 algorithm whose learning-rate schedule honours ``lr_scale``.

    SB3 (2.x) sets every parameter group's lr to the schedule's value before each
    update (``BaseAlgorithm._update_learning_rate``); the subclass then multiplies each
    group's lr by its ``lr_scale``. Its checkpoints store the optimizer as one group,
    so ``PPO.load`` (and :func:`tokenopt.agents.export.export_run`) read them as usual.
    """

    def _update_learning_rate(self: Any, optimizers: list[torch.optim.Optimizer] | torch.optim.Optimizer) -> None:
        algo_class._update_learning_rate(self, optimizers)  # type: ignore[attr-defined]
        for optimizer in optimizers if isinstance(optimizers, list) else [optimizers]:
            for group in optimizer.param_groups:
                group["lr"] *= float(group.get("lr_scale", 1.0))

    def get_parameters(self: Any) -> dict[str, dict[str, Any]]:
        params: dict[str, dict[str, Any]] = algo_class.get_parameters(self)  # type: ignore[attr-defined]
        if len(self.policy.optimizer.param_groups) > 1:
            params["policy.optimizer"] = _single_group_state(self.policy.optimizer, list(self.policy.parameters()))
        return params

    return type(
        f"Layerwise{algo_class.__name__}",
        (algo_class,),
        {
            "_update_learning_rate": _update_learning_rate,
            "get_parameters": get_parameters,
            "__doc__": f"{algo_class.__name__} with per-group learning-rate scales (``lr_scale``).",
            "__module__": __name__,
        },
    )


# --- warm start by classification on the table ---------------------------------------------------------------------

PRETRAIN_OBJECTIVES = ("cross_entropy", "expected_reward")
"""What :func:`pretrain_actor` minimises (``pretrain_objective``)."""


def soft_targets(rewards: np.ndarray, temperature: float) -> np.ndarray:
    """Row-wise softmax of ``rewards / temperature``: each query's target distribution over actions.

    Raises:
        ValueError: a temperature that is not positive.
    """
    if not temperature > 0:
        raise ValueError(f"the softmax temperature must be > 0; got {temperature}")
    scaled = np.asarray(rewards, dtype=np.float64) / temperature
    scaled -= scaled.max(axis=1, keepdims=True)
    weights = np.exp(scaled)
    return weights / weights.sum(axis=1, keepdims=True)


def pretrain_actor(
    model: Any,
    vec_env: Any,
    train: OutcomeMatrix,
    val: OutcomeMatrix,
    cost_model: CostModel,
    epochs: int,
    temperature: float,
    lr: float = 3e-3,
    seed: int = 0,
    batch_size: int = 256,
    baselines: np.ndarray | None = None,
    set_normalization: bool = True,
    objective: str = "cross_entropy",
) -> dict[str, Any]:
    """Fit a fresh SB3 (Maskable)PPO actor to every train query's action rewards, before PPO.

    The actor minimises the cross-entropy to :func:`soft_targets` of the train rewards;
    the critic regresses on the expected training reward of the actor's (detached)
    distribution, ``sum_a pi(a|x) (r(x, a) - b(x))``, so PPO's first advantages are
    already centred per query. Minibatches of ``batch_size`` queries, Adam; the epoch
    whose actor has the best expected val reward (unshaped) is kept.

    Args:
        model: the new model, before training, on a ``Discrete`` action space.
        vec_env: its ``VecNormalize`` wrapper.
        train: the train split (features and outcomes), rows in any order.
        val: the val split, to keep the best epoch.
        cost_model: prices and lambda of the rewards.
        epochs: passes over the train queries.
        temperature: the softmax temperature of the targets (reward units).
        lr: Adam's learning rate.
        seed: seed of the minibatch order.
        batch_size: queries per step.
        baselines: ``b(x)`` of each train row when the training reward is shaped (None: 0).
        set_normalization: set the observation normalisation to the train features'
            mean and variance first (False keeps the current one, e.g. copied by
            :func:`warm_start`).
        objective: ``cross_entropy`` to the soft targets (forward KL: covers every
            near-best action), or ``expected_reward``: maximise ``E_pi[r] + T * H(pi)``
            over every action at once (reverse KL to the same targets: seeks the best
            action the features can tell apart, as PPO does, without sampling).

    Returns:
        What was done, for the run's ``training.json``: epochs, temperature, the kept
        epoch and its val figures, and the train accuracy against the oracle's action.

    Raises:
        ValueError: bad settings, a matrix without features, an action space that is not
            ``Discrete`` with one action per table column.
    """
    from gymnasium import spaces

    if epochs < 1:
        raise ValueError(f"pretrain_actor needs at least one epoch; got {epochs}")
    if objective not in PRETRAIN_OBJECTIVES:
        raise ValueError(f"unknown pretrain objective {objective!r}: expected one of {', '.join(PRETRAIN_OBJECTIVES)}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1; got {batch_size}")
    if train.features is None or val.features is None:
        raise ValueError("the warm start by classification needs the table's features (features.parquet)")
    space = model.action_space
    if not isinstance(space, spaces.Discrete) or int(space.n) != len(train.actions):
        raise ValueError(
            f"the warm start by classification needs a Discrete space of the table's {len(train.actions)} actions; "
            f"this run's action space is {space}"
        )
    if set_normalization and getattr(vec_env, "norm_obs", False):
        features = train.features.astype(np.float64)
        vec_env.obs_rms.mean = features.mean(axis=0)
        vec_env.obs_rms.var = features.var(axis=0)
        vec_env.obs_rms.count = float(len(features))
    policy = model.policy
    device = policy.device

    def observations(matrix: OutcomeMatrix) -> torch.Tensor:
        assert matrix.features is not None
        normalized = vec_env.normalize_obs(matrix.features.astype(np.float32))
        return torch.as_tensor(np.asarray(normalized, dtype=np.float32), device=device)

    train_rewards = train.rewards(cost_model)
    shift = np.zeros(len(train.ids)) if baselines is None else np.asarray(baselines, dtype=np.float64)
    if shift.shape != (len(train.ids),):
        raise ValueError(f"baselines must hold one value per train query ({len(train.ids)}); got shape {shift.shape}")
    x = observations(train)
    targets = torch.as_tensor(soft_targets(train_rewards, temperature), dtype=torch.float32, device=device)
    env_rewards = torch.as_tensor(train_rewards - shift[:, None], dtype=torch.float32, device=device)
    train_reward_tensor = torch.as_tensor(train_rewards, dtype=torch.float32, device=device)
    x_val = observations(val)
    val_rewards = torch.as_tensor(val.rewards(cost_model), dtype=torch.float32, device=device)

    def logits_and_values(inputs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        features = policy.extract_features(inputs)
        latent_pi, latent_vf = policy.mlp_extractor(features)
        return policy.action_net(latent_pi), policy.value_net(latent_vf).squeeze(-1)

    optimizer = torch.optim.Adam(policy.parameters(), lr=lr)
    generator = torch.Generator().manual_seed(seed)
    policy.set_training_mode(True)
    best: tuple[float, int, dict[str, torch.Tensor]] = (-np.inf, 0, {})
    for epoch in range(1, epochs + 1):
        order = torch.randperm(len(train.ids), generator=generator)
        for start in range(0, len(order), batch_size):
            rows = order[start : start + batch_size]
            logits, values = logits_and_values(x[rows])
            log_pi = torch.log_softmax(logits, dim=1)
            if objective == "cross_entropy":
                actor_loss = -(targets[rows] * log_pi).sum(dim=1).mean()
            else:
                pi = log_pi.exp()
                actor_loss = -(
                    (pi * train_reward_tensor[rows]).sum(dim=1) - temperature * (pi * log_pi).sum(dim=1)
                ).mean()
            expected = (log_pi.exp().detach() * env_rewards[rows]).sum(dim=1)
            critic_loss = torch.nn.functional.mse_loss(values, expected)
            optimizer.zero_grad()
            (actor_loss + critic_loss).backward()
            optimizer.step()
        with torch.no_grad():
            val_logits, _ = logits_and_values(x_val)
            score = float((torch.softmax(val_logits, dim=1) * val_rewards).sum(dim=1).mean())
        if score > best[0] + 1e-9:
            best = (score, epoch, {key: value.detach().clone() for key, value in policy.state_dict().items()})
    policy.load_state_dict(best[2])
    policy.set_training_mode(False)
    with torch.no_grad():
        train_logits, _ = logits_and_values(x)
        val_logits, _ = logits_and_values(x_val)
    val_greedy = val_logits.argmax(dim=1).numpy()
    record = {
        "epochs": epochs,
        "temperature": temperature,
        "objective": objective,
        "lr": lr,
        "kept_epoch": best[1],
        "val_expected_reward": best[0],
        "val_greedy_reward": float(val.rewards(cost_model)[np.arange(len(val.ids)), val_greedy].mean()),
        "train_oracle_agreement": float((train_logits.argmax(dim=1).numpy() == train_rewards.argmax(axis=1)).mean()),
    }
    logger.info(
        "warm start by classification: %d epochs at temperature %g, kept epoch %d (val expected reward %.4f)",
        epochs, temperature, best[1], best[0],
    )  # fmt: skip
    return record
