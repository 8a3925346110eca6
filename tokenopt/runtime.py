"""The runtime policy that servers load: numpy and the standard library only.

A policy folder holds ``policy.json`` (format version, feature spec, action table,
observation normalisation, layer shapes, sha256 of the weights) and ``policy.npz``
(the weights, read with ``allow_pickle=False``). Loading never runs code from the
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

FORMAT_VERSION = 1
"""Version of the policy artifact this runtime reads and writes."""

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
        self.obs_mean = arrays["obs_mean"].astype(np.float64)
        self.obs_var = arrays["obs_var"].astype(np.float64)
        self._inverse_std = 1.0 / np.sqrt(self.obs_var + self.epsilon)
        self.members: list[list[tuple[np.ndarray, np.ndarray, str]]] = []
        for member in spec["members"]:  # type: ignore[attr-defined]
            layers = []
            for layer in member["layers"]:
                weight = arrays[layer["weight"]].astype(np.float64)
                bias = arrays[layer["bias"]].astype(np.float64)
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
        x = np.array(observations, dtype=np.float64, ndmin=2)
        x -= self.obs_mean
        x *= self._inverse_std
        np.clip(x, -self.clip, self.clip, out=x)
        total: np.ndarray | None = None
        for layers in self.members:
            h = x
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
        """Decisions for many prompts at once."""
        observations = self.features.batch(prompts).astype(np.float64)
        if self.extra_inputs:
            if extras is None:
                raise ValueError(f"this policy also needs the inputs {self.extra_inputs} (pass extras)")
            observations = np.concatenate([observations, np.atleast_2d(extras)], axis=1)
        return [self._decision(row) for row in self.probabilities(observations)]

    def decide(self, prompt: str, extras: np.ndarray | None = None) -> Decision:
        """The decision for one prompt: its budget, mode and ``max_new_tokens``."""
        return self.decide_batch([prompt], None if extras is None else np.atleast_2d(extras))[0]
