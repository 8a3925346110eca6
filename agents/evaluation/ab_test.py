"""A/B report of a decision log: does arm B beat arm A on exact match or on tokens?

``tokenopt ab-report LOG...`` reads the rows a server wrote (:mod:`tokenopt.decisions`;
several replicas' logs are read together, feedback joined across them) and compares
the two arms on the requests their policies decided (status 200, not bypassed by the
client):

- exact match, on the rows with feedback, by a two-proportion z-test with the pooled
  proportion under the null (Fleiss, Levin & Paik, *Statistical Methods for Rates and
  Proportions*, 3rd ed. 2003, ch. 4); when it cannot tell, the feedback rows per arm
  that would detect the observed difference at 80% power (ibid., eq. 4.14);
- billed tokens, by Welch's unequal-variance t-test (Welch 1947) with the
  Welch-Satterthwaite degrees of freedom.

The normal and Student-t distributions (:mod:`tokenopt.agents.common.statistics`) are computed from ``math.erf`` and the
regularised incomplete beta function (continued fraction, Press et al., *Numerical
Recipes*, 3rd ed. 2007, section 6.4), so the report needs no SciPy.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from tokenopt.agents.common.statistics import (
    POWER,
    TestResult,
    normal_quantile,
    sample_size_two_proportions,
    student_t_quantile,
    two_proportion_z_test,
    welch_t_test,
)
from tokenopt.decisions import LoggedDecisions, read_decisions

__all__ = ["ABReport", "ArmSummary", "ab_report", "format_ab_report"]

ARMS = ("A", "B")
"""The arms a server splits traffic between."""

# --- the report ---------------------------------------------------------------------------------------------------


@dataclass
class ArmSummary:
    """One arm's requests, as decided by its policy."""

    arm: str
    policy_ids: list[str]
    """Policies that decided the arm's requests (more than one if it was swapped mid-log)."""
    requests: int
    """Requests answered with status 200 and decided by the policy."""
    bypassed: int
    """Status-200 requests whose client turned the policy off (left out of the comparison)."""
    errors: int
    """Requests answered with another status (left out)."""
    tokens_mean: float
    tokens_std: float
    """Sample standard deviation (ddof 1) of billed tokens per request."""
    feedback: int
    """Requests with feedback (``correct`` attached)."""
    correct: int
    """Requests whose feedback says the answer was correct."""
    em: float | None
    """Exact match over the requests with feedback; None without any."""
    latency_p50_ms: float
    latency_p99_ms: float
    explored: int = 0
    """Requests served with exploration on (propensity below 1)."""


@dataclass
class ABReport:
    """Both arms and the two tests."""

    log: str
    """The log read (several: comma-separated)."""
    alpha: float
    arms: dict[str, ArmSummary]
    em_test: TestResult | None
    """None when an arm has no feedback."""
    tokens_test: TestResult | None
    """None when an arm has fewer than two requests."""
    notes: list[str] = field(default_factory=list)
    logs: list[str] = field(default_factory=list)
    """The logs read, one per replica."""

    def to_dict(self) -> dict[str, Any]:
        """The report as JSON-ready data (NaN and infinities, which JSON lacks, become None)."""
        return _finite(asdict(self))


def _finite(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {key: _finite(item) for key, item in value.items()}
    if isinstance(value, list):
        return [_finite(item) for item in value]
    return value


def _summarise(decisions: LoggedDecisions, arm: str) -> ArmSummary:
    in_arm = decisions.arm == arm
    served = in_arm & (decisions.status == 200)
    decided = served & ~decisions.bypass
    tokens = decisions.billed_tokens[decided]
    latency = decisions.latency_ms[decided]
    correct = decisions.correct[decided]
    with_feedback = correct[~np.isnan(correct)]
    return ArmSummary(
        arm=arm,
        policy_ids=sorted({decisions.policy_id[i] for i in np.flatnonzero(decided)}),
        requests=int(decided.sum()),
        bypassed=int((served & decisions.bypass).sum()),
        errors=int((in_arm & (decisions.status != 200)).sum()),
        tokens_mean=float(tokens.mean()) if tokens.size else math.nan,
        tokens_std=float(tokens.std(ddof=1)) if tokens.size > 1 else math.nan,
        feedback=int(with_feedback.size),
        correct=int(with_feedback.sum()),
        em=float(with_feedback.mean()) if with_feedback.size else None,
        latency_p50_ms=float(np.percentile(latency, 50)) if latency.size else math.nan,
        latency_p99_ms=float(np.percentile(latency, 99)) if latency.size else math.nan,
        explored=int((decisions.propensity[decided] < 1.0).sum()),
    )


def _em_test(a: ArmSummary, b: ArmSummary, alpha: float) -> TestResult | None:
    if a.em is None or b.em is None:
        return None
    z, p = two_proportion_z_test(a.correct, a.feedback, b.correct, b.feedback)
    difference = b.em - a.em
    # The interval uses the unpooled standard error (Wald), as the test's null does not hold there.
    half = normal_quantile(1.0 - alpha / 2.0) * math.sqrt(
        a.em * (1.0 - a.em) / a.feedback + b.em * (1.0 - b.em) / b.feedback
    )
    result = TestResult(
        metric="em", test="two-proportion z-test (pooled)", difference=difference, statistic=z, p_value=p,
        ci_low=difference - half, ci_high=difference + half,
    )  # fmt: skip
    if p < alpha:
        result.winner = "B" if difference > 0 else "A"
        loser = "A" if result.winner == "B" else "B"
        points = 100 * abs(difference)
        result.verdict = (
            f"{result.winner} wins on EM: {points:.1f} points higher than {loser} (p = {p:.3g} < {alpha:g})"
        )
        return result
    result.needed_per_arm = sample_size_two_proportions(a.em, b.em, alpha)
    if result.needed_per_arm is None:
        result.verdict = (
            f"EM cannot tell yet: both arms have EM {a.em:.3f} (p = {p:.3g}); no number of feedback rows "
            "detects a difference that is not there"
        )
    else:
        result.verdict = (
            f"EM cannot tell yet (B - A = {100 * difference:+.1f} points, p = {p:.3g} >= {alpha:g}): about "
            f"{result.needed_per_arm:,} feedback rows per arm would detect a difference this size at "
            f"{100 * POWER:.0f}% power (now {a.feedback:,} for A and {b.feedback:,} for B)"
        )
    return result


def _tokens_test(a: ArmSummary, b: ArmSummary, alpha: float) -> TestResult | None:
    if a.requests < 2 or b.requests < 2:
        return None
    t, df, p = welch_t_test(
        a.tokens_mean, a.tokens_std**2, a.requests, b.tokens_mean, b.tokens_std**2, b.requests
    )  # fmt: skip
    difference = b.tokens_mean - a.tokens_mean
    standard_error = math.sqrt(a.tokens_std**2 / a.requests + b.tokens_std**2 / b.requests)
    half = student_t_quantile(1.0 - alpha / 2.0, df) * standard_error if standard_error > 0 else 0.0
    result = TestResult(
        metric="billed_tokens", test="Welch's t-test", difference=difference, statistic=t, p_value=p,
        ci_low=difference - half, ci_high=difference + half, df=df,
    )  # fmt: skip
    if p < alpha:
        result.winner = "B" if difference < 0 else "A"
        loser = "A" if result.winner == "B" else "B"
        cheaper, dearer = (b, a) if result.winner == "B" else (a, b)
        saving = 100.0 * abs(difference) / dearer.tokens_mean if dearer.tokens_mean > 0 else math.nan
        result.verdict = (
            f"{result.winner} wins on tokens: {cheaper.tokens_mean:.2f} against {dearer.tokens_mean:.2f} billed tokens "
            f"per request for {loser} ({saving:.1f}% fewer; p = {p:.3g} < {alpha:g})"
        )
    else:
        result.verdict = (
            f"tokens cannot tell yet: B - A = {difference:+.2f} billed tokens per request (p = {p:.3g} >= {alpha:g})"
        )
    return result


def ab_report(path: str | Path | Sequence[str | Path], alpha: float = 0.05) -> ABReport:
    """Compare arms A and B of a decision log, or of several replicas' logs read together.

    Args:
        path: the log the server writes with ``--log``; or several (files, folders, glob
            patterns: :func:`tokenopt.decisions.read_decisions` joins them).
        alpha: significance level of both tests (two-sided).

    Raises:
        FileNotFoundError: no file at ``path``.
        ValueError: ``alpha`` outside (0, 1), a file that is not a decision log, or a
            log without decided requests of both arms.
    """
    if not 0.0 < alpha < 1.0:
        raise ValueError(f"--alpha must be in (0, 1), e.g. 0.05; got {alpha}")
    decisions = read_decisions(path)
    label = ", ".join(decisions.logs)
    arms = {arm: _summarise(decisions, arm) for arm in ARMS}
    missing = [arm for arm, summary in arms.items() if summary.requests == 0]
    if missing:
        present = sorted({str(arm) for arm in decisions.arm})
        counts = ", ".join(f"{arm}: {arms[arm].requests}" for arm in ARMS)
        raise ValueError(
            f"{label} has no policy-decided status-200 request of arm {' or '.join(missing)} ({counts}; arms in the "
            f"log: {present or 'none'}); an A/B report needs both arms: serve a second policy with "
            "`tokenopt serve --policy-b`"
        )
    notes = decisions.notes()
    for arm, summary in arms.items():
        if summary.bypassed or summary.errors:
            notes.append(
                f"arm {arm}: left out {summary.bypassed} bypassed and {summary.errors} non-200 requests"
            )  # fmt: skip
        if summary.explored:
            notes.append(
                f"arm {arm}: {summary.explored} of {summary.requests} requests were served with exploration on "
                "(propensity below 1: a share got a random action); the arms are compared as served"
            )
        if len(summary.policy_ids) > 1:
            notes.append(f"arm {arm} was decided by several policies: {summary.policy_ids}")
    em_test = _em_test(arms["A"], arms["B"], alpha)
    if em_test is None:
        notes.append(
            "EM cannot tell yet: "
            + " and ".join(f"arm {arm} has no feedback" for arm in ARMS if arms[arm].feedback == 0)
            + " (attach outcomes with POST /v1/feedback)"
        )
    tokens_test = _tokens_test(arms["A"], arms["B"], alpha)
    if tokens_test is None:
        notes.append("tokens cannot tell yet: Welch's t-test needs at least two requests per arm")
    return ABReport(
        log=label, alpha=alpha, arms=arms, em_test=em_test, tokens_test=tokens_test, notes=notes, logs=decisions.logs
    )


def _number(value: float | None, digits: int) -> str:
    return "-" if value is None or math.isnan(value) else f"{value:.{digits}f}"


def format_ab_report(report: ABReport) -> str:
    """The report as a Markdown table of the arms, the tests and their verdicts."""
    lines = [
        f"A/B report of {report.log} (alpha {report.alpha:g}, two-sided):",
        "",
        "| arm | policy | requests | billed tokens (mean ± std) | EM (feedback rows) | p50 latency ms "
        "| p99 latency ms |",
        "|---|---|---|---|---|---|---|",
    ]
    for summary in report.arms.values():
        em = "-" if summary.em is None else f"{summary.em:.3f}"
        lines.append(
            f"| {summary.arm} | {', '.join(summary.policy_ids)} | {summary.requests} | "
            f"{_number(summary.tokens_mean, 2)} ± {_number(summary.tokens_std, 2)} | {em} ({summary.feedback}) | "
            f"{_number(summary.latency_p50_ms, 1)} | {_number(summary.latency_p99_ms, 1)} |"
        )
    lines.append("")
    level = f"{100 * (1 - report.alpha):g}%"
    if report.em_test is not None:
        test = report.em_test
        lines.append(
            f"EM, B - A: {100 * test.difference:+.2f} points ({level} interval [{100 * test.ci_low:+.2f}, "
            f"{100 * test.ci_high:+.2f}]); {test.test}: z = {test.statistic:.3f}, p = {test.p_value:.4g}"
        )
    if report.tokens_test is not None:
        test = report.tokens_test
        lines.append(
            f"billed tokens, B - A: {test.difference:+.2f} ({level} interval "
            f"[{test.ci_low:+.2f}, {test.ci_high:+.2f}]); {test.test}: t = {test.statistic:.3f}, "
            f"df = {_number(test.df, 1)}, p = {test.p_value:.4g}"
        )
    lines += ["", "verdict:"]
    lines += [f"- {test.verdict}" for test in (report.em_test, report.tokens_test) if test is not None]
    lines += [f"- {note}" for note in report.notes]
    return "\n".join(lines)
