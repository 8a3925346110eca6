"""The numpy runtime policy against SB3's model.predict, on the same observations.

Prints decisions per second and p50/p99 latency at batch 1 and 64 for
``BudgetPolicy.probabilities`` (argmax) and for ``model.predict(deterministic=True)``
(with VecNormalize), their ratio, and the cost of feature extraction for a
500-character prompt.

Usage: python benchmarks/runtime.py RUN_DIR [--repeats 2000]
"""

from __future__ import annotations

import argparse
import pickle
import time
from pathlib import Path

import numpy as np
import torch

from tokenopt.agents.common.run_dir import RunDir
from tokenopt.runtime import BudgetPolicy


def _latencies(function, batches, repeats):
    times = []
    for i in range(repeats):
        batch = batches[i % len(batches)]
        started = time.perf_counter()
        function(batch)
        times.append(time.perf_counter() - started)
    return np.array(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run", type=Path, help="run folder with checkpoints/ and policy/")
    parser.add_argument("--repeats", type=int, default=2000)
    args = parser.parse_args()
    torch.set_num_threads(1)
    from stable_baselines3 import PPO

    policy = BudgetPolicy.load(args.run / "policy")
    run = RunDir(args.run)
    model = PPO.load(run.best_model, device="cpu")
    normalizer = pickle.loads(run.vecnormalize.read_bytes())
    rng = np.random.default_rng(0)
    prompts = [
        "C " + "+".join(str(d) for d in rng.integers(1, 10, size=int(rng.integers(2, 7)))) + "?" for _ in range(256)
    ]
    observations = policy.features.batch(prompts)

    def runtime(batch):
        return policy.probabilities(batch).argmax(axis=1)

    def sb3(batch):
        return model.predict(normalizer.normalize_obs(batch), deterministic=True)[0]

    print("| batch | method | decisions/s | p50 us | p99 us |")
    print("|---|---|---|---|---|")
    for size in (1, 64):
        batches = [observations[i : i + size] for i in range(0, len(observations) - size + 1, max(size, 1))]
        results = {}
        for name, function in (("tokenopt runtime", runtime), ("SB3 model.predict", sb3)):
            _latencies(function, batches, 50)
            times = _latencies(function, batches, args.repeats)
            results[name] = times
            print(
                f"| {size} | {name} | {size / times.mean():,.0f} | {np.percentile(times, 50) * 1e6:,.0f} | "
                f"{np.percentile(times, 99) * 1e6:,.0f} |"
            )
        ratio = results["SB3 model.predict"].mean() / results["tokenopt runtime"].mean()
        print(f"| {size} | runtime speed-up | {ratio:.1f}x | | |")
    long_prompt = ("Question: what is the total cost of 3 apples at 1.25 each and 4 pears at 0.75 each? " * 6)[:500]
    times = _latencies(lambda text: policy.features(text), [long_prompt], args.repeats)
    print(f"\nfeature extraction for a 500-character prompt: p50 {np.percentile(times, 50) * 1e6:,.0f} us")
    times = _latencies(lambda text: policy.decide(text), [long_prompt], args.repeats)
    print(f"decide() end to end for a 500-character prompt: p50 {np.percentile(times, 50) * 1e6:,.0f} us")


if __name__ == "__main__":
    main()
