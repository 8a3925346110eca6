"""`tokenopt collect` end to end on the embedded demo LM."""

import json
import math
import os
import signal
import subprocess
import sys
import time

import pyarrow.parquet as pq
import pytest

from tokenopt.collect import CollectConfig, collect
from tokenopt.table import OutcomeMatrix, load_outcomes
from tokenopt.table.schema import OUTCOME_SCHEMA

BUDGETS = [0, 4, 16]
MODES = ["greedy", "sc3"]


def _config(out, data, **overrides):
    settings = dict(out=str(out), data=str(data), budgets=BUDGETS, modes=MODES, batch_size=8, shard_size=16)
    settings.update(overrides)
    return CollectConfig(**settings)


def _same(left, right):
    """Equal, floats (also in lists) to 1e-5: a process with one torch thread sums in another order than one
    with two, and log-probabilities then differ in the seventh digit."""
    if isinstance(left, float) and isinstance(right, float):
        return math.isclose(left, right, rel_tol=1e-5, abs_tol=1e-5)
    if isinstance(left, list | tuple) and isinstance(right, list | tuple):
        return len(left) == len(right) and all(_same(a, b) for a, b in zip(left, right, strict=True))
    return left == right


def _sorted_rows(directory):
    table = load_outcomes(directory).drop_columns(["latency_ms"])
    return sorted(zip(*[table.column(name).to_pylist() for name in table.column_names], strict=True))


@pytest.fixture(scope="module")
def collected(tmp_path_factory, demo_questions):
    out = tmp_path_factory.mktemp("collect") / "table"
    summary = collect(_config(out, demo_questions))
    return out, summary


def test_one_row_per_query_budget_and_mode(collected, demo_questions):
    out, summary = collected
    n_queries = sum(1 for _ in demo_questions.open())
    table = load_outcomes(out)
    assert table.schema.names == OUTCOME_SCHEMA.names
    assert table.num_rows == summary.rows == n_queries * len(BUDGETS) * len(MODES)
    keys = list(zip(table.column("id").to_pylist(), table.column("action").to_pylist(), strict=True))
    assert len(set(keys)) == len(keys)
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["complete"] and manifest["backend"]["model"] == "demo"
    assert [a["name"] for a in manifest["actions"]] == [f"b{b}/{m}" for m in MODES for b in BUDGETS]


def test_token_accounting_and_budgets(collected):
    out, _ = collected
    rows = load_outcomes(out).to_pylist()
    for row in rows:
        width = row["n_sequences"]
        assert row["billed_tokens"] == row["reasoning_tokens"] + row["cue_tokens"] + row["answer_tokens"]
        assert row["reasoning_tokens"] <= row["budget"] * width
        assert row["cue_tokens"] == width  # the demo cue is one token, forced or emitted
        assert row["prompt_tokens"] > 0
        if row["mode"] == "sc3":
            assert 1 / 3 - 1e-6 <= row["confidence"] <= 1.0
        else:
            assert row["confidence"] <= 0.0


def test_reasoning_pays_off_on_the_demo(collected):
    out, _ = collected
    matrix = OutcomeMatrix.from_table(out)
    em = matrix.exact_match.mean(axis=0)
    tokens = matrix.billed_tokens.mean(axis=0)
    greedy = {a: i for i, a in enumerate(matrix.actions) if a.endswith("/greedy")}
    assert em[greedy["b16/greedy"]] > em[greedy["b0/greedy"]] + 0.15
    assert tokens[greedy["b16/greedy"]] > tokens[greedy["b0/greedy"]]


def test_queries_and_features_tables(collected, demo_questions):
    out, _ = collected
    queries = pq.read_table(out / "queries.parquet")
    assert {"id", "split", "question", "answers", "prompt_tokens", "family", "difficulty"} <= set(queries.column_names)
    features = pq.read_table(out / "features.parquet")
    assert features.num_rows == queries.num_rows
    spec = json.loads(features.schema.metadata[b"tokenopt.feature_spec"])
    assert len(features.column("features")[0].as_py()) == len(spec["names"])


def test_rerun_with_other_settings_is_refused(collected, demo_questions):
    out, _ = collected
    before = _sorted_rows(out)
    with pytest.raises(ValueError, match="budgets"):
        collect(_config(out, demo_questions, budgets=[0, 8]))
    assert _sorted_rows(out) == before


def test_rerun_reuses_every_shard(collected, demo_questions):
    out, summary = collected
    again = collect(_config(out, demo_questions))
    assert again.shards_written == 0 and again.shards_reused == summary.shards_written
    assert again.rows == summary.rows


def test_kill_9_then_resume_loses_and_duplicates_nothing(tmp_path, collected, demo_questions):
    reference, _ = collected
    out = tmp_path / "killed"
    command = [
        sys.executable, "-m", "tokenopt.cli", "collect", "--out", str(out), "--data", str(demo_questions),
        "--budgets", ",".join(map(str, BUDGETS)), "--modes", ",".join(MODES), "--batch-size", "8",
        "--shard-size", "16",
    ]  # fmt: skip
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 300
    while not (out / "outcomes" / "part-00000.parquet").exists():
        assert process.poll() is None, "collect ended before it could be killed"
        assert time.monotonic() < deadline
        time.sleep(0.05)
    os.kill(process.pid, signal.SIGKILL)
    process.wait()
    written = sorted(p.name for p in (out / "outcomes").glob("part-*.parquet"))
    assert "part-00002.parquet" not in written
    summary = subprocess.run(command, capture_output=True, text=True)
    assert summary.returncode == 0, summary.stderr
    assert "reused" in summary.stderr
    assert not list(out.rglob("*.partial"))
    resumed, whole = _sorted_rows(out), _sorted_rows(reference)
    assert [row[:3] for row in resumed] == [row[:3] for row in whole]  # the same (query, split, action) rows
    assert _same(resumed, whole)


def test_bad_input_fails_before_any_lm_work(tmp_path, demo_questions):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        collect(_config(tmp_path / "a", demo_questions, model=str(tmp_path / "no-model")))
    with pytest.raises(ValueError, match="not in increasing order"):
        collect(_config(tmp_path / "b", demo_questions, budgets=[8, 4]))
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"id": "a", "question": "q", "answers": ["1"]}\n{"id": "b", "question": "q"}\n')
    with pytest.raises(ValueError, match=r"bad.jsonl:2: 'answers'"):
        collect(_config(tmp_path / "c", bad))
    assert not (tmp_path / "c" / "outcomes").exists()


def test_prompt_longer_than_the_context(tmp_path):
    data = tmp_path / "long.jsonl"
    data.write_text(
        json.dumps({"id": "short", "question": "M 1 2?", "answers": ["2"]})
        + "\n"
        + json.dumps({"id": "long", "question": "M " + "1 " * 80 + "?", "answers": ["1"]})
        + "\n"
    )
    summary = collect(_config(tmp_path / "skip", data))
    assert summary.skipped == ["long"]
    assert set(load_outcomes(tmp_path / "skip").column("id").to_pylist()) == {"short"}
    with pytest.raises(ValueError, match=r"'long'.*exceeds the model's context of 128 \(--strict\)"):
        collect(_config(tmp_path / "strict", data, strict=True))


def test_cli_error_is_one_clear_line(tmp_path):
    result = subprocess.run(
        [sys.executable, "-m", "tokenopt.cli", "collect", "--out", str(tmp_path / "x"), "--budgets", "0,-1"],
        capture_output=True,
        text=True,
    )
    assert result.returncode == 2
    assert "budgets must be >= 0" in result.stderr
    assert "Traceback" not in result.stderr
