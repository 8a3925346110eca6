"""Off-policy refinement of an exported policy from a server's decision log (``tokenopt train --from-log``).

A server that logs its decisions (:mod:`tokenopt.decisions`) and receives feedback
(``POST /v1/feedback``) collects logged bandit feedback: for each request the
features x, the action a it served, the probability p (the propensity) with which
its serving rule picked a, and the outcome. The reward of a row is
``correct - lambda * cost(billed_tokens)`` (:class:`tokenopt.cost.CostModel`). For a
price-conditioned policy, lambda is the one the row was decided at (the log's
``cost_weight``), which is also the policy's last input; its ``price_fallback``
intervals are kept, and the greedy policies are valued as served there.

The exported policy is loaded into an equivalent torch MLP (same normalisation,
layers and activations) and trained on the rows with feedback by a clipped,
importance-weighted policy gradient:

- the importance ratio of a row is ``pi_theta(a|x) / p``. It is split into a fixed
  behaviour weight ``pi_prox(a|x) / p`` and ``pi_theta(a|x) / pi_prox(a|x)``, where
  ``pi_prox`` is the policy at the start of the epoch, and PPO's clipping (Schulman
  et al. 2017) is applied to the second factor only: the decoupled objective of
  Hilton, Cobbe & Schulman, *Batch size-invariance for policy optimization* (2022).
  Clipping the whole ratio around 1 would hold every logged action's probability
  within ``1 +- clip`` of its propensity, so with a little exploration (p = eps / K
  for an explored action) nothing could ever become the argmax. Here the surrogate
  stops rewarding a move of a logged action's probability beyond the factor
  ``1 +- clip`` within an epoch, so the policy leaves the one it starts from step by
  step, and ``--epochs`` bounds how far;
- the advantage is the reward minus the self-normalised IPS estimate of the old
  policy's value on the training rows (a baseline makes the IPS objective insensitive
  to a shift of the reward, which self-normalisation achieves too: Joachims,
  Swaminathan & de Rijke, *Deep learning with logged bandit feedback*, ICLR 2018),
  and each minibatch loss is self-normalised by its behaviour weights;
- a penalty ``kl_coef * KL(pi_old || pi_theta)`` on the training rows (the fixed-weight
  form of PPO's KL penalty, Schulman et al. 2017, section 4) holds decisions in place
  where the feedback is thin or mixed, while a consistent signal still moves them. On
  a real server log of 396 feedback rows for a near-optimal demo policy, refinement
  without it changed 63% of the held-out decisions and lost 0.022 reward on the demo
  test split; with 0.1, 23% and 0.009;
- a small entropy bonus keeps the policy from collapsing onto the few logged rows.

20% of the rows (seeded) are held out; on them the greedy old and new policies are
valued by self-normalised IPS (Swaminathan & Joachims, NeurIPS 2015): the weight of a
row is ``1[argmax pi(x) = a] / p``. A bootstrap over the held-out rows gives the
difference an interval, and the verdict (better, worse, cannot tell) says whether the
refined policy should replace the old one; an estimate resting on few effective rows
is flagged, since the interval is then unreliable too. A log whose server never
explored (every propensity 1) says nothing about the actions it did not pick; that is
detected and reported, since only ``--explore`` can teach the policy new actions.
"""

from __future__ import annotations

import dataclasses
import difflib
import json
import math
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
import torch
import yaml

from tokenopt.agents.common.hyperparams import ACTIVATIONS
from tokenopt.agents.common.run_dir import RunDir
from tokenopt.agents.export import export_policy
from tokenopt.cost import CostSettings, with_price
from tokenopt.decisions import LoggedDecisions, read_decisions
from tokenopt.runtime import PROBE_ENV_ID, BudgetPolicy

__all__ = [
    "FromLogConfig",
    "FromLogResult",
    "LoggedRows",
    "PolicyNetwork",
    "greedy_snips",
    "logged_rows",
    "refine_from_log",
    "snips_gain_interval",
]

MIN_REGION_ROWS = 20
"""Rows under one old-policy decision from which a single logged action is warned about."""
MIN_EFFECTIVE_ROWS = 30
"""Fewer effective held-out rows than this (or 10% of them) make the new policy's estimate a warning."""


@dataclass
class FromLogConfig(CostSettings):
    """Settings of ``tokenopt train --from-log`` (the cost fields come from :class:`~tokenopt.cost.CostSettings`)."""

    log: str | list[str] = ""
    """Decision log the server wrote (``--log``); several replicas' logs (files, folders, glob patterns) are read
    together, feedback joined across them."""
    init_from: str = ""
    """Exported policy folder to refine (policy.json + policy.npz)."""
    out: str = "runs/from-log"
    """Run folder: ``policy/``, ``from_log.json``, ``config.yml``."""
    arm: str = "A"
    """A/B arm whose rows are used; its policy must share the policy's actions and features."""
    epochs: int = 30
    """Passes over the training rows; the clipping's reference policy is refreshed at each."""
    clip: float = 0.2
    """PPO clip range: an epoch moves a logged action's probability by at most this factor."""
    entropy_coef: float = 0.01
    """Weight of the entropy bonus."""
    kl_coef: float = 0.1
    """Weight of the penalty KL(old policy || new policy) on the training rows: where the feedback is thin
    or mixed, decisions stay."""
    learning_rate: float = 2e-3
    """Adam's learning rate."""
    batch_size: int = 256
    """Rows per gradient step."""
    holdout: float = 0.2
    """Share of the rows held out to value the old and new policies."""
    seed: int = 0
    """Seed of the holdout split, the minibatch order and torch."""

    def validate(self) -> None:
        """Check the settings.

        Raises:
            ValueError: a setting outside its range, named with the accepted range.
        """
        if not self.log:
            raise ValueError("--from-log needs the decision log: --from-log LOG")
        if not self.init_from:
            raise ValueError("--from-log refines an exported policy: give it with --init-from POLICY_DIR")
        if self.epochs < 1:
            raise ValueError(f"--epochs must be at least 1; got {self.epochs}")
        if not 0.0 < self.clip < 1.0:
            raise ValueError(f"--clip must be in (0, 1), e.g. 0.2; got {self.clip}")
        if not 0.0 < self.holdout < 1.0:
            raise ValueError(f"holdout must be in (0, 1), e.g. 0.2; got {self.holdout}")
        if not self.learning_rate > 0:
            raise ValueError(f"learning_rate must be > 0; got {self.learning_rate}")
        if self.batch_size < 1:
            raise ValueError(f"batch_size must be at least 1; got {self.batch_size}")
        for name in ("entropy_coef", "kl_coef"):
            value = getattr(self, name)
            if not math.isfinite(value) or value < 0:
                raise ValueError(f"{name} must be a finite number >= 0; got {value}")
        self.cost_model()  # validates the prices

    def with_overrides(self, overrides: dict[str, Any]) -> FromLogConfig:
        """A copy with ``--set key=value`` overrides applied.

        Raises:
            ValueError: an unknown key, named with its closest match.
        """
        known = [f.name for f in dataclasses.fields(self) if f.name not in ("log", "init_from", "out")]
        for key in overrides:
            if key not in known:
                close = difflib.get_close_matches(key, known, n=1)
                hint = f"; did you mean {close[0]!r}?" if close else f"; the settings are {known}"
                raise ValueError(f"unknown --from-log setting {key!r}{hint}")
        typed: dict[str, Any] = {}
        for key, value in overrides.items():
            kind = type(getattr(self, key))
            try:
                # YAML reads 3e-4 as a string (it wants 3.0e-4): convert to the setting's type.
                typed[key] = kind(value) if kind is not bool else bool(value)
            except (TypeError, ValueError):
                raise ValueError(f"--set {key}={value!r}: expected a value of type {kind.__name__}") from None
        return dataclasses.replace(self, **typed)


@dataclass
class LoggedRows:
    """The usable rows of one arm: policy-decided, status 200, with feedback."""

    ids: list[str]
    policy_ids: list[str]
    """Policies that decided these rows."""
    features: np.ndarray
    """(rows, inputs) raw policy inputs, as the server logged them."""
    actions: np.ndarray
    """Index of the served action in the action table."""
    propensity: np.ndarray
    correct: np.ndarray
    billed_tokens: np.ndarray
    cost_weight: np.ndarray
    """The lambda each row was decided at (NaN in logs that predate it); a price-conditioned policy's input."""
    arm_rows: int
    """Rows of the arm in the log (any status, bypassed included)."""
    decided_rows: int
    """Of them, policy-decided rows answered with status 200."""
    capped_rows: int
    """Rows with feedback left out because the client capped their budget."""
    logs: list[str] = field(default_factory=list)
    """The decision logs read."""
    log_notes: list[str] = field(default_factory=list)
    """What reading several logs together did (:meth:`tokenopt.decisions.LoggedDecisions.notes`)."""


class PolicyNetwork(torch.nn.Module):
    """An exported policy's MLP in torch: normalised inputs in, action logits out.

    The modules are laid out as SB3's ``MlpPolicy`` actor (``policy_net`` layers, then
    ``action_net``), so :func:`tokenopt.agents.export.export_policy` writes it as it
    writes a trained agent.

    Args:
        layers: the runtime's (weight as inputs x outputs, bias, activation) layers.

    Raises:
        ValueError: an activation torch cannot mirror, or an output layer with one.
    """

    def __init__(self, layers: list[tuple[np.ndarray, np.ndarray, str]]) -> None:
        super().__init__()
        if layers[-1][2] != "none":
            raise ValueError(f"the policy's output layer has activation {layers[-1][2]!r}; expected logits ('none')")
        modules: list[torch.nn.Module] = []
        for weight, bias, activation in layers[:-1]:
            modules.append(self._linear(weight, bias))
            if activation != "none":
                if activation not in ACTIVATIONS:
                    raise ValueError(f"cannot refine a layer with activation {activation!r}; expected tanh or relu")
                modules.append(ACTIVATIONS[activation]())
        self.policy_net = torch.nn.Sequential(*modules)
        self.action_net = self._linear(*layers[-1][:2])

    @staticmethod
    def _linear(weight: np.ndarray, bias: np.ndarray) -> torch.nn.Linear:
        linear = torch.nn.Linear(weight.shape[0], weight.shape[1], dtype=torch.float64)
        with torch.no_grad():
            linear.weight.copy_(torch.as_tensor(weight.T, dtype=torch.float64))
            linear.bias.copy_(torch.as_tensor(bias, dtype=torch.float64))
        return linear

    def forward(self, normalized: torch.Tensor) -> torch.Tensor:
        """Action logits of normalised inputs."""
        return self.action_net(self.policy_net(normalized))

    def as_exportable(self) -> Any:
        """This network in the shape :func:`export_policy` reads from an SB3 model."""
        return SimpleNamespace(policy=SimpleNamespace(mlp_extractor=SimpleNamespace(policy_net=self.policy_net),
                                                      action_net=self.action_net))  # fmt: skip


def _normalize(policy: BudgetPolicy, features: np.ndarray) -> np.ndarray:
    """The runtime's input normalisation (the policy's only member's statistics)."""
    mean, var = policy.member_normalization[0]
    normalized = (np.asarray(features, dtype=np.float64) - mean) / np.sqrt(var + policy.epsilon)
    return np.clip(normalized, -policy.clip, policy.clip)


def _check_policy(policy: BudgetPolicy, path: Path) -> None:
    if len(policy.members) != 1:
        raise ValueError(
            f"--init-from {path}: an ensemble of {len(policy.members)} members; --from-log refines a single "
            "policy (refine each member's policy, then ensemble them)"
        )
    if policy.spec.get("env_id") == PROBE_ENV_ID:
        raise ValueError(
            f"--init-from {path} is a TokenBudgetProbe-v0 controller (answer or continue at checkpoints); "
            "--from-log refines policies that pick a (budget, mode) per request"
        )
    outputs = policy.members[0][-1][0].shape[1]
    if outputs != len(policy.actions):
        raise ValueError(f"--init-from {path}: {outputs} outputs for {len(policy.actions)} actions")


def _check_arm(decisions: LoggedDecisions, log: str, arm: str, policy: BudgetPolicy, path: Path) -> None:
    """Refuse a log whose arm was served with another action table, feature spec or extra inputs."""
    if arm not in decisions.arms:
        raise ValueError(
            f"{log} has no arm {arm!r} (its arms: {sorted(decisions.arms) or 'none'}); choose one with --arm"
        )
    description = decisions.arms[arm]
    served = f"arm {arm} of {log} (policy {description.get('policy_id')!r} at {description.get('path')})"
    refined = f"the policy {policy.policy_id!r} at {path}"
    policy_actions = [str(action["name"]) for action in policy.actions]
    log_actions = [str(name) for name in description.get("actions", [])]  # type: ignore[attr-defined]
    if log_actions != policy_actions:
        raise ValueError(
            f"the action table of {served} is {log_actions}, that of {refined} is {policy_actions}; "
            "refine a policy with the action table the log was served with"
        )
    log_spec = dict(description.get("feature_spec") or {})  # type: ignore[call-overload]
    policy_spec = dict(policy.spec.get("feature_spec") or {})  # type: ignore[call-overload]
    if log_spec != policy_spec:
        keys = sorted(key for key in log_spec | policy_spec if log_spec.get(key) != policy_spec.get(key))
        raise ValueError(
            f"the feature spec of {served} differs from that of {refined} in {keys}; the logged features "
            "were computed otherwise"
        )
    log_extras = [str(name) for name in description.get("extra_inputs", [])]  # type: ignore[attr-defined]
    if log_extras != policy.extra_inputs:
        raise ValueError(f"{served} has extra inputs {log_extras}, {refined} {policy.extra_inputs}")


def logged_rows(
    log: str | Path | Sequence[str | Path], arm: str, policy: BudgetPolicy, policy_path: str | Path
) -> LoggedRows:
    """The rows of ``arm`` a refinement can learn from: decided by the policy, status 200, with feedback.

    A row whose budget the client capped (``max_tokens`` below the action's budget) is
    left out: its outcome is not the outcome of the logged action.

    ``log`` may name several replicas' logs: they are read together
    (:func:`tokenopt.decisions.read_decisions`).

    Raises:
        FileNotFoundError: no log at ``log``.
        ValueError: not a decision log; the arm's action table, feature spec or extra
            inputs differ from the policy's (naming both); no usable row; a propensity
            outside (0, 1]; an action index outside the table or not matching its name.
    """
    decisions = read_decisions(log)
    label = ", ".join(decisions.logs)
    _check_arm(decisions, label, arm, policy, Path(policy_path))
    in_arm = decisions.arm == arm
    decided = in_arm & (decisions.status == 200) & ~decisions.bypass & (decisions.action_index >= 0)
    names = [str(action["name"]) for action in policy.actions]
    for row in np.flatnonzero(decided):
        action = int(decisions.action_index[row])
        if action >= len(names) or names[action] != decisions.action[row]:
            raise ValueError(
                f"{decisions.source[row]}: row {decisions.id[row]!r} has action {decisions.action[row]!r} at index "
                f"{action}, but the table's action {action} is {names[action] if action < len(names) else 'missing'}"
            )
    budgets = np.array([int(action["budget"]) for action in policy.actions])  # type: ignore[call-overload]
    capped = decided & (decisions.budget != budgets[np.where(decided, decisions.action_index, 0)])
    with_feedback = decided & ~np.isnan(decisions.correct)
    usable = with_feedback & ~capped
    if not usable.any():
        raise ValueError(
            f"{label}: arm {arm} has {int(in_arm.sum())} rows, {int(decided.sum())} decided by its policy with "
            f"status 200, {int(with_feedback.sum())} of them with feedback ({int((with_feedback & capped).sum())} "
            "with a budget the client capped): nothing to learn from; attach outcomes with POST /v1/feedback first"
        )
    index = np.flatnonzero(usable)
    inputs = policy.features.dim + len(policy.extra_inputs)
    if decisions.features.shape[1] != inputs:
        raise ValueError(
            f"{label}: rows have {decisions.features.shape[1]} features, the policy at {policy_path} takes {inputs}"
        )
    propensity = decisions.propensity[index]
    bad = np.flatnonzero(~((propensity > 0) & (propensity <= 1)))
    if bad.size:
        first = int(index[bad[0]])
        raise ValueError(
            f"{decisions.source[first]}: row {decisions.id[first]!r} has propensity {decisions.propensity[first]}; "
            "propensities are probabilities in (0, 1] of the serving rule"
        )
    if policy.cost_weight_range is not None:
        low, high = policy.cost_weight_range
        weights = decisions.cost_weight[index]
        outside = np.flatnonzero(~((weights >= low) & (weights <= high)))  # NaN included
        if outside.size:
            first = int(index[outside[0]])
            raise ValueError(
                f"{decisions.source[first]}: row {decisions.id[first]!r} was decided at cost_weight "
                f"{decisions.cost_weight[first]}, outside the price-conditioned policy's range {low:g}:{high:g} "
                f"({outside.size} such rows; a log written before lambda was recorded has none): refine on rows "
                "served by a price-conditioned policy with the same range"
            )
    return LoggedRows(
        ids=[decisions.id[row] for row in index],
        policy_ids=sorted({decisions.policy_id[row] for row in index}),
        features=decisions.features[index].astype(np.float64),
        actions=decisions.action_index[index],
        propensity=propensity,
        correct=decisions.correct[index],
        billed_tokens=decisions.billed_tokens[index],
        cost_weight=decisions.cost_weight[index],
        arm_rows=int(in_arm.sum()),
        decided_rows=int(decided.sum()),
        capped_rows=int((with_feedback & capped).sum()),
        logs=decisions.logs,
        log_notes=decisions.notes(),
    )


def greedy_snips(
    probabilities: np.ndarray, actions: np.ndarray, propensity: np.ndarray, values: dict[str, np.ndarray]
) -> dict[str, float | int | None]:
    """Self-normalised IPS estimates of the greedy policy's mean of each of ``values``.

    A row's weight is ``1[argmax probabilities = logged action] / propensity``. The
    estimates are None when no row's logged action is the greedy one.
    """
    weights = (probabilities.argmax(axis=1) == actions) / propensity
    total = float(weights.sum())
    result: dict[str, float | int | None] = {
        "matched_rows": int(np.count_nonzero(weights)),
        "effective_rows": total**2 / float((weights**2).sum()) if total > 0 else 0.0,
    }
    for name, value in values.items():
        result[name] = float((weights * value).sum() / total) if total > 0 else None
    return result


def snips_gain_interval(
    old_probabilities: np.ndarray,
    new_probabilities: np.ndarray,
    actions: np.ndarray,
    propensity: np.ndarray,
    rewards: np.ndarray,
    *,
    confidence: float = 0.95,
    resamples: int = 1000,
    seed: int = 0,
) -> tuple[float, float] | None:
    """Two-sided percentile bootstrap interval of SNIPS(new greedy) - SNIPS(old greedy) over the rows.

    Rows are resampled with replacement (both estimates on the same resample); a
    resample where either policy matches no row is dropped. None when fewer than
    half the resamples are usable.
    """
    rng = np.random.default_rng(seed)
    old_weights = (old_probabilities.argmax(axis=1) == actions) / propensity
    new_weights = (new_probabilities.argmax(axis=1) == actions) / propensity
    indices = rng.integers(0, len(actions), size=(resamples, len(actions)))
    sums = {}
    for name, weights in (("old", old_weights), ("new", new_weights)):
        sampled = weights[indices]
        sums[name] = ((sampled * rewards[indices]).sum(axis=1), sampled.sum(axis=1))
    usable = (sums["old"][1] > 0) & (sums["new"][1] > 0)
    if usable.sum() < resamples / 2:
        return None
    gains = sums["new"][0][usable] / sums["new"][1][usable] - sums["old"][0][usable] / sums["old"][1][usable]
    tail = (1.0 - confidence) / 2.0
    return float(np.quantile(gains, tail)), float(np.quantile(gains, 1.0 - tail))


@dataclass
class FromLogResult:
    """What the refinement did and how the old and new policies compare on the held-out rows."""

    policy_dir: str
    policy_id: str
    init_policy_id: str
    log_policy_ids: list[str]
    """Policies that served the used rows (the arm's; not necessarily the refined one)."""
    rows: dict[str, int]
    """Rows of the arm; decided with status 200; capped by the client (left out); used; trained on; held out."""
    baseline: float
    """Self-normalised IPS value of the old policy on the training rows (the advantage's baseline)."""
    holdout_old: dict[str, float | int | None]
    """Greedy old policy on the held-out rows: reward, em, billed_tokens (SNIPS), matched and effective rows."""
    holdout_new: dict[str, float | int | None]
    """The same for the refined policy."""
    holdout_logged: dict[str, float]
    """What the serving rule itself earned on the held-out rows (plain means)."""
    holdout_gain: float | None
    """SNIPS reward of the new greedy policy minus the old's on the held-out rows."""
    holdout_gain_interval: list[float] | None
    """Its 95% bootstrap interval (1,000 resamples of the held-out rows)."""
    verdict: str
    """``better``, ``worse`` or ``cannot tell``: where that interval lies against 0."""
    changed_decisions: float
    """Share of held-out rows whose greedy action the refinement changed."""
    stochastic_share: float
    """Share of used rows served with propensity below 1 (the server explored)."""
    off_greedy_share: float
    """Share of used rows whose action is not the old policy's greedy one: the evidence about other actions."""
    single_action_regions: dict[str, int]
    """Old-policy decisions (its argmax actions) under which the log holds one action only, with their rows."""
    warnings: list[str] = field(default_factory=list)
    logs: list[str] = field(default_factory=list)
    """The decision logs read (one per replica)."""
    log_notes: list[str] = field(default_factory=list)
    """What reading several logs together did: feedback joined across replicas, duplicate ids, orphan feedback."""
    epochs: list[dict[str, float]] = field(default_factory=list)
    """Per epoch: mean loss and entropy."""
    seconds: float = 0.0

    def to_dict(self) -> dict[str, Any]:
        """The result as JSON-ready data."""
        return asdict(self)


def _support_warnings(rows: LoggedRows, old_greedy: np.ndarray, names: list[str]) -> tuple[dict[str, int], list[str]]:
    """The decision regions with one logged action, and the warnings the log's support calls for.

    A region is the set of rows on which the old policy picks one action: where the log
    holds that action only, nothing in it says whether another action is better there.
    """
    single: dict[str, int] = {}
    for region in np.unique(old_greedy):
        in_region = old_greedy == region
        if np.unique(rows.actions[in_region]).size < 2:
            single[names[int(region)]] = int(in_region.sum())
    warnings = []
    if bool(np.all(rows.propensity >= 1.0)):
        warnings.append(
            "every used row was served with propensity 1 (the server did not explore): the log says nothing "
            "about the actions the policy did not pick, so the refinement cannot learn that another action is "
            "better; serve with --explore EPS (e.g. 0.1) and collect feedback again to learn new actions"
        )
    elif unexplored := {name: count for name, count in single.items() if count >= MIN_REGION_ROWS}:
        # A region of a few rows can miss exploration by chance; warn where that is unlikely.
        warnings.append(
            f"where the old policy picks {sorted(unexplored)} ({sum(unexplored.values())} rows), the log holds "
            "a single action: there it cannot tell whether another action is better; serve with --explore EPS "
            "(or a larger EPS) to learn new actions there"
        )
    return single, warnings


def _optimise(
    network: PolicyNetwork,
    inputs: torch.Tensor,
    actions: torch.Tensor,
    propensity: torch.Tensor,
    advantages: torch.Tensor,
    train: np.ndarray,
    config: FromLogConfig,
    rng: np.random.Generator,
) -> list[dict[str, float]]:
    """Maximise the clipped, importance-weighted surrogate on the training rows; the per-epoch loss and entropy."""
    with torch.no_grad():
        old_log_probabilities = torch.log_softmax(network(inputs), dim=1)
    optimizer = torch.optim.Adam(network.parameters(), lr=config.learning_rate)
    history: list[dict[str, float]] = []
    for _ in range(config.epochs):
        with torch.no_grad():
            # The epoch's reference policy: clipping bounds the move away from it.
            reference = torch.log_softmax(network(inputs), dim=1).gather(1, actions[:, None]).squeeze(1)
        weights = torch.exp(reference) / propensity
        losses, entropies = [], []
        shuffled = train[rng.permutation(len(train))]
        for start in range(0, len(train), config.batch_size):
            batch = torch.as_tensor(shuffled[start : start + config.batch_size])
            log_probabilities = torch.log_softmax(network(inputs[batch]), dim=1)
            ratio = torch.exp(log_probabilities.gather(1, actions[batch, None]).squeeze(1) - reference[batch])
            advantage = advantages[batch]
            surrogate = torch.minimum(
                ratio * advantage, torch.clamp(ratio, 1.0 - config.clip, 1.0 + config.clip) * advantage
            )
            entropy = -(log_probabilities.exp() * log_probabilities).sum(dim=1).mean()
            old = old_log_probabilities[batch]
            divergence = (old.exp() * (old - log_probabilities)).sum(dim=1).mean()
            loss = (
                -(weights[batch] * surrogate).sum() / weights[batch].sum()
                - config.entropy_coef * entropy
                + config.kl_coef * divergence
            )
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            losses.append(loss.item())
            entropies.append(entropy.item())
        history.append({"loss": float(np.mean(losses)), "entropy": float(np.mean(entropies))})
    return history


def refine_from_log(config: FromLogConfig) -> FromLogResult:
    """Refine an exported policy on a decision log with feedback; export it to ``OUT/policy``.

    Writes ``OUT/config.yml`` (the resolved settings), ``OUT/from_log.json`` (the
    figures of :class:`FromLogResult`) and the refined policy in the runtime format
    (same normalisation, format version and action table; a new policy id).

    Raises:
        FileNotFoundError: no log at ``config.log``.
        PolicyLoadError: the policy folder is missing or corrupt.
        ValueError: bad settings; a policy that cannot be refined (an ensemble, a probe
            controller); a log whose arm does not fit the policy; too few usable rows.
    """
    started = time.perf_counter()
    config.validate()
    out = Path(config.out)
    policy_path = Path(config.init_from)
    policy = BudgetPolicy.load(policy_path)
    _check_policy(policy, policy_path)
    rows = logged_rows(config.log, config.arm, policy, policy_path)
    n_rows = len(rows.ids)
    n_holdout = int(round(config.holdout * n_rows))
    if n_holdout < 1 or n_rows - n_holdout < 1:
        raise ValueError(
            f"{', '.join(rows.logs)}: arm {config.arm} has {n_rows} usable rows; holding out {config.holdout:g} of "
            "them leaves no training or no held-out row: collect more feedback"
        )
    rng = np.random.default_rng(config.seed)
    torch.manual_seed(config.seed)
    order = rng.permutation(n_rows)
    holdout, train = order[:n_holdout], order[n_holdout:]
    cost_model = config.cost_model()
    raw_inputs = rows.features
    if policy.cost_weight_range is None:
        rewards = cost_model.reward(rows.correct, rows.billed_tokens)
    else:  # each row priced at the lambda it was decided at, which the policy also sees
        rewards = np.asarray(rows.correct, dtype=np.float64) - rows.cost_weight * cost_model.cost(rows.billed_tokens)
        raw_inputs = with_price(raw_inputs, rows.cost_weight)

    network = PolicyNetwork(policy.members[0])
    inputs = torch.as_tensor(_normalize(policy, raw_inputs))
    actions = torch.as_tensor(rows.actions)
    propensity = torch.as_tensor(rows.propensity)

    def probabilities(subset: np.ndarray) -> np.ndarray:
        with torch.no_grad():
            return torch.softmax(network(inputs[subset]), dim=1).numpy()

    # As the server decides: where a price-conditioned policy falls back (price_fallback, kept in the export),
    # the old and the refined policy both serve the fixed action.
    def served(probabilities: np.ndarray) -> np.ndarray:
        return policy.with_price_fallback(probabilities.copy(), rows.cost_weight)

    old_network = probabilities(np.arange(n_rows))
    old_probabilities = served(old_network)
    old_greedy = old_probabilities.argmax(axis=1)
    names = [str(action["name"]) for action in policy.actions]
    single, warnings = _support_warnings(rows, old_greedy, names)
    behaviour = old_network[np.arange(n_rows), rows.actions] / rows.propensity
    baseline = float((behaviour[train] * rewards[train]).sum() / behaviour[train].sum())
    advantages = torch.as_tensor(rewards - baseline)

    # A tiny MLP: more than one thread only adds synchronisation (and contention on a busy machine).
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        history = _optimise(network, inputs, actions, propensity, advantages, train, config, rng)
    finally:
        torch.set_num_threads(threads)

    new_probabilities = served(probabilities(np.arange(n_rows)))
    values = {"reward": rewards[holdout], "em": rows.correct[holdout], "billed_tokens": rows.billed_tokens[holdout]}
    holdout_old = greedy_snips(old_probabilities[holdout], rows.actions[holdout], rows.propensity[holdout], values)
    holdout_new = greedy_snips(new_probabilities[holdout], rows.actions[holdout], rows.propensity[holdout], values)
    effective = float(holdout_new["effective_rows"] or 0.0)
    if holdout_new["reward"] is None:
        warnings.append(
            "no held-out row was served with the refined policy's greedy action: its value cannot be estimated "
            "from this log; A/B test it (serve it as arm B) before it replaces the old policy"
        )
    elif effective < max(MIN_EFFECTIVE_ROWS, 0.1 * n_holdout):
        warnings.append(
            f"the held-out estimate of the refined policy rests on {effective:.0f} effective rows (of {n_holdout}): "
            "read it as noise; A/B test the policy (serve it as arm B) before it replaces the old one"
        )
    changed = float((new_probabilities[holdout].argmax(axis=1) != old_greedy[holdout]).mean())
    gain = None
    if holdout_new["reward"] is not None and holdout_old["reward"] is not None:
        gain = float(holdout_new["reward"]) - float(holdout_old["reward"])
    interval = snips_gain_interval(
        old_probabilities[holdout], new_probabilities[holdout], rows.actions[holdout], rows.propensity[holdout],
        rewards[holdout], seed=config.seed,
    )  # fmt: skip
    verdict = "cannot tell"
    if interval is not None and interval[0] > 0:
        verdict = "better"
    elif interval is not None and interval[1] < 0:
        verdict = "worse"
        warnings.append(
            f"on the held-out rows the refined policy earns less than the old one ({gain:+.3f} reward, 95% interval "
            f"[{interval[0]:+.3f}, {interval[1]:+.3f}]): keep the old policy; more feedback or more exploration "
            "may change that"
        )

    policy_id = out.name if out.name != policy.policy_id else f"{out.name}-refined"
    policy_dir = _export(network, policy, policy_path, out / "policy", policy_id, config)
    result = FromLogResult(
        policy_dir=str(policy_dir),
        policy_id=policy_id,
        init_policy_id=policy.policy_id,
        log_policy_ids=rows.policy_ids,
        rows={
            "arm": rows.arm_rows,
            "decided": rows.decided_rows,
            "capped": rows.capped_rows,
            "with_feedback": n_rows,
            "train": len(train),
            "holdout": n_holdout,
        },
        baseline=baseline,
        holdout_old=holdout_old,
        holdout_new=holdout_new,
        holdout_logged={key: float(value.mean()) for key, value in values.items()},
        holdout_gain=gain,
        holdout_gain_interval=None if interval is None else list(interval),
        verdict=verdict,
        changed_decisions=changed,
        stochastic_share=float((rows.propensity < 1.0).mean()),
        off_greedy_share=float((rows.actions != old_greedy).mean()),
        single_action_regions=single,
        warnings=warnings,
        logs=rows.logs,
        log_notes=rows.log_notes,
        epochs=history,
        seconds=time.perf_counter() - started,
    )
    RunDir(out).config.write_text(yaml.safe_dump(asdict(config), sort_keys=False), encoding="utf-8")
    (out / "from_log.json").write_text(json.dumps(result.to_dict(), indent=2) + "\n", encoding="utf-8")
    return result


def _export(
    network: PolicyNetwork, policy: BudgetPolicy, policy_path: Path, out: Path, policy_id: str, config: FromLogConfig
) -> Path:
    """Write the refined network with the old policy's normalisation, actions, features and format version."""
    spec = policy.spec
    normalization: dict[str, Any] = dict(spec["normalization"])  # type: ignore[call-overload]
    member: dict[str, Any] = spec["members"][0]  # type: ignore[index]
    own_normalization = "obs_mean" in member or "obs_var" in member
    priced = policy.cost_weight_range is not None
    return export_policy(
        [network.as_exportable()],
        policy.obs_mean,
        policy.obs_var,
        out,
        actions=policy.actions,
        feature_spec=spec["feature_spec"],
        feature_arrays=policy.features.arrays(),  # the lm-hidden projection, kept as it was
        clip=policy.clip,
        epsilon=policy.epsilon,
        answer_tokens=policy.answer_tokens,
        extra_inputs=policy.extra_inputs,
        policy_id=policy_id,
        env_id=str(spec.get("env_id", "tokenopt/TokenBudget-v0")),
        metadata={
            "refined_from_log": config.log,
            "arm": config.arm,
            "init_from": str(policy_path),
            "init_policy_id": policy.policy_id,
            "init_metadata": spec.get("metadata", {}),
            # A price-conditioned policy's rows are priced at the lambda each was decided at.
            **(
                {"reward_priced_at": "each row's logged cost_weight"} if priced else {"cost_weight": config.cost_weight}
            ),
        },
        # A format-2 single policy keeps its member's own statistics (and its version).
        member_normalization=[policy.member_normalization[0]] if own_normalization else None,
        obs_count=float(normalization["count"]) if "count" in normalization else None,
        prompt_format=spec.get("prompt_format"),
        cost_weight_range=policy.cost_weight_range,
        cost_weight=policy.cost_weight,
        price_fallback=spec.get("price_fallback"),  # where do no harm fell back, so does it
    )
