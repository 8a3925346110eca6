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
    member_normalization: list[tuple[np.ndarray, np.ndarray]] | None = None,
    obs_count: float | None = None,
    probe: dict[str, object] | None = None,
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
        member_normalization: each member's own (obs_mean, obs_var), for an ensemble
            of runs that each kept their own VecNormalize statistics; written as
            ``m{k}_obs_mean``/``m{k}_obs_var`` (format version 2). None: every member
            uses ``obs_mean``/``obs_var`` (written as format version 1).
        obs_count: observations behind the statistics (VecNormalize's ``obs_rms.count``),
            recorded so a warm start can resume the running statistics.
        probe: a probe controller's settings (``mode``, ``checkpoints``,
            ``probe_token_price``), which its runtime session needs to build the
            environment's observation; None for other policies.

    Returns:
        The policy folder.

    Raises:
        ValueError: ``member_normalization`` does not give one pair per member.
    """
    if member_normalization is not None and len(member_normalization) != len(members):
        raise ValueError(
            f"member_normalization has {len(member_normalization)} entries for {len(members)} members; give one each"
        )
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
        member_spec: dict[str, object] = {"layers": layer_specs}
        if member_normalization is not None:
            arrays[f"m{m}_obs_mean"] = np.asarray(member_normalization[m][0], dtype=np.float64)
            arrays[f"m{m}_obs_var"] = np.asarray(member_normalization[m][1], dtype=np.float64)
            member_spec |= {"obs_mean": f"m{m}_obs_mean", "obs_var": f"m{m}_obs_var"}
        member_specs.append(member_spec)
    weights_path = out_dir / "policy.npz"
    partial = out_dir / "policy.npz.partial"
    with partial.open("wb") as handle:
        np.savez(handle, **arrays)  # type: ignore[arg-type]
    os.replace(partial, weights_path)
    spec = {
        "format": "tokenopt-policy",
        # Version 2 only when the file needs it, so older runtimes keep loading single policies.
        "format_version": FORMAT_VERSION if member_normalization is not None else 1,
        "policy_id": policy_id,
        "env_id": env_id,
        "feature_spec": feature_spec,
        "actions": actions,
        "answer_tokens": answer_tokens,
        "extra_inputs": extra_inputs or [],
        "normalization": {"clip": clip, "epsilon": epsilon} | ({"count": obs_count} if obs_count is not None else {}),
        "members": member_specs,
        **({"probe": probe} if probe is not None else {}),
        "weights_sha256": hashlib.sha256(weights_path.read_bytes()).hexdigest(),
        "metadata": metadata or {},
    }
    spec_partial = out_dir / "policy.json.partial"
    spec_partial.write_text(json.dumps(spec, indent=2) + "\n", encoding="utf-8")
    os.replace(spec_partial, out_dir / "policy.json")
    return out_dir
