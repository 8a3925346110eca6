"""``tokenopt collect --upstream``: the outcome table from an OpenAI-compatible server.

The upstream is ``tokenopt serve`` with the demo LM on loopback (plain completions
with token logprobs); greedy collection through it must equal the local table.
"""

from __future__ import annotations

import json
import socket
import subprocess
import sys
from pathlib import Path

import pyarrow.parquet as pq
import pytest
from serving import running_server

from tokenopt.collect import CollectConfig, collect
from tokenopt.demo.suite import SuiteConfig, generate_suite, write_jsonl
from tokenopt.lm.upstream import UpstreamError
from tokenopt.serve import ServeConfig

BUDGETS = [0, 4, 8, 16, 32]
EXACT = ["answer", "em", "reasoning_tokens", "cue_tokens", "answer_tokens", "billed_tokens", "natural_stop"]


@pytest.fixture(scope="module")
def questions(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("upstream_data") / "questions.jsonl"
    write_jsonl(generate_suite(SuiteConfig(n_queries=24, seed=11)), path)
    return path


@pytest.fixture(scope="module")
def upstream(tmp_path_factory: pytest.TempPathFactory, demo_policy: Path):
    folder = tmp_path_factory.mktemp("upstream_serve")
    config = ServeConfig(policy=demo_policy, log=folder / "decisions.sqlite", device="cpu", port=0)
    with running_server(config) as (url, _):
        yield url


@pytest.fixture(scope="module")
def local_table(tmp_path_factory: pytest.TempPathFactory, questions: Path) -> Path:
    out = tmp_path_factory.mktemp("local") / "table"
    collect(CollectConfig(out=str(out), data=str(questions), budgets=BUDGETS, modes=["greedy"], device="cpu"))
    return out


def _rows(table: Path) -> list[dict[str, object]]:
    rows = pq.read_table(table / "outcomes").to_pylist()
    return sorted(rows, key=lambda row: (str(row["id"]), str(row["action"])))


def _upstream_config(out: Path, questions: Path, url: str, **overrides: object) -> CollectConfig:
    settings: dict[str, object] = {
        "out": str(out),
        "data": str(questions),
        "budgets": BUDGETS,
        "modes": ["greedy"],
        "upstream": url,
        "upstream_model": "demo",
        "concurrency": 8,
        "shard_size": 8,
    }
    settings.update(overrides)
    return CollectConfig(**settings)  # type: ignore[arg-type]


def test_greedy_upstream_table_equals_the_local_table(tmp_path, questions, upstream, local_table):
    out = tmp_path / "upstream"
    summary = collect(_upstream_config(out, questions, upstream))
    assert summary.shards_written == 3 and summary.shards_reused == 0 and not summary.skipped
    local, remote = _rows(local_table), _rows(out)
    assert len(remote) == len(local) == 24 * len(BUDGETS)
    for want, got in zip(local, remote, strict=True):
        assert (got["id"], got["action"]) == (want["id"], want["action"])
        assert {k: got[k] for k in EXACT} == {k: want[k] for k in EXACT}, (want["id"], want["action"])
        assert got["prompt_tokens"] == want["prompt_tokens"]
        assert got["answer_logprob"] == pytest.approx(want["answer_logprob"], abs=1e-3)
        assert got["sample_tokens"] == want["sample_tokens"]
    assert any(row["natural_stop"] for row in remote) and not all(row["natural_stop"] for row in remote)
    queries = pq.read_table(out / "queries.parquet").to_pylist()
    assert [q["prompt_tokens"] for q in queries] == [
        q["prompt_tokens"] for q in pq.read_table(local_table / "queries.parquet").to_pylist()
    ]
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["complete"] and manifest["backend"]["kind"] == "openai-upstream"
    assert manifest["backend"]["model"] == "demo" and manifest["backend"]["url"] == f"{upstream}/v1"

    # Resumption: a second run reuses every shard; a lost shard is collected again, equal.
    again = collect(_upstream_config(out, questions, upstream))
    assert (again.shards_written, again.shards_reused) == (0, 3)
    (out / "outcomes" / "part-00001.parquet").unlink()
    refill = collect(_upstream_config(out, questions, upstream))
    assert (refill.shards_written, refill.shards_reused) == (1, 2)
    timeless = [{k: v for k, v in row.items() if k != "latency_ms"} for row in remote]
    assert [{k: v for k, v in row.items() if k != "latency_ms"} for row in _rows(out)] == timeless


def test_self_consistency_bills_every_sample_and_votes(tmp_path, questions, upstream):
    out = tmp_path / "sc"
    collect(_upstream_config(out, questions, upstream, modes=["sc3"], budgets=[0, 8, 32], seed=3))
    rows = _rows(out)
    assert len(rows) == 24 * 3
    for row in rows:
        assert row["n_sequences"] == 3 and len(row["sample_answers"]) == 3  # type: ignore[arg-type]
        assert row["billed_tokens"] == sum(row["sample_tokens"])  # type: ignore[arg-type]
        assert row["billed_tokens"] == row["reasoning_tokens"] + row["cue_tokens"] + row["answer_tokens"]
        assert row["answer"] in row["sample_answers"]  # type: ignore[operator]
        if row["budget"] == 0:
            assert row["reasoning_tokens"] == 0 and row["cue_tokens"] == 3
    # Seeded: the same seed gives the same table.
    again = tmp_path / "sc_again"
    collect(_upstream_config(again, questions, upstream, modes=["sc3"], budgets=[0, 8, 32], seed=3))
    assert [{**row, "latency_ms": 0} for row in _rows(again)] == [{**row, "latency_ms": 0} for row in rows]


def test_beam_mode_is_refused_by_name(tmp_path, questions, upstream):
    with pytest.raises(ValueError, match="beam3"):
        collect(_upstream_config(tmp_path / "beam", questions, upstream, modes=["greedy", "beam3"]))


def test_unreachable_upstream_fails_clearly_and_writes_no_shard(tmp_path, questions):
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    out = tmp_path / "unreachable"
    with pytest.raises(UpstreamError, match="cannot reach the upstream"):
        collect(_upstream_config(out, questions, f"http://127.0.0.1:{port}"))
    assert not list(out.glob("outcomes/*.parquet"))


def test_upstream_without_logprobs_fails_clearly_and_writes_no_shard(
    tmp_path, questions, upstream, demo_policy, tmp_path_factory
):
    # A tokenopt server in front of another forwards plain completions without token logprobs.
    config = ServeConfig(
        policy=demo_policy,
        log=tmp_path / "proxy.sqlite",
        port=0,
        upstream=upstream,
        upstream_model="demo",
    )
    out = tmp_path / "proxied"
    with running_server(config) as (proxy, _):
        with pytest.raises(UpstreamError, match="without token logprobs"):
            collect(_upstream_config(out, questions, proxy))
    assert not list(out.glob("outcomes/*.parquet"))


def test_cli_collects_from_an_upstream_and_keeps_the_key_out_of_command_txt(tmp_path, questions, upstream):
    out = tmp_path / "cli"
    command = [
        sys.executable,
        "-m",
        "tokenopt.cli",
        "collect",
        "--out",
        str(out),
        "--data",
        str(questions),
        "--modes",
        "greedy",
        "--budgets",
        "0,8",
        "--upstream",
        upstream,
        "--upstream-model",
        "demo",
        "--upstream-api-key",
        "secret-key",
        "--concurrency",
        "4",
    ]
    result = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    assert len(pq.read_table(out / "outcomes")) == 24 * 2
    assert "secret-key" not in (out / "command.txt").read_text()
    assert "secret-key" not in (out / "manifest.json").read_text()
    command[5], command[9] = str(tmp_path / "cli_beam"), "greedy,beam2"
    beam = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert beam.returncode != 0 and "beam2" in beam.stderr + beam.stdout
