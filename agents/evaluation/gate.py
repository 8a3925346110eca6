"""Deployment gate: is a new policy at least as good as the one in production?

``tokenopt gate NEW OLD --table DIR`` lets both exported policies decide on the
questions of one split of an outcome table, exactly as a server would, and looks
up what each decision earns. The per-query reward differences are paired (same
queries), so a paired bootstrap over query indices gives a one-sided lower
confidence bound on the mean reward gain of NEW over OLD (Efron & Tibshirani,
*An Introduction to the Bootstrap*, 1993, ch. 13). NEW passes when that bound is
no worse than ``-reward_margin`` and its EM is at most ``max_em_drop`` points
below OLD's.

The gate also applies ``tokenopt train``'s do-no-harm rule
(:func:`tokenopt.agents.evaluation.no_harm.no_harm_verdict`): a learned NEW passes only
if it beats the best fixed action (picked on the val split) beyond the noise on the
compared split; a fallback policy (which is that constant) passes the rule as it is.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from tokenopt.agents.common.evaluation import check_policy_fits_table, policy_choices, query_questions
from tokenopt.agents.common.statistics import paired_bootstrap_lower_bound
from tokenopt.agents.evaluation.no_harm import best_fixed_column, no_harm_verdict
from tokenopt.cost import CostSettings
from tokenopt.runtime import BudgetPolicy
from tokenopt.table import OutcomeMatrix, load_manifest

__all__ = [
    "GateConfig",
    "GateResult",
    "PolicyScore",
    "format_gate",
    "run_gate",
    "save_gate",
]


@dataclass
class GateConfig(CostSettings):
    """Settings of ``tokenopt gate`` (the cost fields come from :class:`~tokenopt.cost.CostSettings`)."""

    table: str = ""
    """Outcome-table folder the two policies are compared on."""
    split: str = "test"
    """Split whose queries are compared."""
    max_em_drop: float = 1.0
    """Most EM points NEW may lose against OLD."""
    reward_margin: float = 0.0
    """NEW passes when the lower confidence bound of its mean reward gain is at least ``-reward_margin``."""
    confidence: float = 0.95
    """Confidence level of the one-sided bootstrap bound."""
    resamples: int = 2000
    """Bootstrap resamples."""
    seed: int = 0
    """Seed of the bootstrap."""
    beat_fixed: bool = True
    """Do no harm: a learned NEW must also beat the best fixed action (picked on val) beyond the noise."""

    def validate(self) -> None:
        """Check the settings.

        Raises:
            ValueError: a setting outside its range, named with the accepted range.
        """
        if not 0.0 < self.confidence < 1.0:
            raise ValueError(f"--confidence must be in (0, 1), e.g. 0.95; got {self.confidence}")
        if self.resamples < 1:
            raise ValueError(f"--resamples must be at least 1; got {self.resamples}")
        if not np.isfinite(self.max_em_drop) or self.max_em_drop < 0:
            raise ValueError(f"--max-em-drop must be a finite number of EM points >= 0; got {self.max_em_drop}")
        if not np.isfinite(self.reward_margin) or self.reward_margin < 0:
            raise ValueError(f"--reward-margin must be a finite number >= 0; got {self.reward_margin}")


@dataclass
class PolicyScore:
    """One policy's means on the compared split."""

    path: str
    policy_id: str
    em: float
    tokens: float
    reward: float
    action_counts: dict[str, int] = field(default_factory=dict)


@dataclass
class GateResult:
    """The comparison of NEW against OLD, and the verdict."""

    new: PolicyScore
    old: PolicyScore
    split: str
    queries: int
    cost_weight: float
    reward_diff: float
    """Mean per-query reward of NEW minus OLD."""
    reward_lower_bound: float
    """One-sided lower confidence bound of ``reward_diff`` (paired bootstrap)."""
    reward_upper_bound: float
    """The matching one-sided upper bound, for the report."""
    em_diff_points: float
    """EM of NEW minus OLD, in points (percent)."""
    tokens_diff: float
    """Mean billed tokens of NEW minus OLD."""
    confidence: float
    resamples: int
    seed: int
    reward_margin: float
    max_em_drop: float
    passed: bool
    reasons: list[str]
    no_harm: dict[str, Any] | None = None
    """The do-no-harm rule's verdict on NEW (None when not applied: ``--no-beat-fixed`` or NEW is a fallback)."""

    def to_dict(self) -> dict[str, Any]:
        """The result as JSON-ready data."""
        return asdict(self)


def _load_policy(path: str | Path, manifest: dict[str, Any], label: str) -> BudgetPolicy:
    policy = BudgetPolicy.load(path)
    check_policy_fits_table(policy, manifest, f"{label} policy {path}")
    return policy


def run_gate(new: str | Path, old: str | Path, config: GateConfig) -> GateResult:
    """Compare the exported policy NEW against OLD on a split of an outcome table.

    Args:
        new: the candidate's policy folder.
        old: the deployed policy's folder.
        config: the table, split, cost model and pass criteria.

    Raises:
        PolicyLoadError: a policy folder is missing or corrupt.
        ValueError: bad settings, an empty split, or a policy that does not fit the table.
    """
    config.validate()
    cost_model = config.cost_model()
    manifest = load_manifest(config.table)
    policies = {"NEW": _load_policy(new, manifest, "NEW"), "OLD": _load_policy(old, manifest, "OLD")}
    matrix = OutcomeMatrix.from_table(config.table)
    if not (matrix.splits == config.split).any():
        present = sorted({str(split) for split in matrix.splits})
        raise ValueError(f"{config.table} has no query in split {config.split!r}; its splits are {present}")
    matrix = matrix.subset(config.split)
    questions = query_questions(config.table)
    rows = np.arange(len(matrix.ids))
    rewards = matrix.rewards(cost_model)
    per_query: dict[str, np.ndarray] = {}
    scores: dict[str, PolicyScore] = {}
    for label, path in (("NEW", new), ("OLD", old)):
        chosen = policy_choices(policies[label], matrix, questions, cost_model.cost_weight)
        if label == "NEW":
            chosen_new = chosen
        per_query[label] = rewards[rows, chosen]
        names, counts = np.unique(chosen, return_counts=True)
        scores[label] = PolicyScore(
            path=str(path),
            policy_id=policies[label].policy_id,
            em=float(matrix.exact_match[rows, chosen].mean()),
            tokens=float(matrix.billed_tokens[rows, chosen].mean()),
            reward=float(per_query[label].mean()),
            action_counts={matrix.actions[int(j)]: int(n) for j, n in zip(names, counts, strict=True)},
        )
    differences = per_query["NEW"] - per_query["OLD"]
    lower, upper = paired_bootstrap_lower_bound(differences, config.confidence, config.resamples, config.seed)
    em_diff = 100.0 * (scores["NEW"].em - scores["OLD"].em)
    reasons = []
    reward_ok = lower >= -config.reward_margin - 1e-12
    em_ok = em_diff >= -config.max_em_drop - 1e-9
    level = f"{100 * config.confidence:g}%"
    threshold = -config.reward_margin if config.reward_margin else 0.0  # no "-0.0000"
    reasons.append(
        f"reward: the {level} lower bound of NEW - OLD is {lower:+.4f}, "
        f"{'at least' if reward_ok else 'below'} the threshold {threshold:+.4f} (minus --reward-margin)"
    )
    reasons.append(
        f"EM: NEW - OLD is {em_diff:+.2f} points, {'within' if em_ok else 'beyond'} the allowed drop of "
        f"{config.max_em_drop:g} points"
    )
    no_harm: dict[str, Any] | None = None
    harm_ok = True
    if config.beat_fixed and policies["NEW"].fallback is not None:
        reasons.append(
            f"do no harm: NEW is a fallback to the fixed action {policies['NEW'].fallback.get('action')}, "
            "which the rule allows as it is"
        )
    elif config.beat_fixed:
        full = OutcomeMatrix.from_table(config.table)
        picked_on = "val" if (full.splits == "val").any() else config.split
        fixed = best_fixed_column(full.subset(picked_on), cost_model)
        verdict = no_harm_verdict(matrix, chosen_new, cost_model, config.split, config.seed, config.resamples,
                                  fixed_column=fixed, confidence=config.confidence)  # fmt: skip
        no_harm = verdict.to_dict() | {"fixed_picked_on": picked_on}
        harm_ok = verdict.beats_fixed
        reasons.append(
            f"do no harm ({'passed' if harm_ok else 'failed'}; fixed action picked on {picked_on}): {verdict.reason}"
            + ("" if harm_ok else "; ship its fallback (`tokenopt train` exports one) or pass --no-beat-fixed")
        )
    return GateResult(
        new=scores["NEW"],
        old=scores["OLD"],
        split=config.split,
        queries=len(matrix.ids),
        cost_weight=config.cost_weight,
        reward_diff=float(differences.mean()),
        reward_lower_bound=lower,
        reward_upper_bound=upper,
        em_diff_points=em_diff,
        tokens_diff=scores["NEW"].tokens - scores["OLD"].tokens,
        confidence=config.confidence,
        resamples=config.resamples,
        seed=config.seed,
        reward_margin=config.reward_margin,
        max_em_drop=config.max_em_drop,
        passed=reward_ok and em_ok and harm_ok,
        reasons=reasons,
        no_harm=no_harm,
    )


def format_gate(result: GateResult) -> str:
    """The comparison as a Markdown table, the bootstrap bound and the verdict with its reasons."""
    level = f"{100 * result.confidence:g}%"
    level2 = f"{100 * (2 * result.confidence - 1):g}%"
    lines = [
        f"Deployment gate on split {result.split!r} ({result.queries} queries, lambda {result.cost_weight:g}):",
        "",
        "| policy | EM | mean billed tokens | reward |",
        "|---|---|---|---|",
        f"| NEW {result.new.path} | {result.new.em:.3f} | {result.new.tokens:.2f} | {result.new.reward:.4f} |",
        f"| OLD {result.old.path} | {result.old.em:.3f} | {result.old.tokens:.2f} | {result.old.reward:.4f} |",
        f"| NEW - OLD | {result.em_diff_points:+.2f} points | {result.tokens_diff:+.2f} | {result.reward_diff:+.4f} |",
        "",
        f"reward NEW - OLD: {result.reward_diff:+.4f}; {level} lower confidence bound {result.reward_lower_bound:+.4f} "
        f"(two-sided {level2} interval [{result.reward_lower_bound:+.4f}, {result.reward_upper_bound:+.4f}]; "
        f"paired bootstrap, {result.resamples} resamples, seed {result.seed})",
        "",
        f"verdict: {'PASS' if result.passed else 'FAIL'}",
    ]
    lines += [f"- {reason}" for reason in result.reasons]
    return "\n".join(lines)


def save_gate(path: str | Path, result: GateResult) -> None:
    """Write the result as JSON."""
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_text(json.dumps(result.to_dict(), indent=2) + "\n", encoding="utf-8")
