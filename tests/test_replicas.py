"""Several replicas: their decision logs read together by `tokenopt ab-report` and `tokenopt train --from-log`.

Each `tokenopt serve` behind a load balancer writes its own log, and feedback may reach
another replica than its request. The reader joins feedback across the logs, counts a
request id found in two logs once and says so, and names the file of a bad log.
"""

import json
import shutil
import sqlite3

import httpx
import numpy as np
import pytest
from serving import serve_processes
from typer.testing import CliRunner

from tokenopt.agents.evaluation.ab_test import ab_report, format_ab_report
from tokenopt.cli import app
from tokenopt.decisions import DecisionLog, DecisionRecord, log_paths, read_decisions
from tokenopt.runtime import BudgetPolicy

runner = CliRunner(env={"COLUMNS": "2000"})
ACTIONS = ["b0/greedy", "b8/greedy", "b32/greedy"]


def _output(result):
    return " ".join(result.output.split())


def _describe(policy_id, actions=ACTIONS):
    return {"policy_id": policy_id, "path": f"/srv/{policy_id}", "actions": actions, "feature_spec": {},
            "extra_inputs": []}  # fmt: skip


def _replica_log(path, prefix, arms, start, dim=4):
    """A replica's log: for each (arm, n) ``n`` requests ``{prefix}{arm}{i}`` answering "7", none with feedback."""
    log = DecisionLog(path, {arm: _describe(f"policy-{arm}") for arm in ("A", "B")})
    created = start
    for arm, n in arms:
        for i in range(n):
            created += 1.0
            log.append(DecisionRecord(
                id=f"{prefix}{arm}{i}", arm=arm, policy_id=f"policy-{arm}", endpoint="completions", bypass=False,
                action="b8/greedy", action_index=1, budget=8, mode="greedy", propensity=1.0,
                features=np.full(dim, i, dtype=np.float32).tobytes(), billed_tokens=10 + i, answer="7",
                created=created,
            ))  # fmt: skip
    return log


@pytest.fixture
def two_replicas(tmp_path):
    """Logs of replicas r1 and r2 (3 A + 2 B requests each); feedback sent to the replica that did not serve."""
    folder = tmp_path / "logs"
    first = _replica_log(folder / "r1.sqlite", "one-", [("A", 3), ("B", 2)], 1000.0)
    second = _replica_log(folder / "r2.sqlite", "two-", [("A", 3), ("B", 2)], 1000.5)
    # r2 received the feedback for r1's requests and the other way round; one carries a gold answer only.
    for request_id, correct in [("one-A0", True), ("one-A1", False), ("one-B0", True)]:
        assert second.attach_feedback(request_id, correct, None) is None
        second.keep_feedback(request_id, correct, None)
    assert first.attach_feedback("two-B1", None, "8") is None
    first.keep_feedback("two-B1", None, "8")  # scored against the logged answer "7": wrong
    first.keep_feedback("two-A2", True, None)
    second.attach_feedback("two-A0", True, None)  # feedback that reached the right replica
    first.close()
    second.close()
    return folder


def test_feedback_is_joined_across_replicas_and_every_request_counts_once(two_replicas):
    together = read_decisions([two_replicas / "r1.sqlite", two_replicas / "r2.sqlite"])
    assert len(together) == 10 and len(set(together.id)) == 10
    correct = dict(zip(together.id, together.correct, strict=True))
    expected = {"one-A0": 1.0, "one-A1": 0.0, "one-B0": 1.0, "two-B1": 0.0, "two-A2": 1.0, "two-A0": 1.0}
    assert {key: value for key, value in correct.items() if not np.isnan(value)} == expected
    assert together.joined_feedback == 5 and together.duplicate_ids == {} and together.unmatched_feedback == {}
    assert together.source.count(str(two_replicas / "r1.sqlite")) == 5
    # Alone, a replica's log holds its own rows and the feedback it attached, not its siblings'.
    alone = read_decisions(two_replicas / "r1.sqlite")
    assert len(alone) == 5 and np.isnan(alone.correct).all()
    assert alone.unmatched_feedback == {"two-B1": str(alone.logs[0]), "two-A2": str(alone.logs[0])}
    assert any("2 feedback rows match no request" in note for note in alone.notes())

    report = ab_report([two_replicas / "r1.sqlite", two_replicas / "r2.sqlite"])
    assert (report.arms["A"].requests, report.arms["B"].requests) == (6, 4)
    assert (report.arms["A"].feedback, report.arms["A"].correct) == (4, 3)
    assert (report.arms["B"].feedback, report.arms["B"].correct) == (2, 1)
    assert report.logs == [str(two_replicas / "r1.sqlite"), str(two_replicas / "r2.sqlite")]
    text = format_ab_report(report)
    assert "read 2 decision logs together" in text and "5 feedback rows reached another replica" in text


def test_logs_are_named_by_files_folders_and_patterns(two_replicas):
    (two_replicas / "README.txt").write_text("not a log\n")
    logs = [str(two_replicas / "r1.sqlite"), str(two_replicas / "r2.sqlite")]
    assert [str(path) for path in log_paths(two_replicas)] == logs
    assert [str(path) for path in log_paths(str(two_replicas / "r*"))] == logs  # no -wal/-shm companions
    assert [str(path) for path in log_paths([logs[0], two_replicas])] == logs  # a log named twice is read once
    for given in ([logs[0], logs[1]], [str(two_replicas)], [str(two_replicas / "*.sqlite")]):
        result = runner.invoke(app, ["ab-report", *given, "--json"])
        assert result.exit_code == 0, result.output
        data = json.loads(result.output)
        assert data["logs"] == logs and data["arms"]["A"]["requests"] == 6 and data["arms"]["B"]["feedback"] == 2
    result = runner.invoke(app, ["ab-report", str(two_replicas / "x*.sqlite")])
    assert result.exit_code == 2 and "no decision log matches" in _output(result)
    result = runner.invoke(app, ["ab-report", str(two_replicas.parent)])
    assert result.exit_code == 2 and "holds no decision log" in _output(result)


def test_a_request_in_two_logs_is_reported_and_counted_once(two_replicas):
    copy = two_replicas.parent / "r1-backup.sqlite"
    shutil.copy(two_replicas / "r1.sqlite", copy)
    report = ab_report([two_replicas, copy])
    assert (report.arms["A"].requests, report.arms["B"].requests) == (6, 4)
    assert report.arms["A"].feedback == 4
    duplicates = read_decisions([two_replicas, copy]).duplicate_ids
    assert sorted(duplicates) == ["one-A0", "one-A1", "one-A2", "one-B0", "one-B1"]
    assert duplicates["one-A0"] == [str(two_replicas / "r1.sqlite"), str(copy)]
    note = next(note for note in report.notes if "more than one log" in note)
    assert note.startswith("5 request ids are in more than one log and are counted once") and str(copy) in note


def test_a_bad_log_among_several_is_named(two_replicas, tmp_path):
    junk = two_replicas / "r3.sqlite"
    junk.write_text("not SQLite\n" * 100)
    result = runner.invoke(app, ["ab-report", str(two_replicas)])
    assert result.exit_code == 2 and f"{junk} is not a tokenopt decision log" in _output(result)
    junk.unlink()
    wide = _replica_log(tmp_path / "wide.sqlite", "wide-", [("A", 1)], 2000.0, dim=6)
    wide.close()
    with pytest.raises(ValueError, match=r"sizes: 4 in .*r1.sqlite \(row 'one-A0'\), 6 in .*wide.sqlite \(row"):
        read_decisions([two_replicas, tmp_path / "wide.sqlite"])
    other = DecisionLog(tmp_path / "other.sqlite", {"A": _describe("policy-A", ["b0/greedy", "b4/greedy"])})
    other.close()
    with pytest.raises(ValueError, match=r"arm A of .*other.sqlite differs from arm A of .*r1.sqlite in \['actions'\]"):
        read_decisions([two_replicas, tmp_path / "other.sqlite"])


def test_a_log_without_the_feedback_table_is_read(two_replicas):
    # A log written before replicas kept feedback has no `feedback` table.
    connection = sqlite3.connect(two_replicas / "r2.sqlite")
    connection.execute("DROP TABLE feedback")
    connection.commit()
    connection.close()
    together = read_decisions(two_replicas)
    assert len(together) == 10 and together.joined_feedback == 2  # the two r1 kept for r2's requests


# --- two `tokenopt serve` processes on loopback --------------------------------------------------------------------

QUESTIONS = ["S 4 3?", "M 1 9 1?", "N 084562?", "S 2 2 2?", "M 3 5 4 1?", "N 11?"]


def _users_by_arm(split):
    """Two user keys the server hashes to arm A and two to arm B."""
    from tokenopt.serve.serving import _stable_fraction

    users = [f"user-{i}" for i in range(40)]
    in_b = [user for user in users if _stable_fraction(user) < split]
    in_a = [user for user in users if user not in in_b]
    return {"A": in_a[:2], "B": in_b[:2]}


def test_two_serve_processes_are_reported_and_refined_from_together(tmp_path, demo_policy):
    logs = [tmp_path / "logs" / "replica-1.sqlite", tmp_path / "logs" / "replica-2.sqlite"]
    common = ["--policy", str(demo_policy), "--policy-b", str(demo_policy), "--split", "0.5", "--device", "cpu",
              "--threads", "1", "--keep-unmatched-feedback"]  # fmt: skip
    users = _users_by_arm(0.5)
    sent: dict[str, str] = {}  # request id -> arm
    feedback: dict[str, bool] = {}
    with serve_processes([*common, "--log", str(logs[0])], [*common, "--log", str(logs[1])]) as replicas:
        for i, question in enumerate(QUESTIONS):
            arm = "AB"[i % 2]
            reply = httpx.post(
                f"{replicas[i // 2 % 2]}/v1/completions", json={"prompt": question},
                headers={"X-Tokenopt-User": users[arm][i // 2 % 2]}, timeout=60,
            )  # fmt: skip
            assert reply.status_code == 200, reply.text
            assert reply.json()["tokenopt"]["arm"] == arm
            sent[reply.json()["id"]] = arm
        ids = list(sent)
        # Feedback for requests 0-3 goes to the replica that did not serve them (the load balancer does not pin it).
        for i, request_id in enumerate(ids[:4]):
            feedback[request_id] = i != 1
            kept = httpx.post(f"{replicas[1 - i // 2 % 2]}/v1/feedback", json={"id": request_id, "correct": i != 1})
            assert kept.status_code == 202 and kept.json() == {"id": request_id, "arm": None, "correct": i != 1}
        feedback[ids[4]] = True
        assert httpx.post(f"{replicas[0]}/v1/feedback", json={"id": ids[4], "correct": True}).status_code == 200

    # Alone, replica 1's log holds the one feedback it attached and the two it kept for replica 2's requests.
    alone = read_decisions(logs[0])
    assert int((~np.isnan(alone.correct)).sum()) == 1 and sorted(alone.unmatched_feedback) == sorted(ids[2:4])

    result = runner.invoke(app, ["ab-report", str(logs[0]), str(logs[1]), "--json"])
    assert result.exit_code == 0, result.output
    report = json.loads(result.output)
    assert report["arms"]["A"]["requests"] + report["arms"]["B"]["requests"] == len(QUESTIONS)
    for arm in ("A", "B"):
        assert report["arms"][arm]["requests"] == sum(1 for value in sent.values() if value == arm)
        with_feedback = [request_id for request_id in feedback if sent[request_id] == arm]
        assert report["arms"][arm]["feedback"] == len(with_feedback)
        assert report["arms"][arm]["correct"] == sum(feedback[request_id] for request_id in with_feedback)
    assert any("4 feedback rows reached another replica" in note for note in report["notes"])

    out = tmp_path / "refined"
    result = runner.invoke(
        app,
        ["train", "--from-log", str(logs[0]), "--from-log", str(logs[1]), "--init-from", str(demo_policy),
         "--out", str(out), "--epochs", "1", "--arm", "A"],
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    refined = json.loads((out / "from_log.json").read_text())
    assert refined["logs"] == [str(log) for log in logs]
    assert refined["rows"]["arm"] == 3 and refined["rows"]["with_feedback"] == 3
    assert BudgetPolicy.load(out / "policy").actions == BudgetPolicy.load(demo_policy).actions
