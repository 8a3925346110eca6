"""PPO training on an outcome table, with validation, early stopping and TensorBoard.

``tokenopt train --table DIR`` trains PPO (or MaskablePPO) from Stable-Baselines3
on ``tokenopt/TokenBudget-v0`` backed by the table, validates on the val split
while it trains (EM, billed tokens, reward, gap recovered), stops early when the
validation score stops improving, keeps the best model and exports it as the
runtime policy. The cost weight is fixed, or adapted by dual ascent to meet an EM
floor or a token target (a Lagrangian relaxation of the constrained problem).
"""

from __future__ import annotations

import difflib
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

from tokenopt.cost import DEFAULT_COST_WEIGHT, CostModel
from tokenopt.outcomes import OutcomeMatrix, load_manifest

__all__ = ["TrainConfig", "TrainResult", "evaluate_actions", "load_config", "train"]

logger = logging.getLogger(__name__)

CONFIG_DIR = Path(__file__).resolve().parent / "configs"
ENV_IDS = {
    "budget": "tokenopt/TokenBudget-v0",
    "stream": "tokenopt/TokenBudgetStream-v0",
    "probe": "tokenopt/TokenBudgetProbe-v0",
}


@dataclass
class TrainConfig:
    """Settings of ``tokenopt train``; PPO hyperparameters come from the YAML file."""

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
    cost_weight: float = DEFAULT_COST_WEIGHT
    """lambda: fixed, or the starting value when a constraint is given."""
    token_price: float = 1.0
    """Price of a billed token."""
    prompt_token_price: float = 0.0
    """Price of a prompt token."""
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


@dataclass
class TrainResult:
    """What training produced."""

    run_dir: Path
    best_metrics: dict[str, float]
    cost_weight: float
    timesteps: int
    seconds: float
    stopped_early: bool


def load_config(path: str | Path, env_id: str) -> dict[str, Any]:
    """The hyperparameters for ``env_id`` in a YAML file keyed by environment id.

    Raises:
        ValueError: the file has no entry for the environment.
    """
    data = yaml.safe_load(Path(path).read_text(encoding="utf-8")) or {}
    if env_id not in data:
        raise ValueError(f"{path} has no hyperparameters for {env_id}; it has {sorted(data)}")
    return dict(data[env_id])


def _schedule(value: Any) -> Any:
    if isinstance(value, str) and value.startswith("lin_"):
        start = float(value[4:])
        return lambda progress_remaining: progress_remaining * start
    return value


_PPO_KEYS = {
    "n_steps", "batch_size", "n_epochs", "gamma", "gae_lambda", "learning_rate", "ent_coef", "clip_range",
    "vf_coef", "max_grad_norm", "target_kl",
}  # fmt: skip
_OTHER_KEYS = {"n_timesteps", "n_envs", "normalize", "policy_kwargs", "policy"}
_ENV_KEYS = {"escalate_mode"}
"""Environment arguments accepted beside the hyperparameters, as RL Zoo's ``env_kwargs``:
``escalate_mode`` (``--env probe`` only) gives TokenBudgetProbe-v0 its escalate action."""


def _check_keys(hyperparams: dict[str, Any], where: str) -> None:
    known = sorted(_PPO_KEYS | _OTHER_KEYS | _ENV_KEYS)
    for key in hyperparams:
        if key not in known:
            close = difflib.get_close_matches(key, known, n=1)
            hint = f"; did you mean {close[0]!r}?" if close else ""
            raise ValueError(f"unknown hyperparameter {key!r} in {where}{hint}")


def _policy_kwargs(raw: dict[str, Any]) -> dict[str, Any]:
    kwargs = dict(raw)
    activation = kwargs.pop("activation_fn", "tanh")
    activations = {"tanh": torch.nn.Tanh, "relu": torch.nn.ReLU}
    if activation not in activations:
        raise ValueError(f"activation_fn {activation!r} is not one of {sorted(activations)}")
    kwargs["activation_fn"] = activations[activation]
    weight_decay = float(kwargs.pop("weight_decay", 0.0))
    kwargs["optimizer_kwargs"] = {"weight_decay": weight_decay} if weight_decay else {}
    net_arch = kwargs.pop("net_arch", [64, 64])
    kwargs["net_arch"] = {"pi": list(net_arch), "vf": list(net_arch)}
    return kwargs


def evaluate_actions(
    matrix: OutcomeMatrix, chosen: np.ndarray, cost_model: CostModel, reference_em: float | None = None
) -> dict[str, float]:
    """EM, mean billed tokens, mean reward and gap recovered of per-query actions."""
    rows = np.arange(len(matrix.ids))
    rewards = matrix.rewards(cost_model)
    policy_reward = float(rewards[rows, chosen].mean())
    oracle = float(rewards.max(axis=1).mean())
    best_fixed = float(rewards.mean(axis=0).max())
    spread = oracle - best_fixed
    metrics = {
        "em": float(matrix.exact_match[rows, chosen].mean()),
        "tokens": float(matrix.billed_tokens[rows, chosen].mean()),
        "reward": policy_reward,
        "oracle_reward": oracle,
        "best_fixed_reward": best_fixed,
        "gap_recovered": (policy_reward - best_fixed) / spread if spread > 1e-12 else 0.0,
    }
    if reference_em is not None:
        metrics["em_drop_points"] = 100.0 * (reference_em - metrics["em"])
    return metrics


def _max_budget_greedy(matrix: OutcomeMatrix) -> int:
    candidates = [j for j, name in enumerate(matrix.actions) if name.endswith("/greedy")] or list(
        range(len(matrix.actions))
    )
    return max(candidates, key=lambda j: int(matrix.actions[j].split("/")[0][1:]))


class _Predictor:
    """Deterministic actions for raw observations, through VecNormalize's statistics."""

    def __init__(self, model: Any, vec_normalize: Any) -> None:
        self.model = model
        self.vec_normalize = vec_normalize

    def __call__(self, observations: np.ndarray) -> np.ndarray:
        normalized = self.vec_normalize.normalize_obs(observations) if self.vec_normalize is not None else observations
        actions, _ = self.model.predict(normalized, deterministic=True)
        return np.asarray(actions).reshape(-1)


Validator = Callable[[Any, Any], tuple[dict[str, float], dict[str, float]]]


def _budget_validator(config: TrainConfig, val: OutcomeMatrix, train_sample: OutcomeMatrix) -> Validator:
    """Validation on TokenBudget-v0: every val query once, actions looked up in the table."""
    reference = _max_budget_greedy(val)
    reference_em = float(val.exact_match[:, reference].mean())
    report_cost = CostModel(config.cost_weight, config.token_price, config.prompt_token_price)
    assert val.features is not None and train_sample.features is not None
    val_features, train_features = val.features, train_sample.features

    def validate(model: Any, vec_env: Any) -> tuple[dict[str, float], dict[str, float]]:
        predict = _Predictor(model, vec_env)
        metrics = evaluate_actions(val, predict(val_features), report_cost, reference_em)
        return metrics, evaluate_actions(train_sample, predict(train_features), report_cost)

    return validate


def _stream_validator(config: TrainConfig, matrix: OutcomeMatrix, episodes: int = 40) -> Validator:
    """Validation on TokenBudgetStream-v0: seeded streams of val (and train) queries."""
    from tokenopt.envs import TableBackend, TokenBudgetStreamEnv

    envs = {split: TokenBudgetStreamEnv(backend=TableBackend(matrix, split)) for split in ("val", "train")}
    reference_em = float(matrix.subset("val").exact_match[:, _max_budget_greedy(matrix)].mean())

    def run(model: Any, vec_env: Any, env: Any) -> dict[str, float]:
        predict = _Predictor(model, vec_env)
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


def _probe_validator(config: TrainConfig, replay: Any, escalate_mode: str | None = None) -> Validator:
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
    reference_em = float(replay.subset("val").matrix.exact_match[:, _max_budget_greedy(replay.matrix)].mean())
    rows = {split: np.arange(min(len(env.replay.matrix.ids), 600)) for split, env in envs.items()}

    def run(model: Any, vec_env: Any, split: str) -> dict[str, float]:
        env = envs[split]
        predict = _Predictor(model, vec_env)
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
        rewards = matrix.rewards(cost_model)
        reward = float(np.mean(cost_model.reward(np.array(exact), np.array(tokens), matrix.prompt_tokens)))
        oracle, best_fixed = float(rewards.max(axis=1).mean()), float(rewards.mean(axis=0).max())
        spread = oracle - best_fixed
        em = float(np.mean(exact))
        return {
            "em": em,
            "tokens": float(np.mean(tokens)),
            "reward": reward,
            "oracle_reward": oracle,
            "best_fixed_reward": best_fixed,
            "gap_recovered": (reward - best_fixed) / spread if spread > 1e-12 else 0.0,
            "em_drop_points": 100.0 * (reference_em - em),
        }

    def validate(model: Any, vec_env: Any) -> tuple[dict[str, float], dict[str, float]]:
        return run(model, vec_env, "val"), run(model, vec_env, "train")

    return validate


def _make_callback(
    config: TrainConfig,
    run_dir: Path,
    validate: Validator,
    vec_env: Any,
    hparams: dict[str, Any],
    progress: Callable[[int, int, dict[str, float]], None] | None,
) -> Any:
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
                self.cost_weight = max(0.0, self.cost_weight * float(np.exp(config.dual_lr * slack)))
            elif config.token_target is not None:
                excess = (metrics["tokens"] - config.token_target) / max(config.token_target, 1e-9)
                self.cost_weight = max(1e-6, self.cost_weight * float(np.exp(10 * config.dual_lr * excess)))
            else:
                return
            vec_env.env_method("set_cost_weight", self.cost_weight)

        def _on_step(self) -> bool:
            if self.num_timesteps - self.last_eval < config.eval_freq:
                return True
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
                self.model.save(run_dir / "checkpoints" / "best_model.zip")
                vec_env.save(str(run_dir / "checkpoints" / "vecnormalize.pkl"))
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


def tradeoff_figure(matrix: OutcomeMatrix, chosen: np.ndarray, cost_model: CostModel) -> Any:
    """EM against mean billed tokens: every fixed action, the policy and the oracle."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = np.arange(len(matrix.ids))
    oracle = matrix.rewards(cost_model).argmax(axis=1)
    figure, axis = plt.subplots(figsize=(7, 4.5))
    modes = list(dict.fromkeys(name.split("/")[1] for name in matrix.actions))
    for mode, marker in zip(modes, "osD^v<>", strict=False):
        columns = [j for j, name in enumerate(matrix.actions) if name.endswith("/" + mode)]
        axis.plot(
            matrix.billed_tokens[:, columns].mean(axis=0),
            matrix.exact_match[:, columns].mean(axis=0),
            marker=marker,
            alpha=0.7,
            label=f"fixed budgets, {mode}",
        )
    for picks, size, color, marker, label in (
        (chosen, 180, "crimson", "*", "tokenopt policy"),
        (oracle, 90, "black", "X", "oracle"),
    ):
        axis.scatter(
            [matrix.billed_tokens[rows, picks].mean()], [matrix.exact_match[rows, picks].mean()],
            s=size, c=color, marker=marker, zorder=5, label=label,
        )  # fmt: skip
    axis.set_xscale("symlog", linthresh=10)
    axis.set_xlabel("mean billed tokens per query")
    axis.set_ylabel("exact match")
    axis.set_title(f"EM vs tokens (lambda {cost_model.cost_weight:g})")
    axis.grid(alpha=0.3)
    axis.legend(fontsize=8, loc="lower right")
    figure.tight_layout()
    return figure


def action_mix_figure(matrix: OutcomeMatrix, chosen: np.ndarray) -> Any:
    """Share of each action the policy picks, per task family."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    families = matrix.families if matrix.families is not None else np.array(["all"] * len(matrix.ids))
    names = list(dict.fromkeys(families.tolist()))
    figure, axis = plt.subplots(figsize=(7, 0.6 * len(names) + 1.5))
    left = np.zeros(len(names))
    colors = plt.get_cmap("tab20")
    for k, action in enumerate(sorted(set(chosen.tolist()))):
        shares = np.array([np.mean(chosen[families == name] == action) for name in names])
        axis.barh(names, shares, left=left, color=colors(k % 20), label=matrix.actions[action])
        left += shares
    axis.set_xlabel("share of queries")
    axis.set_title("actions chosen per family")
    axis.legend(fontsize=7, bbox_to_anchor=(1.01, 1), loc="upper left")
    figure.tight_layout()
    return figure


def _log_figures(logger_: Any, matrix: OutcomeMatrix, chosen: np.ndarray, cost_model: CostModel) -> None:
    from stable_baselines3.common.logger import Figure

    hidden = ("stdout", "log", "json", "csv")
    logger_.record("figures/em_vs_tokens", Figure(tradeoff_figure(matrix, chosen, cost_model), close=True), hidden)
    logger_.record("figures/action_mix", Figure(action_mix_figure(matrix, chosen), close=True), hidden)


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
    from tokenopt.envs import TableBackend, TokenBudgetEnv, TokenBudgetStreamEnv

    started = time.perf_counter()
    if config.env not in ENV_IDS:
        raise ValueError(f"unknown env {config.env!r}: expected one of {sorted(ENV_IDS)}")
    if config.algo not in {"ppo", "maskable_ppo"}:
        raise ValueError(f"unknown algo {config.algo!r}: expected ppo or maskable_ppo")
    if config.em_floor is not None and config.token_target is not None:
        raise ValueError("give at most one constraint: --em-floor or --token-target")
    init_source = None
    if config.init_from:
        from tokenopt.agents.warm_start import layerwise_lr_algo, layerwise_optimizer, load_init_source, warm_start

        if not config.init_lr_scale > 0:
            raise ValueError(f"init_lr_scale must be > 0, got {config.init_lr_scale}")
        init_source = load_init_source(config.init_from)
    env_id = ENV_IDS[config.env]
    hyperparams = load_config(config.config_file, env_id)
    _check_keys(hyperparams, config.config_file)
    _check_keys(config.hyperparams, "the overrides")
    hyperparams.update(config.hyperparams)
    escalate_mode = hyperparams.get("escalate_mode")
    if escalate_mode is not None and config.env != "probe":
        raise ValueError(f"escalate_mode applies to --env probe, not --env {config.env}")
    if escalate_mode is not None and not isinstance(escalate_mode, str):
        raise ValueError(f"escalate_mode must be a mode name such as beam3; got {escalate_mode!r}")
    manifest = load_manifest(config.table)
    if matrix is None:
        matrix = OutcomeMatrix.from_table(config.table)
    for split in ("train", "val"):
        if not (matrix.splits == split).any():
            raise ValueError(f"{config.table} has no query in split {split!r}; training needs train and val queries")
    run_dir = Path(config.out)
    (run_dir / "checkpoints").mkdir(parents=True, exist_ok=True)
    resolved = asdict(config) | {"resolved_hyperparams": hyperparams, "env_id": env_id}
    (run_dir / "config.yml").write_text(yaml.safe_dump(resolved, sort_keys=False), encoding="utf-8")
    (run_dir / "command.txt").write_text(" ".join(["tokenopt", *sys.argv[1:]]) + "\n", encoding="utf-8")

    torch.set_num_threads(config.threads)
    if config.env == "budget":
        env_class: Any = TokenBudgetEnv
        env_kwargs: dict[str, Any] = {
            "backend": TableBackend(matrix, "train"),
            "cost_weight": config.cost_weight,
            "token_price": config.token_price,
            "prompt_token_price": config.prompt_token_price,
        }
    elif config.em_floor is not None or config.token_target is not None:
        raise ValueError(f"--em-floor and --token-target apply to --env budget, not --env {config.env}")
    elif config.env == "stream":
        env_class = TokenBudgetStreamEnv
        env_kwargs = {"backend": TableBackend(matrix, "train")}
    else:
        from tokenopt.envs import TokenBudgetProbeEnv
        from tokenopt.outcomes import ReplayTable

        replay = ReplayTable.load(config.table, matrix)
        env_class = TokenBudgetProbeEnv
        env_kwargs = {"replay": replay, "split": "train", "cost_weight": config.cost_weight,
                      "token_price": config.token_price, "escalate_mode": escalate_mode}  # fmt: skip
        TokenBudgetProbeEnv(**env_kwargs)  # a bad escalate_mode fails here, with the environment's message
    hyperparams.pop("escalate_mode", None)
    n_envs = int(hyperparams.pop("n_envs", 8))
    total = int(config.total_timesteps or hyperparams.pop("n_timesteps", 60000))
    hyperparams.pop("n_timesteps", None)
    normalize = bool(hyperparams.pop("normalize", True))
    policy_kwargs = _policy_kwargs(hyperparams.pop("policy_kwargs", {}))
    hyperparams.pop("policy", None)
    ppo_kwargs = {key: _schedule(value) for key, value in hyperparams.items()}
    vec_env = make_vec_env(env_class, n_envs=n_envs, seed=config.seed, env_kwargs=env_kwargs)
    vec_env = VecNormalize(vec_env, norm_obs=normalize, norm_reward=False, clip_obs=10.0)
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
        policy_kwargs=policy_kwargs,
        device="cpu",
        **ppo_kwargs,
    )
    init_record: dict[str, Any] | None = None
    if init_source is not None:
        action_names = [str(action["name"]) for action in manifest["actions"]]  # type: ignore[attr-defined]
        init_record = warm_start(model, vec_env, init_source, action_names)
        layerwise_optimizer(model.policy, config.init_lr_scale)
        init_record["init_lr_scale"] = config.init_lr_scale
    model.set_logger(configure(str(run_dir / "tb"), ["tensorboard"]))
    val = matrix.subset("val")
    train_all = matrix.subset("train")
    sample = np.random.default_rng(config.seed).permutation(len(train_all.ids))[: max(len(val.ids), 1)]
    train_sample = train_all.take(np.sort(sample))
    hparams = {
        "algo": config.algo,
        "env": env_id,
        "cost_weight": config.cost_weight,
        "n_envs": n_envs,
        "net_arch": str(policy_kwargs["net_arch"]["pi"]),
        "ent_coef": float(ppo_kwargs.get("ent_coef", 0.0)),
        "seed": config.seed,
    }
    if config.env == "budget":
        validate = _budget_validator(config, val, train_sample)
    elif config.env == "stream":
        validate = _stream_validator(config, matrix)
    else:
        validate = _probe_validator(config, replay, escalate_mode)
    callback = _make_callback(config, run_dir, validate, vec_env, hparams, progress)
    model.learn(total_timesteps=total, callback=callback)
    best = callback.best_metrics
    if not best:
        model.save(run_dir / "checkpoints" / "best_model.zip")
        vec_env.save(str(run_dir / "checkpoints" / "vecnormalize.pkl"))
    best_model = algo_class.load(run_dir / "checkpoints" / "best_model.zip", device="cpu")
    stats = VecNormalize.load(str(run_dir / "checkpoints" / "vecnormalize.pkl"), vec_env.venv)
    if config.env == "budget":
        assert val.features is not None
        chosen = _Predictor(best_model, stats)(val.features)
        figure_cost = CostModel(config.cost_weight, config.token_price, config.prompt_token_price)
        _log_figures(model.logger, val, chosen, figure_cost)
        model.logger.dump(model.num_timesteps)
    summary = {
        "best_val": best,
        "timesteps": int(model.num_timesteps),
        "stopped_early": callback.stopped_early,
        "seconds": time.perf_counter() - started,
        "cost_weight": callback.cost_weight,
        "actions": manifest["actions"],
        "init_from": init_record,
    }
    (run_dir / "training.json").write_text(json.dumps(summary, indent=2) + "\n", encoding="utf-8")
    vec_env.close()
    return TrainResult(
        run_dir=run_dir,
        best_metrics=best,
        cost_weight=float(best.get("cost_weight", callback.cost_weight)),
        timesteps=int(model.num_timesteps),
        seconds=summary["seconds"],
        stopped_early=callback.stopped_early,
    )


def config_field_names() -> list[str]:
    """Names of :class:`TrainConfig`'s fields (for CLI overrides)."""
    return [f.name for f in fields(TrainConfig)]
