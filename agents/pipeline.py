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
from tokenopt.cost import CostModel
from tokenopt.outcomes import OutcomeMatrix, load_manifest

__all__ = ["EvaluationRow", "evaluate_policy", "export_run", "format_table"]


def export_run(run_dir: str | Path, onnx: bool = False) -> Path:
    """Export a run's best model as ``RUN/policy/`` (policy.json + policy.npz [+ policy.onnx]).

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
    settings: dict[str, Any] = manifest["settings"]  # type: ignore[assignment]
    answer_tokens = int(settings.get("max_answer_tokens", 8)) + 1
    out = export_policy(
        [model],
        normalizer.obs_rms.mean,
        normalizer.obs_rms.var,
        run_dir / "policy",
        actions=list(manifest["actions"]),  # type: ignore[call-overload]
        feature_spec=manifest["feature_spec"],
        clip=float(normalizer.clip_obs),
        epsilon=float(normalizer.epsilon),
        answer_tokens=answer_tokens,
        extra_inputs=["budget_left_fraction", "queries_left_fraction"] if config.get("env") == "stream" else [],
        policy_id=f"{run_dir.name}",
        env_id=str(config.get("env_id", "tokenopt/TokenBudget-v0")),
        metadata={"table": config["table"], "cost_weight": config["cost_weight"], "algo": config["algo"]},
    )
    if onnx:
        _export_onnx(model, out / "policy.onnx", len(normalizer.obs_rms.mean))
    return out


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
    policy = BudgetPolicy.load(policy_dir)
    import pyarrow.parquet as pq

    questions = dict(
        zip(
            *(pq.read_table(Path(table) / "queries.parquet", columns=["id", "question"]).column(c).to_pylist()
              for c in ("id", "question")),
            strict=True,
        )
    )  # fmt: skip
    decisions = policy.decide_batch([questions[query_id] for query_id in matrix.ids])
    column = {name: j for j, name in enumerate(matrix.actions)}
    chosen = np.array([column[d.action] for d in decisions])
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
    for family, decision in zip(families, decisions, strict=True):
        mix.setdefault(str(family), {}).setdefault(decision.action, 0)
        mix[str(family)][decision.action] += 1
    extra = {"best_fixed_action": matrix.actions[int(np.argmax(means))], "action_mix": mix, "queries": len(matrix.ids)}
    return rows, extra


def format_table(rows: list[EvaluationRow], max_greedy: str) -> str:
    """A Markdown table of the evaluation, the policy and oracle first."""
    lines = ["| method | EM | mean billed tokens | reward | gap recovered |", "|---|---|---|---|---|"]
    for r in rows:
        name = r.method + (" (max-budget greedy)" if r.method == f"fixed {max_greedy}" else "")
        lines.append(f"| {name} | {r.em:.3f} | {r.tokens:.2f} | {r.reward:.3f} | {r.gap_recovered:.2f} |")
    return "\n".join(lines)


def save_report(path: Path, rows: list[EvaluationRow], extra: dict[str, Any]) -> None:
    """Write the evaluation as JSON."""
    data = {"rows": [r.__dict__ for r in rows], **extra}
    path.write_text(json.dumps(data, indent=2) + "\n", encoding="utf-8")
