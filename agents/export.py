"""``tokenopt export``: a trained run (or several, as an ensemble) as the pickle-free runtime policy.

:func:`export_run` reads a run folder's best model and observation normalisation and
writes ``RUN/policy/`` (``policy.json`` + ``policy.npz`` [+ ``policy.onnx``]) through
:func:`export_policy`, which :mod:`tokenopt.runtime` loads with numpy alone;
:func:`export_ensemble` writes one policy that averages several runs.
"""

from __future__ import annotations

import hashlib
import json
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import yaml

from tokenopt.agents.common.features import load_run_features
from tokenopt.agents.common.hyperparams import activation_name
from tokenopt.agents.common.run_dir import RunDir
from tokenopt.cost import parse_cost_weight_range
from tokenopt.probe import PROBE_INPUTS
from tokenopt.prompt import PromptFormat
from tokenopt.runtime import POLICY_SPEC_FILE, POLICY_WEIGHTS_FILE
from tokenopt.table import load_manifest
from tokenopt.table.schema import write_atomic

__all__ = ["export_ensemble", "export_policy", "export_run", "policy_layers"]

_EXTRA_INPUTS = {"stream": ["budget_left_fraction", "queries_left_fraction"], "probe": PROBE_INPUTS}
"""Inputs after the prompt features, per environment."""


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
        elif activation_name(module) is not None:
            if not layers:
                raise ValueError("the policy network starts with an activation; expected Linear first")
            weight, bias, _ = layers[-1]
            layers[-1] = (weight, bias, str(activation_name(module)))
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
    prompt_format: dict[str, object] | None = None,
    feature_arrays: dict[str, np.ndarray] | None = None,
    cost_weight_range: tuple[float, float] | None = None,
    cost_weight: float | None = None,
    price_fallback: list[dict[str, object]] | None = None,
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
        prompt_format: the prompt format the table was collected with
            (:meth:`tokenopt.prompt.PromptFormat.to_dict`): servers use it by default.
        feature_arrays: the feature spec's arrays (:meth:`tokenopt.features.Features.arrays`:
            the lm-hidden projection), stored in ``policy.npz`` under the names the spec gives.
        cost_weight_range: the (low, high) lambda range of a price-conditioned policy, whose
            network takes log lambda as its last input (format version 3); None otherwise.
        cost_weight: the lambda a price-conditioned policy decides at by default.
        price_fallback: a price-conditioned policy's do-no-harm intervals (``low``, ``high``,
            ``action``), at whose prices it picks that fixed action; None or empty: none.

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
        **(feature_arrays or {}),
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
    weights_path = out_dir / POLICY_WEIGHTS_FILE

    def write_weights(partial: Path) -> None:
        with partial.open("wb") as handle:
            np.savez(handle, **arrays)  # type: ignore[arg-type]

    write_atomic(weights_path, write_weights)
    spec = {
        "format": "tokenopt-policy",
        # The lowest version that holds the file, so older runtimes keep loading what they can use.
        "format_version": 3 if cost_weight_range is not None else 2 if member_normalization is not None else 1,
        "policy_id": policy_id,
        "env_id": env_id,
        "feature_spec": feature_spec,
        "actions": actions,
        "answer_tokens": answer_tokens,
        "extra_inputs": extra_inputs or [],
        **(
            {"cost_weight_range": list(cost_weight_range), "cost_weight": cost_weight}
            if cost_weight_range is not None
            else {}
        ),
        "normalization": {"clip": clip, "epsilon": epsilon} | ({"count": obs_count} if obs_count is not None else {}),
        "members": member_specs,
        **({"probe": probe} if probe is not None else {}),
        **({"prompt_format": prompt_format} if prompt_format is not None else {}),
        **({"price_fallback": price_fallback} if price_fallback else {}),
        "weights_sha256": hashlib.sha256(weights_path.read_bytes()).hexdigest(),
        "metadata": metadata or {},
    }
    text = json.dumps(spec, indent=2) + "\n"
    write_atomic(out_dir / POLICY_SPEC_FILE, lambda partial: partial.write_text(text, encoding="utf-8"))
    return out_dir


@dataclass
class _LoadedRun:
    """A trained run read back for export: its best model, normalisation and settings."""

    run_dir: Path
    model: Any
    normalizer: Any
    config: dict[str, Any]
    manifest: dict[str, Any]


def _load_run(run_dir: str | Path) -> _LoadedRun:
    """Read a run's best model, VecNormalize statistics, config and table manifest.

    Raises:
        FileNotFoundError: the run has no trained model.
    """
    from stable_baselines3 import PPO

    run = RunDir(run_dir)
    run.require_trained()
    model_path, stats_path = run.best_model, run.vecnormalize
    config = yaml.safe_load(run.config.read_text(encoding="utf-8"))
    manifest = load_manifest(config["table"])
    if config["algo"] == "maskable_ppo":
        from sb3_contrib import MaskablePPO

        model: Any = MaskablePPO.load(model_path, device="cpu")
    else:
        model = PPO.load(model_path, device="cpu")
    # VecNormalize statistics are a training checkpoint (SB3's own pickle), read here
    # offline only; the exported policy stores them as plain arrays.
    import pickle

    with stats_path.open("rb") as handle:
        normalizer = pickle.load(handle)
    return _LoadedRun(run.path, model, normalizer, config, dict(manifest))


def _policy_settings(run: _LoadedRun) -> dict[str, Any]:
    """The keyword arguments of :func:`export_policy` that come from a run's settings."""
    settings: dict[str, Any] = run.manifest["settings"]
    env = str(run.config.get("env", "budget"))
    features = load_run_features(RunDir(run.run_dir), run.manifest)
    return {
        "actions": list(run.manifest["actions"]),
        "feature_spec": features.to_dict(),
        "feature_arrays": features.arrays(),
        "clip": float(run.normalizer.clip_obs),
        "epsilon": float(run.normalizer.epsilon),
        "answer_tokens": int(settings.get("max_answer_tokens", 8)) + 1,
        "extra_inputs": _EXTRA_INPUTS.get(env, []),
        "env_id": str(run.config.get("env_id", "tokenopt/TokenBudget-v0")),
        "probe": _probe_settings(run.manifest, run.config) if env == "probe" else None,
        "prompt_format": _prompt_format(settings),
        **_price_settings(run.config),
    }


def _price_settings(config: dict[str, Any]) -> dict[str, Any]:
    """A price-conditioned run's lambda range and default (``train --cost-weight-range``); empty otherwise."""
    if not config.get("cost_weight_range"):
        return {}
    return {
        "cost_weight_range": parse_cost_weight_range(config["cost_weight_range"]),
        "cost_weight": float(config["cost_weight"]),
    }


def _prompt_format(settings: dict[str, Any]) -> dict[str, object]:
    """The prompt format the table was collected with, as the policy records it for servers."""
    return PromptFormat(
        template=str(settings.get("prompt_template", "{question}")),
        answer_cue=str(settings.get("answer_cue", "=")),
        answer_regex=settings.get("answer_regex"),
        max_answer_tokens=int(settings.get("max_answer_tokens", 8)),
        use_chat_template=bool(settings.get("use_chat_template", False)),
        system_prompt=settings.get("system_prompt"),
    ).to_dict()


def _probe_settings(manifest: dict[str, Any], config: dict[str, Any]) -> dict[str, object]:
    """What a probe controller's runtime session needs to build its environment's observation.

    ``train --env probe`` builds TokenBudgetProbe-v0 with its default mode and probe
    price, so the checkpoints are that mode's budgets in the table's action table; an
    ``escalate_mode`` given with ``--set`` is recorded only when set, so controllers
    without one export as before.
    """
    from tokenopt.envs.probe import DEFAULT_MODE, DEFAULT_PROBE_TOKEN_PRICE

    checkpoints = sorted(int(action["budget"]) for action in manifest["actions"] if action["mode"] == DEFAULT_MODE)
    settings: dict[str, object] = {
        "mode": DEFAULT_MODE, "checkpoints": checkpoints, "probe_token_price": DEFAULT_PROBE_TOKEN_PRICE
    }  # fmt: skip
    escalate_mode = (config.get("resolved_hyperparams") or {}).get("escalate_mode")
    if escalate_mode is not None:
        settings["escalate_mode"] = str(escalate_mode)
    return settings


def export_run(run_dir: str | Path, onnx: bool = False) -> Path:
    """Export a run's best model as ``RUN/policy/`` (policy.json + policy.npz [+ policy.onnx]).

    Raises:
        FileNotFoundError: the run has no trained model.
    """
    run = _load_run(run_dir)
    config, normalizer, model = run.config, run.normalizer, run.model
    out = export_policy(
        [model],
        normalizer.obs_rms.mean,
        normalizer.obs_rms.var,
        RunDir(run.run_dir).policy,
        policy_id=f"{run.run_dir.name}",
        metadata={"table": config["table"], "cost_weight": config["cost_weight"], "algo": config["algo"]},
        obs_count=float(normalizer.obs_rms.count),
        **_policy_settings(run),
    )
    if onnx:
        _export_onnx(model, out / "policy.onnx", len(normalizer.obs_rms.mean))
    return out


def export_ensemble(run_dirs: list[str | Path] | list[Path], out_dir: str | Path) -> Path:
    """Export several runs (e.g. seeds) as one policy that averages their action probabilities.

    Each member keeps its own observation normalisation (its run's VecNormalize
    statistics), so the policy is written as format version 2.

    Args:
        run_dirs: trained run folders on the same table and environment.
        out_dir: the policy folder to write.

    Returns:
        The policy folder.

    Raises:
        ValueError: fewer than two runs, or runs whose features, actions or
            environment differ (naming the first run that differs).
        FileNotFoundError: a run has no trained model.
    """
    if len(run_dirs) < 2:
        raise ValueError(f"an ensemble needs at least two runs; got {len(run_dirs)}: {[str(r) for r in run_dirs]}")
    runs = [_load_run(run_dir) for run_dir in run_dirs]
    reference = _policy_settings(runs[0])
    for run in runs[1:]:
        settings = _policy_settings(run)
        keys = ("feature_spec", "actions", "extra_inputs", "env_id", "probe", "clip", "epsilon", "cost_weight_range",
                "prompt_format")  # fmt: skip
        for key in keys:
            if settings.get(key) != reference.get(key):
                raise ValueError(
                    f"cannot ensemble {run.run_dir} with {runs[0].run_dir}: their {key} differ "
                    f"({settings.get(key)!r} vs {reference.get(key)!r}); train every member on the same table and env"
                )
    out_dir = Path(out_dir)
    return export_policy(
        [run.model for run in runs],
        runs[0].normalizer.obs_rms.mean,
        runs[0].normalizer.obs_rms.var,
        out_dir,
        policy_id=f"{out_dir.parent.name}-ensemble{len(runs)}",
        metadata={
            "table": runs[0].config["table"],
            "cost_weight": runs[0].config["cost_weight"],
            "members": [
                {"run": str(run.run_dir), "seed": run.config.get("seed"), "algo": run.config["algo"]} for run in runs
            ],
        },
        member_normalization=[(run.normalizer.obs_rms.mean, run.normalizer.obs_rms.var) for run in runs],
        **reference,
    )


def _export_onnx(model: Any, path: Path, n_inputs: int) -> None:
    """Logits-only ONNX export (the dynamo exporter fails on SB3's distributions)."""
    import torch

    try:
        import onnx  # noqa: F401
    except ImportError:
        raise ValueError("--onnx needs the onnx package: pip install 'tokenopt[onnx]'") from None

    class Logits(torch.nn.Module):
        def __init__(self, policy: Any) -> None:
            super().__init__()
            self.policy = policy

        def forward(self, observation: torch.Tensor) -> torch.Tensor:
            latent = self.policy.mlp_extractor.forward_actor(observation)
            return self.policy.action_net(latent)

    # The TorchScript exporter is deprecated but needs no onnxscript, and the dynamo
    # exporter fails on SB3's distribution classes; the logits-only module suits both.
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", category=DeprecationWarning, message=".*legacy TorchScript-based ONNX")
        _torchscript_export(Logits(model.policy).eval(), path, n_inputs)


def _torchscript_export(module: Any, path: Path, n_inputs: int) -> None:
    import torch

    torch.onnx.export(
        module,
        (torch.zeros(1, n_inputs),),
        str(path),
        input_names=["observation"],
        output_names=["logits"],
        dynamic_axes={"observation": {0: "batch"}, "logits": {0: "batch"}},
        dynamo=False,
    )
