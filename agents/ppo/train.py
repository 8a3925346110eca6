"""PPO training on an outcome table, with validation, early stopping and TensorBoard.

``tokenopt train --table DIR`` trains PPO (or MaskablePPO) from Stable-Baselines3
on a registered environment (``tokenopt/TokenBudget-v0`` by default) backed by the
table, validates on the val split while it trains (EM, billed tokens, reward, gap
recovered), stops early when the validation score stops improving, keeps the best
model and exports it as the runtime policy. The cost weight is fixed, or adapted by
dual ascent to meet an EM floor or a token target (a Lagrangian relaxation of the
constrained problem).
"""

from __future__ import annotations

import json
import logging
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

import numpy as np
import torch
import yaml

from tokenopt.agents.common.callbacks import Predictor, validation_callback
from tokenopt.agents.common.features import fit_table_features, save_run_features
from tokenopt.agents.common.hyperparams import CONFIG_DIR, ENV_IDS, check_keys, load_config, split_hyperparams
from tokenopt.agents.common.plots import log_figures
from tokenopt.agents.common.run_dir import RunDir
from tokenopt.agents.ppo.validators import budget_validator, probe_validator, stream_validator
from tokenopt.cost import CostSettings, parse_cost_weight_range, with_price
from tokenopt.features import DEFAULT_HIDDEN_DIM, PROMPT_TEXT
from tokenopt.table import OutcomeMatrix, ReplayTable, load_manifest

__all__ = ["TrainConfig", "TrainResult", "config_field_names", "train"]

logger = logging.getLogger(__name__)

PRICE_RANGE_MARGIN = 2.0
"""With ``cost_weight_range``: training episodes draw lambda from ``[LOW / m, HIGH * m]``; validation, the export
and the runtime keep ``[LOW, HIGH]``. Without a margin the range's ends are learned from half the neighbourhood the
middle gets, and trail the per-weight policies there; 2 was chosen over 1 and 1.5 on the tuning suites (demo,
gpt2_bits, SmolLM2; three seeds; docs/results/prices.md)."""

PRICE_STEPS_FACTOR = 3
"""With ``cost_weight_range`` and no ``total_timesteps``: the YAML's ``n_timesteps`` times this, a cap (early
stopping still ends the run when validation stops improving): one conditioned run replaces a sweep of runs."""


@dataclass
class TrainConfig(CostSettings):
    """Settings of ``tokenopt train``; PPO hyperparameters come from the YAML file.

    The cost fields (``cost_weight``: lambda, fixed or the starting value when a
    constraint is given; ``token_price``; ``prompt_token_price``) come from
    :class:`~tokenopt.cost.CostSettings`.
    """

    table: str = ""
    """Outcome-table folder written by ``tokenopt collect``."""
    out: str = "runs/train"
    """Run folder."""
    env: str = "budget"
    """Environment: ``budget`` (one query per episode), ``stream`` (shared budget) or ``probe``
    (answer-or-continue at budget checkpoints)."""
    algo: str = "ppo"
    """``ppo`` or ``maskable_ppo`` (sb3-contrib)."""
    config_file: str = str(CONFIG_DIR / "ppo.yml")
    """YAML of hyperparameters keyed by environment id."""
    hyperparams: dict[str, Any] = field(default_factory=dict)
    """Overrides of the YAML's hyperparameters (``--set key=value``)."""
    total_timesteps: int | None = None
    """Environment steps; None takes ``n_timesteps`` from the YAML."""
    seed: int = 0
    """Seed of the environments, the network and PPO."""
    em_floor: float | None = None
    """Constraint: validation EM at most this many points below max-budget greedy EM."""
    token_target: float | None = None
    """Constraint: validation mean billed tokens at most this."""
    dual_lr: float = 0.02
    """Step size of the dual ascent on lambda."""
    eval_freq: int = 4096
    """Environment steps between validations."""
    patience: int = 6
    """Validations without improvement before training stops early."""
    threads: int = 1
    """CPU threads for torch (one is fastest for these small networks)."""
    verbose: int = 0
    """SB3 verbosity."""
    init_from: str | None = None
    """Warm start: a run folder (actor, critic) or an exported policy folder (actor) to start from."""
    init_lr_scale: float = 0.3
    """With ``init_from``: the hidden layers' learning rate as a multiple of the output heads'."""
    features: str = "prompt-text"
    """Feature spec: prompt-text, lm-hidden or prompt-text+lm-hidden (lm-hidden: the table must record it)."""
    hidden_dim: int = DEFAULT_HIDDEN_DIM
    """With lm-hidden: principal components of the hidden state kept (the projection is fitted on train only)."""
    cost_weight_range: str | None = None
    """``LOW:HIGH``: train one price-conditioned policy for every lambda in the range (drawn log-uniformly per
    episode, observed as log lambda); ``cost_weight`` is then the lambda it decides at by default. None: one lambda."""


@dataclass
class TrainResult:
    """What training produced."""

    run_dir: Path
    best_metrics: dict[str, float]
    cost_weight: float
    timesteps: int
    seconds: float
    stopped_early: bool


def train(
    config: TrainConfig,
    progress: Callable[[int, int, dict[str, float]], None] | None = None,
    matrix: OutcomeMatrix | None = None,
) -> TrainResult:
    """Train, validate and export a policy on an outcome table.

    Args:
        config: the settings.
        progress: called after every validation with (steps, 0, validation metrics);
            an exception raised there (e.g. a tuner's prune signal) stops training.
        matrix: the table already loaded, possibly with its own split column (the
            folds of cross-validation); None loads ``config.table``.

    Raises:
        ValueError: bad settings or an outcome table that does not fit them.
    """
    from stable_baselines3 import PPO
    from stable_baselines3.common.env_util import make_vec_env
    from stable_baselines3.common.logger import configure
    from stable_baselines3.common.vec_env import VecNormalize

    import tokenopt.envs  # noqa: F401  (registers the environments)
    from tokenopt.envs import TableSource, TokenBudgetProbeEnv

    started = time.perf_counter()
    if config.env not in ENV_IDS:
        raise ValueError(f"unknown env {config.env!r}: expected one of {sorted(ENV_IDS)}")
    if config.algo not in {"ppo", "maskable_ppo"}:
        raise ValueError(f"unknown algo {config.algo!r}: expected ppo or maskable_ppo")
    if config.em_floor is not None and config.token_target is not None:
        raise ValueError("give at most one constraint: --em-floor or --token-target")
    init_source = None
    if config.init_from:
        from tokenopt.agents.ppo.warm_start import layerwise_lr_algo, layerwise_optimizer, load_init_source, warm_start

        if not config.init_lr_scale > 0:
            raise ValueError(f"init_lr_scale must be > 0, got {config.init_lr_scale}")
        init_source = load_init_source(config.init_from)
    env_id = ENV_IDS[config.env]
    hyperparams = load_config(config.config_file, env_id)
    check_keys(hyperparams, config.config_file)
    check_keys(config.hyperparams, "the overrides")
    hyperparams.update(config.hyperparams)
    escalate_mode = hyperparams.get("escalate_mode")
    if escalate_mode is not None and config.env != "probe":
        raise ValueError(f"escalate_mode applies to --env probe, not --env {config.env}")
    if escalate_mode is not None and not isinstance(escalate_mode, str):
        raise ValueError(f"escalate_mode must be a mode name such as beam3; got {escalate_mode!r}")
    for key in ("reward_baseline", "reward_scale", "pretrain_epochs"):
        if hyperparams.get(key) not in (None, 0, "none") and config.env != "budget":
            raise ValueError(f"{key} applies to --env budget, not --env {config.env}; set it to its default there")
    settings = split_hyperparams(hyperparams)  # bad values fail here, before any work
    price_range = None
    if config.cost_weight_range:
        price_range = parse_cost_weight_range(config.cost_weight_range)
        if config.env != "budget":
            raise ValueError(f"--cost-weight-range applies to --env budget, not --env {config.env}")
        if config.em_floor is not None or config.token_target is not None:
            raise ValueError(
                "--cost-weight-range trains for every lambda in the range; a constraint (--em-floor, --token-target) "
                "picks one: give one or the other (a server meets a budget with --token-budget instead)"
            )
        if settings.pretrain_epochs or config.init_from:
            raise ValueError("--cost-weight-range does not combine with pretrain_epochs or --init-from yet")
        if not price_range[0] <= config.cost_weight <= price_range[1]:
            default = float(np.sqrt(price_range[0] * price_range[1]))
            logger.warning(
                "cost weight %g lies outside --cost-weight-range %g:%g; the policy's default lambda is %g "
                "(the range's geometric middle)", config.cost_weight, *price_range, default
            )  # fmt: skip
            config.cost_weight = default
    manifest = load_manifest(config.table)
    if matrix is None:
        matrix = OutcomeMatrix.from_table(config.table)
    for split in ("train", "val"):
        if not (matrix.splits == split).any():
            raise ValueError(f"{config.table} has no query in split {split!r}; training needs train and val queries")
    if config.features != PROMPT_TEXT and config.env != "budget":
        raise ValueError(f"--features {config.features} applies to --env budget; --env {config.env} takes prompt-text")
    features, matrix = fit_table_features(config.features, matrix, dict(manifest), config.hidden_dim)
    run_dir = RunDir(config.out)
    run_dir.checkpoints.mkdir(parents=True, exist_ok=True)
    resolved = asdict(config) | {"resolved_hyperparams": hyperparams, "env_id": env_id}
    run_dir.config.write_text(yaml.safe_dump(resolved, sort_keys=False), encoding="utf-8")
    run_dir.command.write_text(" ".join(["tokenopt", *sys.argv[1:]]) + "\n", encoding="utf-8")
    save_run_features(run_dir, features)

    torch.set_num_threads(config.threads)
    replay = None
    if config.env == "budget":
        env_kwargs: dict[str, Any] = {
            "source": TableSource(matrix, "train"),
            "cost_weight": config.cost_weight,
            "token_price": config.token_price,
            "prompt_token_price": config.prompt_token_price,
            "reward_baseline": settings.env_kwargs.get("reward_baseline"),
            "reward_scale": settings.env_kwargs.get("reward_scale"),
            # Episodes draw lambda a little beyond both ends, so the ends of the range are not the edge of training.
            "cost_weight_range": None
            if price_range is None
            else (price_range[0] / PRICE_RANGE_MARGIN, price_range[1] * PRICE_RANGE_MARGIN),
        }
    elif config.em_floor is not None or config.token_target is not None:
        raise ValueError(f"--em-floor and --token-target apply to --env budget, not --env {config.env}")
    elif config.env == "stream":
        env_kwargs = {"source": TableSource(matrix, "train")}
    else:
        replay = ReplayTable.load(config.table, matrix)
        env_kwargs = {"replay": replay, "split": "train", "cost_weight": config.cost_weight,
                      "token_price": config.token_price,
                      **{k: v for k, v in settings.env_kwargs.items() if k == "escalate_mode"}}  # fmt: skip
        TokenBudgetProbeEnv(**env_kwargs)  # a bad escalate_mode fails here, with the environment's message
    # One price-conditioned policy replaces a sweep of per-weight runs, and learns the decision at every price.
    total = int(config.total_timesteps or settings.n_timesteps * (PRICE_STEPS_FACTOR if price_range else 1))
    # Built through the registered id (gymnasium.make), as a user's own script would.
    # render_mode None: the environments do not render (SB3 asks gymnasium.make for rgb_array otherwise).
    env_kwargs["render_mode"] = None
    vec_env = make_vec_env(env_id, n_envs=settings.n_envs, seed=config.seed, env_kwargs=env_kwargs)
    vec_env = VecNormalize(vec_env, norm_obs=settings.normalize, norm_reward=False, clip_obs=10.0)
    if config.algo == "maskable_ppo":
        try:
            from sb3_contrib import MaskablePPO
        except ImportError:
            raise ValueError("--algo maskable_ppo needs sb3-contrib: pip install sb3-contrib") from None
        algo_class: Any = MaskablePPO
    else:
        algo_class = PPO
    model = (layerwise_lr_algo(algo_class) if init_source is not None else algo_class)(
        "MlpPolicy",
        vec_env,
        seed=config.seed,
        verbose=config.verbose,
        policy_kwargs=settings.policy_kwargs,
        device="cpu",
        **settings.ppo_kwargs,
    )
    init_record: dict[str, Any] | None = None
    if init_source is not None:
        action_names = [str(action["name"]) for action in manifest["actions"]]  # type: ignore[attr-defined]
        init_record = warm_start(model, vec_env, init_source, action_names)
        layerwise_optimizer(model.policy, config.init_lr_scale)
        init_record["init_lr_scale"] = config.init_lr_scale
    model.set_logger(configure(str(run_dir.tensorboard), ["tensorboard"]))
    val = matrix.subset("val")
    train_all = matrix.subset("train")
    pretrain_record: dict[str, Any] | None = None
    if settings.pretrain_epochs:
        from tokenopt.agents.ppo.warm_start import pretrain_actor

        pretrain_record = pretrain_actor(
            model, vec_env, train_all, val, config.cost_model(), settings.pretrain_epochs,
            settings.pretrain_temperature, settings.pretrain_lr, seed=config.seed,
            baselines=vec_env.env_method("baselines", indices=0)[0], set_normalization=init_source is None,
            objective=settings.pretrain_objective,
        )  # fmt: skip
    sample = np.random.default_rng(config.seed).permutation(len(train_all.ids))[: max(len(val.ids), 1)]
    train_sample = train_all.take(np.sort(sample))
    hparams = {
        "algo": config.algo,
        "env": env_id,
        "cost_weight": config.cost_weight,
        **({"cost_weight_range": config.cost_weight_range} if config.cost_weight_range else {}),
        "n_envs": settings.n_envs,
        "net_arch": str(settings.policy_kwargs["net_arch"]["pi"]),
        "ent_coef": float(settings.ppo_kwargs.get("ent_coef", 0.0)),
        "seed": config.seed,
    }
    if config.env == "budget":
        validate = budget_validator(config, val, train_sample)
    elif config.env == "stream":
        validate = stream_validator(config, matrix)
    else:
        validate = probe_validator(config, replay, escalate_mode)
    # A warm-started actor is validated before PPO moves it, so the best model is never worse than it.
    callback = validation_callback(
        config, run_dir, validate, vec_env, hparams, progress, validate_at_start=pretrain_record is not None
    )
    model.learn(total_timesteps=total, callback=callback)
    best = callback.best_metrics
    if not best:
        model.save(run_dir.best_model)
        vec_env.save(str(run_dir.vecnormalize))
    best_model = algo_class.load(run_dir.best_model, device="cpu")
    stats = VecNormalize.load(str(run_dir.vecnormalize), vec_env.venv)
    if config.env == "budget":
        assert val.features is not None
        observations = val.features if price_range is None else with_price(val.features, config.cost_weight)
        chosen = Predictor(best_model, stats)(observations)
        log_figures(model.logger, val, chosen, config.cost_model())
        model.logger.dump(model.num_timesteps)
    summary = {
        "best_val": best,
        "timesteps": int(model.num_timesteps),
        "stopped_early": callback.stopped_early,
        "seconds": time.perf_counter() - started,
        "cost_weight": callback.cost_weight,
        "actions": manifest["actions"],
        "init_from": init_record,
        "pretrain": pretrain_record,
    }
    run_dir.training.write_text(json.dumps(summary, indent=2) + "\n", encoding="utf-8")
    vec_env.close()
    return TrainResult(
        run_dir=run_dir.path,
        best_metrics=best,
        cost_weight=float(best.get("cost_weight", callback.cost_weight)),
        timesteps=int(model.num_timesteps),
        seconds=summary["seconds"],
        stopped_early=callback.stopped_early,
    )


def config_field_names() -> list[str]:
    """Names of :class:`TrainConfig`'s fields (for CLI overrides)."""
    return [f.name for f in fields(TrainConfig)]
