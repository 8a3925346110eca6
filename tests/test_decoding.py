"""Shared-prefix decoding against independent per-budget runs on the demo LM."""

from dataclasses import replace

import pytest
import torch

from tokenopt.actions import parse_mode
from tokenopt.demo.suite import SuiteConfig, generate_suite
from tokenopt.lm.decoding import decode_each_at_budget, decode_with_budgets

BUDGETS = [0, 2, 4, 8, 16, 32]


@pytest.fixture(scope="module")
def prompts(demo_lm):
    suite = generate_suite(SuiteConfig(n_queries=24, seed=11))
    return [demo_lm.encode_prompt(record["question"]) for record in suite]


def _reference_greedy(lm, prompt, budget):
    """Budget forcing with transformers' own generate, one budget at a time."""
    settings = lm.settings
    model = lm.model
    ids = torch.tensor([prompt])
    reasoning: list[int] = []
    if budget > 0:
        generated = model.generate(
            ids,
            attention_mask=torch.ones_like(ids),
            max_new_tokens=budget,
            do_sample=False,
            eos_token_id=[*settings.cue_ids, *settings.eos_ids],
            pad_token_id=settings.pad_id,
        )[0, len(prompt) :].tolist()
        reasoning = generated
        if reasoning and reasoning[-1] in (*settings.cue_ids, *settings.eos_ids):
            reasoning = reasoning[:-1]
    context = torch.tensor([prompt + reasoning + list(settings.cue_ids)])
    answer = model.generate(
        context,
        attention_mask=torch.ones_like(context),
        max_new_tokens=settings.max_answer_tokens,
        do_sample=False,
        eos_token_id=[*settings.eos_ids, *settings.newline_ids],
        pad_token_id=settings.pad_id,
    )[0, context.shape[1] :].tolist()
    while answer and answer[-1] in (*settings.eos_ids, *settings.newline_ids):
        answer = answer[:-1]
    return reasoning, answer


def test_greedy_branches_equal_separate_generate_runs(demo_lm, prompts):
    outcomes, _, _ = decode_with_budgets(demo_lm.model, prompts, parse_mode("greedy"), BUDGETS, demo_lm.settings)
    natural = 0
    for prompt, per_budget in zip(prompts, outcomes, strict=True):
        for budget in BUDGETS:
            (sequence,) = per_budget[budget]
            reasoning, answer = _reference_greedy(demo_lm, prompt, budget)
            assert sequence.reasoning_ids == reasoning, (budget, prompt)
            assert sequence.answer_ids == answer, (budget, prompt)
            assert len(sequence.reasoning_ids) <= budget
            natural += sequence.natural_stop
    # The batch mixes traces that end by themselves and traces cut by the budget.
    assert 0 < natural < len(prompts) * len(BUDGETS)


@pytest.mark.parametrize("mode_name", ["sc4", "beam3"])
def test_branches_equal_single_budget_runs(demo_lm, prompts, mode_name):
    mode = parse_mode(mode_name)
    seeds = list(range(100, 100 + len(prompts)))
    shared, _, _ = decode_with_budgets(demo_lm.model, prompts, mode, BUDGETS, demo_lm.settings, seeds)
    for budget in BUDGETS:
        alone, _, _ = decode_with_budgets(demo_lm.model, prompts, mode, [budget], demo_lm.settings, seeds)
        for together, single in zip(shared, alone, strict=True):
            assert [(s.reasoning_ids, s.answer_ids) for s in together[budget]] == [
                (s.reasoning_ids, s.answer_ids) for s in single[budget]
            ], (mode_name, budget)


def test_sampling_is_seeded(demo_lm, prompts):
    mode = parse_mode("sc3")
    first, _, _ = decode_with_budgets(demo_lm.model, prompts[:6], mode, [0, 8], demo_lm.settings, [1] * 6)
    again, _, _ = decode_with_budgets(demo_lm.model, prompts[:6], mode, [0, 8], demo_lm.settings, [1] * 6)
    other, _, _ = decode_with_budgets(demo_lm.model, prompts[:6], mode, [0, 8], demo_lm.settings, [2] * 6)

    def flat(outcomes):
        return [(s.reasoning_ids, s.answer_ids) for per in outcomes for b in (0, 8) for s in per[b]]

    assert flat(first) == flat(again)
    assert flat(first) != flat(other)


def test_shared_prefix_runs_fewer_forward_tokens(demo_lm, prompts):
    mode = parse_mode("greedy")
    _, _, shared = decode_with_budgets(demo_lm.model, prompts, mode, BUDGETS, demo_lm.settings)
    naive = 0
    for budget in BUDGETS:
        _, _, stats = decode_with_budgets(demo_lm.model, prompts, mode, [budget], demo_lm.settings)
        naive += stats.forward_tokens
    assert shared.forward_tokens < naive / 2


def test_tokenizer_round_trips_through_autotokenizer():
    from transformers import AutoTokenizer

    from tokenopt.demo import DEMO_MODEL_DIR

    tokenizer = AutoTokenizer.from_pretrained(DEMO_MODEL_DIR, local_files_only=True)
    text = "ball a ab ba? C 3+4*2-5?"
    ids = tokenizer(text)["input_ids"]
    assert ids[0] == tokenizer.bos_token_id
    assert len(ids) == len(text) + 1
    assert tokenizer.decode(ids, skip_special_tokens=True) == text


@pytest.mark.parametrize("mode_name", ["greedy", "sc5"])
def test_each_row_at_its_own_budget_equals_one_budget_runs(demo_lm, prompts, mode_name):
    mode, prompts = parse_mode(mode_name), prompts[:12]
    budgets = [BUDGETS[i % len(BUDGETS)] for i in range(len(prompts))]
    seeds = list(range(len(prompts)))
    mixed, stats = decode_each_at_budget(demo_lm.model, prompts, mode, budgets, demo_lm.settings, seeds)
    for i, (prompt, budget) in enumerate(zip(prompts, budgets, strict=True)):
        alone, _, _ = decode_with_budgets(demo_lm.model, [prompt], mode, [budget], demo_lm.settings, [seeds[i]])
        for got, want in zip(mixed[i], alone[0][budget], strict=True):
            # Same tokens; log-probabilities differ only by the batch's padding (float32).
            assert replace(got, answer_logprob=0.0) == replace(want, answer_logprob=0.0)
            assert got.answer_logprob == pytest.approx(want.answer_logprob, abs=1e-4)
    # One batch instead of one per budget: rows leave as their budgets run out.
    assert stats.forward_calls < sum(budget + 12 for budget in set(budgets))
    with pytest.raises(ValueError, match="beam"):
        decode_each_at_budget(demo_lm.model, prompts, parse_mode("beam3"), budgets, demo_lm.settings)


def test_listener_hears_greedy_tokens_while_they_decode(demo_lm, prompts):
    forwards = [0]
    handle = demo_lm.model.register_forward_hook(lambda *_: forwards.__setitem__(0, forwards[0] + 1))
    heard: dict[int, list[tuple[int, int]]] = {}
    try:
        out, _ = decode_each_at_budget(
            demo_lm.model,
            prompts[:4],
            parse_mode("greedy"),
            [32, 0, 8, 32],
            demo_lm.settings,
            listener=lambda slot, token: heard.setdefault(slot, []).append((token, forwards[0])),
        )
    finally:
        handle.remove()
    for slot, sequences in enumerate(out):
        sequence = sequences[0]
        text = demo_lm.tokenizer.decode([token for token, _ in heard[slot]], skip_special_tokens=True)
        cue = demo_lm.prompt_format.answer_cue
        assert text == demo_lm.tokenizer.decode(sequence.reasoning_ids) + cue + demo_lm.tokenizer.decode(
            sequence.answer_ids
        )
    # Tokens arrive one forward pass apart, not all at the end.
    moments = [moment for _, moment in heard[0]]
    assert len(set(moments)) >= len(moments) - 2 and moments[0] < moments[-1]
    with pytest.raises(ValueError, match="greedy"):
        decode_each_at_budget(demo_lm.model, prompts[:2], parse_mode("sc3"), [4, 4], demo_lm.settings, listener=print)
