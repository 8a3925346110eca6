"""Honest figures and the do-no-harm rule: intervals over queries, the noise check, the fallback.

One home for three ideas that ``tokenopt train``, ``eval`` and ``gate`` share:

- :func:`split_figures`: EM, mean billed tokens, reward and gap recovered of per-query
  outcomes on a split, each with a 95% paired-bootstrap interval over the queries;
- :func:`oracle_noise`: whether the oracle's margin over the best fixed action is within
  the noise of the split (then gap recovered there is mostly noise);
- :func:`no_harm_verdict`: the do-no-harm rule. A learned controller ships only if the
  one-sided lower confidence bound of its per-query reward minus the best fixed
  action's (picked on validation) is above 0; otherwise a constant ``max_tokens`` would
  serve as well, and :func:`write_fallback_policy` exports that constant as a runtime
  policy (a network whose output ignores the prompt), so a server loads it unchanged.
"""

from __future__ import annotations

import json
import re
import shutil
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from tokenopt.agents.common.statistics import BootstrapInterval, bootstrap_intervals, paired_bootstrap_lower_bound
from tokenopt.cost import CostModel
from tokenopt.table import OutcomeMatrix

__all__ = [
    "CONFIDENCE",
    "LEARNED_POLICY_DIR",
    "RESAMPLES",
    "NoHarmVerdict",
    "NoiseCheck",
    "apply_no_harm",
    "best_fixed_column",
    "format_no_harm",
    "no_harm_verdict",
    "oracle_noise",
    "split_figures",
    "write_fallback_policy",
]

CONFIDENCE = 0.95
"""Level of every interval and bound of this module."""
RESAMPLES = 2000
"""Bootstrap resamples (seeded)."""
LEARNED_POLICY_DIR = "policy-learned"
"""Where ``tokenopt train`` keeps the learned policy when ``RUN/policy/`` is its fallback."""
FALLBACK_LOGIT = 50.0
"""Output bias of the fallback's action (the others get minus this): probability 1 to float precision."""


def best_fixed_column(matrix: OutcomeMatrix, cost_model: CostModel) -> int:
    """The action column with the best mean reward on ``matrix``'s queries (the best fixed action)."""
    return int(np.argmax(matrix.rewards(cost_model).mean(axis=0)))


def split_figures(
    matrix: OutcomeMatrix,
    exact_match: np.ndarray,
    billed_tokens: np.ndarray,
    cost_model: CostModel,
    *,
    compare: dict[str, np.ndarray] | None = None,
    seed: int = 0,
    resamples: int = RESAMPLES,
) -> dict[str, BootstrapInterval]:
    """Per-query outcomes on a split, with 95% paired-bootstrap intervals over its queries.

    Args:
        matrix: the split's queries (the oracle and best fixed action come from its actions).
        exact_match: the EM each query got, in row order.
        billed_tokens: the tokens each query was billed.
        cost_model: prices and lambda.
        compare: other methods' per-query rewards, by name; adds ``reward_minus:<name>``,
            this method's reward minus theirs, resampled with the same queries.
        seed: seed of the bootstrap.
        resamples: bootstrap resamples.

    Returns:
        ``em``, ``tokens``, ``reward``, ``gap_recovered`` (the ratio of the resampled
        means, as :func:`tokenopt.table.gap_recovered` computes it on the split) and the
        ``reward_minus:`` differences.
    """
    rewards = matrix.rewards(cost_model)
    fixed = rewards[:, best_fixed_column(matrix, cost_model)]
    mine = cost_model.reward(np.asarray(exact_match, float), np.asarray(billed_tokens, float), matrix.prompt_tokens)
    columns = {
        "em": np.asarray(exact_match, dtype=np.float64),
        "tokens": np.asarray(billed_tokens, dtype=np.float64),
        "reward": mine,
        "_above_fixed": mine - fixed,
        "_oracle_above_fixed": rewards.max(axis=1) - fixed,
    }
    for name, other in (compare or {}).items():
        columns[f"reward_minus:{name}"] = mine - np.asarray(other, dtype=np.float64)
    intervals = bootstrap_intervals(
        columns, CONFIDENCE, resamples, seed, ratios={"gap_recovered": ("_above_fixed", "_oracle_above_fixed")}
    )
    if not np.isfinite(intervals["gap_recovered"].value):  # the oracle does no better than the best fixed action
        intervals["gap_recovered"] = BootstrapInterval(0.0, 0.0, 0.0)
    return {name: value for name, value in intervals.items() if not name.startswith("_")}


@dataclass
class NoiseCheck:
    """The oracle's margin over the best fixed action on a split, against the split's noise."""

    split: str
    queries: int
    best_fixed_action: str
    margin: float
    """Mean per-query reward of the oracle minus the best fixed action."""
    interval: list[float]
    """Its 95% paired-bootstrap interval."""
    noise: float
    """The split's noise: the larger half-width of the margin's interval and of a policy's reward
    difference to the best fixed action (when one was given)."""
    within_noise: bool
    warning: str | None
    """What it means, when the margin is within the noise; None otherwise."""

    def to_dict(self) -> dict[str, Any]:
        """As JSON-ready data."""
        return asdict(self)


def oracle_noise(
    matrix: OutcomeMatrix,
    cost_model: CostModel,
    split: str,
    policy_rewards: np.ndarray | None = None,
    seed: int = 0,
    resamples: int = RESAMPLES,
) -> NoiseCheck:
    """Whether the oracle's margin over the best fixed action is within the noise of the split.

    The margin is within the noise when its 95% interval reaches 0, or when it is no
    larger than the split's noise: the half-width of its own interval or, given a
    policy's per-query rewards, of the policy's reward difference to the best fixed
    action. Then a policy's gap recovered (its difference divided by the margin) can
    move by 1.0 or more from the draw of queries alone.
    """
    rewards = matrix.rewards(cost_model)
    column = best_fixed_column(matrix, cost_model)
    fixed = rewards[:, column]
    columns = {"margin": rewards.max(axis=1) - fixed}
    if policy_rewards is not None:
        columns["policy"] = np.asarray(policy_rewards, dtype=np.float64) - fixed
    intervals = bootstrap_intervals(columns, CONFIDENCE, resamples, seed)
    margin = intervals["margin"]
    noise = max(interval.half_width for interval in intervals.values())
    within = margin.low <= 0.0 or margin.value <= noise
    warning = None
    if within:
        warning = (
            f"the oracle's margin over the best fixed action ({matrix.actions[column]}) on the {split} split is "
            f"{margin.value:.4f} reward per query (95% interval [{margin.low:.4f}, {margin.high:.4f}]), within the "
            f"split's noise ({noise:.4f}, the half-width of a 95% interval of a reward difference on its "
            f"{len(matrix.ids)} queries): no policy can be shown to beat the fixed action here, and gap recovered "
            "can move by 1.0 or more from the draw of queries alone. Evaluate on more queries, or at a cost weight "
            "where the actions differ more."
        )
    return NoiseCheck(split, len(matrix.ids), matrix.actions[column], margin.value, margin.to_list(), noise,
                      within, warning)  # fmt: skip


@dataclass
class NoHarmVerdict:
    """The do-no-harm rule on one split: does the learned policy beat the best fixed action beyond the noise?"""

    split: str
    queries: int
    cost_weight: float
    fixed_action: str
    """The best fixed action, picked by its mean reward on ``split``."""
    policy_reward: float
    fixed_reward: float
    reward_diff: float
    """Mean per-query reward of the policy minus the fixed action."""
    lower_bound: float
    """One-sided 95% lower confidence bound of ``reward_diff`` (paired bootstrap over queries)."""
    upper_bound: float
    beats_fixed: bool
    """``lower_bound > 0``: the learned policy may ship."""
    reason: str

    def to_dict(self) -> dict[str, Any]:
        """As JSON-ready data."""
        return asdict(self)


def no_harm_verdict(
    matrix: OutcomeMatrix,
    chosen: np.ndarray,
    cost_model: CostModel,
    split: str,
    seed: int = 0,
    resamples: int = RESAMPLES,
    fixed_column: int | None = None,
    confidence: float = CONFIDENCE,
) -> NoHarmVerdict:
    """The do-no-harm rule: the policy's per-query reward minus the best fixed action's, paired.

    Args:
        matrix: the split's queries.
        chosen: the action column the policy picks for each query.
        cost_model: prices and lambda.
        split: the split's name, for the reason.
        seed: seed of the bootstrap.
        resamples: bootstrap resamples.
        fixed_column: the fixed action to compare with; None picks the best on ``matrix``.
        confidence: level of the one-sided bound.

    Returns:
        The verdict: the policy beats the fixed action when the one-sided lower bound
        of the mean difference is above 0.
    """
    rewards = matrix.rewards(cost_model)
    column = best_fixed_column(matrix, cost_model) if fixed_column is None else fixed_column
    rows = np.arange(len(matrix.ids))
    policy, fixed = rewards[rows, np.asarray(chosen, dtype=np.int64)], rewards[:, column]
    lower, upper = paired_bootstrap_lower_bound(policy - fixed, confidence, resamples, seed)
    diff = float((policy - fixed).mean())
    beats = lower > 0.0
    action = matrix.actions[column]
    reason = (
        f"on {split} ({len(matrix.ids)} queries, lambda {cost_model.cost_weight:g}) the policy's reward minus the "
        f"best fixed action {action}'s is {diff:+.4f}, with a one-sided {100 * confidence:g}% lower bound of "
        f"{lower:+.4f} (paired bootstrap over queries): "
        + ("above 0, so the learned policy beats the fixed action beyond the noise"
           if beats else "not above 0, so the learned policy is not shown to beat a constant max_tokens")
    )  # fmt: skip
    return NoHarmVerdict(split, len(matrix.ids), cost_model.cost_weight, action, float(policy.mean()),
                         float(fixed.mean()), diff, lower, upper, beats, reason)  # fmt: skip


def write_fallback_policy(learned: str | Path, out: str | Path, action: str, verdict: dict[str, Any]) -> Path:
    """Export a policy that always picks ``action``, in the learned policy's format.

    The learned policy's arrays (normalisation, and anything its feature spec keeps) and
    spec are copied; its network is replaced by one layer with zero weights and a bias
    that puts probability 1 on ``action``. The runtime loads it like any policy and
    :meth:`~tokenopt.runtime.BudgetPolicy.decide` returns ``action`` for every prompt.
    ``policy.json`` records ``fallback``: the action, the learned policy's id and folder,
    and why (the validation figures).

    Raises:
        ValueError: ``action`` is not in the learned policy's action table.
    """
    import hashlib

    from tokenopt.runtime import POLICY_SPEC_FILE, POLICY_WEIGHTS_FILE
    from tokenopt.table.schema import write_atomic

    learned, out = Path(learned), Path(out)
    spec = json.loads((learned / POLICY_SPEC_FILE).read_text(encoding="utf-8"))
    names = [str(entry["name"]) for entry in spec["actions"]]
    if action not in names:
        raise ValueError(f"fallback action {action!r} is not in the policy's action table {names}")
    with np.load(learned / POLICY_WEIGHTS_FILE, allow_pickle=False) as data:
        arrays = {name: data[name] for name in data.files if not re.match(r"m\d+_", name)}
    inputs = int(np.asarray(arrays["obs_mean"]).shape[0])
    bias = np.full(len(names), -FALLBACK_LOGIT, dtype=np.float32)
    bias[names.index(action)] = FALLBACK_LOGIT
    arrays |= {"m0_layer0_weight": np.zeros((inputs, len(names)), dtype=np.float32), "m0_layer0_bias": bias}
    out.mkdir(parents=True, exist_ok=True)

    def write_weights(partial: Path) -> None:
        with partial.open("wb") as handle:
            np.savez(handle, **arrays)

    write_atomic(out / POLICY_WEIGHTS_FILE, write_weights)
    layer = {"weight": "m0_layer0_weight", "bias": "m0_layer0_bias", "shape": [inputs, len(names)],
             "activation": "none"}  # fmt: skip
    spec |= {
        "policy_id": f"{spec.get('policy_id', 'policy')}-fallback-{action.replace('/', '-')}",
        "members": [{"layers": [layer]}],
        "weights_sha256": hashlib.sha256((out / POLICY_WEIGHTS_FILE).read_bytes()).hexdigest(),
        "fallback": {
            "action": action,
            "learned_policy_id": spec.get("policy_id"),
            "learned_policy": str(learned),
            "verdict": verdict,
        },  # fmt: skip
    }
    text = json.dumps(spec, indent=2) + "\n"
    write_atomic(out / POLICY_SPEC_FILE, lambda partial: partial.write_text(text, encoding="utf-8"))
    return out


def apply_no_harm(
    run_dir: str | Path, fallback: bool = True, seed: int = 0, config: dict[str, Any] | None = None
) -> dict[str, Any] | None:
    """After ``tokenopt train``: the do-no-harm rule on validation, and the fallback export.

    The run's exported ``RUN/policy/`` is scored on the val split against the best fixed
    action on val. When it does not beat it beyond the noise and ``fallback`` is set, the
    learned policy moves to ``RUN/policy-learned/`` and ``RUN/policy/`` becomes the
    fallback to that fixed action. The outcome is written to ``RUN/no_harm.json``.

    ``config``: the training settings (table, prices, env) when ``run_dir`` has no
    ``config.yml`` of its own, as for ``train --seeds N --ensemble``'s ``OUT/``, whose
    policy averages runs trained with one member's settings but its seed.

    Returns:
        ``{"figures", "verdict", "noise", "fallback", "policy", "learned_policy"}`` (``figures``: the
        learned policy's val figures and reward differences as ``[value, low, high]``), or None for a
        run whose policy does not pick a (budget, mode) per query (stream, probe).
    """
    import yaml

    from tokenopt.agents.common.evaluation import policy_choices, query_questions
    from tokenopt.agents.common.run_dir import RunDir
    from tokenopt.cost import CostSettings
    from tokenopt.runtime import POLICY_SPEC_FILE, BudgetPolicy

    run = RunDir(run_dir)
    if config is None:
        config = yaml.safe_load(run.config.read_text(encoding="utf-8"))
    assert config is not None
    if str(config.get("env", "budget")) != "budget":
        return None
    cost_model = CostSettings(
        **{key: config[key] for key in ("cost_weight", "token_price", "prompt_token_price") if key in config}
    ).cost_model()
    learned_dir = run.path / LEARNED_POLICY_DIR
    if learned_dir.is_dir():  # checked before: keep the newest learned policy, drop the old fallback
        current = json.loads((run.policy / POLICY_SPEC_FILE).read_text(encoding="utf-8"))
        if "fallback" in current:
            shutil.rmtree(run.policy)
            learned_dir.rename(run.policy)
        else:
            shutil.rmtree(learned_dir)
    matrix = OutcomeMatrix.from_table(config["table"]).subset("val")
    if config.get("cost_weight_range"):
        return _apply_price_no_harm(run, config, matrix, fallback, seed)
    chosen = policy_choices(BudgetPolicy.load(run.policy), matrix, query_questions(config["table"]))
    verdict = no_harm_verdict(matrix, chosen, cost_model, "val", seed=seed)
    rows = np.arange(len(chosen))
    rewards = matrix.rewards(cost_model)
    noise = oracle_noise(matrix, cost_model, "val", rewards[rows, chosen], seed=seed)
    references = {f"best fixed {verdict.fixed_action}": rewards[:, best_fixed_column(matrix, cost_model)],
                  "oracle": rewards.max(axis=1)}  # fmt: skip
    greedy = matrix.max_budget_greedy()
    if "greedy" in matrix.mode_names and greedy != best_fixed_column(matrix, cost_model):
        references[f"max-budget greedy {matrix.actions[greedy]}"] = rewards[:, greedy]
    figures = split_figures(matrix, matrix.exact_match[rows, chosen], matrix.billed_tokens[rows, chosen], cost_model,
                            compare=references, seed=seed)  # fmt: skip
    fell_back = fallback and not verdict.beats_fixed
    result: dict[str, Any] = {
        "figures": {name: [value.value, value.low, value.high] for name, value in figures.items()},
        "verdict": verdict.to_dict(),
        "noise": noise.to_dict(),
        "fallback": fell_back,
        "policy": str(run.policy),
        "learned_policy": str(run.policy),
    }
    if fell_back:
        run.policy.rename(learned_dir)
        write_fallback_policy(learned_dir, run.policy, verdict.fixed_action, verdict.to_dict())
        result["learned_policy"] = str(learned_dir)
    (run.path / "no_harm.json").write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
    return result


def price_fallback_entries(
    matrix: OutcomeMatrix, cost_model: CostModel, low: float, high: float, points: int = 512
) -> list[dict[str, Any]]:
    """The best fixed action on ``matrix`` at every lambda of ``[low, high]``, as price intervals.

    The best fixed action at lambda is the argmax over actions of mean EM minus lambda times mean
    cost: an upper envelope of lines, so each action holds one interval. It is read off a log-spaced
    grid of ``points`` weights; interval ends are geometric midpoints between grid weights.
    """
    weights = np.geomspace(low, high, points)
    exact, billed = matrix.exact_match.mean(axis=0), matrix.billed_tokens.mean(axis=0)
    prompt = float(matrix.prompt_tokens.mean())
    best = [int(np.argmax(replace_weight(cost_model, w).reward(exact, billed, prompt))) for w in weights]
    entries: list[dict[str, Any]] = []
    start = 0
    for k in range(1, points + 1):
        if k == points or best[k] != best[start]:
            entry_low = low if start == 0 else float(np.sqrt(weights[start - 1] * weights[start]))
            entry_high = high if k == points else float(np.sqrt(weights[k - 1] * weights[k]))
            entries.append({"low": entry_low, "high": entry_high, "action": matrix.actions[best[start]]})
            start = k
    return entries


def replace_weight(cost_model: CostModel, cost_weight: float) -> CostModel:
    """The cost model at another lambda (same prices)."""
    return CostModel(cost_weight, cost_model.token_price, cost_model.prompt_token_price, cost_model.normalizer)


def _apply_price_no_harm(
    run: Any, config: dict[str, Any], matrix: OutcomeMatrix, fallback: bool, seed: int
) -> dict[str, Any]:
    """Do no harm at every price: a price-conditioned policy is checked at each weight of its validation grid.

    The range is cut into cells around the grid's weights (ends at geometric midpoints). In a cell whose
    weight fails the rule, the exported policy picks the best fixed action on val instead of deciding
    (``price_fallback`` in ``policy.json``: price intervals and their action); where it passes, it decides.
    The learned policy, unchanged, is kept in ``RUN/policy-learned/``.
    """
    from tokenopt.agents.common.evaluation import policy_choices, query_questions
    from tokenopt.agents.ppo.validators import price_grid
    from tokenopt.cost import CostSettings, parse_cost_weight_range
    from tokenopt.runtime import POLICY_SPEC_FILE, BudgetPolicy
    from tokenopt.table.schema import write_atomic

    low, high = parse_cost_weight_range(config["cost_weight_range"])
    prices = CostSettings(**{key: config[key] for key in ("cost_weight", "token_price", "prompt_token_price")
                             if key in config})  # fmt: skip
    learned = BudgetPolicy.load(run.policy)
    questions = query_questions(config["table"])
    grid = price_grid((low, high))
    edges = [low, *(float(np.sqrt(a * b)) for a, b in zip(grid[:-1], grid[1:], strict=True)), high]
    verdicts: list[dict[str, Any]] = []
    entries: list[dict[str, Any]] = []
    for k, weight in enumerate(grid):
        cost_model = prices.cost_model(weight)
        chosen = policy_choices(learned, matrix, questions, weight)
        verdict = no_harm_verdict(matrix, chosen, cost_model, "val", seed=seed)
        verdicts.append(verdict.to_dict())
        if not verdict.beats_fixed:
            for entry in price_fallback_entries(matrix, cost_model, edges[k], edges[k + 1]):
                if entries and entries[-1]["action"] == entry["action"] and entries[-1]["high"] == entry["low"]:
                    entries[-1]["high"] = entry["high"]  # one interval where neighbouring cells agree
                else:
                    entries.append(entry)
    fell_back = fallback and bool(entries)
    result: dict[str, Any] = {
        "price_conditioned": True,
        "verdicts": verdicts,
        "fallback": fell_back,
        "price_fallback": entries if fell_back else [],
        "policy": str(run.policy),
        "learned_policy": str(run.policy),
    }
    if fell_back:
        learned_dir = run.path / LEARNED_POLICY_DIR
        shutil.copytree(run.policy, learned_dir)
        spec = json.loads((run.policy / POLICY_SPEC_FILE).read_text(encoding="utf-8"))
        spec["policy_id"] = f"{spec.get('policy_id', 'policy')}-price-fallback"
        spec["price_fallback"] = entries
        spec["fallback"] = {"price_fallback": entries, "learned_policy": str(learned_dir), "verdicts": verdicts}
        text = json.dumps(spec, indent=2) + "\n"
        write_atomic(run.policy / POLICY_SPEC_FILE, lambda partial: partial.write_text(text, encoding="utf-8"))
        BudgetPolicy.load(run.policy)  # what was written loads
        result["learned_policy"] = str(learned_dir)
    (run.path / "no_harm.json").write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
    return result


def format_no_harm(result: dict[str, Any]) -> str:
    """What :func:`apply_no_harm` found, for ``tokenopt train`` to print."""
    if result.get("price_conditioned"):
        lines = ["do no harm at every price (val split; the policy's reward minus the best fixed action's there):"]
        for verdict in result["verdicts"]:
            lines.append(
                f"  lambda {verdict['cost_weight']:g}: {verdict['reward_diff']:+.4f} vs {verdict['fixed_action']}, "
                f"one-sided 95% lower bound {verdict['lower_bound']:+.4f}: "
                + ("passed" if verdict["beats_fixed"] else "not passed")
            )
        if result["fallback"]:
            spans = ", ".join(f"{e['low']:.4g}-{e['high']:.4g}: {e['action']}" for e in result["price_fallback"])
            lines.append(
                f"{result['policy']} picks the best fixed action on val at the prices where it did not pass ({spans}) "
                f"and decides elsewhere; the learned policy is kept in {result['learned_policy']} (--no-fallback "
                "exports it as is)."
            )
        elif not all(verdict["beats_fixed"] for verdict in result["verdicts"]):
            lines.append("Exported the learned policy anyway (--no-fallback).")
        return "\n".join(lines)
    verdict = result["verdict"]
    figures = result["figures"]

    def cell(name: str, digits: int, signed: bool = False) -> str:
        value, low, high = figures[name]
        sign = "+" if signed else ""
        return f"{value:{sign}.{digits}f} [{low:{sign}.{digits}f}, {high:{sign}.{digits}f}]"

    lines = [
        f"val split, {verdict['queries']} queries, lambda {verdict['cost_weight']:g}; the learned policy with 95% "
        "bootstrap intervals over the queries:",
        f"  EM {cell('em', 3)}, tokens {cell('tokens', 2)}, reward {cell('reward', 4)}, gap recovered "
        f"{cell('gap_recovered', 2)}",
        "  reward minus "
        + ", ".join(f"{name[13:]} {cell(name, 4, True)}" for name in figures if name.startswith("reward_minus:")),
    ]
    if result["noise"]["warning"]:
        lines.append(f"warning: {result['noise']['warning']}")
    if verdict["beats_fixed"]:
        lines.append(f"do no harm: passed; {verdict['reason']}.")
    elif result["fallback"]:
        lines.append(
            f"do no harm: {verdict['reason']}. {result['policy']} is therefore a fallback that always picks "
            f"{verdict['fixed_action']} (policy.json records it and why); the learned policy is kept in "
            f"{result['learned_policy']}. To export the learned policy anyway: `tokenopt export "
            f"{Path(result['policy']).parent} --no-fallback` (or train with --no-fallback), or serve that folder."
        )
    else:
        lines.append(
            f"do no harm: {verdict['reason']}. Exported the learned policy anyway (--no-fallback); a constant "
            f"{verdict['fixed_action']} would serve as well."
        )
    return "\n".join(lines)
