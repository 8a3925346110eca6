"""The published methods tokenopt is measured against, replayed on an outcome table.

Every method here sees the same LM, the same queries and the same outcome table as
the learned policy, and bills what it would have spent:

- fixed actions: one (budget, mode) for every query; s1-style budget forcing at a cap;
- TALE-style: a classifier predicts each query's smallest sufficient budget from the
  prompt features, plus a safety margin of budget steps;
- Dynasor-style certainty exit: probe the answer at each budget of the ladder and stop
  once the last ``window`` probes agree, billing every probe's cue and answer;
- DEER-style confidence exit: probe likewise and stop once the probe answer's
  confidence (its mean token probability) passes a threshold, billed the same way;
- Adaptive-Consistency-style sampling: draw the samples of ``sc<k>`` one by one and
  stop once the vote is decided (or likely decided, by its Beta stopping rule);
- RouteLLM-style router: a classifier scores how likely the expensive action beats the
  cheap one, and a threshold routes between them;
- CLEAR-style allocation: a fixed total budget is shared across the split's queries
  through one global shadow price on their EM-versus-action curves predicted from the
  prompt features (:func:`clear_allocation`).

Each method yields :class:`OperatingPoint` objects, one per setting of its knob: the
per-query exact match and billed tokens on a split. :func:`probe_controller_point` replays
the learned probe controller (``tokenopt train --env probe``) through its runtime
session with the same bill as the two probing rules and the environment;
:func:`stream_policy_point` replays the stream policy (``tokenopt train --env stream``) on
TokenBudgetStream-v0, for comparison with the CLEAR-style allocation at its total spend.
:mod:`tokenopt.agents.evaluation.scoreboard` turns them into curves, rows and plots.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np

from tokenopt.actions import parse_mode
from tokenopt.cost import CostModel
from tokenopt.probe import ANSWER, ESCALATE, escalate_columns, exit_bill, segment_bill
from tokenopt.runtime import BudgetPolicy
from tokenopt.scoring import majority_vote
from tokenopt.table import ReplayTable

__all__ = [
    "DEER_THRESHOLDS",
    "BudgetAllocation",
    "ClearModel",
    "OperatingPoint",
    "ReplayTable",
    "RidgePredictor",
    "adaptive_consistency_points",
    "clear_allocation",
    "clear_point",
    "clear_points",
    "clear_stream_point",
    "deer_points",
    "dynasor_points",
    "fixed_points",
    "probe_controller_point",
    "probe_oracle_point",
    "router_points",
    "stream_environment",
    "stream_orders",
    "stream_policy_point",
    "tale_points",
]

DEER_THRESHOLDS = (0.0, 0.3, 0.35, 0.4, 0.45, 0.5, 0.6, 0.95)
"""Confidence thresholds of the DEER-style rule: 0 (answer at the first probe, the cheap
end of its curve), DEER's own 0.95, and a dense grid between, where a small LM's
confidences (the demo's lie near 0.46 when unsure, above 0.99 when sure) separate right
answers from guesses."""


@dataclass
class OperatingPoint:
    """One setting of one method: what it scored and billed on each query of a split."""

    method: str
    setting: str
    exact_match: np.ndarray
    """Per query, 0 or 1."""
    billed_tokens: np.ndarray
    """Per query."""
    actions: np.ndarray | None = None
    """Per query, the action column finally answered with (for action-mix plots)."""

    @property
    def em(self) -> float:
        """Mean exact match."""
        return float(self.exact_match.mean())

    @property
    def tokens(self) -> float:
        """Mean billed tokens."""
        return float(self.billed_tokens.mean())


def fixed_points(replay: ReplayTable) -> list[OperatingPoint]:
    """Every action of the table for every query (s1-style budget forcing at a cap)."""
    m = replay.matrix
    return [
        OperatingPoint("fixed", name, m.exact_match[:, j], m.billed_tokens[:, j], np.full(len(m.ids), j))
        for j, name in enumerate(m.actions)
    ]


# --- supervised baselines ---------------------------------------------------------


class _Classifier:
    """A small MLP classifier on standardised prompt features (as large as the policy's).

    Trained full-batch with Adam and weight decay; the epoch with the best validation
    loss is kept. Seeded, deterministic on CPU.
    """

    def __init__(self, hidden: tuple[int, ...] = (64, 64), epochs: int = 400, seed: int = 0) -> None:
        self.hidden = hidden
        self.epochs = epochs
        self.seed = seed

    def fit(self, x: np.ndarray, y: np.ndarray, x_val: np.ndarray, y_val: np.ndarray, classes: int) -> _Classifier:
        import torch

        threads = torch.get_num_threads()
        torch.set_num_threads(1)  # small full-batch steps: more threads only add overhead
        try:
            return self._fit(x, y, x_val, y_val, classes)
        finally:
            torch.set_num_threads(threads)

    def _fit(self, x: np.ndarray, y: np.ndarray, x_val: np.ndarray, y_val: np.ndarray, classes: int) -> _Classifier:
        import torch

        torch.manual_seed(self.seed)
        self.mean = x.mean(axis=0)
        self.std = x.std(axis=0) + 1e-6
        layers: list[torch.nn.Module] = []
        width = x.shape[1]
        for size in self.hidden:
            layers += [torch.nn.Linear(width, size), torch.nn.Tanh()]
            width = size
        layers.append(torch.nn.Linear(width, classes))
        self.net = torch.nn.Sequential(*layers)
        optimizer = torch.optim.Adam(self.net.parameters(), lr=3e-3, weight_decay=1e-4)
        inputs, targets = self._tensor(x), torch.as_tensor(y, dtype=torch.long)
        val_inputs, val_targets = self._tensor(x_val), torch.as_tensor(y_val, dtype=torch.long)
        loss_fn = torch.nn.CrossEntropyLoss()
        best = (math.inf, [p.detach().clone() for p in self.net.parameters()])
        for _ in range(self.epochs):
            optimizer.zero_grad()
            loss = loss_fn(self.net(inputs), targets)
            loss.backward()
            optimizer.step()
            with torch.no_grad():
                val_loss = float(loss_fn(self.net(val_inputs), val_targets))
            if val_loss < best[0]:
                best = (val_loss, [p.detach().clone() for p in self.net.parameters()])
        with torch.no_grad():
            for parameter, value in zip(self.net.parameters(), best[1], strict=True):
                parameter.copy_(value)
        return self

    def _tensor(self, x: np.ndarray) -> Any:
        import torch

        return torch.as_tensor((x - self.mean) / self.std, dtype=torch.float32)

    def probabilities(self, x: np.ndarray) -> np.ndarray:
        import torch

        with torch.no_grad():
            return torch.softmax(self.net(self._tensor(x)), dim=1).numpy().astype(np.float64)


def _features(replay: ReplayTable) -> np.ndarray:
    if replay.matrix.features is None:
        raise ValueError("the outcome table has no features.parquet; collect it again")
    return replay.matrix.features


def tale_points(
    train: ReplayTable,
    val: ReplayTable,
    targets: list[ReplayTable],
    margins: tuple[int, ...] = (0, 1, 2),
    seed: int = 0,
) -> list[list[OperatingPoint]]:
    """TALE-style: predict each query's smallest sufficient budget, then add a margin.

    For each mode a classifier learns, on the train split, the index of the smallest
    budget whose forced answer is correct (an extra class: no budget is); the val split
    picks its best epoch. A query predicted unsolvable gets the smallest budget
    (reasoning will not help it); the others get the predicted budget plus ``margin``
    steps of the ladder.

    Returns:
        For each target table, its operating points (one per mode and margin).
    """
    points: list[list[OperatingPoint]] = [[] for _ in targets]
    for mode in train.mode_names:
        ladder = train.ladder(mode)
        labels, val_labels = _smallest_sufficient(train, ladder), _smallest_sufficient(val, ladder)
        model = _Classifier(seed=seed).fit(_features(train), labels, _features(val), val_labels, len(ladder) + 1)
        for target, out in zip(targets, points, strict=True):
            predicted = model.probabilities(_features(target)).argmax(axis=1)
            for margin in margins:
                steps = np.where(predicted == len(ladder), 0, np.minimum(predicted + margin, len(ladder) - 1))
                out.append(_point("TALE-style", f"{mode}, margin {margin}", target, np.asarray(ladder)[steps]))
    return points


def _smallest_sufficient(replay: ReplayTable, ladder: list[int]) -> np.ndarray:
    correct = replay.matrix.exact_match[:, ladder] > 0.5
    return np.where(correct.any(axis=1), correct.argmax(axis=1), len(ladder))


def router_points(
    train: ReplayTable, val: ReplayTable, targets: list[ReplayTable], thresholds: int = 11, seed: int = 0
) -> list[list[OperatingPoint]]:
    """RouteLLM-style: route each query to a cheap or an expensive action by a threshold.

    The pairs: the cheapest action against max-budget greedy, against the most accurate
    action on the train split, and the best fixed-reward action on the train split at
    the default weight against the most accurate one. For each pair a classifier
    learns, on the train split, whether the expensive action is right where the cheap
    one is wrong (RouteLLM's "strong model wins" label); queries scoring at or above
    the threshold go to the expensive action. Thresholds are quantiles of the val
    scores, so the curve spans from all-cheap to all-expensive.

    Returns:
        For each target table, its operating points (one per pair and threshold).
    """
    m = train.matrix
    tokens = m.billed_tokens.mean(axis=0)
    accuracy = m.exact_match.mean(axis=0)
    cheapest = int(np.argmin(tokens))
    greedy = train.ladder("greedy") if "greedy" in train.mode_names else []
    most_accurate = int(np.lexsort((tokens, -accuracy))[0])
    best_reward = int(np.argmax(accuracy - 0.01 * tokens))
    pairs = {(cheapest, most_accurate), (best_reward, most_accurate)}
    if greedy:
        pairs.add((cheapest, greedy[-1]))
    points: list[list[OperatingPoint]] = [[] for _ in targets]
    for cheap, strong in sorted(pairs):
        label = (m.exact_match[:, strong] > m.exact_match[:, cheap]).astype(np.int64)
        val_label = (val.matrix.exact_match[:, strong] > val.matrix.exact_match[:, cheap]).astype(np.int64)
        if cheap == strong or label.min() == label.max():
            continue
        model = _Classifier(seed=seed).fit(_features(train), label, _features(val), val_label, 2)
        cuts = np.unique(np.quantile(model.probabilities(_features(val))[:, 1], np.linspace(0.0, 1.0, thresholds)))
        names = f"{m.actions[cheap]}->{m.actions[strong]}"
        for target, out in zip(targets, points, strict=True):
            scores = model.probabilities(_features(target))[:, 1]
            for cut in [*cuts, np.inf]:
                columns = np.where(scores >= cut, strong, cheap)
                setting = f"{names} at {cut:.3f}"
                out.append(_point("RouteLLM-style", setting, target, columns))
    return points


def _point(method: str, setting: str, replay: ReplayTable, columns: np.ndarray) -> OperatingPoint:
    rows = np.arange(len(columns))
    m = replay.matrix
    return OperatingPoint(method, setting, m.exact_match[rows, columns], m.billed_tokens[rows, columns], columns)


# --- CLEAR-style allocation of one total budget -----------------------------------


@dataclass(frozen=True)
class BudgetAllocation:
    """What :func:`clear_allocation` gives each query of a batch under one total budget."""

    columns: np.ndarray
    """Per query, the action column allocated."""
    shadow_price: float
    """The price mu of one token at which the batch meets the budget (0: the budget does not bind)."""
    spent: float
    """The batch's total billed tokens under the allocation (at most the total budget)."""
    utility: float
    """The batch's total predicted utility (predicted EM) under the allocation."""


def _cheapest_best(utility: np.ndarray, cost: np.ndarray, price: float) -> np.ndarray:
    """Per query, argmax of utility - price * cost; ties go to the cheaper action, then the lower column."""
    score = utility - price * cost
    best = score.max(axis=1, keepdims=True)
    tied = score >= best - 1e-12 * np.maximum(1.0, np.abs(best))
    return np.argmin(np.where(tied, cost, np.inf), axis=1)


def clear_allocation(
    utility: np.ndarray,
    cost: np.ndarray,
    total_budget: float,
    billed: np.ndarray | None = None,
    iterations: int = 200,
) -> BudgetAllocation:
    """Allocate a total budget across a batch of queries through one global shadow price.

    Every query takes ``argmax_a utility[q, a] - mu * cost[q, a]``; the price ``mu >= 0``
    is found by bisection so that the batch's total billed tokens (``billed``, by
    default ``cost``) are at most ``total_budget`` (``mu = 0`` when the most useful
    actions already fit). Ties: within a query, equally good actions go to the
    cheaper, then to the lower column; at the price the bisection ends on, the queries
    whose choice differs on the two sides of its final bracket (those tied at the
    price) take the dearer, more useful action in batch order while it still fits, and
    the rest keep the cheaper one. With ``billed`` left to ``cost``, a larger budget
    never lowers the total utility.

    CLEAR-like: as in CLEAR (2026), one shadow price equalises the marginal utility per
    token across the whole batch, and the batch is known in advance (offline
    allocation). What differs: the options are the rows of tokenopt's action table
    (budget, mode), not a continuous token budget; no fractional or random mix is made
    at the price, so part of one tied upgrade's cost may stay unspent; the utility and
    cost are whatever the caller predicts (:func:`clear_point` predicts both from the
    prompt features), and the one price may be set on what the batch is then billed.

    Args:
        utility: (queries, actions) predicted utility, e.g. predicted exact match.
        cost: (queries, actions) the cost each decision weighs, >= 0 (e.g. predicted tokens).
        total_budget: the batch's total budget, in billed tokens.
        billed: (queries, actions) what each action is billed, summed against the
            budget; None: ``cost``.
        iterations: bisection steps on the price.

    Returns:
        The allocation, its price, billed total and total predicted utility.

    Raises:
        ValueError: arrays that are empty, not finite, of different shapes, a negative
            cost or bill, a negative or non-finite budget, or a budget below the bill of
            the cheapest action of every query.
    """
    utility = np.asarray(utility, dtype=np.float64)
    cost = np.asarray(cost, dtype=np.float64)
    bill = cost if billed is None else np.asarray(billed, dtype=np.float64)
    if utility.ndim != 2 or utility.shape != cost.shape or utility.shape != bill.shape or utility.size == 0:
        raise ValueError(
            f"utility, cost and billed must be (queries, actions) arrays of one shape with at least one query and "
            f"action; got {utility.shape}, {cost.shape} and {bill.shape}"
        )
    if not (np.isfinite(utility).all() and np.isfinite(cost).all() and np.isfinite(bill).all()):
        raise ValueError("utility, cost and billed must be finite")
    if (cost < 0).any() or (bill < 0).any():
        raise ValueError(f"costs and bills must be >= 0; got minima {cost.min():g} and {bill.min():g}")
    if not (math.isfinite(total_budget) and total_budget >= 0):
        raise ValueError(f"the total budget must be a finite number >= 0; got {total_budget}")
    rows = np.arange(len(cost))

    def spend(columns: np.ndarray) -> float:
        return float(bill[rows, columns].sum())

    def allocation(columns: np.ndarray, price: float) -> BudgetAllocation:
        return BudgetAllocation(columns, price, spend(columns), float(utility[rows, columns].sum()))

    free = _cheapest_best(utility, cost, 0.0)
    if spend(free) <= total_budget:
        return allocation(free, 0.0)
    gaps = cost - cost.min(axis=1, keepdims=True)
    positive = gaps[gaps > 0]
    # Past this price every query takes its cheapest action (the most useful of equally cheap ones).
    high = (float(utility.max() - utility.min()) + 1.0) / (float(positive.min()) if positive.size else 1.0)
    floor = spend(_cheapest_best(utility, cost, high))
    if floor > total_budget:
        raise ValueError(
            f"the total budget {total_budget:g} is below {floor:g}, the bill of the cheapest action of every query"
        )
    low = 0.0
    for _ in range(iterations):  # low never fits, high always does
        middle = (low + high) / 2.0
        if spend(_cheapest_best(utility, cost, middle)) <= total_budget:
            high = middle
        else:
            low = middle
    columns = _cheapest_best(utility, cost, high)
    dearer = _cheapest_best(utility, cost, low)
    spent = spend(columns)
    for query in np.flatnonzero(dearer != columns):  # tied at the price: upgrade in batch order while it fits
        extra = bill[query, dearer[query]] - bill[query, columns[query]]
        if spent + extra <= total_budget:
            columns[query] = dearer[query]
            spent += extra
    return allocation(columns, high)


class RidgePredictor:
    """Per-action ridge regressions of an outcome on the standardised prompt features.

    One closed-form multi-output ridge regression (with an intercept) over all
    actions; its strength is the one of ``alphas`` with the lowest squared error on
    the validation split. Predictions are clipped to ``[low, high]``. Deterministic.
    """

    def __init__(
        self,
        low: float = -math.inf,
        high: float = math.inf,
        alphas: tuple[float, ...] = (0.1, 1.0, 10.0, 100.0, 1000.0),
    ) -> None:
        self.low, self.high, self.alphas = low, high, alphas

    def fit(self, x: np.ndarray, y: np.ndarray, x_val: np.ndarray, y_val: np.ndarray) -> RidgePredictor:
        """Fit on (queries, features) and (queries, actions) outcomes; pick the strength on the val pair."""
        self.mean = x.mean(axis=0)
        self.std = x.std(axis=0) + 1e-6
        self.intercept = y.mean(axis=0)
        z, z_val = (x - self.mean) / self.std, (x_val - self.mean) / self.std
        gram, moment = z.T @ z, z.T @ (y - self.intercept)
        best = math.inf
        for alpha in self.alphas:
            weights = np.linalg.solve(gram + alpha * np.eye(len(gram)), moment)
            error = float(((np.clip(z_val @ weights + self.intercept, self.low, self.high) - y_val) ** 2).mean())
            if error < best:
                best, self.alpha, self.weights = error, alpha, weights
        return self

    def predict(self, x: np.ndarray) -> np.ndarray:
        """(queries, actions) predictions."""
        return np.asarray(np.clip(((x - self.mean) / self.std) @ self.weights + self.intercept, self.low, self.high))


@dataclass
class ClearModel:
    """The CLEAR-style baseline's per-query curves: EM and billed tokens against the action."""

    exact_match: RidgePredictor
    billed_tokens: RidgePredictor
    ladders: list[list[int]]
    """Each mode's action columns by increasing budget."""

    @classmethod
    def fit(cls, train: ReplayTable, val: ReplayTable) -> ClearModel:
        """Fit both on ``train``'s prompt features and outcomes; pick their strengths on ``val``."""
        x, x_val, m, m_val = _features(train), _features(val), train.matrix, val.matrix
        return cls(
            RidgePredictor(0.0, 1.0).fit(x, m.exact_match, x_val, m_val.exact_match),
            RidgePredictor(0.0).fit(x, m.billed_tokens, x_val, m_val.billed_tokens),
            [train.ladder(mode) for mode in train.mode_names],
        )

    def predict(self, replay: ReplayTable) -> tuple[np.ndarray, np.ndarray]:
        """(queries, actions) predicted EM and billed tokens of ``replay``'s queries.

        A larger budget of one mode is never predicted to bill less (it never reasons
        less), so within a mode the smallest budget is the cheapest, as it is in fact.
        """
        x = _features(replay)
        tokens = self.billed_tokens.predict(x)
        for ladder in self.ladders:
            tokens[:, ladder] = np.maximum.accumulate(tokens[:, ladder], axis=1)
        return self.exact_match.predict(x), tokens


def clear_point(model: ClearModel, replay: ReplayTable, total_budget: float, setting: str) -> OperatingPoint:
    """The CLEAR-style allocation of ``total_budget`` billed tokens across ``replay``'s queries, scored.

    Each query's decision weighs its EM and billed tokens per action as ``model``
    predicts them from its prompt features; the one shadow price is set so that the
    split's actual billed tokens meet the budget (as a server's price follows the spend
    it observes). The outcomes are otherwise only looked up to score the allocation:
    a table's billed tokens hold the answer's length, which would tell right from
    wrong answers.

    Raises:
        ValueError: as :func:`clear_allocation` (e.g. a budget below the cheapest actions').
    """
    utility, cost = model.predict(replay)
    allocation = clear_allocation(utility, cost, total_budget, billed=replay.matrix.billed_tokens)
    return _point("CLEAR-style", setting, replay, allocation.columns)


def clear_points(train: ReplayTable, val: ReplayTable, targets: list[ReplayTable]) -> list[list[OperatingPoint]]:
    """CLEAR-style: one shadow price allocates each fixed action's total spend across the split.

    For every action of the table, the total budget on a target split is what that
    fixed action bills there, so each setting is compared with a fixed action at
    exactly equal spend on the same queries (see :func:`clear_allocation` and
    :func:`clear_point`). An action whose spend is below what the cheapest predicted
    actions bill on some target (the cheapest fixed action's, when the predictions
    put another action first) gives no setting.

    Returns:
        For each target table, its operating points (one per action's spend, in the
        same order on every target).
    """
    model = ClearModel.fit(train, val)
    points: list[list[OperatingPoint]] = [[] for _ in targets]
    for j, name in enumerate(train.matrix.actions):
        try:
            settings = [
                clear_point(model, target, float(target.matrix.billed_tokens[:, j].sum()), f"at the spend of {name}")
                for target in targets
            ]
        except ValueError:
            continue  # below the cheapest predicted allocation on some target
        for out, point in zip(points, settings, strict=True):
            out.append(point)
    return points


# --- replayed early-exit baselines -----------------------------------------------


def _probe_ladders(replay: ReplayTable) -> dict[str, list[int]]:
    """The ladders the probing rules walk, by name.

    Per mode: from budget 0 (a direct answer is the first probe) and, when the ladder
    starts at 0 and has more than two budgets, from the first non-zero budget.
    """
    ladders = {}
    for mode in replay.mode_names:
        full = replay.ladder(mode)
        ladders[f"{mode}, from b{replay.budgets[full[0]]}"] = full
        if replay.budgets[full[0]] == 0 and len(full) > 2:
            ladders[f"{mode}, from b{replay.budgets[full[1]]}"] = full[1:]
    return ladders


def _exit_bill(replay: ReplayTable, query: int, ladder: list[int], step: int, probe_token_price: float = 1.0) -> float:
    """What answering at checkpoint ``step`` of ``ladder`` bills, as TokenBudgetProbe-v0 bills it.

    The reasoning up to the checkpoint, the cue and answer tokens of the probes before
    it weighted by ``probe_token_price``, and the last probe's in full (it is the answer).
    """
    column = ladder[step]
    earlier = replay.probe_tokens[query, ladder[:step]].sum()
    return exit_bill(
        replay.reasoning_tokens[query, column], earlier, replay.probe_tokens[query, column], probe_token_price
    )


def _probe_exit_point(
    method: str, setting: str, replay: ReplayTable, ladder: list[int], stop: Callable[[int, int], bool]
) -> OperatingPoint:
    """Replay a probing rule over one ladder, with the probe environment's bill.

    Each query answers at the first checkpoint where ``stop(query, step)`` holds, where
    the LM has stopped reasoning by itself, or at the largest budget.
    """
    n = len(replay.matrix.ids)
    columns = np.empty(n, dtype=np.int64)
    billed = np.empty(n)
    for i in range(n):
        step = next(k for k, j in enumerate(ladder) if k == len(ladder) - 1 or replay.natural_stop[i, j] or stop(i, k))
        columns[i], billed[i] = ladder[step], _exit_bill(replay, i, ladder, step)
    rows = np.arange(n)
    return OperatingPoint(method, setting, replay.matrix.exact_match[rows, columns], billed, columns)


def dynasor_points(replay: ReplayTable, windows: tuple[int, ...] = (2, 3)) -> list[OperatingPoint]:
    """Dynasor-style certainty exit over each mode's budget ladder.

    The LM reasons once; at each budget of the ladder the answer is probed (the cue
    forced, the answer read). The method stops at the first budget where the last
    ``window`` probes agree, where the LM has stopped reasoning by itself, or at the
    largest budget, and answers with that probe. It is billed the reasoning up to
    there plus the cue and answer tokens of every probe it made. Ladders start at
    budget 0 (a direct answer is the first probe) or at the first non-zero budget.
    """
    points = []
    for name, ladder in _probe_ladders(replay).items():
        for window in windows:
            if window > len(ladder):
                continue

            def agree(i: int, step: int, ladder: list[int] = ladder, window: int = window) -> bool:
                recent = ladder[max(0, step - window + 1) : step + 1]
                return step + 1 >= window and len({replay.answers[i, k] for k in recent}) == 1

            points.append(_probe_exit_point("Dynasor-style", f"{name}, {window} agree", replay, ladder, agree))
    return points


def deer_points(replay: ReplayTable, thresholds: tuple[float, ...] = DEER_THRESHOLDS) -> list[OperatingPoint]:
    """DEER-style confidence exit over each mode's budget ladder.

    After DEER (Yang et al., 2025, "Dynamic Early Exit in Reasoning Models"). The
    ladders and the bill are the Dynasor-style rule's; the method stops at the first
    budget where the probe answer's confidence, the exponential of its mean token
    log-probability, exceeds ``threshold`` (or where the LM stopped by itself, or at the
    largest budget). Threshold 0 answers at the first probe; 1 never trusts one.

    Raises:
        ValueError: a threshold outside [0, 1].
    """
    bad = [t for t in thresholds if not 0.0 <= t <= 1.0]
    if bad:
        raise ValueError(f"DEER thresholds are confidences in [0, 1]; got {bad}")
    confidence = np.exp(replay.answer_logprob)
    points = []
    for name, ladder in _probe_ladders(replay).items():
        for threshold in thresholds:

            def confident(i: int, step: int, ladder: list[int] = ladder, threshold: float = threshold) -> bool:
                return bool(confidence[i, ladder[step]] > threshold)

            setting = f"{name}, confidence > {threshold:g}"
            points.append(_probe_exit_point("DEER-style", setting, replay, ladder, confident))
    return points


def probe_controller_point(
    policy: BudgetPolicy, replay: ReplayTable, questions: dict[str, str], setting: str = ""
) -> OperatingPoint:
    """The learned probe controller, replayed through its runtime session as a server runs it.

    Each query's session starts from the question text and is told the table's probe
    at each checkpoint (answer, mean log-probability, tokens billed so far, natural
    stop) until it answers; it is billed as TokenBudgetProbe-v0 and the probing rules
    bill. A controller that escalates is billed as the environment bills it: what it
    billed so far plus the full bill of the fixed action (checkpoint budget, escalate
    mode), whose exact match it gets (and whose column ``actions`` records).

    Raises:
        ValueError: the policy is not a probe controller, its checkpoints are not the
            table's budgets of its mode (or of its escalate mode), or a query has no
            question.
    """
    if policy.probe is None:
        raise ValueError(f"{policy.policy_id} is not a probe controller (trained on {policy.spec.get('env_id')!r})")
    settings = policy.probe
    if settings.mode not in replay.mode_names:
        raise ValueError(f"the controller reasons in mode {settings.mode!r}; the table has {replay.mode_names}")
    ladder = replay.ladder(settings.mode)
    if tuple(int(replay.budgets[j]) for j in ladder) != settings.checkpoints:
        raise ValueError(
            f"the controller's checkpoints {list(settings.checkpoints)} are not the table's {settings.mode} budgets "
            f"{[int(replay.budgets[j]) for j in ladder]}"
        )
    table = list(zip(replay.budgets.tolist(), replay.modes, strict=True))
    columns_of_escalation = escalate_columns(table, settings.mode, settings.escalate_mode, "the outcome table")
    escalate_column = dict(zip(settings.checkpoints, columns_of_escalation, strict=False))
    missing = [query_id for query_id in replay.matrix.ids if query_id not in questions]
    if missing:
        raise ValueError(f"{len(missing)} queries have no question in queries.parquet, e.g. {missing[0]!r}")
    n = len(replay.matrix.ids)
    columns = np.empty(n, dtype=np.int64)
    billed = np.empty(n)
    for i, query_id in enumerate(replay.matrix.ids):
        session = policy.start(questions[query_id])
        spent, reasoned = 0.0, 0.0
        for step, j in enumerate(ladder):
            # Accumulated as the environment does, so the inputs match it to the last bit.
            spent += segment_bill(
                replay.reasoning_tokens[i, j], reasoned, replay.probe_tokens[i, j], settings.probe_token_price
            )
            reasoned = replay.reasoning_tokens[i, j]
            decision = session.observe(
                replay.answers[i, j], replay.answer_logprob[i, j], spent, replay.natural_stop[i, j]
            )
            if decision == ANSWER:
                columns[i], billed[i] = j, _exit_bill(replay, i, ladder, step, settings.probe_token_price)
                break
            if decision == ESCALATE:
                # The escalated mode reasons afresh from the prompt: its whole bill comes on top.
                columns[i] = escalate_column[int(replay.budgets[j])]
                billed[i] = spent + replay.matrix.billed_tokens[i, columns[i]]
                break
    rows = np.arange(n)
    return OperatingPoint(
        "tokenopt probe controller", setting, replay.matrix.exact_match[rows, columns], billed, columns
    )


def stream_environment(replay: ReplayTable) -> Any:
    """TokenBudgetStream-v0 on ``replay``'s split, with the environment's default stream length and budget."""
    from tokenopt.envs import TableSource, TokenBudgetStreamEnv

    return TokenBudgetStreamEnv(source=TableSource(replay.matrix, str(replay.matrix.splits[0])))


def stream_orders(queries: int, length: int, passes: int, seed: int) -> list[np.ndarray]:
    """Each pass's seeded order of a split's queries, completed to whole streams of ``length``.

    The last, shorter stream is completed with queries from the start of the order;
    positions at or past ``queries`` are padding, whose second answers are not counted.

    Raises:
        ValueError: ``passes`` < 1.
    """
    if passes < 1:
        raise ValueError(f"passes must be >= 1; got {passes}")
    orders = []
    for p in range(passes):
        order = np.random.default_rng(seed * 7919 + p).permutation(queries)
        orders.append(np.concatenate([order, order[: (-queries) % length]]))
    return orders


def clear_stream_point(
    model: ClearModel, replay: ReplayTable, stream_budget: float, length: int, passes: int = 4, seed: int = 0
) -> OperatingPoint:
    """CLEAR-style within each stream of the stream policy's replay, at the stream environment's budget.

    The streams are :func:`stream_orders`' (the same as :func:`stream_policy_point`
    replays, padding left out); each is a batch that :func:`clear_point` allocates
    offline with ``stream_budget`` (cut in proportion for the last, shorter stream).

    Returns:
        Per query, the mean exact match and billed tokens over the passes.

    Raises:
        ValueError: a stream's budget is below its cheapest predicted allocation, or
            ``passes`` < 1.
    """
    n = len(replay.matrix.ids)
    exact, billed = np.zeros(n), np.zeros(n)
    for padded in stream_orders(n, length, passes, seed):
        order = padded[:n]
        for start in range(0, n, length):
            queries = order[start : start + length]
            point = clear_point(model, replay.take(queries), stream_budget * len(queries) / length, "")
            exact[queries] += point.exact_match / passes
            billed[queries] += point.billed_tokens / passes
    setting = f"each stream of {length} queries, {stream_budget / length:.2f} tokens a query"
    return OperatingPoint("CLEAR-style", setting, exact, billed)


def stream_policy_point(policy: BudgetPolicy, replay: ReplayTable, passes: int = 4, seed: int = 0) -> OperatingPoint:
    """The stream policy (``tokenopt train --env stream``), replayed on TokenBudgetStream-v0 over a split.

    Each pass puts the split's queries in a seeded order and cuts it into streams of
    the environment's ``stream_length``, each sharing the environment's total budget as
    it derives it on this split (its default ``budget_fraction`` of the max-budget greedy
    action's tokens). The last, shorter stream is completed with queries from the start
    of the order, whose second answers are not counted. The policy decides as its
    training validator does: the most probable action for the environment's
    observation (the table's prompt features, the fractions of budget and queries
    left), through the runtime; the environment answers as it does in training (an
    action that no longer fits falls back to the cheapest, and a query nothing fits
    scores 0 and costs nothing).

    Returns:
        Per query, the mean exact match and billed tokens over the passes (``actions``:
        the first pass's); the setting names the streams' length and budget.

    Raises:
        ValueError: the policy is not a stream policy, or ``passes`` < 1.
    """
    if len(policy.extra_inputs) != 2 or policy.probe is not None:
        raise ValueError(f"{policy.policy_id} is not a stream policy (trained on {policy.spec.get('env_id')!r})")
    m = replay.matrix
    env = stream_environment(replay)
    n, length = len(m.ids), env.stream_length
    column = {name: j for j, name in enumerate(m.actions)}
    exact, billed = np.zeros(n), np.zeros(n)
    first_actions = np.zeros(n, dtype=np.int64)
    for p, padded in enumerate(stream_orders(n, length, passes, seed)):
        for start in range(0, len(padded), length):
            stream = padded[start : start + length]
            observation, _ = env.reset(options={"order": stream})
            for position, query in enumerate(stream):
                action = int(np.argmax(policy.probabilities(observation[None, :])[0]))
                observation, _, _, _, info = env.step(action)
                if start + position < n:  # a padding query's second answer is not counted
                    exact[query] += info["em"] / passes
                    billed[query] += info["billed_tokens"] / passes
                    if p == 0:
                        first_actions[query] = column[info["action"]]
    per_query = env.total_budget / length
    setting = f"streams of {length} queries, {per_query:.2f} tokens a query"
    return OperatingPoint("tokenopt stream policy", setting, exact, billed, first_actions)


def probe_oracle_point(
    replay: ReplayTable,
    mode: str,
    cost_model: CostModel,
    probe_token_price: float = 1.0,
    escalate_mode: str | None = None,
) -> OperatingPoint:
    """Each query's best exit in hindsight on ``mode``'s ladder, billed as the probe environment bills.

    The most any probe controller reasoning in ``mode`` could earn: it may answer at
    any checkpoint up to the first where the LM stopped by itself (the earliest of
    equally rewarded ones), paying for every probe on the way. With ``escalate_mode``
    it may also escalate at any checkpoint before that one, billed as the environment
    bills escalation (everything so far plus the fixed action's full bill).
    """
    ladder = replay.ladder(mode)
    escalate_of = {} if escalate_mode is None else {int(replay.budgets[j]): j for j in replay.ladder(escalate_mode)}
    n = len(replay.matrix.ids)
    columns = np.empty(n, dtype=np.int64)
    billed = np.empty(n)
    for i in range(n):
        last = next(k for k, j in enumerate(ladder) if k == len(ladder) - 1 or replay.natural_stop[i, j])
        options = [(ladder[k], _exit_bill(replay, i, ladder, k, probe_token_price)) for k in range(last + 1)]
        if escalate_mode is not None:
            spent = 0.0
            for k in range(last):
                j = ladder[k]
                spent += probe_token_price * replay.probe_tokens[i, j]
                column = escalate_of[int(replay.budgets[j])]
                reasoned = replay.reasoning_tokens[i, j] + spent
                options.append((column, reasoned + replay.matrix.billed_tokens[i, column]))
        em = replay.matrix.exact_match[i, [column for column, _ in options]]
        bills = np.array([bill for _, bill in options])
        best = int(np.argmax(cost_model.reward(em, bills, replay.matrix.prompt_tokens[i])))
        columns[i], billed[i] = options[best]
    rows = np.arange(n)
    setting = f"{mode}, best exit" + ("" if escalate_mode is None else f" or escalation to {escalate_mode}")
    return OperatingPoint("probe oracle", setting, replay.matrix.exact_match[rows, columns], billed, columns)


def _majority_probability(leader: int, runner_up: int) -> float:
    """P(p_leader > p_runner_up) under a uniform prior: P(X > 1/2), X ~ Beta(leader+1, runner_up+1).

    For integer parameters, P(X <= 1/2) = P(Binomial(a + b - 1, 1/2) >= a).
    """
    a, b = leader + 1, runner_up + 1
    n = a + b - 1
    at_least_a = sum(math.comb(n, k) for k in range(a, n + 1)) / 2**n
    return 1.0 - at_least_a


def adaptive_consistency_points(
    replay: ReplayTable, thresholds: tuple[float, ...] = (0.75, 0.9, 0.95)
) -> list[OperatingPoint]:
    """Adaptive-Consistency-style sampling for every ``sc<k>`` action.

    Samples are drawn one at a time (in the table's sampling order) and drawing stops
    once the vote is decided: the leader cannot be overtaken by the samples left
    (the ``decided`` rule, which returns the full vote's answer), or the Beta
    posterior probability that the leading answer is the majority passes a threshold
    (Adaptive-Consistency's stopping rule). Billed: the samples drawn.
    """
    points = []
    rules: list[tuple[str, float | None]] = [("decided", None)] + [(f"Beta >= {t:g}", t) for t in thresholds]
    n = len(replay.matrix.ids)
    for j, name in enumerate(replay.matrix.actions):
        mode = parse_mode(replay.modes[j])
        if mode.kind != "sc" or mode.width < 2:
            continue
        for rule, threshold in rules:
            em = np.empty(n)
            billed = np.empty(n)
            for i in range(n):
                answers, correct, tokens, logprobs = replay.samples[i, j]
                k = len(answers)
                drawn = k
                for count in range(1, k + 1):
                    tally = Counter(answers[:count]).most_common(2)
                    leader = tally[0][1]
                    runner = tally[1][1] if len(tally) > 1 else 0
                    if threshold is None:
                        stop = leader - runner > k - count
                    else:
                        stop = count >= 2 and _majority_probability(leader, runner) >= threshold
                    if stop:
                        drawn = count
                        break
                chosen = majority_vote(answers[:drawn], logprobs[:drawn], normalized=True)
                em[i], billed[i] = correct[chosen], tokens[:drawn].sum()
            points.append(OperatingPoint("Adaptive-Consistency-style", f"{name}, {rule}", em, billed, np.full(n, j)))
    return points
