"""README claims of `tokenopt collect --ray`: refusals that must come before any work.

- asking for more CPUs or GPUs than the Ray cluster has is refused instead of hanging;
- `--ray` with `--upstream` is refused.
"""

from __future__ import annotations

import contextlib
import logging
import re
import subprocess
import sys
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest

from tokenopt.collect import CollectConfig
from tokenopt.demo.suite import SuiteConfig, generate_suite, write_jsonl

ray = pytest.importorskip("ray")

from tokenopt.collect.ray import RayConfig, collect_ray  # noqa: E402

CLUSTER_CPUS = 2
SHARDS = 4


@pytest.fixture(scope="module")
def questions(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("ray_claims") / "questions.jsonl"
    write_jsonl(generate_suite(SuiteConfig(n_queries=4 * SHARDS, seed=13)), path)
    return path


@pytest.fixture(scope="module")
def cluster() -> Iterator[dict[str, float]]:
    """A local Ray instance of known size (2 CPUs, no GPU); collect_ray joins it rather than starting one."""
    ray.init(num_cpus=CLUSTER_CPUS, num_gpus=0, include_dashboard=False, logging_level=logging.ERROR)
    try:
        yield ray.cluster_resources()
    finally:
        ray.shutdown()


def _config(out: Path, data: Path, **overrides: Any) -> CollectConfig:
    settings: dict[str, Any] = {
        "out": str(out), "data": str(data), "budgets": [0, 4], "modes": ["greedy"], "shard_size": 4, "device": "cpu",
    }  # fmt: skip
    settings.update(overrides)
    return CollectConfig(**settings)


def _refused_within(seconds: float, config: CollectConfig, ray_config: RayConfig) -> BaseException | None:
    """Run collect_ray in a thread; the error it raised, or a test failure if it neither fails nor ends in time."""
    outcome: list[BaseException | None] = []

    def run() -> None:
        try:
            collect_ray(config, ray_config)
            outcome.append(None)
        except BaseException as error:  # handed to the test
            outcome.append(error)

    worker = threading.Thread(target=run, daemon=True)
    worker.start()
    worker.join(seconds)
    if worker.is_alive():
        pytest.fail(f"collect_ray neither refused nor finished within {seconds:.0f} s: it hangs")
    return outcome[0]


def _no_actor_ran(out: Path) -> None:
    assert not list((out / "outcomes").glob("part-*")), "a shard was collected although the request was refused"
    assert ray.available_resources().get("CPU") == CLUSTER_CPUS  # no actor holds a CPU


# -- 6. --ray with --upstream is refused -------------------------------------------------------


@contextlib.contextmanager
def _recording_upstream() -> Iterator[tuple[str, list[str]]]:
    """A loopback server that answers /v1/models and records every path it is asked for."""
    paths: list[str] = []

    class Handler(BaseHTTPRequestHandler):
        def _reply(self) -> None:
            paths.append(self.path)
            data = b'{"object": "list", "data": [{"id": "fake-lm"}]}'
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        do_GET = do_POST = _reply  # noqa: N815 (http.server's names)

        def log_message(self, format: str, *args: Any) -> None:  # noqa: A002
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}", paths
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=10)


def test_ray_with_upstream_is_refused_before_ray_starts(tmp_path, questions):
    ray_was_running = ray.is_initialized()
    out = tmp_path / "both"
    with _recording_upstream() as (url, paths):
        with pytest.raises(ValueError, match="--ray and --upstream exclude each other"):
            collect_ray(_config(out, questions, upstream=url), RayConfig(workers=1))
    assert paths == []  # neither the driver nor a worker talked to the upstream
    assert ray.is_initialized() == ray_was_running
    assert not out.exists()


def test_cli_refuses_ray_with_upstream(tmp_path, questions):
    out = tmp_path / "cli"
    with _recording_upstream() as (url, paths):
        command = [sys.executable, "-m", "tokenopt.cli", "collect", "--ray", "--upstream", url]
        command += ["--out", str(out), "--data", str(questions), "--modes", "greedy", "--budgets", "0,4"]
        result = subprocess.run(command, capture_output=True, text=True, timeout=120)
    assert result.returncode == 2
    assert "--ray and --upstream exclude each other" in " ".join((result.stdout + result.stderr).split())
    assert paths == []
    assert not (out / "manifest.json").exists() and not (out / "outcomes").exists()


# -- 5. more workers than the cluster has are refused --------------------------------------------


@pytest.mark.parametrize(
    ("workers", "cpus", "gpus", "refused"),
    [
        (3, 1.0, 0.0, r"3 workers x 1 CPUs need 3 CPUs but the Ray cluster has 2"),
        (SHARDS, 0.75, 0.0, r"4 workers x 0.75 CPUs need 3 CPUs but the Ray cluster has 2"),
        (1, 0.5, 1.0, r"1 workers x 1 GPUs need 1 GPUs but the Ray cluster has 0"),
    ],
)
def test_more_workers_than_the_cluster_has_are_refused_before_any_shard(
    tmp_path, questions, cluster, workers, cpus, gpus, refused
):
    assert cluster["CPU"] == CLUSTER_CPUS and cluster.get("GPU", 0.0) == 0.0
    out = tmp_path / "too_many"
    error = _refused_within(
        120, _config(out, questions), RayConfig(workers=workers, cpus_per_worker=cpus, gpus_per_worker=gpus)
    )
    assert isinstance(error, ValueError), error
    assert re.search(refused, str(error)) and "lower --ray-workers" in str(error), error
    _no_actor_ran(out)


@pytest.mark.slow
def test_workers_that_fit_the_cluster_are_not_refused(tmp_path, questions, cluster):
    """The counterpart: the same cluster runs 2 workers x 1 CPU (the check is not a blanket refusal)."""
    out = tmp_path / "fits"
    summary = collect_ray(_config(out, questions), RayConfig(workers=2, cpus_per_worker=1.0))
    assert summary.shards_written == SHARDS and summary.rows == 4 * SHARDS * 2
