"""Environment steps per second on an outcome table, single and vectorised.

Usage: python benchmarks/env.py TABLE_DIR [--steps 20000]
"""

from __future__ import annotations

import argparse
import time

import numpy as np
from stable_baselines3.common.env_util import make_vec_env

from tokenopt.envs import TableSource, TokenBudgetEnv, TokenBudgetStreamEnv


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("table")
    parser.add_argument("--steps", type=int, default=20000)
    args = parser.parse_args()
    source = TableSource(args.table, "train")
    print("| environment | envs | steps/s |")
    print("|---|---|---|")
    for name, env_class in (("TokenBudget-v0", TokenBudgetEnv), ("TokenBudgetStream-v0", TokenBudgetStreamEnv)):
        env = env_class(source=source)
        env.reset(seed=0)
        rng = np.random.default_rng(0)
        actions = rng.integers(len(env.actions), size=args.steps)
        started = time.perf_counter()
        for action in actions:
            _, _, terminated, truncated, _ = env.step(int(action))
            if terminated or truncated:
                env.reset()
        print(f"| {name} | 1 | {args.steps / (time.perf_counter() - started):,.0f} |")
        vec_env = make_vec_env(env_class, n_envs=8, seed=0, env_kwargs={"source": source})
        vec_env.reset()
        batches = rng.integers(len(env.actions), size=(args.steps // 8, 8))
        started = time.perf_counter()
        for batch in batches:
            vec_env.step(batch)
        print(f"| {name} | 8 (DummyVecEnv) | {len(batches) * 8 / (time.perf_counter() - started):,.0f} |")


if __name__ == "__main__":
    main()
