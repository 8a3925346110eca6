"""Budget control while the traffic mix shifts: a server holding a token budget vs a fixed lambda.

Starts two `tokenopt serve` processes on the demo LM with the same price-conditioned
policy: one with ``--token-budget`` (the controller sets lambda), one without (the policy
decides at its default lambda, fixed). Both get the same open-loop traffic from this
process, a fixed number of requests per second (test-split questions), whose mix
shifts twice: easy, then hard, then easy. Easy and hard are families of the table: the
families on which the fixed policy bills less than the median family are easy. A phase
sends ``--hard-shares`` (easy phase, hard phase) of its requests from the hard
families, in blocks of 20 requests with exact family counts (shuffled within the
block), so that a window's spend varies with the questions, not with how many hard ones
it happened to draw.

The target is the middle of the spend both mixes can reach within the policy's lambda
range, estimated from the table (the billed tokens of the action the policy picks at
each end of the range): a budget the controller can hold in every phase. The
fixed-lambda server decides at the policy's default lambda. The script prints, per reporting window, each server's
spend against the target and the controller's lambda; per phase, after a stated settling
time, the mean spend against the target and EM against the gold answers; and it writes
the plot (OUT.png) and the raw series (OUT.json); the tables go to docs/results/budget_control.md by hand.

    python benchmarks/budget_control.py --policy POLICY --table TABLE \
        [--rate 12] [--phase-seconds 300] [--settle-seconds 120] [--out docs/results/budget_control]

The controller runs with the server's defaults compressed five times in time
(``--budget-window 12 --budget-interval 2``: the defaults are 60 s and 10 s) so that a
phase fits in minutes; the step (0.25), the clip (0.1 in log lambda per update) and the
minimum count of requests in the window (20) are the server's defaults. The clip bounds
how fast lambda can move: 0.05 per second here, so crossing a factor of e^3 in lambda
takes a minute, which is why a phase settles for two minutes before it is scored.

A window's spend varies with the questions it happens to hold, whatever the controller
does: the script prints that noise floor, the spread of the fixed-lambda server's windows
around its own phase mean, beside the share of windows within +-5% of the target.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import numpy as np

from tokenopt.runtime import BudgetPolicy
from tokenopt.scoring import exact_match
from tokenopt.serve.budget import ControlSettings
from tokenopt.table.reader import OutcomeMatrix

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from serving import serve_processes  # noqa: E402  (one home for the loopback helpers: tests/serving.py)

SERVER = ControlSettings()
"""The server's controller defaults; the benchmark keeps step, clip and min_requests and compresses time."""
TIME_COMPRESSION = 5.0
"""The benchmark's window and interval are the server's defaults divided by this, so that a phase fits in minutes."""


@contextlib.contextmanager
def server(policy: Path, folder: Path, extra: list[str]) -> Iterator[str]:
    """A ``tokenopt serve`` process of ``policy`` logging to ``folder``; yields its base URL."""
    arguments = ["--policy", str(policy), "--log", str(folder / "decisions.sqlite"), "--device", "cpu",
                 "--threads", "1", *extra]  # fmt: skip
    with serve_processes(arguments, timeout=120, log_dir=folder) as (url,):
        yield url


def table_spend(policy: BudgetPolicy, matrix: OutcomeMatrix, questions: dict[str, str], rows: np.ndarray,
                cost_weight: float) -> np.ndarray:  # fmt: skip
    """Billed tokens the policy's action gets on each row (from the table), at this lambda."""
    decisions = policy.decide_batch([questions[matrix.ids[i]] for i in rows], cost_weight=cost_weight)
    columns = [matrix.actions.index(d.action) for d in decisions]
    return matrix.billed_tokens[rows, columns]


async def replay(
    urls: dict[str, str], schedule: list[dict[str, str]], rate: float, lambda_url: str
) -> tuple[dict[str, list[tuple[float, float, bool]]], list[tuple[float, float]]]:
    """Send request i at i / rate seconds to every server; collect (sent at, billed tokens, correct)."""
    results: dict[str, list[tuple[float, float, bool]]] = {name: [] for name in urls}
    lambdas: list[tuple[float, float]] = []
    # Idle connections are dropped before the server's keep-alive timeout (uvicorn: 5 s): reusing one the server
    # is closing at that moment fails the request with a read error.
    limits = httpx.Limits(max_connections=256, max_keepalive_connections=256, keepalive_expiry=1.0)
    async with httpx.AsyncClient(timeout=300, limits=limits) as client:
        start = time.perf_counter()

        async def one(name: str, url: str, item: dict[str, str], sent: float) -> None:
            response = await client.post(f"{url}/v1/completions", json={"prompt": item["question"], "seed": 0})
            response.raise_for_status()
            body = response.json()
            correct = exact_match(body["tokenopt"]["answer"], item["answers"])
            results[name].append((sent, float(body["usage"]["completion_tokens"]), bool(correct)))

        async def watch() -> None:
            while True:
                text = (await client.get(f"{lambda_url}/metrics")).text
                for line in text.splitlines():
                    if line.startswith('tokenopt_cost_weight{arm="A"}'):
                        lambdas.append((time.perf_counter() - start, float(line.rsplit(" ", 1)[1])))
                await asyncio.sleep(1.0)

        watcher = asyncio.ensure_future(watch())
        tasks = []
        for index, item in enumerate(schedule):
            sent = index / rate
            delay = start + sent - time.perf_counter()
            if delay > 0:
                await asyncio.sleep(delay)
            tasks += [asyncio.ensure_future(one(name, url, item, sent)) for name, url in urls.items()]
        await asyncio.gather(*tasks)
        watcher.cancel()
    return results, lambdas


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--policy", type=Path, required=True, help="a price-conditioned policy folder")
    parser.add_argument("--table", type=Path, required=True, help="its outcome table (questions.jsonl beside or in it)")
    parser.add_argument("--rate", type=float, default=12.0, help="requests per second")
    parser.add_argument("--phase-seconds", type=float, default=300.0)
    parser.add_argument("--settle-seconds", type=float, default=120.0, help="left out of each phase's figures")
    parser.add_argument("--report-seconds", type=float, default=30.0, help="reporting window")
    parser.add_argument("--budget-window", type=float, default=SERVER.window / TIME_COMPRESSION,
                        help="the controller's window (s)")  # fmt: skip
    parser.add_argument("--budget-interval", type=float, default=SERVER.interval / TIME_COMPRESSION,
                        help="the controller's update interval (s)")  # fmt: skip
    parser.add_argument("--budget-step", type=float, default=SERVER.step, help="the controller's step size")
    parser.add_argument("--budget-min-requests", type=int, default=SERVER.min_requests,
                        help="the controller's minimum in a window")  # fmt: skip
    parser.add_argument("--hard-shares", default="0.2,0.8", help="share of hard queries: easy phase, hard phase")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--plan-only", action="store_true", help="print the mixes and the target, serve nothing")
    parser.add_argument("--out", type=Path, default=Path("docs/results/budget_control"))
    args = parser.parse_args()
    if args.phase_seconds % args.report_seconds or args.settle_seconds % args.report_seconds:
        parser.error(f"--phase-seconds ({args.phase_seconds:g}) and --settle-seconds ({args.settle_seconds:g}) "
                     f"must be multiples of --report-seconds ({args.report_seconds:g})")  # fmt: skip

    policy = BudgetPolicy.load(args.policy)
    if policy.cost_weight_range is None or policy.cost_weight is None:
        raise SystemExit(f"{args.policy} is not price-conditioned: train it with --cost-weight-range LOW:HIGH")
    matrix = OutcomeMatrix.from_table(args.table)
    source = args.table / "questions.jsonl"
    source = source if source.is_file() else args.table.parent / "questions.jsonl"
    items = {row["id"]: row for row in map(json.loads, source.read_text().splitlines())}
    questions = {key: str(row["question"]) for key, row in items.items()}
    assert matrix.families is not None
    test = np.flatnonzero(matrix.splits == "test")
    fixed_spend = table_spend(policy, matrix, questions, test, policy.cost_weight)
    families = sorted(set(matrix.families[test]))
    by_family = {f: float(fixed_spend[matrix.families[test] == f].mean()) for f in families}
    median = float(np.median(list(by_family.values())))

    rng = np.random.default_rng(args.seed)
    per_phase = int(args.phase_seconds * args.rate)
    phases = ["easy", "hard", "easy"]
    shares = dict(zip(["easy", "hard"], (float(v) for v in args.hard_shares.split(",")), strict=True))
    groups = {
        "easy": [test[matrix.families[test] == f] for f in families if by_family[f] < median],
        "hard": [test[matrix.families[test] == f] for f in families if by_family[f] >= median],
    }
    block = 20
    schedule_rows: list[int] = []
    for phase in phases:
        hard_count = round(shares[phase] * block)
        phase_rows: list[int] = []
        while len(phase_rows) < per_phase:  # a block: exact counts per family group, in random order
            picks = [int(rng.choice(groups["hard"][k % len(groups["hard"])])) for k in range(hard_count)]
            picks += [int(rng.choice(groups["easy"][k % len(groups["easy"])])) for k in range(block - hard_count)]
            phase_rows += [int(i) for i in rng.permutation(picks)]
        schedule_rows += phase_rows[:per_phase]
    rows = np.array(schedule_rows)
    low, high = policy.cost_weight_range
    print(f"policy {policy.policy_id}: lambda range {low:g}:{high:g}, default {policy.cost_weight:g}")
    print("families by the fixed policy's billed tokens:", {f: round(v, 1) for f, v in by_family.items()})
    reach = {}
    for name, phase_rows in (("easy", rows[:per_phase]), ("hard", rows[per_phase : 2 * per_phase])):
        at_low = table_spend(policy, matrix, questions, phase_rows, low).mean() * args.rate
        at_high = table_spend(policy, matrix, questions, phase_rows, high).mean() * args.rate
        fixed = table_spend(policy, matrix, questions, phase_rows, policy.cost_weight).mean() * args.rate
        reach[name] = (at_high, at_low)
        print(f"{name} mix (table): {at_high:.1f} tokens/s at lambda {high:g} .. {at_low:.1f} at {low:g}; "
              f"{fixed:.1f} at the default")  # fmt: skip
    floor, ceiling = max(r[0] for r in reach.values()), min(r[1] for r in reach.values())
    if floor >= ceiling:
        raise SystemExit(f"no budget both mixes can meet ({floor:.1f} > {ceiling:.1f} tokens/s): shift the mix less")
    target = (floor + ceiling) / 2
    print(f"target: {target:.1f} tokens/s ({args.rate:g} requests/s), the middle of {floor:.1f}..{ceiling:.1f}")
    if args.plan_only:
        return
    schedule = [{"question": questions[matrix.ids[i]], "answers": items[matrix.ids[i]]["answers"]} for i in rows]

    args.out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as scratch:
        folders = {name: Path(scratch) / name for name in ("budget", "fixed")}
        for folder in folders.values():
            folder.mkdir()
        budget = ["--token-budget", f"{target * 60:.0f}/min", "--budget-window", str(args.budget_window),
                  "--budget-interval", str(args.budget_interval), "--budget-step", str(args.budget_step),
                  "--budget-min-requests", str(args.budget_min_requests)]  # fmt: skip
        with (
            server(args.policy, folders["budget"], budget) as budget_url,
            server(args.policy, folders["fixed"], []) as fixed_url,
        ):
            results, lambdas = asyncio.run(
                replay({"budget": budget_url, "fixed": fixed_url}, schedule, args.rate, budget_url)
            )

    window = args.report_seconds
    edges = np.arange(0.0, len(schedule) / args.rate + 1e-9, window)
    series: dict[str, list[float]] = {}
    for name, samples in results.items():
        sent = np.array([s[0] for s in samples])
        tokens = np.array([s[1] for s in samples])
        series[name] = [float(tokens[(sent >= a) & (sent < a + window)].sum() / window) for a in edges[:-1]]
    lambda_times = np.array([t for t, _ in lambdas])
    lambda_at = [float(lambdas[int(np.searchsorted(lambda_times, a + window) - 1)][1]) for a in edges[:-1]]

    lines = [
        "| window (s) | phase | budgeted: tokens/s (vs target) | lambda | fixed: tokens/s (vs target) |",
        "|---|---|---|---|---|",
    ]
    for k, a in enumerate(edges[:-1]):
        phase = phases[min(int(a // args.phase_seconds), 2)]
        b, f = series["budget"][k], series["fixed"][k]
        lines.append(f"| {a:.0f}-{a + window:.0f} | {phase} | {b:.1f} ({b / target - 1:+.1%}) | {lambda_at[k]:.4f} | "
                     f"{f:.1f} ({f / target - 1:+.1%}) |")  # fmt: skip
    summary = [
        "| phase | seconds (after settling) | budgeted: spend vs target | budgeted EM | fixed: spend vs target "
        "| fixed EM |",
        "|---|---|---|---|---|---|",
    ]
    figures: dict[str, dict[str, float]] = {}
    for p, phase in enumerate(phases):
        begin, end = p * args.phase_seconds + args.settle_seconds, (p + 1) * args.phase_seconds
        row = {}
        for name, samples in results.items():
            kept = [s for s in samples if begin <= s[0] < end]
            row[f"{name}_spend"] = sum(s[1] for s in kept) / (end - begin) / target - 1
            row[f"{name}_em"] = float(np.mean([s[2] for s in kept]))
        figures[f"{p + 1}:{phase}"] = row
        summary.append(
            f"| {p + 1}: {phase} | {begin:.0f}-{end:.0f} | {row['budget_spend']:+.1%} | {row['budget_em']:.3f} | "
            f"{row['fixed_spend']:+.1%} | {row['fixed_em']:.3f} |"
        )
    post = [k for k, a in enumerate(edges[:-1]) if a % args.phase_seconds >= args.settle_seconds]
    per_window = round(args.phase_seconds / window)  # windows per phase
    within = {name: float(np.mean([abs(series[name][k] / target - 1) <= 0.05 for k in post])) for name in series}
    text = "\n".join(summary) + "\n\n" + "\n".join(lines)
    print(text)
    closing = f"budgeted {within['budget']:.0%}, fixed {within['fixed']:.0%}"
    print(f"{window:g}-second windows after settling within +-5% of the target: {closing}")
    # the traffic's own noise at this window size: the fixed server's windows around its phase mean
    fixed = np.array(series["fixed"])[post]
    phase_of = np.array(post) // per_window
    phase_mean = {p: fixed[phase_of == p].mean() for p in set(phase_of)}
    noise = float(np.std([value / phase_mean[p] - 1 for value, p in zip(fixed, phase_of, strict=True)]))
    print(f"noise floor: the fixed-lambda server's {window:g}-second windows vary around their phase mean by "
          f"{noise:.1%} (standard deviation)")  # fmt: skip

    record = {
        "target_tokens_per_second": target, "rate": args.rate, "phase_seconds": args.phase_seconds,
        "settle_seconds": args.settle_seconds, "report_seconds": window, "hard_shares": args.hard_shares,
        "budget_window": args.budget_window, "budget_interval": args.budget_interval, "budget_step": args.budget_step,
        "budget_min_requests": args.budget_min_requests,
        "policy": str(args.policy), "table": str(args.table), "series": series, "lambda": lambdas,
        "phases": figures, "within_5_percent": within, "noise_floor": noise, "command": " ".join(sys.argv),
        "default_cost_weight": policy.cost_weight,
    }  # fmt: skip
    args.out.with_suffix(".json").write_text(json.dumps(record, indent=1))
    plot(record, args.out.with_suffix(".png"))


def plot(record: dict, path: Path) -> None:
    """Spend per window against the target (both servers), and the controller's lambda over time."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    window, phase_seconds, target = (
        record["report_seconds"],
        record["phase_seconds"],
        record["target_tokens_per_second"],
    )
    series, lambdas = record["series"], record["lambda"]
    middles = window * (np.arange(len(series["budget"])) + 0.5)
    end = window * len(series["budget"])
    figure, (top, bottom) = plt.subplots(2, 1, figsize=(8, 5.5), sharex=True, height_ratios=[3, 1.4])
    top.plot(middles, series["budget"], marker="o", label="--token-budget (controller)")
    top.plot(middles, series["fixed"], marker="s", label=f"fixed lambda {record['default_cost_weight']:g}")
    top.axhline(target, color="black", linestyle="--", label="target")
    top.fill_between([0, end], target * 0.95, target * 1.05, color="grey", alpha=0.15, label="target +-5%")
    bottom.plot([t for t, _ in lambdas], [v for _, v in lambdas], color="tab:blue")
    bottom.set_yscale("log")
    for axis in (top, bottom):
        for p in range(3):
            axis.axvspan(p * phase_seconds, p * phase_seconds + record["settle_seconds"], color="orange", alpha=0.08)
            if p:
                axis.axvline(p * phase_seconds, color="grey", linewidth=0.8)
    low, high = top.get_ylim()
    top.set_ylim(low, high + (high - low) * 0.25)  # room for the legend and the phase names
    for p, phase in enumerate(["easy", "hard", "easy"]):
        top.text((p + 0.5) * phase_seconds, high + (high - low) * 0.02, phase, ha="center", va="bottom")
    top.set_ylabel(f"billed tokens/s ({window:g} s windows)")
    top.legend(loc="upper left", fontsize=7, ncol=4)
    bottom.set_ylabel("lambda")
    bottom.set_xlabel("seconds (orange: settling, left out of the phase figures)")
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)


if __name__ == "__main__":
    main()
