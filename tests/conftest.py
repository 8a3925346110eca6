from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

import pytest
from filelock import FileLock

from tokenopt.demo.suite import SuiteConfig, generate_suite, write_jsonl

os.environ.setdefault("HF_HUB_OFFLINE", "1")

TORCH_THREADS = max(1, (os.cpu_count() or 1) // int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1")))
"""torch threads of each test process: the cores shared among pytest-xdist's workers. More would oversubscribe
the cores, which slows torch many times over; subprocesses inherit the limit through OMP_NUM_THREADS."""
for _name in ("OMP_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ.setdefault(_name, str(TORCH_THREADS))


@pytest.fixture(scope="session", autouse=True)
def torch_threads() -> int:
    """Give torch :data:`TORCH_THREADS` threads for the session; the count, for tests that set their own."""
    import torch

    torch.set_num_threads(TORCH_THREADS)
    return TORCH_THREADS


HEAVY_FIXTURES = {
    "demo_table",
    "demo_policy",
    "conditioned_policy",
    "probe_training",
    "escalating_probe_training",
    "probe_run",
}
"""Fixtures that collect the 1,500-query demo table or train on it: minutes on 2 cores."""


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Mark every test that needs a heavy fixture as slow, so `pytest -m "not slow"` stays a fast loop."""
    for item in items:
        if HEAVY_FIXTURES & set(getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.slow)


@pytest.fixture(scope="session")
def demo_questions(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """48 demo queries of every family, written as JSONL."""
    path = tmp_path_factory.mktemp("data") / "questions.jsonl"
    write_jsonl(generate_suite(SuiteConfig(n_queries=48, seed=7)), path)
    return path


@pytest.fixture(scope="session")
def demo_lm():
    from tokenopt.lm.local import TransformersLM

    return TransformersLM(device="cpu")


def built_once(tmp_path_factory: pytest.TempPathFactory, name: str, build: Callable[[Path], None]) -> Path:
    """A folder that ``build`` fills once per test run, shared by pytest-xdist's workers.

    Under xdist the first worker to ask builds it under the run's common temporary folder,
    holding a file lock, and the others wait for it and reuse it; the session fixtures
    of :data:`HEAVY_FIXTURES` are then collected or trained once per run rather than once
    per worker. Without xdist it is a fresh temporary folder.
    """
    if not os.environ.get("PYTEST_XDIST_WORKER"):
        folder = tmp_path_factory.mktemp(name)
        build(folder)
        return folder
    folder = tmp_path_factory.getbasetemp().parent / name
    with FileLock(str(folder) + ".lock"):
        done = folder / ".built"
        if not done.exists():
            folder.mkdir(exist_ok=True)
            build(folder)
            done.touch()
    return folder


@pytest.fixture(scope="session")
def demo_table(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An outcome table of 1,500 demo queries (all splits), collected with the embedded LM.

    ``TOKENOPT_TEST_TABLE`` may name a table already collected this way (suite seed 5,
    1,500 queries, default settings, with the suite's ``questions.jsonl`` beside the
    table folder), to skip the collection while developing.
    """
    from tokenopt.collect import CollectConfig, collect

    if os.environ.get("TOKENOPT_TEST_TABLE"):
        return Path(os.environ["TOKENOPT_TEST_TABLE"])

    def build(root: Path) -> None:
        questions = root / "questions.jsonl"
        write_jsonl(generate_suite(SuiteConfig(n_queries=1500, seed=5)), questions)
        collect(CollectConfig(out=str(root / "table"), data=str(questions)))

    return built_once(tmp_path_factory, "demo_table", build) / "table"


@pytest.fixture(scope="session")
def demo_policy(tmp_path_factory: pytest.TempPathFactory, demo_table: Path) -> Path:
    """A prompt-only policy trained briefly on the demo table and exported (policy folder)."""
    from tokenopt.agents.export import export_run
    from tokenopt.agents.ppo.train import TrainConfig, train

    def build(root: Path) -> None:
        train(TrainConfig(table=str(demo_table), out=str(root / "run"), total_timesteps=12_288, eval_freq=4096, seed=0))
        export_run(root / "run")

    return built_once(tmp_path_factory, "serve_policy", build) / "run" / "policy"


@pytest.fixture(scope="session")
def conditioned_policy(tmp_path_factory: pytest.TempPathFactory, demo_table: Path) -> Path:
    """A price-conditioned policy (lambda 0.003 to 0.05) trained briefly on the demo table and exported."""
    from tokenopt.agents.export import export_run
    from tokenopt.agents.ppo.train import TrainConfig, train

    def build(root: Path) -> None:
        config = TrainConfig(
            table=str(demo_table), out=str(root / "run"), total_timesteps=24_576, eval_freq=8192, seed=0,
            cost_weight_range="0.003:0.05",
        )  # fmt: skip
        train(config)
        export_run(root / "run")

    return built_once(tmp_path_factory, "conditioned_policy", build) / "run" / "policy"


@pytest.fixture(scope="session")
def probe_training(tmp_path_factory: pytest.TempPathFactory, demo_table: Path):
    """A probe controller trained briefly on the demo table (about 20 s on 2 cores), exported: (run, result)."""
    from tokenopt.agents.export import export_run
    from tokenopt.agents.ppo.train import TrainConfig, train

    run = tmp_path_factory.mktemp("probe") / "run"
    result = train(TrainConfig(table=str(demo_table), out=str(run), env="probe", total_timesteps=24_576))
    export_run(run)
    return run, result


@pytest.fixture(scope="session")
def escalating_probe_training(tmp_path_factory: pytest.TempPathFactory, demo_table: Path):
    """A probe controller that may escalate to beam3, trained and exported like ``probe_training``: (run, result)."""
    from tokenopt.agents.export import export_run
    from tokenopt.agents.ppo.train import TrainConfig, train

    run = tmp_path_factory.mktemp("probe_escalate") / "run"
    config = TrainConfig(
        table=str(demo_table), out=str(run), env="probe", total_timesteps=24_576, hyperparams={"escalate_mode": "beam3"}
    )
    result = train(config)
    export_run(run)
    return run, result


@pytest.fixture(scope="session")
def probe_run(probe_training) -> Path:
    """The run folder of ``probe_training`` (its exported policy is ``RUN/policy``)."""
    return probe_training[0]
