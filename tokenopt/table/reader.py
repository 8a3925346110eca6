"""Reading an outcome table back, as per-query x per-action matrices (never imports the writer)."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from tokenopt.actions import Action
from tokenopt.cost import CostModel
from tokenopt.scoring import normalize_answer
from tokenopt.table.schema import (
    FEATURES_FILE,
    HIDDEN_COLUMN,
    MANIFEST_FILE,
    OUTCOMES_DIR,
    QUERIES_FILE,
    SCHEMA_VERSION,
)

__all__ = ["OutcomeMatrix", "ReplayTable", "load_manifest", "load_outcomes"]


def load_manifest(directory: str | Path) -> dict[str, object]:
    """The manifest of an outcome table.

    Raises:
        FileNotFoundError: the folder holds no ``manifest.json``.
        ValueError: the table's schema version is not this tokenopt's.
    """
    path = Path(directory) / MANIFEST_FILE
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
    parts = sorted((directory / OUTCOMES_DIR).glob("part-*.parquet"))
    if not parts:
        raise ValueError(f"{directory} has no outcome shards yet; run `tokenopt collect --out {directory}`")
    return pa.concat_tables([pq.read_table(part) for part in parts])


def _fixed_size_lists(column: pa.ChunkedArray) -> np.ndarray:
    """A column of equal-length float lists as a (rows x length) float32 array."""
    return np.asarray(column.to_pylist(), dtype=np.float32)


@dataclass
class OutcomeMatrix:
    """Outcomes as (queries x actions) arrays, in the manifest's action order."""

    ids: list[str]
    splits: np.ndarray
    actions: list[str]
    exact_match: np.ndarray
    billed_tokens: np.ndarray
    prompt_tokens: np.ndarray
    features: np.ndarray | None = None
    """(queries x feature dim) float32, from ``features.parquet``, when loaded."""
    families: np.ndarray | None = None
    """A ``family`` column of the question file, when it has one (for reports)."""
    hidden: np.ndarray | None = None
    """(queries x hidden size) float32: the LM's hidden state of each prompt at prefill, when the
    table recorded it (``features.parquet``'s ``lm_hidden`` column; source in the manifest)."""

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
        features = families = hidden = None
        directory = Path(directory)
        if (directory / FEATURES_FILE).is_file():
            feature_table = pq.read_table(directory / FEATURES_FILE)
            row_of_id = {query_id: k for k, query_id in enumerate(feature_table.column("id").to_pylist())}
            rows = np.array([row_of_id[query_id] for query_id in ids], dtype=np.int64)
            features = _fixed_size_lists(feature_table.column("features"))[rows]
            if HIDDEN_COLUMN in feature_table.column_names:
                hidden = _fixed_size_lists(feature_table.column(HIDDEN_COLUMN))[rows]
        if (directory / QUERIES_FILE).is_file():
            query_table = pq.read_table(directory / QUERIES_FILE)
            if "family" in query_table.column_names:
                family_of = dict(
                    zip(query_table.column("id").to_pylist(), query_table.column("family").to_pylist(), strict=True)
                )
                families = np.asarray([str(family_of[query_id]) for query_id in ids], dtype=object)
        return cls(ids, splits, actions, exact, billed, prompt, features, families, hidden)

    def subset(self, split: str | None) -> OutcomeMatrix:
        """The rows of one split (all rows when None)."""
        if split is None:
            return self
        mask = self.splits == split
        if not mask.any():
            raise ValueError(f"the table has no query in split {split!r}")
        return self.take(np.flatnonzero(mask))

    def take(self, indices: np.ndarray) -> OutcomeMatrix:
        """The rows at these indices, in this order."""
        return OutcomeMatrix(
            [self.ids[i] for i in indices],
            self.splits[indices],
            self.actions,
            self.exact_match[indices],
            self.billed_tokens[indices],
            self.prompt_tokens[indices],
            None if self.features is None else self.features[indices],
            None if self.families is None else self.families[indices],
            None if self.hidden is None else self.hidden[indices],
        )

    @property
    def parsed_actions(self) -> list[Action]:
        """The action table, parsed."""
        return [Action.parse(name) for name in self.actions]

    @property
    def mode_names(self) -> list[str]:
        """The table's modes, in action-table order."""
        return list(dict.fromkeys(action.mode for action in self.parsed_actions))

    def mode_columns(self, mode: str) -> list[int]:
        """Action columns of one mode, in action-table order."""
        return [j for j, action in enumerate(self.parsed_actions) if action.mode == mode]

    def max_budget_greedy(self) -> int:
        """Column of max-budget greedy (what most deployments do), or of the largest budget without greedy."""
        parsed = self.parsed_actions
        candidates = self.mode_columns("greedy") or list(range(len(parsed)))
        return max(candidates, key=lambda j: parsed[j].budget)

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


@dataclass
class ReplayTable:
    """An :class:`OutcomeMatrix` plus the per-row details the replayed methods read.

    Arrays are (queries x actions), aligned with ``matrix``.
    """

    matrix: OutcomeMatrix
    budgets: np.ndarray
    """Budget of each action column."""
    modes: list[str]
    """Mode of each action column."""
    answers: np.ndarray
    """Normalised answer of each (query, action)."""
    probe_tokens: np.ndarray
    """Cue + answer tokens of each (query, action): what probing that budget bills."""
    reasoning_tokens: np.ndarray
    natural_stop: np.ndarray
    samples: np.ndarray
    """Per (query, action): a tuple (normalised answers, em, tokens, logprobs) of its sequences."""
    answer_logprob: np.ndarray
    """Mean log-probability of each (query, action)'s returned answer tokens."""

    @classmethod
    def load(cls, directory: str | Path, matrix: OutcomeMatrix | None = None) -> ReplayTable:
        """Load the details of a table for the queries of ``matrix`` (default: all).

        Raises:
            ValueError: the table lacks the per-sequence columns (an older schema).
        """
        matrix = matrix if matrix is not None else OutcomeMatrix.from_table(directory)
        table = load_outcomes(directory)
        needed = [
            "id",
            "action",
            "answer",
            "cue_tokens",
            "answer_tokens",
            "reasoning_tokens",
            "natural_stop",
            "answer_logprob",
        ]
        needed += ["sample_answers", "sample_em", "sample_tokens", "sample_logprobs"]
        missing = [name for name in needed if name not in table.column_names]
        if missing:
            raise ValueError(f"{directory}: the outcome table has no columns {missing}; collect it again")
        row_of = {query_id: i for i, query_id in enumerate(matrix.ids)}
        column_of = {action: j for j, action in enumerate(matrix.actions)}
        shape = (len(matrix.ids), len(matrix.actions))
        answers = np.empty(shape, dtype=object)
        samples = np.empty(shape, dtype=object)
        probe = np.zeros(shape)
        reasoning = np.zeros(shape)
        natural = np.zeros(shape, dtype=bool)
        logprob = np.zeros(shape)
        columns = {name: table.column(name).to_pylist() for name in needed}
        for k, query_id in enumerate(columns["id"]):
            i = row_of.get(query_id)
            if i is None:
                continue
            j = column_of[columns["action"][k]]
            answers[i, j] = normalize_answer(columns["answer"][k])
            probe[i, j] = columns["cue_tokens"][k] + columns["answer_tokens"][k]
            reasoning[i, j] = columns["reasoning_tokens"][k]
            natural[i, j] = columns["natural_stop"][k]
            logprob[i, j] = columns["answer_logprob"][k]
            samples[i, j] = (
                [normalize_answer(a) for a in columns["sample_answers"][k]],
                np.asarray(columns["sample_em"][k], dtype=np.float64),
                np.asarray(columns["sample_tokens"][k], dtype=np.float64),
                np.asarray(columns["sample_logprobs"][k], dtype=np.float64),
            )
        parsed = matrix.parsed_actions
        budgets = np.array([action.budget for action in parsed])
        modes = [action.mode for action in parsed]
        return cls(matrix, budgets, modes, answers, probe, reasoning, natural, samples, logprob)

    def take(self, indices: np.ndarray) -> ReplayTable:
        """The rows at these indices."""
        return ReplayTable(
            self.matrix.take(indices),
            self.budgets,
            self.modes,
            self.answers[indices],
            self.probe_tokens[indices],
            self.reasoning_tokens[indices],
            self.natural_stop[indices],
            self.samples[indices],
            self.answer_logprob[indices],
        )

    def subset(self, split: str) -> ReplayTable:
        """The rows of one split."""
        mask = self.matrix.splits == split
        if not mask.any():
            raise ValueError(f"the table has no query in split {split!r}")
        return self.take(np.flatnonzero(mask))

    def ladder(self, mode: str) -> list[int]:
        """Action columns of one mode, by increasing budget."""
        columns = [j for j, m in enumerate(self.modes) if m == mode]
        return sorted(columns, key=lambda j: self.budgets[j])

    @property
    def mode_names(self) -> list[str]:
        """The table's modes, in action-table order."""
        return list(dict.fromkeys(self.modes))
