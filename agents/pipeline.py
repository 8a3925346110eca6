"""Export of a run, evaluation on the test split, and the end-to-end demo."""

from __future__ import annotations

import json
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import yaml

from tokenopt.agents.export import export_policy
from tokenopt.agents.gate import policy_choices, query_questions
from tokenopt.cost import CostModel
from tokenopt.outcomes import OutcomeMatrix, load_manifest
from tokenopt.runtime import PROBE_INPUTS

_EXTRA_INPUTS = {"stream": ["budget_left_fraction", "queries_left_fraction"], "probe": PROBE_INPUTS}
"""Inputs after the prompt features, per environment."""

__all__ = [
    "EvaluationRow",
    "evaluate_policy",
    "export_ensemble",
    "export_run",
    "format_seed_report",
    "format_table",
    "seed_report",
]


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

    run_dir = Path(run_dir)
    model_path = run_dir / "checkpoints" / "best_model.zip"
    stats_path = run_dir / "checkpoints" / "vecnormalize.pkl"
    config_path = run_dir / "config.yml"
    for required in (model_path, stats_path, config_path):
        if not required.is_file():
            raise FileNotFoundError(f"{required} is missing: train the run first with `tokenopt train --out {run_dir}`")
    config = yaml.safe_load(config_path.read_text(encoding="utf-8"))
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
    return _LoadedRun(run_dir, model, normalizer, config, dict(manifest))


def _policy_settings(run: _LoadedRun) -> dict[str, Any]:
    """The keyword arguments of :func:`export_policy` that come from a run's settings."""
    settings: dict[str, Any] = run.manifest["settings"]
    env = str(run.config.get("env", "budget"))
    return {
        "actions": list(run.manifest["actions"]),
        "feature_spec": run.manifest["feature_spec"],
        "clip": float(run.normalizer.clip_obs),
        "epsilon": float(run.normalizer.epsilon),
        "answer_tokens": int(settings.get("max_answer_tokens", 8)) + 1,
        "extra_inputs": _EXTRA_INPUTS.get(env, []),
        "env_id": str(run.config.get("env_id", "tokenopt/TokenBudget-v0")),
        "probe": _probe_settings(run.manifest, run.config) if env == "probe" else None,
    }


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
        run.run_dir / "policy",
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
        for key in ("feature_spec", "actions", "extra_inputs", "env_id", "probe", "clip", "epsilon"):
            if settings[key] != reference[key]:
                raise ValueError(
                    f"cannot ensemble {run.run_dir} with {runs[0].run_dir}: their {key} differ "
                    f"({settings[key]!r} vs {reference[key]!r}); train every member on the same table and env"
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


@dataclass
class EvaluationRow:
    """One method's metrics on a split."""

    method: str
    em: float
    tokens: float
    reward: float
    gap_recovered: float


def evaluate_policy(
    policy_dir: str | Path, table: str | Path, split: str = "test", cost_model: CostModel | None = None
) -> tuple[list[EvaluationRow], dict[str, Any]]:
    """The runtime policy against every fixed action and the oracle on a split.

    The policy decides from the question text, exactly as a server would.
    """
    from tokenopt.runtime import BudgetPolicy

    cost_model = cost_model or CostModel()
    matrix = OutcomeMatrix.from_table(table).subset(split)
    chosen = policy_choices(BudgetPolicy.load(policy_dir), matrix, query_questions(table))
    rewards = matrix.rewards(cost_model)
    rows_index = np.arange(len(matrix.ids))
    oracle = float(rewards.max(axis=1).mean())
    means = rewards.mean(axis=0)
    best_fixed = float(means.max())
    spread = oracle - best_fixed

    def row(method: str, picks: np.ndarray) -> EvaluationRow:
        reward = float(rewards[rows_index, picks].mean())
        return EvaluationRow(
            method,
            float(matrix.exact_match[rows_index, picks].mean()),
            float(matrix.billed_tokens[rows_index, picks].mean()),
            reward,
            (reward - best_fixed) / spread if spread > 1e-12 else 0.0,
        )

    rows = [row("tokenopt policy", chosen)]
    rows.append(row("oracle", rewards.argmax(axis=1)))
    for j, name in enumerate(matrix.actions):
        rows.append(row(f"fixed {name}", np.full(len(matrix.ids), j)))
    mix: dict[str, dict[str, int]] = {}
    families = matrix.families if matrix.families is not None else np.array(["all"] * len(matrix.ids))
    for family, column in zip(families, chosen, strict=True):
        action = matrix.actions[int(column)]
        mix.setdefault(str(family), {}).setdefault(action, 0)
        mix[str(family)][action] += 1
    extra = {"best_fixed_action": matrix.actions[int(np.argmax(means))], "action_mix": mix, "queries": len(matrix.ids)}
    return rows, extra


def format_table(rows: list[EvaluationRow], max_greedy: str) -> str:
    """A Markdown table of the evaluation, the policy and oracle first."""
    lines = ["| method | EM | mean billed tokens | reward | gap recovered |", "|---|---|---|---|---|"]
    for r in rows:
        name = r.method + (" (max-budget greedy)" if r.method == f"fixed {max_greedy}" else "")
        lines.append(f"| {name} | {r.em:.3f} | {r.tokens:.2f} | {r.reward:.3f} | {r.gap_recovered:.2f} |")
    return "\n".join(lines)


def seed_report(
    policies: dict[str, Path],
    table: str | Path,
    cost_model: CostModel | None = None,
    ensemble: Path | None = None,
    split: str = "test",
) -> dict[str, Any]:
    """Each seed's policy (and the ensemble of them) on a split, to see what the ensemble buys.

    Args:
        policies: a label (``seed 3``) and policy folder per single policy.
        table: the outcome table.
        cost_model: the reward's cost model (default lambda 0.01).
        ensemble: the ensemble's policy folder, if there is one.
        split: the split to evaluate on.

    Returns:
        ``{"split", "queries", "cost_weight", "best_fixed_action", "singles", "mean_single",
        "best_single", "ensemble"}``; every policy entry has ``em``, ``tokens``, ``reward``
        and ``gap_recovered``.

    Raises:
        ValueError: the table has no query in the split.
    """
    cost_model = cost_model or CostModel()
    metric_names = ("em", "tokens", "reward", "gap_recovered")

    def evaluate(label: str, path: Path) -> tuple[dict[str, Any], dict[str, Any]]:
        rows, extra = evaluate_policy(path, table, split, cost_model)
        policy_row = rows[0]
        return {"policy": label, "path": str(path)} | {k: getattr(policy_row, k) for k in metric_names}, extra

    singles = []
    extra: dict[str, Any] = {}
    for label, path in policies.items():
        entry, extra = evaluate(label, path)
        singles.append(entry)
    report: dict[str, Any] = {
        "split": split,
        "queries": extra.get("queries"),
        "cost_weight": cost_model.cost_weight,
        "best_fixed_action": extra.get("best_fixed_action"),
        "singles": singles,
        "mean_single": {k: float(np.mean([entry[k] for entry in singles])) for k in metric_names},
        "best_single": max(singles, key=lambda entry: entry["reward"])["policy"] if singles else None,
        "ensemble": None,
    }
    if ensemble is not None:
        report["ensemble"], _ = evaluate("ensemble", ensemble)
    return report


def format_seed_report(report: dict[str, Any]) -> str:
    """A Markdown table of :func:`seed_report`: every single policy, their mean and the ensemble."""
    lines = ["| policy | EM | mean billed tokens | reward | gap recovered |", "|---|---|---|---|---|"]
    entries = [*report["singles"], {"policy": "mean of singles"} | report["mean_single"]]
    if report["ensemble"] is not None:
        entries.append(report["ensemble"])
    for e in entries:
        lines.append(
            f"| {e['policy']} | {e['em']:.3f} | {e['tokens']:.2f} | {e['reward']:.3f} | {e['gap_recovered']:.2f} |"
        )
    return "\n".join(lines)


def save_report(path: Path, rows: list[EvaluationRow], extra: dict[str, Any]) -> None:
    """Write the evaluation as JSON."""
    data = {"rows": [r.__dict__ for r in rows], **extra}
    path.write_text(json.dumps(data, indent=2) + "\n", encoding="utf-8")
