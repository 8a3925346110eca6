"""`tokenopt collect --ray`: shards on a local Ray instance give the single-process table."""

import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from tokenopt.collect import CollectConfig, collect
from tokenopt.demo.suite import SuiteConfig, generate_suite, write_jsonl
from tokenopt.table import load_outcomes

ray = pytest.importorskip("ray")

from tokenopt.collect.ray import RayConfig, collect_ray  # noqa: E402

BUDGETS = [0, 4, 16]
MODES = ["greedy", "sc5"]
N_QUERIES = 40
SHARD_SIZE = 8
RAY_CONFIG = RayConfig(workers=2, cpus_per_worker=0.5)
EXACT = ["id", "split", "action", "budget", "mode", "answer", "em", "reasoning_tokens", "cue_tokens",
         "answer_tokens", "prompt_tokens", "billed_tokens", "natural_stop", "n_sequences", "sample_answers",
         "sample_em", "sample_tokens"]  # fmt: skip
APPROX = ["confidence", "answer_logprob"]


@pytest.fixture(scope="module")
def questions(tmp_path_factory):
    path = tmp_path_factory.mktemp("ray_data") / "questions.jsonl"
    write_jsonl(generate_suite(SuiteConfig(n_queries=N_QUERIES, seed=11)), path)
    return path


def _config(out, data):
    return CollectConfig(
        out=str(out), data=str(data), budgets=BUDGETS, modes=MODES, batch_size=4, shard_size=SHARD_SIZE, device="cpu"
    )


@pytest.fixture(scope="module")
def reference(tmp_path_factory, questions):
    out = tmp_path_factory.mktemp("single") / "table"
    collect(_config(out, questions))
    return out


@pytest.fixture(autouse=True)
def _ray_is_shut_down():
    yield
    assert not ray.is_initialized(), "collect_ray left Ray running"


def _rows(directory):
    table = load_outcomes(directory)
    rows = table.to_pylist()
    rows.sort(key=lambda row: (row["id"], row["action"]))
    return rows


def _assert_same_table(directory, reference):
    got, want = _rows(directory), _rows(reference)
    assert len(got) == len(want) == N_QUERIES * len(BUDGETS) * len(MODES)
    for row, expected in zip(got, want, strict=True):
        assert {k: row[k] for k in EXACT} == {k: expected[k] for k in EXACT}
        for key in APPROX:
            assert row[key] == pytest.approx(expected[key], abs=1e-4)
        assert row["sample_logprobs"] == pytest.approx(expected["sample_logprobs"], abs=1e-4)


def _shard_names(directory):
    return sorted(path.name for path in (directory / "outcomes").iterdir())


def test_two_ray_workers_give_the_single_process_table(tmp_path, questions, reference):
    out = tmp_path / "ray"
    summary = collect_ray(_config(out, questions), RAY_CONFIG)
    assert summary.shards_written == N_QUERIES // SHARD_SIZE and summary.shards_reused == 0
    assert summary.forward_tokens > 0
    _assert_same_table(out, reference)
    assert _shard_names(out) == _shard_names(reference)  # no leftover temporary files
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["complete"] and manifest["backend"]["kind"] == "transformers"
    assert manifest["runner"]["kind"] == "ray" and manifest["runner"]["workers"] == 2
    reference_manifest = json.loads((reference / "manifest.json").read_text())
    assert manifest["settings"] == reference_manifest["settings"]


class _WorkerKiller(threading.Thread):
    """Kills every live shard actor's process with SIGKILL (from outside, as a crash would) once.

    It waits until the actors are working (the first new shard file is written) while
    shards are still pending, so the kill lands mid-collection.
    """

    def __init__(self, shard_dir, already: int, total: int) -> None:
        super().__init__(daemon=True)
        self.shard_dir, self.already, self.total = shard_dir, already, total
        self.killed: list[int] = []
        self.pending_at_kill = 0
        self.stop = threading.Event()

    def _written(self) -> int:
        return len(list(self.shard_dir.glob("part-*.parquet")))

    def run(self) -> None:
        while not self.stop.is_set():
            written = self._written()
            if written > self.already:
                workers = _shard_worker_pids()
                if workers and written < self.total:
                    self.pending_at_kill = self.total - written
                    for pid in workers:
                        os.kill(pid, signal.SIGKILL)
                        self.killed.append(pid)
                    return
            if written >= self.total:
                return
            time.sleep(0.05)


def _shard_worker_pids() -> list[int]:
    """Processes of the actor pool's workers, by the title Ray gives them (``ray::MapWorker(...)``)."""
    pids = []
    for cmdline in Path("/proc").glob("[0-9]*/cmdline"):
        try:
            title = cmdline.read_bytes().decode(errors="replace")
        except OSError:
            continue
        if title.startswith("ray::") and ("MapWorker" in title or "_ShardActor" in title):
            pids.append(int(cmdline.parent.name))
    return pids


def test_resume_reuses_shards_and_workers_killed_mid_collection_have_their_shards_redone_once(
    tmp_path, questions, reference
):
    # One Ray run checks both (a Ray start and two actor loads cost most of a test on 2 cores).
    out = tmp_path / "ray"
    (out / "outcomes").mkdir(parents=True)
    shutil.copy(reference / "manifest.json", out / "manifest.json")
    kept = ["part-00000.parquet", "part-00003.parquet"]
    for name in kept:
        shutil.copy(reference / "outcomes" / name, out / "outcomes" / name)
    before = {name: (out / "outcomes" / name).stat().st_mtime_ns for name in kept}
    killer = _WorkerKiller(out / "outcomes", already=len(kept), total=N_QUERIES // SHARD_SIZE)
    killer.start()
    try:
        summary = collect_ray(_config(out, questions), RAY_CONFIG)
    finally:
        killer.stop.set()
        killer.join(timeout=30)

    assert killer.killed, "no worker was alive to kill while shards were pending"
    assert killer.pending_at_kill >= 1
    assert summary.shards_reused == 2 and summary.shards_written == N_QUERIES // SHARD_SIZE - 2
    assert {name: (out / "outcomes" / name).stat().st_mtime_ns for name in kept} == before
    assert summary.rows == sum(pq.read_metadata(p).num_rows for p in (out / "outcomes").glob("part-*.parquet"))
    _assert_same_table(out, reference)  # one row per query and action: nothing lost, nothing twice
    leftovers = [name for name in _shard_names(out) if not name.endswith(".parquet")]
    assert len(leftovers) <= len(killer.killed)  # at most a killed attempt's temporary file, which no reader loads


def test_unreachable_address_fails_fast_with_the_fix(tmp_path, questions):
    config = RayConfig(address="127.0.0.1:9", connect_timeout_s=2)
    with pytest.raises(ValueError, match="ray start --head"):
        collect_ray(_config(tmp_path / "ray", questions), config)
    assert not (tmp_path / "ray").exists()


def test_bad_worker_settings_are_refused():
    with pytest.raises(ValueError, match="--ray-workers"):
        RayConfig(workers=0)
    with pytest.raises(ValueError, match="--cpus-per-worker"):
        RayConfig(cpus_per_worker=0)


def test_cli_reports_an_unreachable_cluster(tmp_path):
    command = [sys.executable, "-m", "tokenopt.cli", "collect", "--ray", "127.0.0.1:9", "--out", str(tmp_path / "t")]
    result = subprocess.run(command, capture_output=True, text=True, timeout=120)
    assert result.returncode == 2
    assert "no Ray cluster answers at 127.0.0.1:9" in " ".join((result.stdout + result.stderr).split())


def test_without_ray_installed_says_how_to_install_it(tmp_path, questions, monkeypatch):
    monkeypatch.setitem(sys.modules, "ray", None)  # import ray now raises ImportError
    with pytest.raises(ValueError, match=r"pip install 'tokenopt\[ray\]'"):
        collect_ray(_config(tmp_path / "ray", questions), RAY_CONFIG)
