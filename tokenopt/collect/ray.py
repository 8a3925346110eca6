"""Outcome collection over Ray: the question file's shards on a pool of LM actors.

``collect_ray`` prepares the collection as :func:`tokenopt.collect.collect` does (queries,
prompts, features, manifest), then hands the shards not yet written to a Ray Data
``map_batches`` stage over a fixed pool of actors. Each actor loads the LM once (on its
GPU when it is given one) and collects whole shards with
:func:`~tokenopt.collect.collect_shard`, so the merged table is the one a single process
writes with the same seed, row for row.

Each shard is written by the actor that computes it, to a temporary file renamed into
place: a shard file is complete or absent. A shard whose file exists is skipped, by the
driver (resumption) and by an actor that is given it again. If an actor dies mid-shard,
Ray restarts it and retries the shard, which is then written once, whole.

Ray is an optional dependency: ``pip install 'tokenopt[ray]'``.
"""

from __future__ import annotations

import json
import logging
import socket
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import pyarrow.parquet as pq

from tokenopt.collect.config import CollectConfig, CollectSummary
from tokenopt.collect.local import collect, collect_shard
from tokenopt.data import Query
from tokenopt.table.schema import write_table_atomic

__all__ = ["RayConfig", "collect_ray"]

logger = logging.getLogger(__name__)

INSTALL_HINT = "pip install 'tokenopt[ray]'"


@dataclass
class RayConfig:
    """Where and how wide ``tokenopt collect --ray`` runs."""

    address: str | None = None
    """Ray cluster address (``host:port``, ``ray://host:port`` or ``auto``); None or ``local`` starts one here."""
    workers: int = 2
    """LM actors, each holding one copy of the model."""
    cpus_per_worker: float = 0.5
    """CPUs each actor reserves; fractional on small machines so Ray's own tasks still get a CPU."""
    gpus_per_worker: float = 0.0
    """GPUs each actor reserves (the actor then decodes on its GPU)."""
    connect_timeout_s: float = 10.0
    """How long to wait for a cluster address to answer before giving up."""

    def __post_init__(self) -> None:
        if self.workers < 1:
            raise ValueError(f"--ray-workers must be >= 1; got {self.workers}")
        if self.cpus_per_worker <= 0:
            raise ValueError(f"--cpus-per-worker must be > 0; got {self.cpus_per_worker}")
        if self.gpus_per_worker < 0:
            raise ValueError(f"--gpus-per-worker must be >= 0; got {self.gpus_per_worker}")

    @property
    def local(self) -> bool:
        """Whether to start a Ray instance in this process instead of joining a cluster."""
        return self.address is None or self.address == "local"


def _import_ray() -> Any:
    try:
        import ray
        import ray.data  # noqa: F401
    except ImportError:
        raise ValueError(f"--ray needs Ray, which is not installed: {INSTALL_HINT}") from None
    return ray


def _check_reachable(address: str, timeout_s: float) -> None:
    """Fail fast, with the fix, when a cluster address does not answer (ray.init may wait minutes)."""
    if address == "auto":
        return
    target = address.removeprefix("ray://")
    host, _, port_text = target.rpartition(":")
    if not host or not port_text.isdigit():
        raise ValueError(f"--ray {address!r}: expected host:port, ray://host:port, auto or local")
    try:
        with socket.create_connection((host, int(port_text)), timeout=timeout_s):
            pass
    except OSError as error:
        raise ValueError(
            f"no Ray cluster answers at {address} within {timeout_s:.0f} s ({error}); start one with "
            "`ray start --head` and pass the address it prints, or use `--ray local` to start one here"
        ) from None


class _ShardActor:
    """One LM per actor process; each call collects and writes whole shards."""

    def __init__(self, settings: dict[str, Any], device: str, threads: int) -> None:
        import torch

        from tokenopt.actions import parse_budgets, parse_modes
        from tokenopt.lm.local import TransformersLM

        torch.set_num_threads(threads)
        self.config = CollectConfig(**settings)
        prompt_format = self.config.prompt_format()
        self.lm = TransformersLM(self.config.model, device, self.config.dtype, prompt_format, self.config.temperature)
        self.budgets = parse_budgets(self.config.budgets)
        self.modes = parse_modes(self.config.modes)

    def __call__(self, batch: dict[str, Any]) -> dict[str, list[Any]]:
        results: dict[str, list[Any]] = {"path": [], "rows": [], "queries": [], "forward_tokens": []}
        for path_text, payload in zip(batch["path"], batch["payload"], strict=True):
            path = Path(str(path_text))
            shard = json.loads(str(payload))
            queries = [Query(q["id"], "", tuple(q["answers"]), q["split"]) for q in shard["queries"]]
            before = self.lm.stats.forward_tokens
            if path.exists():  # written by an earlier attempt at this shard
                rows = pq.read_metadata(path).num_rows
            else:
                batch_size, seed = self.config.batch_size, self.config.seed
                table = collect_shard(self.lm, queries, shard["prompts"], self.modes, self.budgets, batch_size, seed)
                # A unique temporary name: a retried shard never shares a half-written file with the first attempt.
                write_table_atomic(table, path, unique=True)
                rows = table.num_rows
            results["path"].append(str(path))
            results["rows"].append(rows)
            results["queries"].append(len(queries))
            results["forward_tokens"].append(self.lm.stats.forward_tokens - before)
        return results


class _RayShardRunner:
    """The :data:`tokenopt.collect.ShardRunner` that sends pending shards to Ray actors."""

    def __init__(self, config: CollectConfig, ray_config: RayConfig) -> None:
        self.config = config
        self.ray_config = ray_config

    def __call__(
        self,
        pending: list[tuple[Path, list[Query]]],
        prompts: dict[str, list[int]],
        advance: Callable[[int], None],
    ) -> tuple[int, int]:
        ray = _import_ray()
        rc = self.ray_config
        started_here = not ray.is_initialized()
        if started_here:
            init_args: dict[str, Any] = {"include_dashboard": False, "logging_level": logging.ERROR}
            init_args["log_to_driver"] = logger.isEnabledFor(logging.DEBUG)
            if not rc.local:
                init_args["address"] = rc.address
            try:
                ray.init(**init_args)
            except ConnectionError as error:
                raise ValueError(f"could not join the Ray cluster at {rc.address}: {error}") from None
        try:
            return self._run(ray, pending, prompts, advance)
        finally:
            if started_here:
                ray.shutdown()

    def _run(
        self,
        ray: Any,
        pending: list[tuple[Path, list[Query]]],
        prompts: dict[str, list[int]],
        advance: Callable[[int], None],
    ) -> tuple[int, int]:
        rc = self.ray_config
        workers = min(rc.workers, len(pending))
        resources = ray.cluster_resources()
        for name, each in (("CPU", rc.cpus_per_worker), ("GPU", rc.gpus_per_worker)):
            have = float(resources.get(name, 0.0))
            if each * workers > have:
                raise ValueError(
                    f"{workers} workers x {each:g} {name}s need {each * workers:g} {name}s but the Ray cluster has "
                    f"{have:g}; lower --ray-workers or --{name.lower()}s-per-worker"
                )
        device = self.config.device
        if device == "auto" and rc.gpus_per_worker == 0:
            device = "cpu"  # an actor without a reserved GPU must not take one that another actor holds
        items = []
        for path, queries in pending:
            shard = {
                "queries": [{"id": q.id, "split": q.split, "answers": list(q.answers)} for q in queries],
                "prompts": {q.id: prompts[q.id] for q in queries},
            }
            items.append({"path": str(path), "payload": json.dumps(shard)})
        context = ray.data.DataContext.get_current()
        context.enable_progress_bars = False
        if not logger.isEnabledFor(logging.DEBUG):  # Ray Data logs every execution plan at INFO
            logging.getLogger("ray.data").setLevel(logging.WARNING)
        dataset = ray.data.from_items(items, override_num_blocks=len(items)).map_batches(
            _ShardActor,
            fn_constructor_kwargs={
                "settings": asdict(self.config),
                "device": device,
                "threads": max(1, int(rc.cpus_per_worker)),
            },
            batch_size=1,
            batch_format="numpy",
            compute=ray.data.ActorPoolStrategy(size=workers),
            num_cpus=rc.cpus_per_worker,
            num_gpus=rc.gpus_per_worker,
            # Ray Data's actor pool restarts a crashed actor and retries its shard (max_restarts and
            # max_task_retries default to -1 there); the retry writes the whole shard once.
        )
        rows = forward_tokens = 0
        finished: set[str] = set()
        for result in dataset.iter_rows():
            path_text = str(result["path"])
            if path_text in finished:
                continue
            finished.add(path_text)
            rows += int(result["rows"])
            forward_tokens += int(result["forward_tokens"])
            advance(int(result["queries"]))
        missing = sorted(str(path) for path, _ in pending if str(path) not in finished)
        if missing:
            raise RuntimeError(f"Ray returned no result for {len(missing)} shards: {missing[:3]}")
        return rows, forward_tokens


def collect_ray(
    config: CollectConfig,
    ray_config: RayConfig | None = None,
    progress: Callable[[int, int], None] | None = None,
) -> CollectSummary:
    """Collect the outcome table with the shards spread over Ray workers.

    The driver prepares the collection (and loads the LM to encode the prompts); the
    shards not yet written run on ``ray_config.workers`` actors. A local Ray instance is
    started and shut down again unless Ray is already initialised in this process or
    ``ray_config.address`` names a cluster.

    Args:
        config: the collection's settings (the same as a single-process run's).
        ray_config: where and how wide to run.
        progress: called as ``progress(queries_done, queries_total)``.

    Returns:
        What was done.

    Raises:
        ValueError: Ray is not installed, the cluster does not answer or lacks the
            resources, or any error :func:`tokenopt.collect.collect` raises.
    """
    ray_config = ray_config or RayConfig()
    if config.upstream is not None:
        raise ValueError(
            "--ray and --upstream exclude each other: Ray workers each load the model; an upstream server "
            "is already shared (raise --concurrency instead)"
        )
    ray = _import_ray()
    if not ray_config.local and not ray.is_initialized():
        _check_reachable(str(ray_config.address), ray_config.connect_timeout_s)
    started = time.perf_counter()
    runner_info: dict[str, object] = {
        "kind": "ray",
        "address": ray_config.address or "local",
        "workers": ray_config.workers,
        "cpus_per_worker": ray_config.cpus_per_worker,
        "gpus_per_worker": ray_config.gpus_per_worker,
        "ray_version": str(ray.__version__),
    }
    summary = collect(config, progress, shard_runner=_RayShardRunner(config, ray_config), runner_info=runner_info)
    logger.info("Ray collection took %.1f s", time.perf_counter() - started)
    return summary
