"""Every suite x cost weight x training variant: train as ``tokenopt train`` does, score on test, one table.

For each outcome table, cost weight, variant and seed, the runner calls ``tokenopt train``
in a subprocess (the command users run: PPO, validation, export and the do-no-harm check,
one torch thread) into ``OUT/<suite>/w<weight>/<variant>/seed-<s>/``, then replays the
exported policy on the table's test split from the question text, as a server would.
Per (suite, weight, variant) it reports the seeds' mean per query: reward, EM, billed
tokens and gap recovered, with 95% paired-bootstrap intervals over the test queries, and
beside it each baseline's setting picked on val (fixed action, TALE-style, RouteLLM-style).
A baseline the table cannot replay is shown as ``n/a`` (a greedy-only table has no sc<k>).

A finished cell leaves ``cell.json`` in its run folder and is skipped on a rerun with the
same settings, so an interrupted sweep resumes where it stopped. Results go to
``OUT/results.json`` and, as markdown, to stdout and ``OUT/results.md``.

    python benchmarks/suites.py --table demo=runs/suites/demo/table \\
        --weights 0.01,0.02 --variants none,shaping,warm,both --seeds 0,1 --out runs/suites

Variants are named sets of ``--set`` overrides (see ``VARIANTS``); ``--variant NAME:k=v,k=v``
adds one. ``default`` is the shipped ``agents/configs/ppo.yml`` unchanged. ``--ensemble`` adds,
per (suite, weight, variant), the seeds' runs averaged into one policy as ``tokenopt train
--seeds N --ensemble`` ships it (do no harm applied to the ensemble), with its test reward
minus the seeds' mean, paired.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

from tokenopt.agents.common.evaluation import policy_choices, query_questions
from tokenopt.agents.evaluation.baselines import OperatingPoint
from tokenopt.agents.evaluation.no_harm import LEARNED_POLICY_DIR, split_figures
from tokenopt.agents.evaluation.scoreboard import baseline_points
from tokenopt.cost import CostModel
from tokenopt.runtime import BudgetPolicy
from tokenopt.table import OutcomeMatrix, ReplayTable, evaluate_actions

VARIANTS: dict[str, dict[str, Any]] = {
    "default": {},
    "none": {"reward_baseline": "none", "pretrain_epochs": 0},
    "shaping": {"reward_baseline": "mean", "pretrain_epochs": 0},
    "shaping-best": {"reward_baseline": "best_fixed", "pretrain_epochs": 0},
    "warm": {"reward_baseline": "none", "pretrain_epochs": 100},
    "both": {"reward_baseline": "mean", "pretrain_epochs": 100},
    "warm-er": {
        "reward_baseline": "none",
        "pretrain_epochs": 100,
        "pretrain_objective": "expected_reward",
        "pretrain_temperature": 0.01,
    },
    "both-er": {
        "reward_baseline": "mean",
        "pretrain_epochs": 100,
        "pretrain_objective": "expected_reward",
        "pretrain_temperature": 0.01,
    },
}
"""Training variants: ``--set`` overrides of the shipped hyperparameters."""

BASELINE_METHODS = ("fixed", "TALE-style", "RouteLLM-style")
"""The baselines whose val-picked setting each row shows."""

CELL_FILE = "cell.json"


def parse_variant(text: str) -> tuple[str, dict[str, Any]]:
    """``NAME:key=value,key=value`` (values read as YAML) as (name, overrides).

    Raises:
        ValueError: no name, or a pair without ``=``.
    """
    import yaml

    name, _, body = text.partition(":")
    if not name:
        raise ValueError(f"variant {text!r} has no name: expected NAME:key=value,...")
    overrides: dict[str, Any] = {}
    for pair in filter(None, body.split(",")):
        if "=" not in pair:
            raise ValueError(f"variant {text!r}: {pair!r} is not key=value")
        key, value = pair.split("=", 1)
        overrides[key.strip()] = yaml.safe_load(value)
    return name, overrides


def _tokenopt() -> list[str]:
    script = Path(sys.executable).parent / "tokenopt"
    return [str(script)] if script.is_file() else [sys.executable, "-m", "tokenopt.cli"]


def train_cell(
    table: Path, run_dir: Path, weight: float, seed: int, overrides: dict[str, Any], extra: list[str]
) -> tuple[float, str]:
    """Run ``tokenopt train`` for one cell; (seconds, its output).

    Raises:
        RuntimeError: the command failed (with its output).
    """
    command = [*_tokenopt(), "train", "--table", str(table), "--out", str(run_dir), "--cost-weight", f"{weight:g}",
               "--seed", str(seed), *extra]  # fmt: skip
    for key, value in overrides.items():
        command += ["--set", f"{key}={json.dumps(value)}"]
    env = os.environ | {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    started = time.perf_counter()
    done = subprocess.run(command, capture_output=True, text=True, env=env, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"{' '.join(command)} failed ({done.returncode}):\n{done.stdout}\n{done.stderr}")
    return time.perf_counter() - started, done.stdout


def run_cell(
    table: Path, test: OutcomeMatrix, questions: dict[str, str], run_dir: Path, weight: float, seed: int,
    overrides: dict[str, Any], extra: list[str],
) -> dict[str, Any]:  # fmt: skip
    """Train (unless ``cell.json`` records the same settings) and replay the policies on test."""
    settings = {"table": str(table), "weight": weight, "seed": seed, "overrides": overrides, "extra": extra}
    cell_path = run_dir / CELL_FILE
    if cell_path.is_file():
        cell = json.loads(cell_path.read_text(encoding="utf-8"))
        if cell.get("settings") == settings:
            return dict(cell)
    if run_dir.exists():
        shutil.rmtree(run_dir)
    seconds, output = train_cell(table, run_dir, weight, seed, overrides, extra)
    shipped = run_dir / "policy"
    learned = run_dir / LEARNED_POLICY_DIR if (run_dir / LEARNED_POLICY_DIR).is_dir() else shipped
    summary = json.loads((run_dir / "training.json").read_text(encoding="utf-8"))
    cell = {
        "settings": settings,
        "seconds": seconds,
        "timesteps": summary.get("timesteps"),
        "best_val": summary.get("best_val"),
        "pretrain": summary.get("pretrain"),
        "fallback": learned != shipped,
        "test_columns": {
            "shipped": policy_choices(BudgetPolicy.load(shipped), test, questions).tolist(),
            "learned": policy_choices(BudgetPolicy.load(learned), test, questions).tolist(),
        },
        "output": output[-2000:],
    }
    cell_path.write_text(json.dumps(cell, indent=2) + "\n", encoding="utf-8")
    return cell


def val_picked(
    points: dict[str, list[OperatingPoint]], method: str, cost_model: CostModel, val: OutcomeMatrix,
    test: OutcomeMatrix,
) -> OperatingPoint | None:  # fmt: skip
    """The method's test point whose val twin has the best val reward (as ``tokenopt eval`` picks)."""
    candidates = [k for k, point in enumerate(points["val"]) if point.method == method]
    if not candidates:
        return None

    def val_reward(k: int) -> float:
        point = points["val"][k]
        return float(cost_model.reward(point.exact_match, point.billed_tokens, val.prompt_tokens).mean())

    return points["test"][max(candidates, key=val_reward)]


def _interval(values: Any) -> list[float]:
    return [values.value, values.low, values.high]


def ensemble_cell(run_dirs: list[Path], out: Path, test: OutcomeMatrix, questions: dict[str, str]) -> dict[str, Any]:
    """The seeds' runs as one policy (``tokenopt train --seeds N --ensemble``), do no harm applied, replayed on test.

    The ensemble goes to ``OUT/policy/`` (the fallback where it does not beat the best fixed action on val beyond
    the noise; ``OUT/policy-learned/`` then keeps it), checked with the first run's settings as the CLI does.
    """
    import yaml

    from tokenopt.agents.evaluation.no_harm import apply_no_harm
    from tokenopt.agents.export import export_ensemble

    if out.exists():
        shutil.rmtree(out)
    export_ensemble(run_dirs, out / "policy")
    config = yaml.safe_load((run_dirs[0] / "config.yml").read_text(encoding="utf-8"))
    apply_no_harm(out, config=config)
    learned = out / LEARNED_POLICY_DIR if (out / LEARNED_POLICY_DIR).is_dir() else out / "policy"
    cells = [json.loads((run_dir / CELL_FILE).read_text(encoding="utf-8")) for run_dir in run_dirs]
    return {
        "settings": {"seed": f"ensemble of {len(run_dirs)}"},
        "seconds": float(sum(cell["seconds"] for cell in cells)),
        "fallback": learned != out / "policy",
        "test_columns": {
            "shipped": policy_choices(BudgetPolicy.load(out / "policy"), test, questions).tolist(),
            "learned": policy_choices(BudgetPolicy.load(learned), test, questions).tolist(),
        },
    }


def summarise(
    suite: str, weight: float, variant: str, cells: list[dict[str, Any]], test: OutcomeMatrix, val: OutcomeMatrix,
    points: dict[str, list[OperatingPoint]], left_out: dict[str, str], which: str,
    reference: np.ndarray | None = None,
) -> dict[str, Any]:  # fmt: skip
    """One row: the seeds' per-query mean outcomes with intervals, and the val-picked baselines.

    ``reference``: per-query test rewards to subtract (paired), e.g. the seeds' mean beside their ensemble.
    """
    cost_model = CostModel(weight)
    rows = np.arange(len(test.ids))
    columns = np.array([cell["test_columns"][which] for cell in cells], dtype=np.int64)
    exact = np.mean([test.exact_match[rows, c] for c in columns], axis=0)
    billed = np.mean([test.billed_tokens[rows, c] for c in columns], axis=0)
    baselines: dict[str, dict[str, Any]] = {}
    compare: dict[str, np.ndarray] = {}
    for method in BASELINE_METHODS:
        point = None if method in left_out else val_picked(points, method, cost_model, val, test)
        if point is None:
            baselines[method] = {"reason": left_out.get(method, "no operating point")}
            continue
        figures = split_figures(test, point.exact_match, point.billed_tokens, cost_model)
        baselines[method] = {"setting": point.setting, **{k: _interval(v) for k, v in figures.items()}}
        compare[method] = cost_model.reward(point.exact_match, point.billed_tokens, test.prompt_tokens)
    figures = split_figures(test, exact, billed, cost_model, compare=compare)
    minus_reference = None
    if reference is not None:
        minus_reference = _interval(
            split_figures(test, exact, billed, cost_model, compare={"r": reference})["reward_minus:r"]
        )
    per_seed = [evaluate_actions(test, c, cost_model) for c in columns]
    oracle, best_fixed = float(test.oracle_reward(cost_model)), test.best_fixed(cost_model)[1]
    return {
        "suite": suite,
        "weight": weight,
        "variant": variant,
        "policy": which,
        "seeds": [cell["settings"]["seed"] for cell in cells],
        "queries": len(test.ids),
        **{key: _interval(figures[key]) for key in ("reward", "em", "tokens", "gap_recovered")},
        "reward_minus": {name: _interval(figures[f"reward_minus:{name}"]) for name in compare},
        "seed_gap_recovered": [m["gap_recovered"] for m in per_seed],
        "seed_reward": [m["reward"] for m in per_seed],
        "fallbacks": sum(bool(cell["fallback"]) for cell in cells),
        "oracle_reward": oracle,
        "best_fixed_reward": best_fixed,
        "baselines": baselines,
        "train_seconds": float(np.mean([cell["seconds"] for cell in cells])),
        "rewards": cost_model.reward(exact, billed, test.prompt_tokens).tolist(),
        "minus_reference": minus_reference,
    }


def format_ensembles(rows: list[dict[str, Any]], held_out: str | None) -> str:
    """Each ensemble row beside its seeds' row: test reward [95%] and the paired difference."""
    lines = ["| suite | λ | policy | the seeds' mean | their ensemble | ensemble − seeds' mean [95%] |",
             "|---|---|---|---|---|---|"]  # fmt: skip
    seeds = {(row["suite"], row["weight"], row["variant"], row["policy"]): row for row in rows}
    for row in rows:
        if row.get("minus_reference") is None:
            continue
        variant = row["variant"].rsplit(", ensemble of", 1)[0]
        single = seeds[(row["suite"], row["weight"], variant, row["policy"])]
        name = row["suite"] + (" (held out)" if row["suite"] == held_out else "")
        shipped = row["policy"] + ("" if not row["fallbacks"] else ", fallback" if row["policy"] == "shipped"
                                   else " (the ensemble ships the fallback)")  # fmt: skip
        lines.append(f"| {name} | {row['weight']:g} | {shipped} | {_cell(single['reward'], 3)} | "
                     f"{_cell(row['reward'], 3)} | {_cell(row['minus_reference'], 3)} |")  # fmt: skip
    return "\n".join(lines)


def _cell(values: list[float], digits: int) -> str:
    value, low, high = values
    return f"{value:.{digits}f} [{low:.{digits}f}, {high:.{digits}f}]"


def format_rows(rows: list[dict[str, Any]], held_out: str | None) -> str:
    """The markdown table of the rows."""
    head = ["suite", "λ", "variant", "reward [95%]", "EM", "tokens", "gap recovered [95%]", "gap per seed",
            *[f"{m} (val-picked)" for m in BASELINE_METHODS], "policy − best baseline [95%]"]  # fmt: skip
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for row in rows:
        suite = row["suite"] + (" (held out)" if row["suite"] == held_out else "")
        baselines = []
        for method in BASELINE_METHODS:
            entry = row["baselines"][method]
            baselines.append(_cell(entry["reward"], 3) if "reward" in entry else "n/a")
        diffs = row["reward_minus"]
        if diffs:
            name = max(diffs, key=lambda m: row["baselines"][m]["reward"][0])
            best = f"{_cell(diffs[name], 3)} ({name})"
        else:
            best = "n/a"
        seeds = ", ".join(f"{g:.2f}" for g in row["seed_gap_recovered"])
        fallbacks = f"; {row['fallbacks']} fallback" if row["fallbacks"] else ""
        lines.append(
            "| "
            + " | ".join(
                [
                    suite,
                    f"{row['weight']:g}",
                    row["variant"],
                    _cell(row["reward"], 3),
                    _cell(row["em"], 3),
                    _cell(row["tokens"], 1),
                    _cell(row["gap_recovered"], 2),
                    seeds + fallbacks,
                    *baselines,
                    best,
                ]
            )
            + " |"  # fmt: skip
        )
    return "\n".join(lines)


def format_ablation(rows: list[dict[str, Any]], held_out: str | None) -> str:
    """Variants side by side: test reward [95%] and gap recovered per (suite, weight)."""
    variants = list(dict.fromkeys(row["variant"] for row in rows))
    cells: dict[tuple[str, float], dict[str, str]] = {}
    for row in rows:
        text = f"{_cell(row['reward'], 3)}; gap {row['gap_recovered'][0]:.2f}"
        text += f" ({len(row['seeds'])} seeds)" if len(row["seeds"]) > 1 else ""
        cells.setdefault((row["suite"], row["weight"]), {})[row["variant"]] = text
    lines = ["| suite | λ | " + " | ".join(variants) + " |", "|" + "---|" * (len(variants) + 2)]
    for (suite, weight), by_variant in cells.items():
        name = suite + (" (held out)" if suite == held_out else "")
        values = [by_variant.get(variant, "") for variant in variants]
        lines.append(f"| {name} | {weight:g} | " + " | ".join(values) + " |")
    return "\n".join(lines)


def main() -> None:
    """Run the sweep and print the table."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--table",
        action="append",
        required=True,
        help="NAME=PATH of an outcome table (repeatable); PATH alone takes its parent's name",
    )
    parser.add_argument("--weights", default="0.01,0.02", help="cost weights, comma-separated")
    parser.add_argument("--variants", default="default", help=f"comma-separated, of {sorted(VARIANTS)} or --variant")
    parser.add_argument("--variant", action="append", default=[], help="NAME:key=value,... (repeatable)")
    parser.add_argument("--seeds", default="0,1", help="training seeds, comma-separated")
    parser.add_argument("--out", default="runs/suites", help="where the runs and results go")
    parser.add_argument("--total-timesteps", type=int, default=None, help="PPO steps (default: the YAML's)")
    parser.add_argument(
        "--policy",
        choices=("shipped", "learned"),
        default="shipped",
        help="score the exported policy (after the do-no-harm fallback) or the learned one",
    )
    parser.add_argument("--held-out", default=None, help="the suite kept out of tuning (marked in the table)")
    parser.add_argument(
        "--ensemble",
        action="store_true",
        help="also score the seeds' runs as one ensemble (as `tokenopt train --seeds N --ensemble` ships it)",
    )
    parser.add_argument(
        "--train-args", default="", help="more `tokenopt train` options for every cell, e.g. '--features lm-hidden'"
    )
    args = parser.parse_args()

    import torch

    torch.set_num_threads(1)
    variants = dict(VARIANTS)
    variants.update(parse_variant(text) for text in args.variant)
    chosen = [name.strip() for name in args.variants.split(",") if name.strip()]
    chosen += [parse_variant(text)[0] for text in args.variant if parse_variant(text)[0] not in chosen]
    unknown = [name for name in chosen if name not in variants]
    if unknown:
        parser.error(f"unknown variants {unknown}; known: {sorted(variants)}")
    weights = [float(w) for w in args.weights.split(",")]
    seeds = [int(s) for s in args.seeds.split(",")]
    extra = ["--total-timesteps", str(args.total_timesteps)] if args.total_timesteps else []
    extra += shlex.split(args.train_args)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    tables: list[tuple[str, Path]] = []
    for text in args.table:
        name, _, path = text.rpartition("=")
        table = Path(path)
        tables.append((name or table.parent.name, table.resolve()))

    results_path = out / "results.json"
    # Rows of earlier invocations into the same OUT stay, unless this one recomputes them.
    kept: list[dict[str, Any]] = []
    if results_path.is_file():
        kept = json.loads(results_path.read_text(encoding="utf-8")).get("rows", [])
    rows: list[dict[str, Any]] = []

    def key(row: dict[str, Any]) -> tuple[Any, ...]:
        return row["suite"], row["weight"], row["variant"], row["policy"]

    def save() -> None:
        mine = {key(row) for row in rows}
        merged = [row for row in kept if key(row) not in mine] + rows
        results_path.write_text(json.dumps({"rows": merged}, indent=2) + "\n", encoding="utf-8")

    for suite, table in tables:
        matrix = OutcomeMatrix.from_table(table)
        replay = ReplayTable.load(table, matrix)
        train_r, val_r, test_r = (replay.subset(split) for split in ("train", "val", "test"))
        points, left_out = baseline_points(train_r, val_r, test_r, seed=0)
        questions = query_questions(table)
        for weight in weights:
            for variant in chosen:
                cells = []
                for seed in seeds:
                    run_dir = out / suite / f"w{weight:g}" / variant / f"seed-{seed}"
                    print(f"{suite} λ={weight:g} {variant} seed {seed} ...", file=sys.stderr, flush=True)
                    cell = run_cell(table, test_r.matrix, questions, run_dir, weight, seed, variants[variant], extra)
                    cells.append(cell)
                row = summarise(suite, weight, variant, cells, test_r.matrix, val_r.matrix, points, left_out,
                                args.policy)  # fmt: skip
                rows.append(row)
                print(format_rows([row], args.held_out).splitlines()[-1], file=sys.stderr, flush=True)
                if args.ensemble and len(seeds) > 1:
                    run_dirs = [out / suite / f"w{weight:g}" / variant / f"seed-{seed}" for seed in seeds]
                    joint = ensemble_cell(run_dirs, out / suite / f"w{weight:g}" / variant / "ensemble",
                                          test_r.matrix, questions)  # fmt: skip
                    row = summarise(suite, weight, f"{variant}, ensemble of {len(seeds)}", [joint], test_r.matrix,
                                    val_r.matrix, points, left_out, args.policy,
                                    np.asarray(rows[-1]["rewards"]))  # fmt: skip
                    rows.append(row)
                    print(format_rows([row], args.held_out).splitlines()[-1], file=sys.stderr, flush=True)
                save()
    table_md = format_rows(rows, args.held_out)
    if len(chosen) > 1:
        table_md += "\n\n" + format_ablation(rows, args.held_out)
    if args.ensemble:
        table_md += "\n\n" + format_ensembles(rows, args.held_out)
    (out / "results.md").write_text(table_md + "\n", encoding="utf-8")
    print(table_md)


if __name__ == "__main__":
    main()
