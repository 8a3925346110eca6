"""Where an environment's outcomes come from: a collected table, or the live LM.

Both sources implement :class:`OutcomeSource`: the queries of one split, their
feature vectors, the action table, which actions are valid for a query, and the
outcome (exact match, billed and prompt tokens) of an action on a query.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import numpy as np

from tokenopt.actions import Action, build_action_table, parse_budgets, parse_modes
from tokenopt.data import SPLITS, Query
from tokenopt.features import PromptFeatures
from tokenopt.scoring import exact_match
from tokenopt.table import OutcomeMatrix, load_manifest

__all__ = ["LiveLMSource", "Outcome", "OutcomeSource", "TableSource"]


@dataclass(frozen=True)
class Outcome:
    """What one action did on one query."""

    exact_match: float
    billed_tokens: float
    prompt_tokens: float


class OutcomeSource(Protocol):
    """The interface the environments need from a source of outcomes."""

    actions: list[Action]
    """The ordered action table."""
    features: np.ndarray
    """(queries x feature dim) float32 feature vectors of the split's queries."""
    query_ids: list[str]
    """Ids of the split's queries, in row order."""

    def outcome(self, query: int, action: int) -> Outcome:
        """The outcome of action ``action`` on query row ``query``."""
        ...

    def action_mask(self, query: int) -> np.ndarray:
        """Boolean mask of the actions valid for query row ``query``."""
        ...

    def known_costs(self, query: int) -> np.ndarray | None:
        """Billed tokens of every action on query row ``query`` when known without running the LM, else None."""
        ...

    def known_outcomes(self, query: int) -> tuple[np.ndarray, np.ndarray, float] | None:
        """Every action's exact match and billed tokens on query row ``query``, and its prompt tokens.

        None when unknown without running the LM (a live source).
        """
        ...


def _check_split(split: str) -> None:
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}: expected one of {', '.join(SPLITS)}")


def _check_features(features: np.ndarray, where: str) -> None:
    bad = ~np.isfinite(features)
    if bad.any():
        row, column = np.argwhere(bad)[0]
        raise ValueError(f"{where}: feature {column} of query row {row} is {features[row, column]} (not finite)")


class TableSource:
    """Outcomes replayed from a collected outcome table (fast, offline).

    Args:
        table: the folder ``tokenopt collect`` wrote, or an already loaded matrix.
        split: the split whose queries the environment draws.
        budgets: the expected budgets; the table must have exactly these (None: any).
        modes: the expected modes; the table must have exactly these (None: any).
    """

    def __init__(
        self,
        table: str | Path | OutcomeMatrix,
        split: str = "train",
        budgets: list[int] | None = None,
        modes: list[str] | None = None,
    ) -> None:
        _check_split(split)
        if isinstance(table, OutcomeMatrix):
            matrix, where = table, "outcome matrix"
        else:
            load_manifest(table)
            matrix, where = OutcomeMatrix.from_table(table), str(table)
        if matrix.features is None:
            raise ValueError(f"{where} has no features.parquet; collect it again with `tokenopt collect`")
        if not len(matrix.ids):
            raise ValueError(f"{where} is empty: it has no outcome rows")
        if not (matrix.splits == split).any():
            present = sorted(set(matrix.splits.tolist()))
            raise ValueError(f"{where} has no query in split {split!r}; it has {present}")
        self.matrix = matrix.subset(split)
        self.actions = matrix.parsed_actions
        if budgets is not None or modes is not None:
            expected = build_action_table(
                parse_budgets(budgets) if budgets is not None else sorted({a.budget for a in self.actions}),
                parse_modes(modes)
                if modes is not None
                else parse_modes(list(dict.fromkeys(a.mode for a in self.actions))),
            )
            if [a.name for a in expected] != [a.name for a in self.actions]:
                raise ValueError(
                    f"{where} has actions {[a.name for a in self.actions]}, but the configuration expects "
                    f"{[a.name for a in expected]}; collect the table with the same --budgets and --modes"
                )
        assert self.matrix.features is not None
        self.features = self.matrix.features.astype(np.float32)
        _check_features(self.features, where)
        self.query_ids = self.matrix.ids
        self._mask = np.ones(len(self.actions), dtype=bool)

    def outcome(self, query: int, action: int) -> Outcome:
        """The recorded outcome."""
        return Outcome(
            float(self.matrix.exact_match[query, action]),
            float(self.matrix.billed_tokens[query, action]),
            float(self.matrix.prompt_tokens[query]),
        )

    def action_mask(self, query: int) -> np.ndarray:
        """Every action of the table is valid: collection skipped prompts that do not fit."""
        return self._mask.copy()

    def known_costs(self, query: int) -> np.ndarray:
        """The recorded billed tokens of every action."""
        return self.matrix.billed_tokens[query]

    def known_outcomes(self, query: int) -> tuple[np.ndarray, np.ndarray, float]:
        """The recorded exact match and billed tokens of every action, and the prompt tokens."""
        return self.matrix.exact_match[query], self.matrix.billed_tokens[query], float(self.matrix.prompt_tokens[query])


class LiveLMSource:
    """Outcomes from running the LM when an action is taken (online).

    For modes whose outcome is random (``sc<k>``), every step samples afresh from
    the environment's seeded stream; for data without a collected table.

    Args:
        queries: the questions (all splits; the source keeps ``split``).
        lm: a :class:`tokenopt.lm.TransformersLM`.
        budgets: the budgets of the action table.
        modes: the modes of the action table.
        split: the split whose queries the environment draws.
        seed: seed of the sampling streams.
    """

    def __init__(
        self,
        queries: list[Query],
        lm: object,
        budgets: list[int] | str = "0,4,8,16,32",
        modes: list[str] | str = "greedy,sc5,beam3",
        split: str = "train",
        seed: int = 0,
    ) -> None:
        _check_split(split)
        self.queries = [q for q in queries if q.split == split]
        if not self.queries:
            raise ValueError(f"no query is in split {split!r}")
        self.lm = lm
        self.budgets = parse_budgets(budgets)
        self.modes = parse_modes(modes)
        self.actions = build_action_table(self.budgets, self.modes)
        self.features = PromptFeatures().batch([q.question for q in self.queries])
        _check_features(self.features, "live source")
        self.query_ids = [q.id for q in self.queries]
        self.prompts = [lm.encode_prompt(q.question) for q in self.queries]  # type: ignore[attr-defined]
        self._draws = 0
        self.seed = seed

    def outcome(self, query: int, action: int) -> Outcome:
        """Run the LM with this action's budget and mode."""
        chosen = self.actions[action]
        mode = next(m for m in self.modes if m.name == chosen.mode)
        self._draws += 1
        (per_budget,) = self.lm.run(  # type: ignore[attr-defined]
            [self.prompts[query]], mode, [chosen.budget], [self.seed * 1_000_003 + self._draws]
        )
        result = per_budget[chosen.budget]
        correct = exact_match(result.answer, self.queries[query].answers)
        return Outcome(float(correct), float(result.billed_tokens), float(len(self.prompts[query])))

    def action_mask(self, query: int) -> np.ndarray:
        """Budgets whose prompt + budget + answer fit in the model's context."""
        fits = {budget: self.lm.fits(self.prompts[query], budget) for budget in self.budgets}  # type: ignore[attr-defined]
        return np.array([fits[a.budget] for a in self.actions], dtype=bool)

    def known_costs(self, query: int) -> None:
        """Unknown until the LM runs: an action's bill depends on what it generates."""
        return None

    def known_outcomes(self, query: int) -> None:
        """Unknown until the LM runs each action."""
        return None
