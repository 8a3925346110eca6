"""The numpy runtime policy against SB3's model.predict, on the same observations.

Prints decisions per second and p50/p99 latency at batch 1 and 64 for
``BudgetPolicy.probabilities`` (argmax) and for ``model.predict(deterministic=True)``
(with VecNormalize), their ratio (issue 13's goal: >= 20x at batch 1), and, for a
500-character prompt, the cost of feature extraction and of ``decide()`` end to end
(goal: p50 <= 100 us), each beside the original per-character loop (kept in
tests/test_features_fast.py as the reference) on the same machine. Features are timed
on the same prompt repeated (its word buckets cached after the first call) and on
distinct prompts (cache cold for every new word pair).

Usage: python benchmarks/runtime.py RUN_DIR [--repeats 2000]
"""

from __future__ import annotations

import argparse
import pickle
import sys
import time
from pathlib import Path

import numpy as np
import torch

from tokenopt.agents.common.run_dir import RunDir
from tokenopt.runtime import BudgetPolicy

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from test_features_fast import reference_features  # noqa: E402  (the original loop, for the side-by-side)


def _side_by_side(functions: dict, inputs: list, repeats: int, block: int = 50) -> dict[str, np.ndarray]:
    """Wall-clock seconds of every call, the functions taking turns in blocks of ``block`` calls.

    Taking turns gives every function the same share of whatever else the machine runs
    (these machines are shared), so their ratios hold even when the absolute figures
    move; blocks rather than single calls keep each function's own caches warm, as in a
    server that calls it again and again. The first block of each is a warm-up.
    """
    times: dict[str, list[float]] = {name: [] for name in functions}
    for start in range(0, repeats + block, block):
        for name, function in functions.items():
            for i in range(start, start + block):
                item = inputs[i % len(inputs)]
                started = time.perf_counter()
                function(item)
                if start:
                    times[name].append(time.perf_counter() - started)
    return {name: np.array(values) for name, values in times.items()}


def _us(times: np.ndarray, q: float) -> str:
    return f"{np.percentile(times, q) * 1e6:,.1f}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run", type=Path, help="run folder with checkpoints/ and policy/")
    parser.add_argument("--repeats", type=int, default=2000)
    args = parser.parse_args()
    torch.set_num_threads(1)
    from stable_baselines3 import PPO

    policy = BudgetPolicy.load(args.run / "policy")
    if policy.features.prompt is None or policy.features.needs_hidden:
        parser.error(f"this benchmark times prompt-text policies; {args.run} has {policy.features.name}")
    prompt_spec = policy.features.prompt.spec
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
        results = _side_by_side({"tokenopt runtime": runtime, "SB3 model.predict": sb3}, batches, args.repeats)
        for name, times in results.items():
            print(f"| {size} | {name} | {size / times.mean():,.0f} | {_us(times, 50)} | {_us(times, 99)} |")
        sb3_times, runtime_times = results["SB3 model.predict"], results["tokenopt runtime"]
        ratio = np.percentile(sb3_times, 50) / np.percentile(runtime_times, 50)
        goal = " (goal >= 20x)" if size == 1 else ""
        print(f"| {size} | runtime speed-up{goal}, p50 over p50 | {ratio:.1f}x | | |")

    long_prompt = ("Question: what is the total cost of 3 apples at 1.25 each and 4 pears at 0.75 each? " * 6)[:500]
    distinct = iter([f"{i} {long_prompt}"[:500] for i in range(args.repeats * 2)])
    loop = _side_by_side(
        {
            "features, original per-character loop": lambda text: reference_features(prompt_spec, text),
            "features, same prompt repeated": policy.features,
        },
        [long_prompt],
        max(args.repeats // 5, 100),
    )
    fast = _side_by_side(
        {
            "features, same prompt repeated": policy.features,
            "features, a new prompt each call": lambda _: policy.features(next(distinct)),
            "decide() end to end (features, forward, Decision)": policy.decide,
        },
        [long_prompt],
        args.repeats,
    )
    print("\n| 500-character prompt | p50 us | p99 us |")
    print("|---|---|---|")
    print(f"| features, original per-character loop | {_us(loop['features, original per-character loop'], 50)} | "
          f"{_us(loop['features, original per-character loop'], 99)} |")  # fmt: skip
    for name, times in fast.items():
        print(f"| {name} | {_us(times, 50)} | {_us(times, 99)} |")
    speedup = np.percentile(loop["features, original per-character loop"], 50) / np.percentile(
        loop["features, same prompt repeated"], 50
    )
    decide = np.percentile(fast["decide() end to end (features, forward, Decision)"], 50) * 1e6
    print(f"\nfeatures speed-up over the loop, side by side (p50): {speedup:.1f}x; decide() p50 {decide:,.1f} us "
          "(goal <= 100 us)")  # fmt: skip


if __name__ == "__main__":
    main()
