"""Export a trained SB3 agent as the pickle-free runtime policy of :mod:`tokenopt.runtime`."""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any

import numpy as np
import torch

from tokenopt.runtime import FORMAT_VERSION

__all__ = ["export_policy", "policy_layers"]

_ACTIVATION_NAMES = {torch.nn.Tanh: "tanh", torch.nn.ReLU: "relu"}


def policy_layers(model: Any) -> list[tuple[np.ndarray, np.ndarray, str]]:
    """The actor of an SB3 (Maskable)PPO MlpPolicy as (weight, bias, activation) layers.

    Weights are stored as (inputs x outputs), so a layer is ``act(x @ W + b)``.

    Raises:
        ValueError: the policy is not a plain MLP over a flattened observation.
    """
    policy = model.policy
    modules = list(policy.mlp_extractor.policy_net) + [policy.action_net]
    layers: list[tuple[np.ndarray, np.ndarray, str]] = []
    for module in modules:
        if isinstance(module, torch.nn.Linear):
            layers.append(
                (
                    module.weight.detach().cpu().numpy().T.astype(np.float32),
                    module.bias.detach().cpu().numpy().astype(np.float32),
                    "none",
                )
            )
        elif type(module) in _ACTIVATION_NAMES:
            if not layers:
                raise ValueError("the policy network starts with an activation; expected Linear first")
            weight, bias, _ = layers[-1]
            layers[-1] = (weight, bias, _ACTIVATION_NAMES[type(module)])
        else:
            raise ValueError(f"cannot export layer {type(module).__name__}: expected Linear, Tanh or ReLU")
    return layers


def export_policy(
    members: list[Any],
    obs_mean: np.ndarray,
    obs_var: np.ndarray,
    out_dir: str | Path,
    *,
    actions: list[dict[str, object]],
    feature_spec: dict[str, object],
    clip: float = 10.0,
    epsilon: float = 1e-8,
    answer_tokens: int = 9,
    extra_inputs: list[str] | None = None,
    policy_id: str = "policy",
    env_id: str = "tokenopt/TokenBudget-v0",
    metadata: dict[str, object] | None = None,
) -> Path:
    """Write ``policy.json`` and ``policy.npz`` for one agent or an ensemble.

    Args:
        members: trained SB3 models; several are averaged (an ensemble).
        obs_mean: observation normalisation mean (VecNormalize's ``obs_rms.mean``).
        obs_var: observation normalisation variance.
        out_dir: the policy folder.
        actions: the action table as ``{"name", "budget", "mode"}`` dicts.
        feature_spec: the feature spec the observations were made with.
        clip: VecNormalize's ``clip_obs``.
        epsilon: VecNormalize's ``epsilon``.
        answer_tokens: tokens to allow after the budget (cue + answer).
        extra_inputs: names of inputs after the features (the stream environment's).
        policy_id: an id servers report with each decision.
        env_id: the environment the policy was trained on.
        metadata: anything else to record (run name, cost weight, ...).

    Returns:
        The policy folder.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    arrays: dict[str, np.ndarray] = {
        "obs_mean": np.asarray(obs_mean, dtype=np.float64),
        "obs_var": np.asarray(obs_var, dtype=np.float64),
    }
    member_specs = []
    for m, model in enumerate(members):
        layer_specs = []
        for i, (weight, bias, activation) in enumerate(policy_layers(model)):
            arrays[f"m{m}_layer{i}_weight"] = weight
            arrays[f"m{m}_layer{i}_bias"] = bias
            layer_specs.append(
                {
                    "weight": f"m{m}_layer{i}_weight",
                    "bias": f"m{m}_layer{i}_bias",
                    "shape": list(weight.shape),
                    "activation": activation,
                }
            )
        member_specs.append({"layers": layer_specs})
    weights_path = out_dir / "policy.npz"
    partial = out_dir / "policy.npz.partial"
    with partial.open("wb") as handle:
        np.savez(handle, **arrays)  # type: ignore[arg-type]
    os.replace(partial, weights_path)
    spec = {
        "format": "tokenopt-policy",
        "format_version": FORMAT_VERSION,
        "policy_id": policy_id,
        "env_id": env_id,
        "feature_spec": feature_spec,
        "actions": actions,
        "answer_tokens": answer_tokens,
        "extra_inputs": extra_inputs or [],
        "normalization": {"clip": clip, "epsilon": epsilon},
        "members": member_specs,
        "weights_sha256": hashlib.sha256(weights_path.read_bytes()).hexdigest(),
        "metadata": metadata or {},
    }
    spec_partial = out_dir / "policy.json.partial"
    spec_partial.write_text(json.dumps(spec, indent=2) + "\n", encoding="utf-8")
    os.replace(spec_partial, out_dir / "policy.json")
    return out_dir
