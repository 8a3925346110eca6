"""The demo's property table: EM and billed tokens per family, difficulty and action.

It checks, on a collected outcome table of the demo suite, the properties that
make the demo a real token/EM trade-off (see docs/demo.md): a family answered at
budget 0, families whose EM rises with the budget, a family no budget helps, a
family where a non-greedy mode beats greedy, and an oracle that beats the best
fixed action by a margin.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq

from tokenopt.cost import CostModel
from tokenopt.table import OutcomeMatrix

__all__ = ["PropertyCheck", "PropertyThresholds", "check_properties", "property_table"]


@dataclass(frozen=True)
class PropertyThresholds:
    """Bars the demo LM must pass; tests of a short rebuild use weaker ones."""

    direct_em: float = 0.9
    """EM of ``max`` at budget 0 (greedy)."""
    reasoning_em: float = 0.85
    """EM of ``chain`` and ``swap`` at the largest budget (greedy)."""
    direct_chance: float = 0.4
    """Highest EM of ``chain`` at budget 0 for difficulty >= 4 (near chance)."""
    noise_spread: float = 0.1
    """Largest EM difference between budgets of one mode on ``noise``."""
    mode_gain: float = 0.2
    """Gain of the best non-greedy mode over greedy on ``vote`` at budget 0."""
    oracle_gap: float = 0.15
    """Oracle reward minus best fixed action's reward on the held-out split."""


@dataclass(frozen=True)
class PropertyCheck:
    """One measured property against its bar."""

    name: str
    value: float
    threshold: float
    passed: bool
    detail: str


def _family_columns(directory: Path, ids: list[str]) -> tuple[np.ndarray, np.ndarray]:
    """Each query's family and difficulty (0 for every query of a question file without difficulties)."""
    names = set(pq.read_schema(directory / "queries.parquet").names)
    table = pq.read_table(directory / "queries.parquet", columns=["id", "family", *({"difficulty"} & names)])
    family_of = dict(zip(table.column("id").to_pylist(), table.column("family").to_pylist(), strict=True))
    if "difficulty" not in names:
        return np.array([family_of[i] for i in ids]), np.zeros(len(ids), dtype=int)
    level_of = dict(zip(table.column("id").to_pylist(), table.column("difficulty").to_pylist(), strict=True))
    return np.array([family_of[i] for i in ids]), np.array([int(level_of[i]) for i in ids])


def property_table(directory: str | Path, split: str | None = "test") -> str:
    """A Markdown table per mode: rows are family and difficulty, cells ``EM (tokens)``."""
    directory = Path(directory)
    matrix = OutcomeMatrix.from_table(directory).subset(split)
    families, levels = _family_columns(directory, matrix.ids)
    parsed = matrix.parsed_actions
    lines: list[str] = []
    for mode in matrix.mode_names:
        columns = matrix.mode_columns(mode)
        header = [f"budget {parsed[j].budget}" for j in columns]
        lines += [f"**{mode}**: EM (mean billed tokens)", ""]
        lines.append("| family | difficulty | n | " + " | ".join(header) + " |")
        lines.append("|---" * (3 + len(columns)) + "|")
        for family in dict.fromkeys(families):
            for level in sorted(set(levels[families == family])):
                mask = (families == family) & (levels == level)
                cells = [
                    f"{matrix.exact_match[mask, j].mean():.2f} ({matrix.billed_tokens[mask, j].mean():.1f})"
                    for j in columns
                ]
                lines.append(f"| {family} | {level} | {int(mask.sum())} | " + " | ".join(cells) + " |")
        lines.append("")
    return "\n".join(lines)


def check_properties(
    directory: str | Path,
    thresholds: PropertyThresholds | None = None,
    cost_model: CostModel | None = None,
    split: str | None = "test",
) -> list[PropertyCheck]:
    """Measure the demo's properties on a collected table of the demo suite."""
    thresholds = thresholds or PropertyThresholds()
    cost_model = cost_model or CostModel()
    directory = Path(directory)
    matrix = OutcomeMatrix.from_table(directory).subset(split)
    families, levels = _family_columns(directory, matrix.ids)
    actions = matrix.actions
    column = {action: j for j, action in enumerate(actions)}
    budgets = sorted({action.budget for action in matrix.parsed_actions})
    modes = matrix.mode_names
    first, last = f"b{budgets[0]}/greedy", f"b{budgets[-1]}/greedy"

    def em(mask: np.ndarray, action: str) -> float:
        return float(matrix.exact_match[mask, column[action]].mean()) if mask.any() else float("nan")

    def tokens(mask: np.ndarray, action: str) -> float:
        return float(matrix.billed_tokens[mask, column[action]].mean()) if mask.any() else float("nan")

    checks: list[PropertyCheck] = []
    direct = families == "max"
    value = em(direct, first)
    checks.append(
        PropertyCheck(
            "answered at budget 0 (max)",
            value,
            thresholds.direct_em,
            value >= thresholds.direct_em and em(direct, last) <= value + 0.02,
            f"EM {value:.2f} at {first} with {tokens(direct, first):.1f} tokens; "
            f"{em(direct, last):.2f} at {last} with {tokens(direct, last):.1f} tokens",
        )
    )
    for family in ("chain", "swap"):
        mask = families == family
        hard = mask & (levels >= 4)
        top, bottom = em(mask, last), em(hard, first)
        right_budget = set()
        for level in sorted(set(levels[mask])):
            at_level = mask & (levels == level)
            sufficient = [b for b in budgets if em(at_level, f"b{b}/greedy") >= top - 0.05]
            right_budget.add(sufficient[0] if sufficient else budgets[-1])
        passed = top >= thresholds.reasoning_em and (family == "swap" or bottom <= thresholds.direct_chance)
        checks.append(
            PropertyCheck(
                f"EM rises with the budget ({family})",
                top,
                thresholds.reasoning_em,
                passed and len(right_budget) >= 2,
                f"EM {bottom:.2f} at {first} for difficulty >= 4, {top:.2f} at {last}; "
                f"smallest sufficient budget per difficulty takes {len(right_budget)} values {sorted(right_budget)}",
            )
        )
    noise = families == "noise"
    spreads = {}
    for mode in modes:
        by_budget = [em(noise, f"b{b}/{mode}") for b in budgets]
        spreads[mode] = max(by_budget) - min(by_budget)
    spread = max(spreads.values())
    checks.append(
        PropertyCheck(
            "no budget helps (noise)",
            spread,
            thresholds.noise_spread,
            spread <= thresholds.noise_spread,
            "largest EM difference between budgets: "
            + ", ".join(f"{mode} {value:.2f}" for mode, value in spreads.items())
            + f"; greedy EM {em(noise, first):.2f} with {tokens(noise, first):.1f} tokens at {first}, "
            f"{em(noise, last):.2f} with {tokens(noise, last):.1f} at {last}",
        )
    )
    vote = families == "vote"
    others = [mode for mode in modes if mode != "greedy"]
    gains = {mode: em(vote, f"b{budgets[0]}/{mode}") - em(vote, first) for mode in others}
    best_mode = max(gains, key=lambda mode: gains[mode]) if gains else "none"
    gain = gains.get(best_mode, float("nan"))
    checks.append(
        PropertyCheck(
            "a non-greedy mode beats greedy (vote)",
            gain,
            thresholds.mode_gain,
            gain >= thresholds.mode_gain,
            "EM at budget 0: greedy "
            + f"{em(vote, first):.2f}, "
            + ", ".join(f"{mode} {em(vote, f'b{budgets[0]}/{mode}'):.2f}" for mode in others),
        )
    )
    oracle = matrix.oracle_reward(cost_model)
    best_action, best_reward = matrix.best_fixed(cost_model)
    checks.append(
        PropertyCheck(
            "oracle beats the best fixed action",
            oracle - best_reward,
            thresholds.oracle_gap,
            oracle - best_reward >= thresholds.oracle_gap,
            f"oracle reward {oracle:.3f} vs {best_reward:.3f} for {best_action} "
            f"(lambda {cost_model.cost_weight} per billed token, {len(matrix.ids)} queries)",
        )
    )
    return checks
