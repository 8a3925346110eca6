from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

from tokenopt.demo.suite import SuiteConfig, generate_suite, write_jsonl

torch.set_num_threads(1)
os.environ.setdefault("HF_HUB_OFFLINE", "1")


@pytest.fixture(scope="session")
def demo_questions(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """48 demo queries of every family, written as JSONL."""
    path = tmp_path_factory.mktemp("data") / "questions.jsonl"
    write_jsonl(generate_suite(SuiteConfig(n_queries=48, seed=7)), path)
    return path


@pytest.fixture(scope="session")
def demo_lm():
    from tokenopt.lm.backend import TransformersLM

    return TransformersLM(device="cpu")
