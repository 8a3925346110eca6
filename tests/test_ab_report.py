"""tokenopt ab-report: the statistics (against known values) and the report on constructed decision logs."""

import json
import math

import numpy as np
import pytest
from typer.testing import CliRunner

from tokenopt.agents.common.statistics import (
    normal_cdf,
    normal_quantile,
    regularized_incomplete_beta,
    sample_size_two_proportions,
    student_t_cdf,
    student_t_quantile,
    two_proportion_z_test,
    welch_t_test,
)
from tokenopt.agents.evaluation.ab_test import ab_report, format_ab_report
from tokenopt.cli import app
from tokenopt.decisions import DecisionLog, DecisionRecord

runner = CliRunner(env={"COLUMNS": "2000"})
ACTIONS = ["b0/greedy", "b8/greedy", "b32/greedy"]


def _output(result):
    return " ".join(result.output.split())


def _arm_description(policy_id):
    return {"policy_id": policy_id, "path": f"runs/{policy_id}/policy", "actions": ACTIONS, "feature_spec": {},
            "extra_inputs": []}  # fmt: skip


def write_log(path, arms, seed=0):
    """A decision log; ``arms`` maps an arm to ``(n, em, tokens_mean, tokens_std, feedback_share)``.

    Exactly ``round(em * n)`` of an arm's requests are correct (in random order); billed tokens are
    drawn from a normal distribution; each request gets feedback with probability ``feedback_share``.
    """
    rng = np.random.default_rng(seed)
    log = DecisionLog(path, {arm: _arm_description(f"policy-{arm}") for arm in arms})
    created = 1_700_000_000.0
    for arm, (n, em, tokens_mean, tokens_std, feedback_share) in arms.items():
        correct = rng.permutation(n) < round(em * n)
        for i in range(n):
            created += 1.0
            request_id = f"cmpl-{arm}{i:05d}"
            log.append(DecisionRecord(
                id=request_id, arm=arm, policy_id=f"policy-{arm}", endpoint="completions", bypass=False,
                action="b8/greedy", action_index=1, budget=8, mode="greedy", propensity=1.0,
                features=np.zeros(4, dtype=np.float32).tobytes(),
                billed_tokens=max(1, round(rng.normal(tokens_mean, tokens_std))),
                latency_ms=float(rng.gamma(4.0, 20.0)), created=created,
            ))  # fmt: skip
            if rng.random() < feedback_share:
                log.attach_feedback(request_id, bool(correct[i]), None)
    log.close()
    return path


# --- distributions and tests against known values ------------------------------------------------------------------


def test_normal_cdf_and_quantile_match_known_values():
    assert 2 * (1 - normal_cdf(1.96)) == pytest.approx(0.05, abs=1e-4)
    assert normal_cdf(0.0) == 0.5
    assert normal_cdf(-1.0) == pytest.approx(0.158655254, abs=1e-9)
    assert normal_quantile(0.975) == pytest.approx(1.959963985, abs=1e-8)
    assert normal_quantile(0.8) == pytest.approx(0.841621234, abs=1e-8)
    with pytest.raises(ValueError, match=r"in \(0, 1\)"):
        normal_quantile(1.0)


def test_incomplete_beta_and_student_t_match_known_values():
    assert regularized_incomplete_beta(2, 3, 0.5) == pytest.approx(0.6875, abs=1e-12)  # 11/16
    assert regularized_incomplete_beta(0.5, 0.5, 0.25) == pytest.approx(1 / 3, abs=1e-12)  # arcsine law
    assert regularized_incomplete_beta(5, 1, 0.9) == pytest.approx(0.9**5, abs=1e-12)
    assert regularized_incomplete_beta(3, 4, 0.0) == 0.0 and regularized_incomplete_beta(3, 4, 1.0) == 1.0
    assert 2 * (1 - student_t_cdf(2.0, 10)) == pytest.approx(0.0734, abs=1e-4)
    assert 2 * (1 - student_t_cdf(2.0, 10)) == pytest.approx(0.073388035, abs=1e-8)
    assert student_t_cdf(1.0, 1) == pytest.approx(0.75, abs=1e-12)  # Cauchy
    # df 4 in closed form: F(t) = 1/2 + 3/8 * u * (1 - t^2 / (12 * (1 + t^2 / 4))), u = t / sqrt(1 + t^2 / 4)
    u = -2.5 / math.sqrt(1 + 2.5**2 / 4)
    assert student_t_cdf(-2.5, 4) == pytest.approx(0.5 + 3 / 8 * u * (1 - 2.5**2 / (12 * (1 + 2.5**2 / 4))), abs=1e-12)
    assert student_t_cdf(1.96, 1e7) == pytest.approx(normal_cdf(1.96), abs=1e-6)
    assert student_t_quantile(0.975, 10) == pytest.approx(2.228138852, abs=1e-8)
    assert student_t_quantile(0.025, 3) == pytest.approx(-3.182446305, abs=1e-8)
    with pytest.raises(ValueError, match="df > 0"):
        student_t_cdf(1.0, 0)


def test_two_sample_tests_match_known_values():
    # 45/100 vs 60/100: pooled p 0.525, z = 0.15 / sqrt(0.525 * 0.475 * 0.02) = 2.12398, p = 0.0337 (normal table)
    z, p = two_proportion_z_test(45, 100, 60, 100)
    assert z == pytest.approx(0.15 / math.sqrt(0.525 * 0.475 * 0.02), abs=1e-12)
    assert p == pytest.approx(0.0337, abs=1e-4)
    assert two_proportion_z_test(10, 10, 20, 20) == (0.0, 1.0)
    # Welch: means 0 and 1, unit variances, 10 each: t = sqrt(5), df = 18, p = 0.03825
    t, df, p = welch_t_test(0.0, 1.0, 10, 1.0, 1.0, 10)
    assert (t, df) == pytest.approx((math.sqrt(5.0), 18.0)) and p == pytest.approx(0.038250, abs=1e-6)
    # unequal variances and sizes: Welch-Satterthwaite df = 0.84^2 / (0.2^2 / 19 + 0.64^2 / 24) = 36.80
    t, df, _ = welch_t_test(10.0, 4.0, 20, 12.0, 16.0, 25)
    assert t == pytest.approx(2.0 / math.sqrt(0.84)) and df == pytest.approx(36.804, abs=1e-3)
    assert welch_t_test(5.0, 0.0, 3, 5.0, 0.0, 3)[2] == 1.0
    assert welch_t_test(5.0, 0.0, 3, 4.0, 0.0, 3)[2] == 0.0
    # Fleiss et al. eq. 4.14 without continuity correction: 0.5 vs 0.6 at alpha 0.05, power 0.8 needs 388 per arm
    assert sample_size_two_proportions(0.5, 0.6, 0.05) == 388
    assert sample_size_two_proportions(0.7, 0.7, 0.05) is None


# --- the report -----------------------------------------------------------------------------------------------------


def test_b_wins_on_tokens_while_em_cannot_tell(tmp_path):
    log = write_log(tmp_path / "log.db", {"A": (400, 0.8, 20.0, 4.0, 0.5), "B": (400, 0.8, 14.0, 4.0, 0.5)})
    report = ab_report(log)
    assert report.arms["A"].requests == report.arms["B"].requests == 400
    assert 150 < report.arms["A"].feedback < 250 and report.arms["A"].em == pytest.approx(0.8, abs=0.05)
    assert report.arms["B"].tokens_mean == pytest.approx(14.0, abs=0.6)
    assert report.tokens_test is not None and report.tokens_test.winner == "B"
    assert report.tokens_test.p_value < 1e-10
    assert report.tokens_test.ci_low < -6.0 < report.tokens_test.ci_high < 0  # the true difference is -6
    assert report.em_test is not None and report.em_test.winner is None
    assert report.em_test.p_value >= 0.05
    text = format_ab_report(report)
    assert "B wins on tokens" in text and "EM cannot tell yet" in text
    assert report == ab_report(log)  # a report reads the log only

    result = runner.invoke(app, ["ab-report", str(log)])
    assert result.exit_code == 0, result.output
    assert "B wins on tokens" in _output(result) and "EM cannot tell yet" in _output(result)
    result = runner.invoke(app, ["ab-report", str(log), "--json", "--alpha", "0.01"])
    assert result.exit_code == 0, result.output
    data = json.loads(result.output)
    assert data["alpha"] == 0.01 and data["tokens_test"]["winner"] == "B" and data["em_test"]["winner"] is None
    assert data["arms"]["A"]["latency_p50_ms"] < data["arms"]["A"]["latency_p99_ms"]


def test_em_winner_and_the_feedback_needed_when_it_cannot_tell(tmp_path):
    clear = ab_report(
        write_log(tmp_path / "clear.db", {"A": (600, 0.6, 10.0, 0.0, 1.0), "B": (600, 0.8, 10.0, 0.0, 1.0)})
    )
    assert clear.em_test is not None and clear.em_test.winner == "B"
    assert "B wins on EM" in clear.em_test.verdict
    assert clear.tokens_test is not None and clear.tokens_test.winner is None
    assert "tokens cannot tell yet" in clear.tokens_test.verdict
    small = ab_report(
        write_log(tmp_path / "small.db", {"A": (60, 0.7, 10.0, 2.0, 1.0), "B": (60, 0.72, 10.0, 2.0, 1.0)})
    )
    test = small.em_test
    assert test is not None and test.winner is None and test.needed_per_arm is not None
    a, b = small.arms["A"], small.arms["B"]
    assert test.needed_per_arm == sample_size_two_proportions(a.correct / a.feedback, b.correct / b.feedback, 0.05)
    assert test.needed_per_arm > 60 and f"{test.needed_per_arm:,} feedback rows per arm" in test.verdict


def test_bypassed_and_failed_requests_are_left_out(tmp_path):
    log = DecisionLog(tmp_path / "log.db", {"A": _arm_description("pa"), "B": _arm_description("pb")})
    for i, (arm, bypass, status) in enumerate([("A", False, 200), ("A", False, 200), ("A", True, 200),
                                                ("A", False, 500), ("B", False, 200), ("B", False, 200)]):  # fmt: skip
        log.append(DecisionRecord(
            id=f"r{i}", arm=arm, policy_id="bypass" if bypass else f"p{arm.lower()}", endpoint="completions",
            bypass=bypass, action="b0/greedy", action_index=-1 if bypass else 0, budget=0, mode="greedy",
            propensity=1.0, features=b"\x00" * 16, billed_tokens=100 if bypass or status != 200 else 10 + i,
            status=status, created=float(i + 1),
        ))  # fmt: skip
    log.close()
    report = ab_report(tmp_path / "log.db")
    assert report.arms["A"].requests == 2 and report.arms["A"].tokens_mean == 10.5
    assert (report.arms["A"].bypassed, report.arms["A"].errors) == (1, 1)
    assert report.arms["A"].policy_ids == ["pa"]
    assert report.em_test is None and any("no feedback" in note for note in report.notes)
    assert any("left out 1 bypassed and 1 non-200" in note for note in report.notes)


def test_bad_logs_are_refused_with_the_reason(tmp_path):
    one_arm = write_log(tmp_path / "one.db", {"A": (20, 0.5, 10.0, 2.0, 1.0)})
    result = runner.invoke(app, ["ab-report", str(one_arm)])
    assert result.exit_code == 2
    assert "no policy-decided status-200 request of arm B" in _output(result) and "['A']" in _output(result)
    result = runner.invoke(app, ["ab-report", str(tmp_path / "missing.db")])
    assert result.exit_code == 2 and "does not exist" in _output(result)
    not_a_log = tmp_path / "notes.db"
    not_a_log.write_text("this is not SQLite\n" * 100)
    result = runner.invoke(app, ["ab-report", str(not_a_log)])
    assert result.exit_code == 2 and "is not a tokenopt decision log" in _output(result)
    import sqlite3

    other = sqlite3.connect(tmp_path / "other.db")
    other.execute("CREATE TABLE users (name TEXT)")
    other.commit()
    other.close()
    with pytest.raises(ValueError, match="is not a tokenopt decision log"):
        ab_report(tmp_path / "other.db")
    with pytest.raises(ValueError, match=r"--alpha must be in \(0, 1\)"):
        ab_report(one_arm, alpha=1.5)
