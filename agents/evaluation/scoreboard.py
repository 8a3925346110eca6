"""``tokenopt eval``: the learned policy against the published methods and the oracle.

Every method is replayed on the same outcome table and split (see
:mod:`tokenopt.agents.evaluation.baselines`). For each cost weight of a sweep the learned policy
(one trained policy per weight) is one point of EM against mean billed tokens; each
baseline is a curve, the upper concave envelope of its settings' points (any point on
it is reachable by splitting traffic between two settings). The report says, per
weight, whether the policy lies on or above every baseline's curve at its own mean
tokens, and where a baseline does better. Rows at each weight pick every method's
setting by its validation reward, then report the test split.

Given a probe run (``tokenopt train --env probe``), the learned probe controller, which
watches the reasoning and answers at a checkpoint, is scored too (one controller per
weight, replayed through its runtime session with the probing rules' bill), against
the two probing rules (Dynasor-style, DEER-style) and the per-query policy.

Given a stream run (``tokenopt train --env stream``), the stream policy, which shares one
token budget across a stream of queries, is replayed on TokenBudgetStream-v0 over the
split and compared at its measured total spend with the CLEAR-style allocation of that
same total budget and with the fixed actions.
"""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import yaml

from tokenopt.agents.common.evaluation import check_policy_fits_table, policy_choices, query_questions
from tokenopt.agents.common.run_dir import RunDir
from tokenopt.agents.evaluation.baselines import (
    ClearModel,
    OperatingPoint,
    ReplayTable,
    adaptive_consistency_points,
    clear_point,
    clear_points,
    clear_stream_point,
    deer_points,
    dynasor_points,
    fixed_points,
    probe_controller_point,
    probe_oracle_point,
    router_points,
    stream_environment,
    stream_policy_point,
    tale_points,
)
from tokenopt.agents.evaluation.no_harm import oracle_noise, split_figures
from tokenopt.cost import DEFAULT_COST_WEIGHT, CostModel
from tokenopt.runtime import POLICY_SPEC_FILE
from tokenopt.table import OutcomeMatrix, action_mix, gap_recovered, load_manifest, reference_rewards

__all__ = ["DEFAULT_SWEEP", "ScoreboardConfig", "baseline_points", "envelope", "run_scoreboard"]

logger = logging.getLogger(__name__)

DEFAULT_SWEEP = (0.0025, 0.005, 0.01, 0.02, 0.04, 0.08, 0.16)
"""Cost weights of the sweep: 400 down to about 6 billed tokens per exact match."""

BASELINES = (
    "fixed", "TALE-style", "Dynasor-style", "DEER-style", "Adaptive-Consistency-style", "RouteLLM-style", "CLEAR-style",
)  # fmt: skip

PROBE_RULES = ("Dynasor-style", "DEER-style")
"""The baselines that, like the probe controller, probe the answer at budget checkpoints."""

POLICY, PROBE, STREAM = "tokenopt policy", "tokenopt probe controller", "tokenopt stream policy"
CLEAR_PER_STREAM = "CLEAR-style, per stream"
CONDITIONED = "tokenopt price-conditioned policy"


@dataclass
class ScoreboardConfig:
    """Settings of ``tokenopt eval``."""

    policy: str
    """A run folder (with ``policy/``) or an exported policy folder."""
    table: str
    """The outcome table to evaluate on."""
    split: str = "test"
    out: str = "runs/eval"
    cost_weights: tuple[float, ...] = DEFAULT_SWEEP
    """The sweep; one policy per weight is trained (or reused) under ``OUT/sweep/``."""
    cost_weight: float | None = None
    """The default weight (the policy's own); None reads it from the policy's metadata."""
    total_timesteps: int | None = None
    """Training steps of the sweep's policies; None: the run's own setting."""
    seed: int = 0
    sweep_dir: str | None = None
    """Where the sweep's runs go; None: ``OUT/sweep``."""
    plots: bool = True
    extra_policies: dict[float, str] = field(default_factory=dict)
    """Policies already trained for some weights of the sweep (weight -> folder)."""
    probe_run: str | None = None
    """A ``tokenopt train --env probe`` run (or its policy folder) to score as well; the sweep
    trains one controller per missing weight with the run's settings (reused if there)."""
    conditioned: str | None = None
    """A price-conditioned run or policy (``train --cost-weight-range``), scored at every weight of the
    sweep inside its range and drawn as one curve beside the per-weight policies."""
    stream_run: str | None = None
    """A ``tokenopt train --env stream`` run (or its policy folder), compared with the CLEAR-style
    allocation and the fixed actions at its measured total spend."""
    stream_passes: int = 4
    """Seeded orders of the split the stream policy is replayed over (per query, the mean)."""


# --- curves ----------------------------------------------------------------------


def envelope(tokens: np.ndarray, em: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The upper concave, non-decreasing envelope of (tokens, EM) points.

    Returns:
        The envelope's vertices, by increasing tokens. Between two vertices EM is
        linear (traffic split between the two settings); past the last it is flat.
    """
    order = np.lexsort((-np.asarray(em), np.asarray(tokens)))
    hull: list[tuple[float, float]] = []
    for x, y in zip(np.asarray(tokens)[order], np.asarray(em)[order], strict=True):
        if hull and y <= hull[-1][1]:
            continue  # dominated: costs as much or more and is no better
        while len(hull) >= 2:
            (x1, y1), (x2, y2) = hull[-2], hull[-1]
            if (x2 - x1) * (y - y1) - (y2 - y1) * (x - x1) >= 0:  # hull[-1] lies on or below the chord
                hull.pop()
            else:
                break
        hull.append((float(x), float(y)))
    xs, ys = zip(*hull, strict=True)
    return np.array(xs), np.array(ys)


def curve_at(curve: tuple[np.ndarray, np.ndarray], tokens: float) -> float:
    """EM of a curve at these mean tokens; -inf below its cheapest point."""
    xs, ys = curve
    if tokens < xs[0] - 1e-9:
        return -math.inf
    return float(np.interp(tokens, xs, ys))


def tokens_to_reach(curve: tuple[np.ndarray, np.ndarray], target: float) -> float | None:
    """The fewest mean tokens at which a curve reaches an EM; None if it never does."""
    xs, ys = curve
    if ys[-1] < target - 1e-12:
        return None
    if ys[0] >= target:
        return float(xs[0])
    k = int(np.argmax(ys >= target - 1e-12))
    return float(np.interp(target, [ys[k - 1], ys[k]], [xs[k - 1], xs[k]]))


def area_under(curve: tuple[np.ndarray, np.ndarray], limit: float) -> float:
    """Mean EM of a curve over [0, limit] tokens (0 below its cheapest point)."""
    xs, ys = curve
    grid = np.linspace(0.0, limit, 2001)
    values = np.where(grid < xs[0] - 1e-9, 0.0, np.interp(grid, xs, ys))
    return float(np.trapezoid(values, grid) / limit)


# --- policies ----------------------------------------------------------------------


def _resolve_policy(path: Path) -> tuple[Path, Path | None]:
    """(policy folder, run folder or None) for a run or a policy folder."""
    if (path / POLICY_SPEC_FILE).is_file():
        run = path.parent if RunDir(path.parent).is_run() else None
        return path, run
    if RunDir(path).is_run():
        if not (RunDir(path).policy / POLICY_SPEC_FILE).is_file():
            from tokenopt.agents.export import export_run

            export_run(path)
        return RunDir(path).policy, path
    raise FileNotFoundError(f"{path} is neither a policy folder (policy.json) nor a run folder (config.yml)")


def _policy_columns(
    policy_dir: Path, matrix: OutcomeMatrix, questions: dict[str, str], manifest: dict[str, Any], weight: float
) -> np.ndarray:
    from tokenopt.runtime import BudgetPolicy

    policy = BudgetPolicy.load(policy_dir)
    check_policy_fits_table(policy, manifest, str(policy_dir))
    return policy_choices(policy, matrix, questions, weight)


def _load_probe_controller(policy_dir: Path, manifest: dict[str, Any]) -> Any:
    from tokenopt.runtime import BudgetPolicy

    policy = BudgetPolicy.load(policy_dir)
    check_policy_fits_table(policy, manifest, str(policy_dir), probe_controller=True)
    return policy


def _train_for_weight(
    run: Path | None, config: ScoreboardConfig, weight: float, out: Path, env: str = "budget"
) -> Path:
    """Train (or reuse) the sweep's policy for one cost weight on ``env``, like the given run."""
    from tokenopt.agents.common.hyperparams import ENV_IDS
    from tokenopt.agents.export import export_run
    from tokenopt.agents.ppo.train import TrainConfig, config_field_names, train

    policy_dir = RunDir(out).policy
    if (policy_dir / POLICY_SPEC_FILE).is_file():
        spec = json.loads((policy_dir / POLICY_SPEC_FILE).read_text(encoding="utf-8"))
        metadata = spec.get("metadata", {})
        if (
            math.isclose(float(metadata.get("cost_weight", -1)), weight)
            and metadata.get("table") == config.table
            and spec.get("env_id") == ENV_IDS[env]
        ):
            return policy_dir
    settings: dict[str, Any] = {}
    if run is not None:
        saved = yaml.safe_load(RunDir(run).config.read_text(encoding="utf-8"))
        settings = {key: saved[key] for key in config_field_names() if key in saved}
    settings.update(table=config.table, out=str(out), cost_weight=weight, em_floor=None, token_target=None)
    if config.total_timesteps is not None:
        settings["total_timesteps"] = config.total_timesteps
    trained_on = settings.setdefault("env", env)
    if trained_on != env:
        kind = "probe controllers" if env == "probe" else "per-query policies"
        raise ValueError(f"eval's sweep trains {kind} (--env {env}); {run} was trained with --env {trained_on}")
    train(TrainConfig(**settings))
    return export_run(out)


# --- the scoreboard --------------------------------------------------------------


def _reward(point: OperatingPoint, cost_model: CostModel, prompt: np.ndarray) -> float:
    return float(_query_rewards(point, cost_model, prompt).mean())


def _query_rewards(point: OperatingPoint, cost_model: CostModel, prompt: np.ndarray) -> np.ndarray:
    return np.asarray(cost_model.reward(point.exact_match, point.billed_tokens, prompt), dtype=np.float64)


def _with_intervals(
    row: dict[str, Any], point: OperatingPoint, replay: ReplayTable, cost_model: CostModel, seed: int,
    compare: dict[str, np.ndarray] | None = None,
) -> dict[str, Any]:  # fmt: skip
    """The row plus 95% paired-bootstrap intervals over the split's queries (``ci``) and reward differences."""
    figures = split_figures(
        replay.matrix, point.exact_match, point.billed_tokens, cost_model, compare=compare, seed=seed
    )
    row["ci"] = {key: figures[key].to_list() for key in ("em", "tokens", "reward", "gap_recovered")}
    row["reward_minus"] = {
        name.split(":", 1)[1]: {"diff": value.value, "ci": value.to_list()}
        for name, value in figures.items()
        if name.startswith("reward_minus:")
    }
    return row


def _row(
    method: str, setting: str, point: OperatingPoint, reward: float, best_fixed: float, oracle: float
) -> dict[str, Any]:
    gap = gap_recovered(reward, best_fixed, oracle)
    return {"method": method, "setting": setting, "em": point.em, "tokens": point.tokens, "reward": reward,
            "gap_recovered": gap}  # fmt: skip


NO_POINTS_REASONS = {
    "fixed": "the table has no action",
    "TALE-style": "the table has no budget ladder to predict on",
    "Dynasor-style": "no mode of the table has 2 or more budgets, so no 2 probes can agree",
    "DEER-style": "no mode of the table has a budget ladder to probe",
    "Adaptive-Consistency-style": "the table has no sc<k> mode (k >= 2) whose samples it could draw one by one",
    "RouteLLM-style": (
        "on the train split no expensive action is ever right where the cheap one is wrong, so there is "
        "nothing to route"
    ),
    "CLEAR-style": "the table has no action to allocate",
}
"""Why a baseline the table gives no operating point is left out of the scoreboard."""


def baseline_points(
    train: ReplayTable, val: ReplayTable, test: ReplayTable, seed: int
) -> tuple[dict[str, list[OperatingPoint]], dict[str, str]]:
    """Every baseline's operating points on the val and the test split, in the same order.

    Returns:
        The points per split, and the baselines left out (the table cannot replay them),
        each with the reason.
    """
    targets = [val, test]
    builders: dict[str, Callable[[], list[list[OperatingPoint]]]] = {
        "fixed": lambda: [fixed_points(target) for target in targets],
        "TALE-style": lambda: tale_points(train, val, targets, seed=seed),
        "Dynasor-style": lambda: [dynasor_points(target) for target in targets],
        "DEER-style": lambda: [deer_points(target) for target in targets],
        "Adaptive-Consistency-style": lambda: [adaptive_consistency_points(target) for target in targets],
        "RouteLLM-style": lambda: router_points(train, val, targets, seed=seed),
        "CLEAR-style": lambda: clear_points(train, val, targets),
    }
    points: dict[str, list[OperatingPoint]] = {"val": [], "test": []}
    left_out: dict[str, str] = {}
    for method, build in builders.items():
        try:
            per_split = build()
        except ValueError as error:
            left_out[method] = str(error)
            continue
        if not all(per_split):
            left_out[method] = NO_POINTS_REASONS[method]
            continue
        points["val"] += per_split[0]
        points["test"] += per_split[1]
    return points, left_out


def run_scoreboard(config: ScoreboardConfig, progress: Callable[[str], None] | None = None) -> dict[str, Any]:
    """Evaluate every method, write ``report.json``, ``report.md``, plots and TensorBoard logs.

    Raises:
        ValueError: a policy that does not fit the table, an empty split, a bad sweep.
        FileNotFoundError: the policy or table is missing.
    """
    say = progress or (lambda message: None)
    out = Path(config.out)
    out.mkdir(parents=True, exist_ok=True)
    manifest: dict[str, Any] = load_manifest(config.table)
    if len(config.cost_weights) < 1 or any(not (0 <= w < math.inf) for w in config.cost_weights):
        raise ValueError(f"cost weights must be finite numbers >= 0; got {config.cost_weights}")
    matrix = OutcomeMatrix.from_table(config.table)
    replay = ReplayTable.load(config.table, matrix)
    splits = {}
    for split in ("train", "val", config.split):
        if not (matrix.splits == split).any():
            raise ValueError(
                f"{config.table} has no query in split {split!r}; eval needs train, val and {config.split}"
            )
        splits[split] = replay.subset(split)
    train_r, val_r, test_r = splits["train"], splits["val"], splits[config.split]
    policy_dir, run = _resolve_policy(Path(config.policy))
    from tokenopt.runtime import BudgetPolicy

    main_policy = BudgetPolicy.load(policy_dir)
    check_policy_fits_table(main_policy, manifest, str(policy_dir))  # before any work
    policy_meta = json.loads((policy_dir / POLICY_SPEC_FILE).read_text(encoding="utf-8")).get("metadata", {})
    default_weight = float(
        config.cost_weight if config.cost_weight is not None else policy_meta.get("cost_weight", DEFAULT_COST_WEIGHT)
    )
    weights = sorted(set(config.cost_weights) | {default_weight})
    conditioned_dir: Path | None = None
    conditioned_weights: list[float] = []
    if config.conditioned is not None:
        conditioned_dir = _resolve_policy(Path(config.conditioned))[0]
        conditioned = BudgetPolicy.load(conditioned_dir)
        check_policy_fits_table(conditioned, manifest, str(conditioned_dir))
        if conditioned.cost_weight_range is None:
            raise ValueError(
                f"{conditioned_dir} was trained for one cost weight; --conditioned takes a price-conditioned "
                "policy (`tokenopt train --cost-weight-range LOW:HIGH`)"
            )
        low, high = conditioned.cost_weight_range
        conditioned_weights = [w for w in weights if low <= w <= high]
        if not conditioned_weights:
            raise ValueError(
                f"no cost weight of the sweep {weights} lies in {conditioned_dir}'s range {low:g}:{high:g}"
            )
    probe: tuple[Path, Path | None, float] | None = None
    if config.probe_run is not None:
        probe_dir, probe_source = _resolve_policy(Path(config.probe_run))
        _load_probe_controller(probe_dir, manifest)  # before any work
        probe_meta = json.loads((probe_dir / POLICY_SPEC_FILE).read_text(encoding="utf-8")).get("metadata", {})
        probe = (probe_dir, probe_source, float(probe_meta.get("cost_weight", default_weight)))
        weights = sorted(set(weights) | {probe[2]})
    stream_dir: Path | None = None
    if config.stream_run is not None:
        stream_dir = _resolve_policy(Path(config.stream_run))[0]
        check_policy_fits_table(BudgetPolicy.load(stream_dir), manifest, str(stream_dir), stream_policy=True)

    say("replaying the baselines")
    points, left_out = baseline_points(train_r, val_r, test_r, config.seed)
    for method, reason in left_out.items():
        logger.info("%s: left out, %s", method, reason)
    methods = [method for method in BASELINES if method not in left_out]
    questions = query_questions(config.table)

    sweep_dir = Path(config.sweep_dir) if config.sweep_dir else out / "sweep"
    policies: dict[float, Path] = {
        default_weight: policy_dir,
        **{float(w): Path(p) for w, p in config.extra_policies.items()},
    }
    if main_policy.cost_weight_range is not None:  # one policy serves every weight of its range
        low, high = main_policy.cost_weight_range
        outside = [w for w in weights if not low <= w <= high]
        if outside:
            raise ValueError(
                f"{policy_dir} is price-conditioned for {low:g}:{high:g}; the sweep's weights {outside} lie outside "
                "it: give --cost-weights inside the range"
            )
        policies |= {weight: policy_dir for weight in weights if weight not in policies}
    for weight in weights:
        if weight not in policies:
            say(f"training the sweep's policy for cost weight {weight:g}")
            policies[weight] = _train_for_weight(run, config, weight, sweep_dir / f"lambda-{weight:g}")
    probe_policies: dict[float, Path] = {}
    probe_points: dict[float, OperatingPoint] = {}
    if probe is not None:
        probe_policies[probe[2]] = probe[0]
        for weight in weights:
            if weight not in probe_policies:
                say(f"training the sweep's probe controller for cost weight {weight:g}")
                where = sweep_dir / f"probe-lambda-{weight:g}"
                probe_policies[weight] = _train_for_weight(probe[1], config, weight, where, env="probe")
            controller = _load_probe_controller(probe_policies[weight], manifest)
            probe_points[weight] = probe_controller_point(controller, test_r, questions, f"lambda {weight:g}")
    policy_points: dict[float, OperatingPoint] = {}
    for weight in weights:
        columns = _policy_columns(policies[weight], test_r.matrix, questions, manifest, weight)
        rows = np.arange(len(columns))
        policy_points[weight] = OperatingPoint(
            "tokenopt policy", f"lambda {weight:g}", test_r.matrix.exact_match[rows, columns],
            test_r.matrix.billed_tokens[rows, columns], columns,
        )  # fmt: skip
    conditioned_points: dict[float, OperatingPoint] = {}
    for weight in conditioned_weights:
        assert conditioned_dir is not None
        columns = _policy_columns(conditioned_dir, test_r.matrix, questions, manifest, weight)
        rows = np.arange(len(columns))
        conditioned_points[weight] = OperatingPoint(
            CONDITIONED, f"lambda {weight:g}", test_r.matrix.exact_match[rows, columns],
            test_r.matrix.billed_tokens[rows, columns], columns,
        )  # fmt: skip

    say("scoring")
    prompt = {"val": val_r.matrix.prompt_tokens, "test": test_r.matrix.prompt_tokens}
    curves = {}
    for method in methods:
        mine = [p for p in points["test"] if p.method == method]
        curves[method] = envelope(np.array([p.tokens for p in mine]), np.array([p.em for p in mine]))
    sweep_points = [policy_points[w] for w in weights]
    curves[POLICY] = envelope(np.array([p.tokens for p in sweep_points]), np.array([p.em for p in sweep_points]))
    if probe_points:
        probe_sweep = [probe_points[w] for w in weights]
        curves[PROBE] = envelope(np.array([p.tokens for p in probe_sweep]), np.array([p.em for p in probe_sweep]))
    if conditioned_points:
        mine = list(conditioned_points.values())
        curves[CONDITIONED] = envelope(np.array([p.tokens for p in mine]), np.array([p.em for p in mine]))
    greedy_ladder = test_r.ladder("greedy") if "greedy" in test_r.mode_names else [int(np.argmax(test_r.budgets))]
    reference = greedy_ladder[-1]
    reference_em = float(test_r.matrix.exact_match[:, reference].mean())
    reference_tokens = float(test_r.matrix.billed_tokens[:, reference].mean())

    per_weight: list[dict[str, Any]] = []
    warnings: list[str] = []
    for weight in weights:
        cost_model = CostModel(weight)
        rewards = test_r.matrix.rewards(cost_model)
        oracle_columns = rewards.argmax(axis=1)
        oracle_reward, best_fixed = reference_rewards(test_r.matrix, cost_model)

        rows = np.arange(len(oracle_columns))
        oracle_point = OperatingPoint(
            "oracle", "", test_r.matrix.exact_match[rows, oracle_columns],
            test_r.matrix.billed_tokens[rows, oracle_columns], oracle_columns,
        )  # fmt: skip
        policy = policy_points[weight]
        policy_row = _row(
            POLICY, f"lambda {weight:g}", policy, _reward(policy, cost_model, prompt["test"]), best_fixed, oracle_reward
        )
        rows_out = [
            policy_row,
            _row("oracle", "per-query best", oracle_point, oracle_reward, best_fixed, oracle_reward),
        ]
        picked: dict[str, OperatingPoint] = {"oracle": oracle_point}
        for method in methods:
            val_candidates = [(k, p) for k, p in enumerate(points["val"]) if p.method == method]
            k_best = max(val_candidates, key=lambda item: _reward(item[1], cost_model, prompt["val"]))[0]
            chosen = points["test"][k_best]
            picked[method] = chosen
            reward = _reward(chosen, cost_model, prompt["test"])
            rows_out.append(_row(method, chosen.setting, chosen, reward, best_fixed, oracle_reward))
        # 95% intervals over the split's queries; the policy's reward minus each method's, paired
        compare = {name: _query_rewards(point, cost_model, prompt["test"]) for name, point in picked.items()}
        _with_intervals(policy_row, policy, test_r, cost_model, config.seed, compare)
        for row in rows_out[1:]:
            _with_intervals(row, picked[row["method"]], test_r, cost_model, config.seed)
            row["policy_minus"] = policy_row["reward_minus"][row["method"]]
        noise = oracle_noise(test_r.matrix, cost_model, config.split, _query_rewards(policy, cost_model,
                             prompt["test"]), seed=config.seed)  # fmt: skip
        if noise.warning is not None:
            warnings.append(f"cost weight {weight:g}: {noise.warning}")
        margins = {method: policy.em - curve_at(curves[method], policy.tokens) for method in methods}
        beaten_by = {method: margin for method, margin in margins.items() if margin < -1e-9}
        entry: dict[str, Any] = {
            "cost_weight": weight,
            "policy": {"em": policy.em, "tokens": policy.tokens},
            "oracle": {"em": oracle_point.em, "tokens": oracle_point.tokens, "reward": oracle_reward},
            "rows": rows_out,
            "margins": {m: (None if math.isinf(v) else v) for m, v in margins.items()},
            "on_or_above_all": not beaten_by,
            "beaten_by": beaten_by,
            "noise": noise.to_dict(),
        }
        if probe_points:
            controller = probe_points[weight]
            probe_row = _row(
                PROBE, f"lambda {weight:g}", controller, _reward(controller, cost_model, prompt["test"]), best_fixed,
                oracle_reward,
            )  # fmt: skip
            rows_out.append(_with_intervals(probe_row, controller, test_r, cost_model, config.seed))
            settings = _load_probe_controller(probe_policies[weight], manifest).probe
            ceiling = probe_oracle_point(
                test_r, settings.mode, cost_model, settings.probe_token_price, settings.escalate_mode
            )
            entry["probe"] = _probe_verdict(probe_row, policy_row, rows_out, curves) | {
                "oracle": {
                    "setting": ceiling.setting,
                    "em": ceiling.em,
                    "tokens": ceiling.tokens,
                    "reward": _reward(ceiling, cost_model, prompt["test"]),
                }
            }
        if weight in conditioned_points:
            point = conditioned_points[weight]
            row = _row(CONDITIONED, f"lambda {weight:g}", point, _reward(point, cost_model, prompt["test"]), best_fixed,
                       oracle_reward)  # fmt: skip
            per_lambda = {POLICY: _query_rewards(policy, cost_model, prompt["test"])}
            rows_out.append(_with_intervals(row, point, test_r, cost_model, config.seed, per_lambda))
            entry["conditioned_minus_policy"] = minus = row["reward_minus"][POLICY]
            row["policy_minus"] = {"diff": -minus["diff"], "ci": [-minus["ci"][1], -minus["ci"][0]]}
        per_weight.append(entry)

    summary = {}
    for method, curve in curves.items():
        summary[method] = {
            "auc": area_under(curve, reference_tokens),
            "tokens_to_95": tokens_to_reach(curve, 0.95 * reference_em),
            "tokens_to_99": tokens_to_reach(curve, 0.99 * reference_em),
            "curve": [[float(x), float(y)] for x, y in zip(*curve, strict=True)],
        }
    oracle_sweep = []
    for weight in weights:
        oracle_sweep.append({"cost_weight": weight, **per_weight[weights.index(weight)]["oracle"]})
    sweep_only = [w for w in per_weight if any(math.isclose(w["cost_weight"], c) for c in config.cost_weights)]
    default = next(w for w in per_weight if math.isclose(w["cost_weight"], default_weight))
    stream: dict[str, Any] | None = None
    stream_point: OperatingPoint | None = None
    if stream_dir is not None:
        say("replaying the stream policy")
        stream_point = stream_policy_point(
            BudgetPolicy.load(stream_dir), test_r, passes=config.stream_passes, seed=config.seed
        )
        stream = _stream_comparison(
            stream_point, train_r, val_r, test_r, points["test"], curves, config.stream_passes, config.seed
        )
        stream["policy"] = str(stream_dir)
    report = {
        "table": config.table,
        "split": config.split,
        "queries": len(test_r.matrix.ids),
        "policy": str(policy_dir),
        "default_cost_weight": default_weight,
        "reference": {"action": test_r.matrix.actions[reference], "em": reference_em, "tokens": reference_tokens},
        "bar": {
            "weights_on_or_above": sum(w["on_or_above_all"] for w in sweep_only),
            "weights": len(sweep_only),
            "gap_recovered_at_default": default["rows"][0]["gap_recovered"],
            "gap_recovered_ci_at_default": default["rows"][0]["ci"]["gap_recovered"],
            **(
                {
                    "probe_weights_on_or_above_rules": sum(w["probe"]["on_or_above_rules"] for w in sweep_only),
                    "probe_weights_beating_rules": sum(
                        all(v > 0 for v in w["probe"]["reward_minus_rules"].values()) for w in sweep_only
                    ),
                    "probe_gap_recovered_at_default": default["probe"]["gap_recovered"],
                }
                if probe_points
                else {}
            ),
        },
        "left_out": left_out,
        "warnings": warnings,
        **({"stream": stream} if stream is not None else {}),
        "per_weight": per_weight,
        "curves": summary,
        "oracle_sweep": oracle_sweep,
        "points": [{"method": p.method, "setting": p.setting, "em": p.em, "tokens": p.tokens} for p in points["test"]],
        "policies": {f"{w:g}": str(p) for w, p in policies.items()},
        "probe_controllers": {f"{w:g}": str(p) for w, p in probe_policies.items()},
        "conditioned": str(conditioned_dir) if conditioned_dir is not None else None,
        "action_mix": _action_mix(test_r, policy_points[default_weight].actions, default_weight),
    }
    (out / "report.json").write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
    (out / "report.md").write_text(format_report(report), encoding="utf-8")
    if config.plots:
        say("plotting")
        _plots(
            out, report, points["test"], policy_points, probe_points, test_r, default_weight, conditioned_points,
            stream_point,
        )  # fmt: skip
    return report


def _stream_comparison(
    stream: OperatingPoint,
    train: ReplayTable,
    val: ReplayTable,
    test: ReplayTable,
    points: list[OperatingPoint],
    curves: dict[str, tuple[np.ndarray, np.ndarray]],
    passes: int,
    seed: int,
) -> dict[str, Any]:
    """The stream policy against the CLEAR-style allocation and the fixed actions at its total spend.

    Rows, each with 95% paired-bootstrap intervals over the split's queries: the stream
    policy; the CLEAR-style allocation of exactly its total billed tokens across the
    split (left out, with the reason, when that is below the cheapest predicted actions);
    CLEAR-style within each of the replay's streams at the environment's budget; the
    most accurate fixed action that spends no more than the stream policy. Their EM and the stream policy's EM minus
    theirs are compared (TokenBudgetStream-v0 rewards EM; the budget is its only cost).
    Every baseline curve's EM at the stream policy's mean tokens comes with them.
    """
    total = float(stream.billed_tokens.sum())
    picked: dict[str, OperatingPoint] = {}
    left_out: dict[str, str] = {}
    model = ClearModel.fit(train, val)
    try:
        picked["CLEAR-style"] = clear_point(model, test, total, f"its total spend across the split, {total:.0f} tokens")
    except ValueError as error:
        left_out["CLEAR-style"] = str(error)
    env = stream_environment(test)
    try:
        picked[CLEAR_PER_STREAM] = clear_stream_point(model, test, env.total_budget, env.stream_length, passes, seed)
    except ValueError as error:
        left_out[CLEAR_PER_STREAM] = str(error)
    affordable = [p for p in points if p.method == "fixed" and p.billed_tokens.sum() <= total + 1e-9]
    if affordable:
        picked["fixed"] = max(affordable, key=lambda p: (p.em, -p.tokens))
    else:
        left_out["fixed"] = "every fixed action spends more than the stream policy"
    em_only = CostModel(0.0)  # reward = EM, as the stream environment rewards
    compare = {name: point.exact_match for name, point in picked.items()}
    figures = split_figures(test.matrix, stream.exact_match, stream.billed_tokens, em_only, compare=compare, seed=seed)
    rows = [_stream_row(STREAM, stream, figures)]
    for name, point in picked.items():
        row = _stream_row(name, point, split_figures(
            test.matrix, point.exact_match, point.billed_tokens, em_only, seed=seed
        ))  # fmt: skip
        minus = figures[f"reward_minus:{name}"]
        row["stream_minus"] = {"diff": minus.value, "ci": minus.to_list()}
        rows.append(row)
    return {
        "total_tokens": total,
        "queries": len(test.matrix.ids),
        "rows": rows,
        "left_out": left_out,
        "curves_at_its_tokens": {
            method: (None if math.isinf(v := curve_at(curve, stream.tokens)) else v)
            for method, curve in curves.items()
            if method in BASELINES
        },
    }


def _stream_row(method: str, point: OperatingPoint, figures: dict[str, Any]) -> dict[str, Any]:
    return {
        "method": method, "setting": point.setting, "em": point.em, "tokens": point.tokens,
        "total_tokens": float(point.billed_tokens.sum()),
        "ci": {key: figures[key].to_list() for key in ("em", "tokens")},
    }  # fmt: skip


def format_stream_section(stream: dict[str, Any]) -> list[str]:
    """The report's section on the stream policy against CLEAR-style and the fixed actions at its spend."""
    lines = [
        "## Stream policy against CLEAR-style at the same total budget",
        "",
        f"The stream policy (`{stream['policy']}`), replayed on TokenBudgetStream-v0 over the split's "
        f"{stream['queries']} queries, billed {stream['total_tokens']:.0f} tokens in all. CLEAR-style allocates "
        "at most that total across the split through one shadow price on the EM and billed tokens it predicts "
        "per action from the prompt features (fitted on train); CLEAR-style, per stream, allocates each of the "
        "replay's streams the environment's budget the same way; fixed is the most accurate single action that "
        "spends no more than the stream policy. The stream policy sees its queries one at a time and holds each "
        "stream's budget; CLEAR-style sees the whole batch at once (offline, as CLEAR allocates). Each figure "
        "with its 95% bootstrap interval over the queries (the last column paired).",
        "",
        "| method | setting | EM | mean billed tokens | total billed tokens | stream policy EM minus this |",
        "|---|---|---|---|---|---|",
    ]
    for r in stream["rows"]:
        minus = r.get("stream_minus")
        cell = "" if minus is None else f"{minus['diff']:+.3f} [{minus['ci'][0]:+.3f}, {minus['ci'][1]:+.3f}]"
        lines.append(
            f"| {r['method']} | {r['setting']} | {_fmt_ci(r['em'], r['ci']['em'], 3)} | "
            f"{_fmt_ci(r['tokens'], r['ci']['tokens'], 2)} | {r['total_tokens']:.0f} | {cell} |"
        )
    lines += [f"- {method}: left out, {reason}." for method, reason in stream["left_out"].items()]
    curves = ", ".join(
        f"{method} {'n/a (cheaper than its cheapest point)' if v is None else f'{v:.3f}'}"
        for method, v in stream["curves_at_its_tokens"].items()
    )
    lines += ["", f"Each baseline curve's EM at the stream policy's mean tokens: {curves}."]
    return lines


def _probe_verdict(
    probe_row: dict[str, Any],
    policy_row: dict[str, Any],
    rows: list[dict[str, Any]],
    curves: dict[str, tuple[np.ndarray, np.ndarray]],
) -> dict[str, Any]:
    """The probe controller at one weight, against the probing rules and the per-query policy.

    Its figures; its EM margin over each probing rule's curve at its own mean tokens
    (None where it is cheaper than the rule's cheapest setting: not comparable); its
    reward minus each rule's setting picked on val; and its reward and gap recovered
    minus the policy's.
    """
    rules = [rule for rule in PROBE_RULES if rule in curves]  # a rule the table cannot replay is left out
    margins = {rule: probe_row["em"] - curve_at(curves[rule], probe_row["tokens"]) for rule in rules}
    rule_rewards = {row["method"]: row["reward"] for row in rows if row["method"] in PROBE_RULES}
    return {
        **{key: probe_row[key] for key in ("em", "tokens", "reward", "gap_recovered")},
        "margins": {rule: (None if math.isinf(v) else v) for rule, v in margins.items()},
        "on_or_above_rules": bool(margins) and all(v >= -1e-9 for v in margins.values()),
        "reward_minus_rules": {rule: probe_row["reward"] - reward for rule, reward in rule_rewards.items()},
        "reward_minus_policy": probe_row["reward"] - policy_row["reward"],
        "gap_recovered_minus_policy": probe_row["gap_recovered"] - policy_row["gap_recovered"],
    }


def _action_mix(replay: ReplayTable, columns: np.ndarray | None, weight: float) -> dict[str, dict[str, dict[str, int]]]:
    assert columns is not None
    oracle = replay.matrix.rewards(CostModel(weight)).argmax(axis=1)
    return {"tokenopt policy": action_mix(replay.matrix, columns), "oracle": action_mix(replay.matrix, oracle)}


def _probe_sentence(probe: dict[str, Any]) -> str:
    margins = ", ".join(
        f"{rule} {'n/a (controller cheaper than its cheapest point)' if v is None else f'{100 * v:+.1f}'}"
        for rule, v in probe["margins"].items()
    )
    where = "on or above every comparable curve" if probe["on_or_above_rules"] else "below at least one"
    rewards = ", ".join(f"{rule} {difference:+.3f}" for rule, difference in probe["reward_minus_rules"].items())
    ceiling = probe["oracle"]
    return (
        f"Probe controller at {probe['tokens']:.2f} tokens, EM {probe['em']:.3f}, reward {probe['reward']:.3f}; its EM "
        f"margin over the probing rules' curves at those tokens (points): {margins} ({where}); its reward minus "
        f"their val-picked settings': {rewards}. Against the policy: "
        f"reward {probe['reward_minus_policy']:+.3f}, gap recovered {probe['gap_recovered_minus_policy']:+.2f}. "
        f"The best exit in hindsight on its ladder ({ceiling.get('setting', 'best exit')}), the most any controller "
        f"reasoning in its mode (and escalating as it may) could earn: "
        f"EM {ceiling['em']:.3f} at {ceiling['tokens']:.2f} tokens, reward {ceiling['reward']:.3f}."
    )


def _fmt_tokens(value: float | None) -> str:
    return "never" if value is None else f"{value:.2f}"


def _fmt_ci(value: float, ci: list[float] | None, digits: int) -> str:
    """``value [low, high]``: a figure and its 95% interval."""
    text = f"{value:.{digits}f}"
    return text if ci is None else f"{text} [{ci[0]:.{digits}f}, {ci[1]:.{digits}f}]"


def format_row_cells(row: dict[str, Any]) -> str:
    """EM, tokens, reward and gap recovered of a scoreboard row, each with its 95% interval, as table cells."""
    ci = row.get("ci", {})
    return " | ".join(
        _fmt_ci(row[key], ci.get(key), digits)
        for key, digits in (("em", 3), ("tokens", 2), ("reward", 3), ("gap_recovered", 2))
    )


def format_weight_table(entry: dict[str, Any]) -> list[str]:
    """The Markdown table of one cost weight's rows, every figure with its 95% interval."""
    lines = [
        "| method | setting (chosen on val) | EM | mean billed tokens | reward | gap recovered | policy reward "
        "minus this |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in entry["rows"]:
        lines.append(f"| {r['method']} | {r['setting']} | {format_row_cells(r)} | {format_policy_minus(r)} |")
    return lines


def format_policy_minus(row: dict[str, Any]) -> str:
    """The policy's reward minus a row's, with its paired 95% interval ("" for the policy's own row)."""
    minus = row.get("policy_minus")
    if minus is None:
        return ""
    return f"{minus['diff']:+.3f} [{minus['ci'][0]:+.3f}, {minus['ci'][1]:+.3f}]"


def format_report(report: dict[str, Any]) -> str:
    """The report as Markdown."""
    ref = report["reference"]
    bar = report["bar"]
    lines = [
        "# tokenopt scoreboard",
        "",
        f"Outcome table `{report['table']}`, split `{report['split']}` ({report['queries']} queries), policy "
        f"`{report['policy']}`. Reference: max-budget greedy `{ref['action']}`, EM {ref['em']:.3f} at "
        f"{ref['tokens']:.2f} mean billed tokens.",
        "",
        "Each baseline's curve is the upper concave envelope of its settings' (mean tokens, EM) points on this "
        "split: any point on it is reachable by splitting traffic between two settings. The policy is one "
        "trained policy per cost weight. Rows at a weight pick each method's setting by its reward on the "
        "val split and report this split.",
        "",
        "## Verdict",
        "",
        f"- The policy is on or above every baseline's curve at its own mean tokens for "
        f"**{bar['weights_on_or_above']} of {bar['weights']}** cost weights.",
        f"- Gap recovered at the default weight ({report['default_cost_weight']:g}): "
        f"**{bar['gap_recovered_at_default']:.2f}**"
        + (
            f" (95% interval [{bar['gap_recovered_ci_at_default'][0]:.2f}, "
            f"{bar['gap_recovered_ci_at_default'][1]:.2f}])."
            if bar.get("gap_recovered_ci_at_default")
            else "."
        ),
    ]
    lines += [f"- **Warning**: {warning}" for warning in report.get("warnings", [])]
    lines += [f"- {method}: left out, {reason}." for method, reason in report.get("left_out", {}).items()]
    if "probe_weights_on_or_above_rules" in bar:
        lines += [
            f"- The probe controller is on or above the curves of both probing rules ({', '.join(PROBE_RULES)}) "
            f"at its own mean tokens for **{bar['probe_weights_on_or_above_rules']} of {bar['weights']}** cost "
            f"weights (a rule whose cheapest setting costs more than the controller is not compared), and earns "
            f"a higher reward than both rules' val-picked settings for **{bar['probe_weights_beating_rules']} of "
            f"{bar['weights']}**; its gap recovered at the default weight is "
            f"**{bar['probe_gap_recovered_at_default']:.2f}** against the policy's "
            f"{bar['gap_recovered_at_default']:.2f}.",
        ]
    lines += [
        "",
        "## Curves: area and tokens to reach max-budget greedy's EM",
        "",
        f"Area: mean EM of the curve over 0 to {ref['tokens']:.2f} tokens (0 below a method's cheapest point).",
        "",
        "| method | area | tokens to 95% of ref EM | tokens to 99% of ref EM |",
        "|---|---|---|---|",
    ]
    for method, curve in report["curves"].items():
        reach = f"{_fmt_tokens(curve['tokens_to_95'])} | {_fmt_tokens(curve['tokens_to_99'])}"
        lines.append(f"| {method} | {curve['auc']:.3f} | {reach} |")
    for entry in report["per_weight"]:
        lines += ["", f"## Cost weight {entry['cost_weight']:g}", ""]
        lines += [
            "Each figure with its 95% bootstrap interval over the split's queries (paired: the last column is the "
            "policy's per-query reward minus the method's).",
            "",
            *format_weight_table(entry),
        ]
        lines.append("")
        pol = entry["policy"]
        margins = ", ".join(
            f"{m} {'n/a (policy cheaper than its cheapest point)' if v is None else f'{100 * v:+.1f}'}"
            for m, v in entry["margins"].items()
        )
        lines.append(
            f"Policy at {pol['tokens']:.2f} tokens, EM {pol['em']:.3f}; its EM margin over each curve at those "
            f"tokens (points): {margins}."
        )
        if entry["beaten_by"]:
            worst = min(entry["beaten_by"], key=entry["beaten_by"].get)
            lines.append(f"Below the curve of: {', '.join(entry['beaten_by'])} (most by {worst}).")
        policy_reward = entry["rows"][0]["reward"]
        ahead = [r for r in entry["rows"][2:] if r["reward"] > policy_reward + 1e-12]
        if ahead:
            lines.append(
                "Higher reward than the policy at this weight: "
                + ", ".join(f"{r['method']} ({r['setting']}, {r['reward'] - policy_reward:+.3f})" for r in ahead)
                + "."
            )
        if "probe" in entry:
            lines.append(_probe_sentence(entry["probe"]))
    if "stream" in report:
        lines += ["", *format_stream_section(report["stream"])]
    lines += ["", "## Action mix at the default weight", "", "| family | tokenopt policy | oracle |", "|---|---|---|"]
    mix = report["action_mix"]
    for family in mix["tokenopt policy"]:
        cells = []
        for name in ("tokenopt policy", "oracle"):
            counts = sorted(mix[name].get(family, {}).items(), key=lambda item: -item[1])
            cells.append(", ".join(f"{action} {count}" for action, count in counts[:4]))
        lines.append(f"| {family} | {cells[0]} | {cells[1]} |")
    return "\n".join(lines) + "\n"


_COLORS = {
    "fixed": "tab:gray",
    "TALE-style": "tab:blue",
    "Dynasor-style": "tab:green",
    "DEER-style": "tab:olive",
    "Adaptive-Consistency-style": "tab:purple",
    "RouteLLM-style": "tab:orange",
    "CLEAR-style": "tab:brown",
    "tokenopt policy": "crimson",
    "tokenopt probe controller": "darkcyan",
}


def _plots(
    out: Path,
    report: dict[str, Any],
    points: list[OperatingPoint],
    policy_points: dict[float, OperatingPoint],
    probe_points: dict[float, OperatingPoint],
    replay: ReplayTable,
    default_weight: float,
    conditioned_points: dict[float, OperatingPoint] | None = None,
    stream_point: OperatingPoint | None = None,
) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from tokenopt.agents.common.plots import action_mix_figure

    figure, axis = plt.subplots(figsize=(9, 5.5))
    for method in (m for m in BASELINES if m in report["curves"]):
        mine = [p for p in points if p.method == method]
        color = _COLORS[method]
        axis.scatter([p.tokens for p in mine], [p.em for p in mine], s=12, color=color, alpha=0.35)
        xs, ys = (np.array(v) for v in zip(*report["curves"][method]["curve"], strict=True))
        dense = np.concatenate([np.linspace(a, b, 30) for a, b in zip(xs[:-1], xs[1:], strict=True)] + [xs[-1:]])
        dense = np.append(dense, xs[-1] * 2)  # flat past the last vertex
        axis.plot(dense, np.interp(dense, xs, ys), color=color, lw=1.8, label=f"{method} (envelope)")
    weights = sorted(policy_points)
    axis.plot([policy_points[w].tokens for w in weights], [policy_points[w].em for w in weights], color="crimson",
              lw=2.5, marker="*", markersize=14, label="tokenopt policy (one per cost weight λ)", zorder=6)  # fmt: skip
    for k, w in enumerate(weights):
        axis.annotate(f"λ={w:g}", (policy_points[w].tokens, policy_points[w].em), textcoords="offset points",
                      xytext=(6, -14 if k % 2 else 8), fontsize=7, color="crimson")  # fmt: skip
    if probe_points:
        axis.plot([probe_points[w].tokens for w in weights], [probe_points[w].em for w in weights],
                  color=_COLORS[PROBE], lw=2, marker="P", markersize=10, zorder=6,
                  label="tokenopt probe controller (one per cost weight λ)")  # fmt: skip
    if conditioned_points:
        mine = [conditioned_points[w] for w in sorted(conditioned_points)]
        axis.plot([p.tokens for p in mine], [p.em for p in mine], color="darkorange", lw=2, marker="o", markersize=8,
                  ls="--", zorder=7, label="tokenopt price-conditioned policy (one for every λ)")  # fmt: skip
    if stream_point is not None:
        axis.scatter([stream_point.tokens], [stream_point.em], color="black", marker="D", s=60, zorder=7,
                     label="tokenopt stream policy (its total budget)")  # fmt: skip
    oracle = report["oracle_sweep"]
    axis.plot([o["tokens"] for o in oracle], [o["em"] for o in oracle], color="black", marker="X", ls="--", lw=1,
              label="oracle (per cost weight)", zorder=5)  # fmt: skip
    ref = report["reference"]
    axis.axhline(ref["em"], color="gray", ls=":", lw=1)
    axis.annotate(f"max-budget greedy ({ref['action']})", (ref["tokens"], ref["em"]), fontsize=7, color="gray",
                  textcoords="offset points", xytext=(4, 4))  # fmt: skip
    axis.set_xscale("log")
    axis.set_xlabel("mean billed tokens per query (log scale)")
    axis.set_ylabel("exact match")
    axis.set_title(f"EM vs tokens on the {report['split']} split: every method, same LM and data")
    axis.grid(alpha=0.3)
    axis.legend(fontsize=8, loc="lower right")
    figure.tight_layout()
    figure.savefig(out / "em_vs_tokens.png", dpi=120)

    policy_columns = policy_points[default_weight].actions
    assert policy_columns is not None
    oracle_columns = replay.matrix.rewards(CostModel(default_weight)).argmax(axis=1)
    mix_policy = action_mix_figure(replay.matrix, policy_columns)
    mix_policy.axes[0].set_title(f"tokenopt policy: actions per family (lambda {default_weight:g})")
    mix_policy.savefig(out / "action_mix.png", dpi=120)
    mix_oracle = action_mix_figure(replay.matrix, oracle_columns)
    mix_oracle.axes[0].set_title(f"oracle: actions per family (lambda {default_weight:g})")
    mix_oracle.savefig(out / "action_mix_oracle.png", dpi=120)

    from torch.utils.tensorboard import SummaryWriter

    writer = SummaryWriter(str(out / "tb"))
    for step, entry in enumerate(report["per_weight"]):
        for r in entry["rows"]:
            tag = r["method"].replace(" ", "_")
            for key in ("em", "tokens", "reward", "gap_recovered"):
                writer.add_scalar(f"scoreboard/{tag}/{key}", r[key], step)
    writer.add_figure("scoreboard/em_vs_tokens", figure, close=True)
    writer.add_figure("scoreboard/action_mix", mix_policy, close=True)
    writer.add_figure("scoreboard/action_mix_oracle", mix_oracle, close=True)
    writer.close()
