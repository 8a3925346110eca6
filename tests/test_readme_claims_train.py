"""README claims of `tokenopt train`: dual ascent on lambda for --em-floor, --patience, and
the hyperparameters in TensorBoard, read back from the run's real event files.

The table is small (100 demo queries, greedy at five budgets, collected with the embedded
LM); runs validate every rollout (1,024 steps), so each validation is one point of the
TensorBoard series.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import pyarrow.parquet as pq
import pytest

from tokenopt.agents.common.hyperparams import ENV_IDS
from tokenopt.agents.ppo.train import TrainConfig, train
from tokenopt.demo.suite import SuiteConfig, generate_suite, write_jsonl

ROLLOUT = 1024  # n_envs 8 x n_steps 128 of agents/configs/ppo.yml
FROZEN = {"learning_rate": 0.0, "normalize": False}
"""A policy that cannot change: every validation scores the same, so none is a gain."""


@pytest.fixture(scope="module")
def table(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from tokenopt.collect import CollectConfig, collect

    root = tmp_path_factory.mktemp("train_claims")
    write_jsonl(generate_suite(SuiteConfig(n_queries=100, seed=3)), root / "questions.jsonl")
    collect(CollectConfig(out=str(root / "table"), data=str(root / "questions.jsonl"), modes=["greedy"], device="cpu"))
    return root / "table"


def _events(run: Path) -> Any:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    return EventAccumulator(str(run / "tb")).Reload()


def _series(run: Path, tag: str) -> list[tuple[int, float]]:
    return [(event.step, event.value) for event in _events(run).Scalars(tag)]


def _max_budget_greedy_val_em(table: Path) -> float:
    rows = pq.read_table(table / "outcomes", columns=["split", "action", "em"]).to_pylist()
    chosen = [row["em"] for row in rows if row["split"] == "val" and row["action"] == "b32/greedy"]
    assert chosen
    return sum(chosen) / len(chosen)


# -- 7a. --em-floor adapts lambda by dual ascent, logged as train/lambda ----------------------------


@pytest.mark.parametrize(
    ("em_floor", "direction"),
    [
        (150.0, +1),  # EM can never be 150 points below max-budget greedy: always EM to spare, lambda rises
        (-150.0, -1),  # nor 150 points above it: always below the floor, lambda falls
    ],
)
def test_em_floor_moves_lambda_by_dual_ascent_and_logs_it(tmp_path, table, em_floor, direction):
    start, dual_lr = 0.004, 0.02
    run = tmp_path / "run"
    config = TrainConfig(
        table=str(table), out=str(run), total_timesteps=3 * ROLLOUT, eval_freq=ROLLOUT, em_floor=em_floor,
        cost_weight=start, dual_lr=dual_lr,
    )  # fmt: skip
    result = train(config)
    lambdas = _series(run, "train/lambda")
    ems = _series(run, "eval/em")
    assert [step for step, _ in lambdas] == [step for step, _ in ems] == [ROLLOUT, 2 * ROLLOUT, 3 * ROLLOUT]
    values = [value for _, value in lambdas]
    assert values[0] == pytest.approx(start)  # logged at each validation, before that validation's update
    steps = [later - earlier for earlier, later in zip(values, values[1:], strict=False)]
    assert all(direction * step > 0 for step in steps), values
    # The update: lambda <- lambda * exp(dual_lr * (floor - EM drop in points below max-budget greedy)).
    reference = _max_budget_greedy_val_em(table)
    expected = [start]
    for _, em in ems:
        expected.append(expected[-1] * math.exp(dual_lr * (em_floor - 100.0 * (reference - em))))
    assert values == pytest.approx(expected[:3], rel=1e-5)
    assert result.best_metrics["em_drop_points"] == pytest.approx(100.0 * (reference - result.best_metrics["em"]))
    summary = json.loads((run / "training.json").read_text())
    assert summary["cost_weight"] == pytest.approx(expected[3], rel=1e-5)


# -- 7b. --patience ------------------------------------------------------------------------------


@pytest.mark.parametrize("patience", [1, 3])
def test_patience_stops_after_that_many_validations_without_gain(tmp_path, table, patience):
    run = tmp_path / "run"
    config = TrainConfig(
        table=str(table), out=str(run), total_timesteps=50 * ROLLOUT, eval_freq=ROLLOUT, patience=patience,
        hyperparams=FROZEN,
    )  # fmt: skip
    result = train(config)
    rewards = [value for _, value in _series(run, "eval/reward")]
    assert len(set(rewards)) == 1  # the construction holds: no validation gained on the first
    assert len(rewards) == patience + 1  # the first validation, then `patience` without gain
    assert result.stopped_early and result.timesteps == (patience + 1) * ROLLOUT


def test_a_run_with_an_em_floor_runs_to_its_timesteps_whatever_the_patience(tmp_path, table):
    # docs/train.md: with a constraint, lambda keeps moving the objective, so --patience does not stop it.
    run = tmp_path / "run"
    config = TrainConfig(
        table=str(table), out=str(run), total_timesteps=4 * ROLLOUT, eval_freq=ROLLOUT, patience=1,
        em_floor=150.0, hyperparams=FROZEN,
    )  # fmt: skip
    result = train(config)
    assert len(_series(run, "eval/reward")) == 4
    assert not result.stopped_early and result.timesteps == 4 * ROLLOUT


# -- 7c. the hyperparameters (HParams) in TensorBoard -------------------------------------------------


def test_hyperparameters_are_written_to_tensorboard(tmp_path, table):
    from tensorboard.plugins.hparams import plugin_data_pb2

    run = tmp_path / "run"
    config = TrainConfig(
        table=str(table), out=str(run), total_timesteps=ROLLOUT, eval_freq=ROLLOUT, cost_weight=0.007, seed=5,
        hyperparams={"ent_coef": 0.03, "policy_kwargs": {"net_arch": [32, 16]}},
    )  # fmt: skip
    train(config)
    content = _events(run).PluginTagToContent("hparams")
    start = plugin_data_pb2.HParamsPluginData.FromString(content["_hparams_/session_start_info"])
    logged = {
        name: getattr(value, value.WhichOneof("kind")) for name, value in start.session_start_info.hparams.items()
    }
    assert logged == {
        "algo": "ppo",
        "env": ENV_IDS["budget"],
        "cost_weight": pytest.approx(0.007),
        "n_envs": 8,
        "net_arch": "[32, 16]",
        "ent_coef": pytest.approx(0.03),
        "seed": 5,
    }
    experiment = plugin_data_pb2.HParamsPluginData.FromString(content["_hparams_/experiment"]).experiment
    metrics = {info.name.tag for info in experiment.metric_infos}
    assert {"eval/reward", "eval/em", "eval/tokens", "eval/gap_recovered"} <= metrics
