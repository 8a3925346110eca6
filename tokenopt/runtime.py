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
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from tokenopt.features import FeatureSpec, PromptFeatures

__all__ = ["FORMAT_VERSION", "BudgetPolicy", "Decision", "PolicyLoadError"]

FORMAT_VERSION = 2
"""Newest version of the policy artifact this runtime reads (and writes, when a file needs it).

Version 2 added per-member normalisation arrays; an export without them is written as
version 1, so older runtimes still load single policies."""

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


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _array(arrays: dict[str, np.ndarray], name: object) -> np.ndarray:
    if not isinstance(name, str) or name not in arrays:
        raise PolicyLoadError(f"policy.npz has no array {name!r}; it has {sorted(arrays)}")
    return arrays[name]


class BudgetPolicy:
    """An exported policy: features in, (budget, mode) out.

    Load with :meth:`load`; use :meth:`decide` or :meth:`decide_batch`.
    """

    def __init__(self, spec: dict[str, object], arrays: dict[str, np.ndarray]) -> None:
        self.spec = spec
        self.policy_id = str(spec.get("policy_id", "policy"))
        self.actions: list[dict[str, object]] = list(spec["actions"])  # type: ignore[call-overload]
        self.answer_tokens = int(spec.get("answer_tokens", 9))  # type: ignore[call-overload]
        self.features = PromptFeatures(FeatureSpec.from_dict(spec["feature_spec"]))  # type: ignore[arg-type]
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
        expected = self.features.dim + len(self.extra_inputs)
        if self.obs_mean.shape != (expected,):
            raise PolicyLoadError(
                f"normalisation has {self.obs_mean.shape[0]} inputs; the feature spec gives {expected}"
            )

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
        spec_path, weights_path = folder / "policy.json", folder / "policy.npz"
        for required in (spec_path, weights_path):
            if not required.is_file():
                raise PolicyLoadError(f"{required} is missing; export the run with `tokenopt export RUN`")
        try:
            spec = json.loads(spec_path.read_text(encoding="utf-8"))
        except json.JSONDecodeError as error:
            raise PolicyLoadError(f"{spec_path} is not valid JSON: {error}") from None
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
            FeatureSpec.from_dict(spec["feature_spec"])
        except (KeyError, ValueError) as error:
            raise PolicyLoadError(f"{spec_path}: feature spec mismatch: {error}") from None
        with np.load(weights_path, allow_pickle=False) as data:
            arrays = {name: data[name] for name in data.files}
        return cls(spec, arrays)

    def probabilities(self, observations: np.ndarray) -> np.ndarray:
        """Action probabilities for a batch of raw observations (features [+ extras])."""
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
            h = normalized[index]
            for weight, bias, activation in layers:
                h = h @ weight
                h += bias
                if activation == "tanh":
                    np.tanh(h, out=h)
                elif activation == "relu":
                    np.maximum(h, 0.0, out=h)
            h -= h.max(axis=1, keepdims=True)
            np.exp(h, out=h)
            h /= h.sum(axis=1, keepdims=True)
            total = h if total is None else total + h
        assert total is not None
        return total / len(self.members) if len(self.members) > 1 else total

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

    def decide_batch(self, prompts: list[str], extras: np.ndarray | None = None) -> list[Decision]:
        """Decisions for many prompts at once.

        Raises:
            ValueError: the policy is a probe controller (its two outputs are answer or
                continue at a checkpoint, not an action of the table), or needs extras.
        """
        if self.spec.get("env_id") == "tokenopt/TokenBudgetProbe-v0":
            raise ValueError(
                "this is a TokenBudgetProbe-v0 controller: it says answer or continue at each checkpoint from "
                "the probes, and does not pick a (budget, mode); call probabilities() with the probe inputs"
            )
        observations = self.features.batch(prompts).astype(np.float64)
        if self.extra_inputs:
            if extras is None:
                raise ValueError(f"this policy also needs the inputs {self.extra_inputs} (pass extras)")
            observations = np.concatenate([observations, np.atleast_2d(extras)], axis=1)
        return [self._decision(row) for row in self.probabilities(observations)]

    def decide(self, prompt: str, extras: np.ndarray | None = None) -> Decision:
        """The decision for one prompt: its budget, mode and ``max_new_tokens``."""
        return self.decide_batch([prompt], None if extras is None else np.atleast_2d(extras))[0]
