"""Collection throughput: one process against 1 and 2 Ray workers, and a scaling model.

Collects the same demo questions (same action table, same seed) three ways into fresh
folders and prints queries/s for each:
- the single-process path (``collect``);
- ``collect_ray`` with 1 worker and with 2 workers on a local Ray instance (the wall
  time includes starting Ray and loading the LM in each actor).

It then fits a simple model from the measured figures and prints how wall time and
cost (worker-seconds) grow with queries x actions x workers:

    wall(Q, A, W) = setup + ray_start + Q * A * c / (W * e)

where ``c`` is the measured seconds per (query, action) of one worker, ``setup`` the
driver's fixed cost (LM load, prompts, features), ``ray_start`` Ray's fixed cost
(starting the instance and the actors) and ``e`` the parallel efficiency measured with
2 workers here (on a machine with a core or GPU per worker, e is near 1).

Usage: python benchmarks/scale.py [--queries 64] [--shard-size 8] [--cpus-per-worker 0.5]
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import torch

from tokenopt.collect import CollectConfig, collect
from tokenopt.collect.ray import RayConfig, collect_ray
from tokenopt.demo.suite import SuiteConfig, generate_suite, write_jsonl
from tokenopt.table import load_outcomes

BUDGETS = [0, 4, 8, 16, 32]
MODES = ["greedy", "sc5", "beam3"]


def _config(out: Path, data: Path, args: argparse.Namespace) -> CollectConfig:
    return CollectConfig(
        out=str(out),
        data=str(data),
        budgets=BUDGETS,
        modes=MODES,
        batch_size=args.batch_size,
        shard_size=args.shard_size,
        device="cpu",
    )


def _timed(run) -> float:
    started = time.perf_counter()
    run()
    return time.perf_counter() - started


def _rows(directory: Path) -> list[tuple]:
    table = load_outcomes(directory).select(["id", "action", "answer", "em", "billed_tokens"])
    return sorted(zip(*[table.column(name).to_pylist() for name in table.column_names], strict=True))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--queries", type=int, default=64)
    parser.add_argument("--shard-size", type=int, default=8)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--cpus-per-worker", type=float, default=0.5)
    parser.add_argument("--threads", type=int, default=1, help="torch threads of the single-process run")
    parser.add_argument("--repeats", type=int, default=2, help="runs of each path; the fastest counts (shared CPUs)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    n_actions = len(BUDGETS) * len(MODES)

    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        data = root / "questions.jsonl"
        write_jsonl(generate_suite(SuiteConfig(n_queries=args.queries, seed=3)), data)

        walls: dict[str, float] = {}
        for repeat in range(args.repeats):
            reference = root / f"single{repeat}"
            single = _timed(lambda reference=reference: collect(_config(reference, data, args)))
            walls["single process"] = min(walls.get("single process", single), single)
            for workers in (1, 2):
                ray_config = RayConfig(workers=workers, cpus_per_worker=args.cpus_per_worker)
                out = root / f"ray{workers}-{repeat}"
                name = f"Ray, {workers} worker{'s' if workers > 1 else ''}"
                wall = _timed(lambda out=out, ray_config=ray_config: collect_ray(_config(out, data, args), ray_config))
                walls[name] = min(walls.get(name, wall), wall)
                if _rows(out) != _rows(reference):
                    raise SystemExit(f"the {workers}-worker table differs from the single-process one")
        # Every shard reused: the driver's fixed cost alone (LM load, prompts, features).
        setup = _timed(lambda: collect(_config(root / "single0", data, args)))
        single = walls["single process"]

    print(f"fastest of {args.repeats} runs each; {args.queries} demo queries x {n_actions} actions "
          f"({len(MODES)} modes x {len(BUDGETS)} budgets), "
          f"shards of {args.shard_size}, batch {args.batch_size}, {torch.get_num_threads()} torch thread(s), "
          f"{args.cpus_per_worker:g} CPU per Ray worker")  # fmt: skip
    print(f"{'path':<18} {'wall s':>8} {'queries/s':>10}")
    for name, wall in walls.items():
        print(f"{name:<18} {wall:8.1f} {args.queries / wall:10.2f}")
    print("(the Ray rows include starting Ray and loading the LM in every actor; tables identical to one process)")

    work = single - setup
    per_action = work / (args.queries * n_actions)
    ray_start = max(walls["Ray, 1 worker"] - single, 0.0)
    two_worker_work = max(walls["Ray, 2 workers"] - setup - ray_start, 1e-9)
    efficiency = min(work / (2 * two_worker_work), 1.0)
    print(
        f"\nmodel inputs: c = {1000 * per_action:.2f} ms per (query, action) on one worker; setup = {setup:.1f} s; "
        f"ray_start = {ray_start:.1f} s; parallel efficiency with 2 workers here e = {efficiency:.2f}"
    )
    print("wall(Q, A, W) = setup + ray_start + Q*A*c / (W*e); cost = W * wall worker-seconds")
    print(f"{'queries':>9} {'actions':>7} {'workers':>7} {'e':>5} {'wall':>10} {'queries/s':>10} {'worker-h':>9}")
    for queries in (10_000, 100_000):
        for workers, e in ((1, 1.0), (2, efficiency), (8, 1.0), (32, 1.0)):
            wall = setup + (ray_start if workers > 1 else 0.0) + queries * n_actions * per_action / (workers * e)
            print(
                f"{queries:>9,} {n_actions:>7} {workers:>7} {e:>5.2f} {wall / 60:>8.1f} m "
                f"{queries / wall:>10.1f} {workers * wall / 3600:>9.2f}"
            )
    print("(W > 2 assumes a core or GPU per worker, e = 1; the cost grows with Q*A, the wall time shrinks with W)")


if __name__ == "__main__":
    main()
