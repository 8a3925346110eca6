"""The runtime policy that servers load: numpy and the standard library only.

A policy folder holds ``policy.json`` (format version, feature spec, action table,
observation normalisation, layer shapes, sha256 of the weights) and ``policy.npz``
(the weights, read with ``allow_pickle=False``). An ensemble lists several members
whose action probabilities are averaged; from format version 2 a member may name its
own normalisation arrays (``obs_mean``/``obs_var`` keys), since every seed of an
ensemble was trained with its own VecNormalize statistics. Version-1 files (one
normalisation shared by every member) still load. Loading never runs code from the
artifact: the JSON is data, the weights are plain arrays, and their hash is checked
before use.

A policy trained on ``tokenopt/TokenBudgetProbe-v0`` (a probe controller) does not pick
a (budget, mode): it watches one request's reasoning and, at each checkpoint, says
answer or continue. :meth:`BudgetPolicy.start` opens a :class:`ProbeSession` for a
request; the session builds the environment's observation from the probes the server
reports, so the controller sees in production what it saw in training. A controller
trained with an ``escalate_mode`` has a third output, escalate: answer by generating
afresh in that mode at the current checkpoint's budget.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from tokenopt.cost import parse_cost_weight_range, with_price
from tokenopt.features import Features
from tokenopt.probe import (
    ANSWER,
    CONTINUE,
    ESCALATE,
    PROBE_INPUTS,
    ProbeAction,
    escalate_columns,
    probe_inputs,
    probe_observation,
)
from tokenopt.prompt import PromptFormat
from tokenopt.scoring import normalize_answer

__all__ = [
    "ANSWER",
    "CONTINUE",
    "ESCALATE",
    "FORMAT_VERSION",
    "POLICY_SPEC_FILE",
    "POLICY_WEIGHTS_FILE",
    "PROBE_ENV_ID",
    "PROBE_INPUTS",
    "BudgetPolicy",
    "Decision",
    "PolicyLoadError",
    "ProbeSession",
    "ProbeSettings",
]

FORMAT_VERSION = 3
"""Newest version of the policy artifact this runtime reads (and writes, when a file needs it).

Version 2 added per-member normalisation arrays; version 3 price-conditioned policies
(``cost_weight_range``: log lambda is the network's last input). An export is written
with the lowest version that holds it, so older runtimes still load what they can use."""

POLICY_SPEC_FILE = "policy.json"
"""The policy artifact's description (format, features, actions, layer shapes, sha256 of the weights)."""

POLICY_WEIGHTS_FILE = "policy.npz"
"""The policy artifact's arrays, loaded with ``allow_pickle=False``."""

PROBE_ENV_ID = "tokenopt/TokenBudgetProbe-v0"
"""The environment of probe controllers."""


_ACTIVATIONS: dict[str, Callable[[np.ndarray], np.ndarray]] = {
    "tanh": np.tanh,
    "relu": lambda x: np.maximum(x, 0.0),
    "none": lambda x: x,
}


class PolicyLoadError(ValueError):
    """A policy folder that cannot be loaded safely; the message says why."""


@dataclass(frozen=True)
class Decision:
    """What the policy decided for one prompt."""

    action: str
    """Action name, e.g. ``b16/sc5``."""
    budget: int
    """Most reasoning tokens before the answer cue is forced."""
    mode: str
    """Decoding mode: ``greedy``, ``beam<k>`` or ``sc<k>``."""
    max_new_tokens: int
    """Budget plus room for the cue and the answer: the request's ``max_tokens``."""
    probabilities: np.ndarray
    """The policy's probability of every action of the table."""


@dataclass(frozen=True)
class ProbeSettings:
    """How a probe controller was trained to watch the reasoning (``policy.json``'s ``probe``)."""

    mode: str
    """The decoding mode the request reasons in."""
    checkpoints: tuple[int, ...]
    """Reasoning budgets at which the answer is probed: the mode's budgets, smallest first."""
    probe_token_price: float
    """Weight of a probe's cue and answer tokens against generated tokens in ``tokens_spent``."""
    escalate_mode: str | None = None
    """The mode the controller may escalate to (its third output); None: it only answers or continues."""

    @property
    def max_budget(self) -> int:
        """The last checkpoint: the request answers there at the latest."""
        return self.checkpoints[-1]


def _probe_settings(spec: dict[str, object], actions: list[dict[str, object]]) -> ProbeSettings:
    """Read and check a probe controller's ``probe`` settings against its action table.

    Raises:
        PolicyLoadError: the settings are missing (an export from before they were
            recorded), malformed, or disagree with the action table.
    """
    raw = spec.get("probe")
    if not isinstance(raw, dict):
        raise PolicyLoadError(
            f"this {PROBE_ENV_ID} controller has no probe settings (mode, checkpoints, probe token price), "
            "which its session needs to compute its inputs as the environment did: it was exported by an older "
            "tokenopt; export the run again with `tokenopt export RUN`"
        )
    mode, checkpoints, price = raw.get("mode"), raw.get("checkpoints"), raw.get("probe_token_price")
    if not isinstance(checkpoints, list) or not all(isinstance(b, int) and b >= 0 for b in checkpoints):
        raise PolicyLoadError(f"probe checkpoints must be a list of budgets (integers >= 0); got {checkpoints!r}")
    if len(checkpoints) < 2 or sorted(set(checkpoints)) != checkpoints:
        raise PolicyLoadError(f"probe checkpoints must be at least 2 increasing budgets; got {checkpoints}")
    if not isinstance(price, int | float) or not np.isfinite(price) or price < 0:
        raise PolicyLoadError(f"probe_token_price must be a finite number >= 0; got {price!r}")
    budgets = sorted(int(a["budget"]) for a in actions if a["mode"] == mode)  # type: ignore[call-overload]
    if budgets != checkpoints:
        raise PolicyLoadError(
            f"probe checkpoints {checkpoints} are not the budgets {budgets} of mode {mode!r} in the action table"
        )
    escalate_mode = raw.get("escalate_mode")
    if escalate_mode is not None:
        if not isinstance(escalate_mode, str):
            raise PolicyLoadError(f"probe escalate_mode must be the name of a mode, or absent; got {escalate_mode!r}")
        table = [(int(a["budget"]), str(a["mode"])) for a in actions]  # type: ignore[call-overload]
        try:
            escalate_columns(table, str(mode), escalate_mode, "the action table")
        except ValueError as error:
            raise PolicyLoadError(f"probe {error}") from None
    return ProbeSettings(str(mode), tuple(checkpoints), float(price), escalate_mode)


def _logits(h: np.ndarray, layers: list[tuple[np.ndarray, np.ndarray, str]]) -> np.ndarray:
    """The network's output for inputs ``h`` (normalised, or raw where the first layer folds the normalisation)."""
    for weight, bias, activation in layers:
        h = h @ weight
        h += bias
        if activation == "tanh":
            np.tanh(h, out=h)
        elif activation == "relu":
            np.maximum(h, 0.0, out=h)
    return h


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _array(arrays: dict[str, np.ndarray], name: object) -> np.ndarray:
    if not isinstance(name, str) or name not in arrays:
        raise PolicyLoadError(f"policy.npz has no array {name!r}; it has {sorted(arrays)}")
    array = arrays[name]
    if array.dtype.kind not in "fiu":
        raise PolicyLoadError(f"policy.npz array {name!r} has dtype {array.dtype}; expected numbers")
    if not np.isfinite(array).all():
        raise PolicyLoadError(f"policy.npz array {name!r} holds values that are not finite")
    return array


class BudgetPolicy:
    """An exported policy: features in, (budget, mode) out.

    Load with :meth:`load`; use :meth:`decide` or :meth:`decide_batch`.
    """

    def __init__(self, spec: dict[str, object], arrays: dict[str, np.ndarray]) -> None:
        self.spec = spec
        self.policy_id = str(spec.get("policy_id", "policy"))
        self.actions: list[dict[str, object]] = list(spec["actions"])  # type: ignore[call-overload]
        self.answer_tokens = int(spec.get("answer_tokens", 9))  # type: ignore[call-overload]
        try:
            self.features = Features.from_dict(spec["feature_spec"], arrays)  # type: ignore[arg-type]
        except ValueError as error:
            raise PolicyLoadError(f"feature spec mismatch: {error}") from None
        """The policy's feature spec: ``prompt-text``, ``lm-hidden`` (needs ``hidden=``) or both."""
        normalization: dict[str, float] = spec["normalization"]  # type: ignore[assignment]
        self.clip = float(normalization["clip"])
        self.epsilon = float(normalization["epsilon"])
        self.obs_mean = _array(arrays, "obs_mean").astype(np.float64)
        self.obs_var = _array(arrays, "obs_var").astype(np.float64)
        self._inverse_std = 1.0 / np.sqrt(self.obs_var + self.epsilon)
        self.members: list[list[tuple[np.ndarray, np.ndarray, str]]] = []
        self.member_normalization: list[tuple[np.ndarray, np.ndarray]] = []
        """Each member's (obs_mean, obs_var): its own (format 2) or the shared one."""
        # Members sharing one normalisation are normalised once (index into _normalizers),
        # so a single policy costs what it did before per-member statistics existed.
        self._normalizers: list[tuple[np.ndarray, np.ndarray]] = [(self.obs_mean, self._inverse_std)]
        self._member_normalizer: list[int] = []
        for member in spec["members"]:  # type: ignore[attr-defined]
            if "obs_mean" in member or "obs_var" in member:
                mean = _array(arrays, member.get("obs_mean")).astype(np.float64)
                var = _array(arrays, member.get("obs_var")).astype(np.float64)
                if mean.shape != self.obs_mean.shape or var.shape != self.obs_mean.shape:
                    raise PolicyLoadError(
                        f"member normalisation {member['obs_mean']!r} has shape {mean.shape} and "
                        f"{member['obs_var']!r} {var.shape}; expected {self.obs_mean.shape}"
                    )
                self.member_normalization.append((mean, var))
                self._normalizers.append((mean, 1.0 / np.sqrt(var + self.epsilon)))
                self._member_normalizer.append(len(self._normalizers) - 1)
            else:
                self.member_normalization.append((self.obs_mean, self.obs_var))
                self._member_normalizer.append(0)
            layers = []
            for layer in member["layers"]:
                weight = _array(arrays, layer["weight"]).astype(np.float64)
                bias = _array(arrays, layer["bias"]).astype(np.float64)
                if list(weight.shape) != list(layer["shape"]):
                    raise PolicyLoadError(
                        f"layer {layer['weight']} has shape {weight.shape}, spec says {layer['shape']}"
                    )
                if layer["activation"] not in _ACTIVATIONS:
                    raise PolicyLoadError(
                        f"unknown activation {layer['activation']!r}; expected {sorted(_ACTIVATIONS)}"
                    )
                layers.append((weight, bias, str(layer["activation"])))
            self.members.append(layers)
        self.extra_inputs: list[str] = list(spec.get("extra_inputs", []))  # type: ignore[call-overload]
        self.cost_weight_range: tuple[float, float] | None = None
        """The lambda range of a price-conditioned policy (``tokenopt train --cost-weight-range``): it
        takes log lambda as its last input and decides at any price in the range; None: trained for one."""
        self.cost_weight: float | None = None
        """The lambda a price-conditioned policy decides at when no ``cost_weight`` is given."""
        self.price_fallback: list[tuple[float, float, int]] = []
        """A price-conditioned policy's do-no-harm fallback: (low, high, action index) price intervals where it
        picks that fixed action instead of deciding (where it did not beat the best fixed action on val)."""
        if spec.get("cost_weight_range") is not None:
            if self.extra_inputs:
                raise PolicyLoadError("a price-conditioned policy takes no extra inputs besides log lambda")
            try:
                self.cost_weight_range = parse_cost_weight_range(spec["cost_weight_range"])  # type: ignore[arg-type]
            except (ValueError, TypeError) as error:
                raise PolicyLoadError(f"cost_weight_range: {error}") from None
            lowest, highest = self.cost_weight_range
            default = float(spec.get("cost_weight", (lowest * highest) ** 0.5))  # type: ignore[arg-type]
            if not lowest <= default <= highest:
                raise PolicyLoadError(f"cost_weight {default:g} lies outside cost_weight_range {lowest:g}:{highest:g}")
            self.cost_weight = default
            names = [str(action["name"]) for action in self.actions]
            for entry in spec.get("price_fallback") or []:  # type: ignore[attr-defined]
                start, end, action = float(entry["low"]), float(entry["high"]), str(entry["action"])
                if not lowest <= start <= end <= highest or action not in names:
                    raise PolicyLoadError(
                        f"price_fallback entry {entry} must lie in {lowest:g}:{highest:g} and name an action of {names}"
                    )
                self.price_fallback.append((start, end, names.index(action)))
        expected = self.features.dim + len(self.extra_inputs) + (self.cost_weight_range is not None)
        if self.obs_mean.shape != (expected,):
            raise PolicyLoadError(
                f"normalisation has {self.obs_mean.shape[0]} inputs; the feature spec gives {expected}"
            )
        self._single: list[tuple[np.ndarray, np.ndarray, list[tuple[np.ndarray, np.ndarray, str]]]] = []
        self._logits_bounded = False
        self._check_network(expected)
        # The one-observation path (decide(), a server's batch of one): checked once by
        # _check_network first, then no validation or conversion per call. The normalisation is
        # folded into the first layer, clip((x - mean) * s, -c, c) @ W + b being
        # clip(x, mean - c/s, mean + c/s) @ (s W) + (b - (mean s) @ W): two numpy calls
        # fewer per decision, equal to the batch path up to rounding.
        for layers, index in zip(self.members, self._member_normalizer, strict=True):
            mean, inverse_std = self._normalizers[index]
            (weight, bias, activation), rest = layers[0], layers[1:]
            with np.errstate(all="ignore"):
                low, high = mean - self.clip / inverse_std, mean + self.clip / inverse_std
                first = (inverse_std[:, None] * weight, bias - (mean * inverse_std) @ weight, activation)
            self._single.append((low, high, [first, *rest]))
        # Behind a tanh the logits are bounded by sum |W| + |b| per output: where that bound
        # keeps exp() finite, softmax needs no max subtraction (two numpy calls fewer).
        last_inputs_bounded = all(len(layers) > 1 and layers[-2][2] == "tanh" for layers in self.members)
        bound = max(float((np.abs(layers[-1][0]).sum(axis=0) + np.abs(layers[-1][1])).max()) for layers in self.members)
        self._logits_bounded = last_inputs_bounded and bound < 600.0
        try:
            self._probabilities_one(np.zeros(expected))
        except (ValueError, FloatingPointError) as error:
            raise PolicyLoadError(f"the network cannot be evaluated: {error}") from None
        self.prompt_format: PromptFormat | None = None
        """The prompt format the policy's table was collected with; None in exports that predate it."""
        if "prompt_format" in spec:
            try:
                self.prompt_format = PromptFormat.from_dict(spec["prompt_format"])
            except ValueError as error:
                raise PolicyLoadError(str(error)) from None
        self.fallback: dict[str, object] | None = spec.get("fallback")  # type: ignore[assignment]
        """Set when the policy is ``tokenopt train``'s do-no-harm fallback to one fixed action (why, and which)."""
        if self.fallback is not None and not isinstance(self.fallback, dict):
            raise PolicyLoadError(f"'fallback' must be an object (action, verdict); got {type(self.fallback).__name__}")
        self.probe: ProbeSettings | None = None
        """The probe settings of a probe controller; None for a policy that picks (budget, mode)."""
        if spec.get("env_id") == PROBE_ENV_ID:
            if self.extra_inputs != PROBE_INPUTS:
                raise PolicyLoadError(f"a probe controller takes the inputs {PROBE_INPUTS}; got {self.extra_inputs}")
            self.probe = _probe_settings(spec, self.actions)
            outputs = {layers[-1][0].shape[1] for layers in self.members}
            if self.probe.escalate_mode is None and outputs != {2}:
                hint = ": its probe settings lack the escalate_mode it was trained with" if outputs == {3} else ""
                raise PolicyLoadError(
                    f"a probe controller has 2 outputs (answer, continue); got {sorted(outputs)}{hint}"
                )
            if self.probe.escalate_mode is not None and outputs != {3}:
                raise PolicyLoadError(
                    f"a probe controller with escalate_mode {self.probe.escalate_mode!r} has 3 outputs (answer, "
                    f"continue, escalate); got {sorted(outputs)}"
                )
        else:
            outputs = {layers[-1][0].shape[1] for layers in self.members}
            if outputs != {len(self.actions)}:
                raise PolicyLoadError(
                    f"the network has {sorted(outputs)} outputs; the action table has {len(self.actions)} actions"
                )

    def _check_network(self, inputs: int) -> None:
        """Every layer's shape against its neighbours, then one decision on a zero input (no surprise at serving).

        Raises:
            PolicyLoadError: a bias, a layer's inputs or a normalisation array does not fit.
        """
        if not self.members:
            raise PolicyLoadError("the policy has no members (no network to evaluate)")
        if (self.obs_var < 0).any():
            raise PolicyLoadError("obs_var holds negative variances")
        for m, layers in enumerate(self.members):
            if not layers:
                raise PolicyLoadError(f"member {m} has no layers")
            width = inputs
            for i, (weight, bias, _) in enumerate(layers):
                if weight.ndim != 2 or weight.shape[0] != width:
                    raise PolicyLoadError(
                        f"member {m} layer {i} has weights of shape {weight.shape}; it takes {width} inputs"
                    )
                if bias.shape != (weight.shape[1],):
                    raise PolicyLoadError(
                        f"member {m} layer {i} has a bias of shape {bias.shape}; expected ({weight.shape[1]},)"
                    )
                width = weight.shape[1]
        for mean, var in self.member_normalization:
            if (var < 0).any() or mean.shape != (inputs,):
                raise PolicyLoadError(f"a member's normalisation does not fit the {inputs} inputs")
        try:
            self.probabilities(np.zeros((1, inputs)))
        except (ValueError, FloatingPointError) as error:
            raise PolicyLoadError(f"the network cannot be evaluated: {error}") from None

    @classmethod
    def load(cls, path: str | Path) -> BudgetPolicy:
        """Load a policy folder (or its ``policy.json``).

        Raises:
            PolicyLoadError: a file is missing, the format version is newer than this
                runtime, the weights do not match their sha256, or the feature spec
                is not one this runtime computes.
        """
        path = Path(path)
        folder = path.parent if path.suffix == ".json" else path
        spec_path, weights_path = folder / POLICY_SPEC_FILE, folder / POLICY_WEIGHTS_FILE
        for required in (spec_path, weights_path):
            if not required.is_file():
                raise PolicyLoadError(f"{required} is missing; export the run with `tokenopt export RUN`")
        try:
            spec = json.loads(spec_path.read_text(encoding="utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError, RecursionError) as error:
            raise PolicyLoadError(f"{spec_path} is not valid JSON: {error}") from None
        if not isinstance(spec, dict):
            raise PolicyLoadError(f"{spec_path} must hold a JSON object; got {type(spec).__name__}")
        if spec.get("format") != "tokenopt-policy":
            raise PolicyLoadError(f"{spec_path} is not a tokenopt policy (format {spec.get('format')!r})")
        version = spec.get("format_version")
        if not isinstance(version, int) or version > FORMAT_VERSION:
            raise PolicyLoadError(
                f"{spec_path} has format version {version}; this runtime reads up to {FORMAT_VERSION}: upgrade tokenopt"
            )
        digest = _sha256(weights_path)
        if digest != spec.get("weights_sha256"):
            raise PolicyLoadError(
                f"{weights_path} does not match the sha256 in {spec_path.name} "
                f"({digest[:12]}... vs {str(spec.get('weights_sha256'))[:12]}...): the weights were changed"
            )
        try:
            with np.load(weights_path, allow_pickle=False) as data:
                arrays = {name: data[name] for name in data.files}
        except (ValueError, OSError, EOFError) as error:  # e.g. an object array, which would need pickle
            raise PolicyLoadError(f"{weights_path} cannot be read without pickle: {error}") from None
        try:
            return cls(spec, arrays)
        except PolicyLoadError as error:
            raise PolicyLoadError(f"{spec_path}: {error}") from None
        except (KeyError, TypeError, ValueError, AttributeError, IndexError) as error:
            # A field of the wrong JSON type or missing: the policy is malformed, not a bug to crash on.
            raise PolicyLoadError(f"{spec_path} is malformed: {type(error).__name__}: {error}") from None

    def probabilities(self, observations: np.ndarray) -> np.ndarray:
        """Action probabilities for a batch of raw observations (features [+ extras])."""
        if isinstance(observations, np.ndarray) and observations.ndim == 2 and len(observations) == 1 and self._single:
            # float32 features are widened by the first operation, as np.asarray would.
            return self._probabilities_one(observations[0])[None, :]
        raw = np.asarray(observations, dtype=np.float64)
        normalized: dict[int, np.ndarray] = {}
        total: np.ndarray | None = None
        for layers, index in zip(self.members, self._member_normalizer, strict=True):
            if index not in normalized:
                mean, inverse_std = self._normalizers[index]
                x = np.array(raw, dtype=np.float64, ndmin=2)
                x -= mean
                x *= inverse_std
                np.clip(x, -self.clip, self.clip, out=x)
                normalized[index] = x
            h = _logits(normalized[index], layers)
            h -= h.max(axis=1, keepdims=True)
            np.exp(h, out=h)
            h /= h.sum(axis=1, keepdims=True)
            total = h if total is None else total + h
        assert total is not None
        return total / len(self.members) if len(self.members) > 1 else total

    def _probabilities_one(self, observation: np.ndarray) -> np.ndarray:
        """Action probabilities of one raw observation (a vector): the batch path without its overhead.

        The arithmetic of :meth:`probabilities` with the normalisation folded into the first
        layer (see ``_single``): the same probabilities up to rounding.
        """
        total: np.ndarray | None = None
        for low, high, layers in self._single:
            # On vectors: a batch of one pays numpy's per-call cost, not arithmetic, so every
            # call saved counts; the sum of a few floats is cheaper in Python than in numpy.
            h = np.maximum(observation, low)
            np.minimum(h, high, out=h)
            h = _logits(h, layers)
            if not self._logits_bounded:
                h -= h.max()
            np.exp(h, out=h)
            h /= sum(h.tolist())
            total = h if total is None else total + h
        assert total is not None
        return total / len(self._single) if len(self._single) > 1 else total

    def _decision(self, probabilities: np.ndarray) -> Decision:
        index = int(np.argmax(probabilities))
        action = self.actions[index]
        budget = int(action["budget"])  # type: ignore[call-overload]
        return Decision(
            action=str(action["name"]),
            budget=budget,
            mode=str(action["mode"]),
            max_new_tokens=budget + self.answer_tokens,
            probabilities=probabilities,
        )

    def _price(self, cost_weight: float | np.ndarray | None) -> float | np.ndarray | None:
        """The lambda a price-conditioned policy decides at (None for other policies), checked against its range.

        Args:
            cost_weight: lambda, one for all or one per row; None: the policy's default.

        Raises:
            ValueError: ``cost_weight`` given to a policy trained for one lambda, or outside its range.
        """
        if self.cost_weight_range is None:
            if cost_weight is not None:
                raise ValueError(
                    "this policy was trained for one cost weight and takes no cost_weight; train with "
                    "`tokenopt train --cost-weight-range LOW:HIGH` for a policy that decides at any price"
                )
            return None
        weights = self.cost_weight if cost_weight is None else cost_weight
        low, high = self.cost_weight_range
        outside = ~((np.asarray(weights) >= low) & (np.asarray(weights) <= high))
        if outside.any():
            raise ValueError(
                f"cost_weight {float(np.asarray(weights)[outside].flat[0]):g} is outside the policy's range "
                f"{low:g}:{high:g}; clip it to the range or train with a wider --cost-weight-range"
            )
        return weights

    def decide_batch(
        self,
        prompts: list[str],
        extras: np.ndarray | None = None,
        hidden: np.ndarray | None = None,
        cost_weight: float | np.ndarray | None = None,
    ) -> list[Decision]:
        """Decisions for many prompts at once.

        Args:
            prompts: the prompts (the question text, as the policy's prompt format reads it).
            extras: inputs after the features, for policies that take them (stream policies).
            hidden: (prompts, hidden size) the LM's hidden state of each prompt at prefill,
                for policies whose features need it (``lm-hidden``); ignored otherwise.
            cost_weight: the price lambda to decide at (one, or one per prompt), for a
                price-conditioned policy (:attr:`cost_weight_range`); None: its default.

        Raises:
            ValueError: the policy is a probe controller (its two outputs are answer or
                continue at a checkpoint, not an action of the table: use :meth:`start`),
                needs extras, or needs ``hidden`` and it is missing or of the wrong shape;
                ``cost_weight`` is outside the range, or given to a policy trained for one.
        """
        if self.probe is not None:
            raise ValueError(
                f"this is a {PROBE_ENV_ID} controller: it says answer or continue at each checkpoint from "
                "the probes, and does not pick a (budget, mode); call start(prompt) for a session and "
                "report each probe to its observe()"
            )
        observations = self.features.batch(prompts, hidden).astype(np.float64)
        if self.extra_inputs:
            if extras is None:
                raise ValueError(f"this policy also needs the inputs {self.extra_inputs} (pass extras)")
            observations = np.concatenate([observations, np.atleast_2d(extras)], axis=1)
        return [self._decision(row) for row in self.decision_probabilities(observations, cost_weight)]

    def decision_probabilities(
        self, observations: np.ndarray, cost_weight: float | np.ndarray | None = None
    ) -> np.ndarray:
        """The action probabilities the policy decides from, for a batch of raw observations at a price.

        For a price-conditioned policy, ``log lambda`` is appended to the observations and,
        at a price where the do-no-harm rule fell back (``price_fallback``), the row is the
        fixed action's one-hot: what :meth:`decide` and :meth:`decide_batch` pick, and what a
        server that samples or logs propensities must start from. Other policies: as
        :meth:`probabilities`.

        Args:
            observations: (rows, inputs) the features [+ extras], without the price.
            cost_weight: lambda, one for all rows or one per row; None: the policy's default.

        Raises:
            ValueError: as :meth:`decide_batch`, for ``cost_weight``.
        """
        price = self._price(cost_weight)
        if price is not None:
            observations = with_price(observations, price)
        return self.with_price_fallback(self.probabilities(observations), price)

    def with_price_fallback(self, probabilities: np.ndarray, cost_weight: float | np.ndarray | None) -> np.ndarray:
        """``probabilities`` (rows) with each row at a price where the policy falls back set to that fixed action.

        Args:
            probabilities: (rows, actions) the network's probabilities; changed in place.
            cost_weight: the lambda of every row, or one per row; None (a policy trained for one
                lambda) or a price outside every ``price_fallback`` interval leaves a row as it is.
        """
        if self.price_fallback and cost_weight is not None:
            weights = np.broadcast_to(np.asarray(cost_weight, dtype=np.float64), (len(probabilities),))
            for row, weight in enumerate(weights):
                fixed = self._fixed_at(float(weight))
                if fixed is not None:
                    probabilities[row] = fixed
        return probabilities

    def _fixed_at(self, cost_weight: float) -> np.ndarray | None:
        """The one-hot probabilities of the fixed action the price fallback takes at this lambda, if any."""
        for low, high, action in self.price_fallback:
            if low <= cost_weight <= high:
                one_hot = np.zeros(len(self.actions))
                one_hot[action] = 1.0
                return one_hot
        return None

    def decide(
        self,
        prompt: str,
        extras: np.ndarray | None = None,
        hidden: np.ndarray | None = None,
        cost_weight: float | None = None,
    ) -> Decision:
        """The decision for one prompt: its budget, mode and ``max_new_tokens``.

        Args:
            prompt: the prompt (the question text, as the policy's prompt format reads it).
            extras: inputs after the features, for policies that take them.
            hidden: the LM's hidden state of the prompt at prefill (a vector of the hidden
                size), for policies whose features need it (``lm-hidden``).
            cost_weight: the price lambda to decide at, for a price-conditioned policy;
                None: its default (:attr:`cost_weight`).

        Raises:
            ValueError: as :meth:`decide_batch`.
        """
        if self.probe is not None or self.extra_inputs:
            return self.decide_batch(
                [prompt],
                None if extras is None else np.atleast_2d(extras),
                None if hidden is None else np.atleast_2d(hidden),
                cost_weight,
            )[0]
        features = self.features(prompt, hidden)
        price = self._price(cost_weight)
        if price is not None:
            fixed = self._fixed_at(float(price)) if self.price_fallback else None
            if fixed is not None:
                return self._decision(fixed)
            features = with_price(features, float(price))
        return self._decision(self._probabilities_one(features))

    def start(self, prompt: str) -> ProbeSession:
        """Open the answer-or-continue session of one request (probe controllers only).

        Raises:
            ValueError: the policy picks a (budget, mode) instead: call :meth:`decide`.
        """
        if self.probe is None:
            raise ValueError(
                f"start() is for {PROBE_ENV_ID} controllers (`tokenopt train --env probe`); this policy was "
                f"trained on {self.spec.get('env_id')!r} and picks a (budget, mode): call decide(prompt)"
            )
        if self.features.needs_hidden:
            raise ValueError(f"probe controllers take prompt-text features; this one has {self.features.name}")
        return ProbeSession(self, self.probe, self.features(prompt))


class ProbeSession:
    """One request watched by a probe controller: answer or continue at each checkpoint.

    The server reasons in ``settings.mode`` up to ``next_budget`` reasoning tokens (or
    until the LM stops by itself), probes the answer there (appends the answer cue and
    reads the forced answer, which a server with prefix caching does without
    recomputing the trace) and reports the probe with :meth:`observe`. On
    ``"answer"`` it returns that probe's answer and the session is done; on
    ``"continue"`` it reasons on to the new ``next_budget``; on ``"escalate"`` (a
    controller with ``settings.escalate_mode`` only) it generates afresh from the prompt
    in ``settings.escalate_mode`` at the current checkpoint's budget
    (``checkpoints[checkpoint]``) and returns that answer, and the session is done. The controller's inputs
    are built exactly as ``tokenopt/TokenBudgetProbe-v0`` builds its observation, and,
    as there, a probe where the LM stopped by itself or the last checkpoint answers
    without asking the controller.

    Create it with :meth:`BudgetPolicy.start`.
    """

    def __init__(self, policy: BudgetPolicy, settings: ProbeSettings, features: np.ndarray) -> None:
        self.policy = policy
        self.settings = settings
        self.checkpoints = settings.checkpoints
        """Budgets of the checkpoints, smallest first."""
        self.checkpoint = 0
        """Index of the checkpoint to probe next; once done, of the one answered at."""
        self.done = False
        """Whether the session has answered."""
        self.decision: str | None = None
        """The last decision: ``"answer"``, ``"continue"`` or ``"escalate"``; None before the first probe."""
        self.probabilities: np.ndarray | None = None
        """The controller's (answer, continue[, escalate]) probabilities at the last probe; None when not asked."""
        self.observation: np.ndarray | None = None
        """The controller's input at the last probe: prompt features, then :data:`PROBE_INPUTS`."""
        self._features = np.asarray(features, dtype=np.float32)
        self._answers: list[str] = []
        self._changes = 0
        self._tokens_spent = 0.0

    @property
    def next_budget(self) -> int | None:
        """Reasoning tokens to reach before the next probe; None once done."""
        return None if self.done else self.checkpoints[self.checkpoint]

    def observe(self, answer: str, logprob: float, tokens_spent: float, stopped: bool) -> str:
        """Report the probe at the current checkpoint and get the decision.

        Args:
            answer: the probe's answer text (compared with earlier probes after
                :func:`tokenopt.scoring.normalize_answer`, as collection compares answers).
            logprob: the mean log-probability of the probe answer's tokens.
            tokens_spent: tokens billed for the request so far: the reasoning up to here
                plus every probe's cue and answer tokens (this one's included), probe
                tokens weighted by ``settings.probe_token_price`` (with the default
                price 1: every token generated for the request so far).
            stopped: the LM ended its reasoning by itself (wrote the cue or EOS) before
                this checkpoint.

        Returns:
            ``"answer"``: return this probe's answer; ``"continue"``: reason on to
            ``next_budget`` and probe there; ``"escalate"`` (with an
            ``escalate_mode``): generate in ``settings.escalate_mode`` at this
            checkpoint's budget and return that answer. Where the LM stopped by
            itself, or at the last checkpoint, the session answers without asking.

        Raises:
            RuntimeError: the session has already answered.
            ValueError: a log-probability that is not finite and <= 0, or
                ``tokens_spent`` that is negative, not finite, or below the previous
                probe's.
        """
        if self.done:
            raise RuntimeError(
                f"this session already answered at checkpoint {self.checkpoint} (budget "
                f"{self.checkpoints[self.checkpoint]}); start a new one with policy.start(prompt)"
            )
        if not np.isfinite(logprob) or logprob > 0:
            raise ValueError(f"logprob must be a finite mean log-probability <= 0; got {logprob}")
        if not np.isfinite(tokens_spent) or tokens_spent < self._tokens_spent:
            raise ValueError(
                f"tokens_spent must be a finite count >= {self._tokens_spent:g} (what the earlier probes billed); "
                f"got {tokens_spent}"
            )
        step, last = self.checkpoint, len(self.checkpoints) - 1
        normalized = normalize_answer(answer)
        self._changes += int(bool(self._answers) and normalized != self._answers[-1])
        self._answers.append(normalized)
        self._tokens_spent = float(tokens_spent)
        inputs = probe_inputs(
            self._tokens_spent, self.settings.max_budget, step, len(self.checkpoints), logprob, self._answers,
            self._changes, stopped,
        )  # fmt: skip
        self.observation = probe_observation(self._features, inputs)
        if stopped or step == last:
            # Reasoning on changes nothing (or cannot go further): the environment answers here too.
            self.probabilities = None
            self.decision = ANSWER
        else:
            self.probabilities = self.policy.probabilities(self.observation[None, :])[0]
            self.decision = ProbeAction(int(np.argmax(self.probabilities))).decision
        if self.decision != CONTINUE:
            self.done = True
        else:
            self.checkpoint += 1
        return self.decision
