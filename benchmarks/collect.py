"""Shared-prefix collection against the naive per-budget loop, on the demo LM.

Prints, measured side by side in one run:
- LM forward tokens and wall time of shared-prefix decoding (one reasoning pass per
  query and mode, answers branched off the cache at every budget) against running
  each budget separately, for 6 budgets and the modes greedy, sc5 and beam3;
- queries per second of the full collection step at batch sizes 1, 8 and 32;
- peak memory.

Usage: python benchmarks/collect.py [--queries 256] [--device auto] [--threads 2]
"""

from __future__ import annotations

import argparse
import resource
import time

import torch

from tokenopt.actions import parse_modes
from tokenopt.data import assign_split
from tokenopt.demo.suite import SuiteConfig, generate_suite
from tokenopt.lm.backend import TransformersLM
from tokenopt.lm.decoding import DecodeStats, decode_with_budgets

BUDGETS = [0, 2, 4, 8, 16, 32]
MODES = "greedy,sc5,beam3"


def _run(lm, prompts, modes, budgets_list, batch_size):
    stats = DecodeStats()
    started = time.perf_counter()
    for mode in modes:
        for start in range(0, len(prompts), batch_size):
            batch = prompts[start : start + batch_size]
            seeds = list(range(start, start + len(batch)))
            for budgets in budgets_list:
                _, _, call = decode_with_budgets(lm.model, batch, mode, budgets, lm.settings, seeds)
                stats.add(call)
    return stats, time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--queries", type=int, default=256, help="demo test-split queries to decode")
    parser.add_argument("--device", default="auto", help="auto, cpu or cuda")
    parser.add_argument("--threads", type=int, default=2, help="CPU threads for torch")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    lm = TransformersLM(device=args.device)
    suite = [r for r in generate_suite(SuiteConfig(n_queries=3000)) if assign_split(str(r["id"])) == "test"]
    questions = [str(r["question"]) for r in suite[: args.queries]]
    prompts = [lm.encode_prompt(q) for q in questions]
    modes = parse_modes(MODES)
    print(f"device {lm.device}, {len(prompts)} demo test queries, budgets {BUDGETS}, modes {MODES}")

    _run(lm, prompts[:32], modes, [BUDGETS], 32)  # warm-up
    shared, shared_s = _run(lm, prompts, modes, [BUDGETS], 32)
    naive, naive_s = _run(lm, prompts, modes, [[b] for b in BUDGETS], 32)
    print("\n| method (batch 32) | forward tokens | forward calls | wall s |")
    print("|---|---|---|---|")
    print(f"| shared prefix | {shared.forward_tokens:,} | {shared.forward_calls:,} | {shared_s:.2f} |")
    print(f"| naive per budget | {naive.forward_tokens:,} | {naive.forward_calls:,} | {naive_s:.2f} |")
    print(
        f"\nshared prefix runs {naive.forward_tokens / shared.forward_tokens:.2f}x fewer forward tokens "
        f"and is {naive_s / shared_s:.2f}x faster in wall time"
    )

    print("\n| batch size | queries/s (all modes, all budgets) |")
    print("|---|---|")
    subset = prompts[:64]
    for batch_size in (1, 8, 32):
        _, seconds = _run(lm, subset, modes, [BUDGETS], batch_size)
        print(f"| {batch_size} | {len(subset) / seconds:.1f} |")
    peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(f"\npeak resident memory {peak_mb:.0f} MB")
    if lm.device.type == "cuda":
        print(f"peak CUDA memory {torch.cuda.max_memory_allocated() / 2**20:.0f} MB")


if __name__ == "__main__":
    main()
