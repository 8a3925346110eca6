"""K-fold cross-validation of PPO training on an outcome table.

``tokenopt cv --table DIR --folds K`` ignores the table's own split column: the
unique query ids are permuted with a seeded generator and cut into K folds. Each
fold is the test fold once; of the other queries a seeded share (20% by default)
is the validation split (early stopping, best model) and the rest the training
split. One policy is trained per fold, exported, and scored on its test fold
with the runtime policy deciding from the question text, as a server would. The
spread of the K test scores says how much a single train/test split can be trusted.
"""

from __future__ import annotations

import dataclasses
import json
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from tokenopt.agents.common.evaluation import policy_choices, query_questions
from tokenopt.agents.ppo.train import TrainConfig, train
from tokenopt.table import OutcomeMatrix, evaluate_actions

__all__ = ["CVResult", "FoldResult", "cross_validate", "fold_splits", "format_cv"]

REPORTED_METRICS = ("em", "tokens", "reward", "gap_recovered")
"""Test metrics summarised over the folds."""


def fold_splits(ids: list[str], folds: int, seed: int = 0, val_fraction: float = 0.2) -> list[np.ndarray]:
    """Split columns of a K-fold cross-validation, one per fold.

    Queries are grouped by id (every row of an id lands in the same split). The
    unique ids are permuted with ``seed`` and cut into ``folds`` near-equal
    folds; in split column k, fold k is ``test``, a seeded ``val_fraction`` of the
    other ids is ``val`` and the rest ``train``.

    Args:
        ids: query id of every row.
        folds: K, at least 2 and at most the number of unique ids.
        seed: seed of the permutation and of the validation draws.
        val_fraction: share of the non-test ids used for validation, in (0, 1).

    Returns:
        K object arrays of ``train``/``val``/``test``, aligned with ``ids``.

    Raises:
        ValueError: K or the validation share out of range, or too few queries
            for a training split.
    """
    unique = sorted(set(ids))
    if folds < 2 or folds > len(unique):
        raise ValueError(
            f"--folds must be between 2 and the number of queries ({len(unique)}); got {folds}"
            if folds < 2
            else f"--folds {folds} is larger than the number of queries ({len(unique)}); use at most {len(unique)}"
        )
    if not 0.0 < val_fraction < 1.0:
        raise ValueError(f"the validation share must be in (0, 1); got {val_fraction}")
    order = [unique[i] for i in np.random.default_rng(seed).permutation(len(unique))]
    fold_of = {query_id: k for k, chunk in enumerate(np.array_split(np.arange(len(order)), folds)) for query_id in
               (order[i] for i in chunk)}  # fmt: skip
    columns = []
    for k in range(folds):
        rest = [query_id for query_id in order if fold_of[query_id] != k]
        n_val = max(1, int(round(val_fraction * len(rest))))
        if len(rest) - n_val < 1:
            raise ValueError(
                f"fold {k + 1} of {folds} leaves {len(rest)} queries outside its test fold, too few for both a "
                "train and a val split; use fewer folds or more queries"
            )
        picked = np.random.default_rng([seed, k]).permutation(len(rest))[:n_val]
        val_ids = {rest[i] for i in picked}
        columns.append(
            np.array(
                ["test" if fold_of[q] == k else "val" if q in val_ids else "train" for q in ids],
                dtype=object,
            )
        )
    return columns


@dataclass
class FoldResult:
    """One fold: its split sizes, its best validation and its test metrics."""

    fold: int
    """1-based fold number."""
    run_dir: str
    train_queries: int
    val_queries: int
    test_queries: int
    test_metrics: dict[str, float]
    val_metrics: dict[str, float]
    timesteps: int
    seconds: float
    split_ids: dict[str, list[str]] = field(default_factory=dict, repr=False)
    """Ids of each split (``train``, ``val``, ``test``); written to ``fold-k/splits.json``."""


@dataclass
class CVResult:
    """All folds and the mean and standard deviation of each test metric."""

    out: str
    folds: list[FoldResult]
    summary: dict[str, dict[str, float]]
    """``{metric: {"mean": ..., "std": ...}}`` over the folds (sample std, ddof 1)."""
    seconds: float

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready data, without the per-fold id lists."""
        folds = [{k: v for k, v in dataclasses.asdict(f).items() if k != "split_ids"} for f in self.folds]
        return {"out": self.out, "folds": folds, "summary": self.summary, "seconds": self.seconds}


def cross_validate(
    base: TrainConfig,
    folds: int,
    out: str | Path = "runs/cv",
    seed: int = 0,
    val_fraction: float = 0.2,
    progress: Callable[[int, int, dict[str, float]], None] | None = None,
) -> CVResult:
    """Train and test one policy per fold; write ``OUT/cv.json`` and ``OUT/fold-k/``.

    Args:
        base: training settings shared by the folds (``table`` must be set; ``out``
            and ``seed`` are replaced per fold).
        folds: K.
        out: folder of the fold runs and ``cv.json``.
        seed: seed of the fold assignment and of training.
        val_fraction: share of each fold's non-test queries used for validation.
        progress: called after every validation with (1-based fold, steps, validation metrics).

    Raises:
        ValueError: bad K, settings or table (the message names the bad value).
    """
    from tokenopt.agents.export import export_run
    from tokenopt.runtime import BudgetPolicy

    started = time.perf_counter()
    if base.env != "budget":
        raise ValueError(f"cross-validation scores per-query policies: use env 'budget', not {base.env!r}")
    matrix = OutcomeMatrix.from_table(base.table)
    columns = fold_splits(matrix.ids, folds, seed, val_fraction)
    questions = query_questions(base.table)
    cost_model = base.cost_model()
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    results = []
    for k, splits in enumerate(columns, start=1):
        run_dir = out / f"fold-{k}"
        fold_matrix = dataclasses.replace(matrix, splits=splits)
        config = dataclasses.replace(base, out=str(run_dir), seed=seed)
        report = None if progress is None else (lambda steps, _, metrics, k=k: progress(k, steps, metrics))
        trained = train(config, progress=report, matrix=fold_matrix)
        policy = BudgetPolicy.load(export_run(run_dir))
        test = fold_matrix.subset("test")
        chosen = policy_choices(policy, test, questions, cost_model.cost_weight)
        test_metrics = evaluate_actions(test, chosen, cost_model)
        split_ids = {name: [q for q, s in zip(matrix.ids, splits, strict=True) if s == name] for name in
                     ("train", "val", "test")}  # fmt: skip
        (run_dir / "splits.json").write_text(json.dumps(split_ids) + "\n", encoding="utf-8")
        results.append(
            FoldResult(
                fold=k,
                run_dir=str(run_dir),
                train_queries=len(split_ids["train"]),
                val_queries=len(split_ids["val"]),
                test_queries=len(split_ids["test"]),
                test_metrics=test_metrics,
                val_metrics={key: float(value) for key, value in trained.best_metrics.items()},
                timesteps=trained.timesteps,
                seconds=trained.seconds,
                split_ids=split_ids,
            )
        )
    summary = {}
    for metric in REPORTED_METRICS:
        values = np.array([fold.test_metrics[metric] for fold in results])
        summary[metric] = {"mean": float(values.mean()), "std": float(values.std(ddof=1))}
    result = CVResult(out=str(out), folds=results, summary=summary, seconds=time.perf_counter() - started)
    data = result.to_dict() | {
        "table": base.table,
        "k": folds,
        "seed": seed,
        "val_fraction": val_fraction,
        "cost_weight": base.cost_weight,
        "train_config": dataclasses.asdict(base) | {"out": str(out / "fold-k"), "seed": seed},
    }
    (out / "cv.json").write_text(json.dumps(data, indent=2) + "\n", encoding="utf-8")
    return result


def format_cv(result: CVResult) -> str:
    """Per-fold test metrics and their mean ± standard deviation, as a Markdown table."""
    lines = [
        "| fold | train | val | test | EM | mean billed tokens | reward | gap recovered |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for fold in result.folds:
        m = fold.test_metrics
        lines.append(
            f"| {fold.fold} | {fold.train_queries} | {fold.val_queries} | {fold.test_queries} | {m['em']:.3f} | "
            f"{m['tokens']:.2f} | {m['reward']:.3f} | {m['gap_recovered']:.2f} |"
        )
    s = result.summary
    lines.append(
        f"| mean ± std | | | | {s['em']['mean']:.3f} ± {s['em']['std']:.3f} | "
        f"{s['tokens']['mean']:.2f} ± {s['tokens']['std']:.2f} | "
        f"{s['reward']['mean']:.3f} ± {s['reward']['std']:.3f} | "
        f"{s['gap_recovered']['mean']:.2f} ± {s['gap_recovered']['std']:.2f} |"
    )
    return "\n".join(lines)
