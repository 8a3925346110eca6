"""Reading an outcome table back, as per-query x per-action matrices."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from tokenopt.collect import SCHEMA_VERSION
from tokenopt.cost import CostModel

__all__ = ["OutcomeMatrix", "load_manifest", "load_outcomes"]


def load_manifest(directory: str | Path) -> dict[str, object]:
    """The manifest of an outcome table.

    Raises:
        FileNotFoundError: the folder holds no ``manifest.json``.
        ValueError: the table's schema version is not this tokenopt's.
    """
    path = Path(directory) / "manifest.json"
    if not path.is_file():
        raise FileNotFoundError(f"{directory} is not an outcome table: {path} is missing (run `tokenopt collect`)")
    manifest: dict[str, object] = json.loads(path.read_text(encoding="utf-8"))
    if manifest.get("schema_version") != SCHEMA_VERSION:
        raise ValueError(
            f"{path}: schema version {manifest.get('schema_version')} is not supported (expected {SCHEMA_VERSION})"
        )
    return manifest


def load_outcomes(directory: str | Path) -> pa.Table:
    """All outcome rows of a table, shard by shard in order."""
    directory = Path(directory)
    load_manifest(directory)
    parts = sorted((directory / "outcomes").glob("part-*.parquet"))
    if not parts:
        raise ValueError(f"{directory} has no outcome shards yet; run `tokenopt collect --out {directory}`")
    return pa.concat_tables([pq.read_table(part) for part in parts])


@dataclass
class OutcomeMatrix:
    """Outcomes as (queries x actions) arrays, in the manifest's action order."""

    ids: list[str]
    splits: np.ndarray
    actions: list[str]
    exact_match: np.ndarray
    billed_tokens: np.ndarray
    prompt_tokens: np.ndarray

    @classmethod
    def from_table(cls, directory: str | Path) -> OutcomeMatrix:
        """Load and pivot an outcome table.

        Raises:
            ValueError: some (query, action) has no row, or has two.
        """
        manifest = load_manifest(directory)
        action_entries: list[dict[str, object]] = manifest["actions"]  # type: ignore[assignment]
        actions = [str(entry["name"]) for entry in action_entries]
        table = load_outcomes(directory)
        ids_column = table.column("id").to_pylist()
        ids = list(dict.fromkeys(ids_column))
        row_of = {query_id: i for i, query_id in enumerate(ids)}
        column_of = {action: j for j, action in enumerate(actions)}
        exact = np.full((len(ids), len(actions)), np.nan)
        billed = np.full((len(ids), len(actions)), np.nan)
        prompt = np.zeros(len(ids))
        splits = np.empty(len(ids), dtype=object)
        seen = np.zeros((len(ids), len(actions)), dtype=np.int32)
        columns = {name: table.column(name).to_pylist() for name in ("action", "em", "billed_tokens", "split")}
        prompt_column = table.column("prompt_tokens").to_pylist()
        for k, query_id in enumerate(ids_column):
            action = columns["action"][k]
            if action not in column_of:
                raise ValueError(f"{directory}: row for {query_id!r} has action {action!r}, not in the action table")
            i, j = row_of[query_id], column_of[action]
            seen[i, j] += 1
            exact[i, j] = float(columns["em"][k])
            billed[i, j] = float(columns["billed_tokens"][k])
            prompt[i] = float(prompt_column[k])
            splits[i] = columns["split"][k]
        missing = np.argwhere(seen != 1)
        if len(missing):
            i, j = missing[0]
            raise ValueError(
                f"{directory}: query {ids[i]!r} has {seen[i, j]} rows for action {actions[j]!r} (expected 1); "
                f"{len(missing)} (query, action) pairs are affected"
            )
        return cls(ids, splits, actions, exact, billed, prompt)

    def subset(self, split: str | None) -> OutcomeMatrix:
        """The rows of one split (all rows when None)."""
        if split is None:
            return self
        mask = self.splits == split
        if not mask.any():
            raise ValueError(f"the table has no query in split {split!r}")
        return OutcomeMatrix(
            [i for i, keep in zip(self.ids, mask, strict=True) if keep],
            self.splits[mask],
            self.actions,
            self.exact_match[mask],
            self.billed_tokens[mask],
            self.prompt_tokens[mask],
        )

    def rewards(self, cost_model: CostModel) -> np.ndarray:
        """Reward of every (query, action)."""
        return cost_model.reward(self.exact_match, self.billed_tokens, self.prompt_tokens[:, None])

    def oracle_reward(self, cost_model: CostModel) -> float:
        """Mean reward of the per-query best action in hindsight."""
        return float(self.rewards(cost_model).max(axis=1).mean())

    def best_fixed(self, cost_model: CostModel) -> tuple[str, float]:
        """The single action with the best mean reward, and that reward."""
        means = self.rewards(cost_model).mean(axis=0)
        best = int(np.argmax(means))
        return self.actions[best], float(means[best])
