"""Serving throughput, latency and billed tokens: the policy vs a fixed max_tokens, side by side.

Starts `tokenopt serve` on the demo LM twice, one after the other on the same
machine: once with the learned policy, once with a policy that always picks the
largest budget with greedy decoding (what a server with a fixed ``max_tokens`` and
budget forcing does). Both get the same requests (demo test questions) from this
process at the same concurrency. Prints requests per second, p50/p99 latency, mean
billed tokens, EM against the gold answers, the ratios, and the policy's share of the
request latency (from the decision log).

    python benchmarks/serve.py --policy runs/demo/run/policy [--requests 1000] [--concurrency 32]
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import json
import shutil
import sqlite3
import sys
import tempfile
import time
from pathlib import Path

import httpx
import numpy as np

from tokenopt.demo.suite import SuiteConfig, generate_suite
from tokenopt.scoring import exact_match
from tokenopt.serve import read_decisions

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from serving import serve_processes  # noqa: E402  (one home for the loopback helpers: tests/serving.py)


def fixed_policy(policy: Path, out: Path) -> str:
    """Copy a policy whose output always picks the largest greedy budget; return that action."""
    shutil.copytree(policy, out)
    spec = json.loads((out / "policy.json").read_text())
    actions = [a for a in spec["actions"] if a["mode"] == "greedy"]
    target = max(actions, key=lambda a: a["budget"])
    index = spec["actions"].index(target)
    with np.load(out / "policy.npz", allow_pickle=False) as data:
        arrays = {name: data[name] for name in data.files}
    for member in spec["members"]:
        last = member["layers"][-1]
        arrays[last["weight"]] = np.zeros_like(arrays[last["weight"]])
        bias = np.zeros_like(arrays[last["bias"]])
        bias[index] = 10.0
        arrays[last["bias"]] = bias
    np.savez(out / "policy.npz", **arrays)
    spec["weights_sha256"] = hashlib.sha256((out / "policy.npz").read_bytes()).hexdigest()
    spec["policy_id"] = f"fixed-{target['name']}"
    (out / "policy.json").write_text(json.dumps(spec, indent=2))
    return str(target["name"])


async def drive(url: str, items: list[dict], concurrency: int) -> list[tuple[float, dict]]:
    gate = asyncio.Semaphore(concurrency)
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    async with httpx.AsyncClient(base_url=url, timeout=300, limits=limits) as client:

        async def one(item: dict) -> tuple[float, dict]:
            async with gate:
                started = time.perf_counter()
                response = await client.post("/v1/completions", json={"prompt": item["question"], "seed": 0})
                response.raise_for_status()
                return time.perf_counter() - started, response.json()

        return await asyncio.gather(*(one(item) for item in items))


def measure(policy: Path, items: list[dict], concurrency: int, threads: int, work: Path) -> dict[str, float]:
    log = work / f"{policy.name}.sqlite"
    arguments = ["--policy", str(policy), "--log", str(log), "--device", "cpu", "--threads", str(threads),
                 "--max-queue", str(len(items))]  # fmt: skip
    folder = work / f"{policy.name}-output"
    folder.mkdir(exist_ok=True)
    with serve_processes(arguments, log_dir=folder) as (url,):
        asyncio.run(drive(url, items[:concurrency], concurrency))  # warm-up
        started = time.perf_counter()
        results = asyncio.run(drive(url, items, concurrency))
        wall = time.perf_counter() - started
    latencies = np.array([latency for latency, _ in results]) * 1000.0
    tokens = np.array([body["usage"]["completion_tokens"] for _, body in results], dtype=float)
    answers = [body["tokenopt"]["answer"] for _, body in results]
    em = np.mean([exact_match(answer, item["answers"]) for answer, item in zip(answers, items, strict=True)])
    rows = read_decisions(log)
    with sqlite3.connect(log) as connection:
        policy_ms, latency_ms = connection.execute("SELECT AVG(policy_ms), AVG(latency_ms) FROM decisions").fetchone()
    return {
        "requests_per_s": len(items) / wall,
        "p50_ms": float(np.percentile(latencies, 50)),
        "p99_ms": float(np.percentile(latencies, 99)),
        "billed_tokens": float(tokens.mean()),
        "em": float(em),
        "policy_ms": float(policy_ms),
        "policy_share": float(policy_ms / latency_ms),
        "logged": float(len(rows)),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--policy", type=Path, default=Path("runs/demo/run/policy"))
    parser.add_argument("--requests", type=int, default=1000)
    parser.add_argument("--concurrency", type=int, default=32)
    parser.add_argument("--threads", type=int, default=1, help="torch threads of each server")
    args = parser.parse_args()
    # Fresh demo questions (another seed than the training suite's).
    items = generate_suite(SuiteConfig(n_queries=args.requests, seed=99))
    with tempfile.TemporaryDirectory() as folder:
        work = Path(folder)
        fixed = work / "fixed"
        action = fixed_policy(args.policy, fixed)
        learned = measure(args.policy, items, args.concurrency, args.threads, work)
        baseline = measure(fixed, items, args.concurrency, args.threads, work)
    print(f"{args.requests} requests at concurrency {args.concurrency}, demo LM on CPU ({args.threads} torch thread)")
    print(f"{'':24}{'policy':>12}{'fixed ' + action:>18}{'ratio':>10}")
    for key, label in [
        ("requests_per_s", "requests/s"),
        ("p50_ms", "p50 latency ms"),
        ("p99_ms", "p99 latency ms"),
        ("billed_tokens", "billed tokens/request"),
        ("em", "EM"),
        ("policy_ms", "policy ms/request"),
        ("policy_share", "policy share of latency"),
    ]:
        ratio = learned[key] / baseline[key] if baseline[key] else float("nan")
        print(f"{label:24}{learned[key]:12.4g}{baseline[key]:18.4g}{ratio:10.3f}")
    expected = args.requests + args.concurrency
    print(
        f"decision-log rows: {int(learned['logged'])} and {int(baseline['logged'])} of {expected} "
        f"({args.requests} measured + {args.concurrency} warm-up requests per server)"
    )


if __name__ == "__main__":
    main()
