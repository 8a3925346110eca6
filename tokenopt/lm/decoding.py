"""Shared-prefix decoding with budget forcing at every budget of the action table.

For each (query, mode) the LM reasons once, up to the largest budget, with the KV
cache. When the reasoning reaches a budget ``b`` of the table, the decoder forks:
it copies the cache of the rows still reasoning, appends the answer cue (budget
forcing) and decodes their forced answers, then the main pass goes on reasoning.
A row that emits the cue itself answers in the main pass, and that answer is its
outcome at every budget at or above the point where it stopped.

This is exact, not an approximation:

- greedy: a greedy trace cut at ``b`` is the trace a run with budget ``b`` writes;
- ``sc<k>``: each sample draws its token ``i`` from its own seeded uniform stream at
  index ``i``, so the branch at ``b`` draws what a separate budget-``b`` run with the
  same seed draws;
- ``beam<k>``: beam search is the same for every budget until step ``b``; the fork
  at ``b`` copies the whole beam of the query, forces the cue on the hypotheses
  still reasoning and finishes the beam search from there, as a budget-``b`` run
  would.
"""

from __future__ import annotations

import copy
import inspect
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import torch

from tokenopt.actions import Mode

__all__ = ["DecodeSettings", "DecodeStats", "SequenceOutcome", "decode_each_at_budget", "decode_with_budgets"]

_REASONING, _ANSWERING, _DONE = 0, 1, 2


@dataclass(frozen=True)
class DecodeSettings:
    """What the decoder needs to know about the prompt format and the stop rules."""

    cue_ids: tuple[int, ...]
    """Token ids of the answer cue appended when the budget runs out."""
    eos_ids: frozenset[int]
    """Token ids that end a sequence."""
    newline_ids: frozenset[int] = frozenset()
    """Token ids that end an answer (any token containing a newline)."""
    pad_id: int = 0
    """Token id fed to rows that have finished."""
    max_answer_tokens: int = 8
    """Most tokens an answer may have after the cue."""
    temperature: float = 1.0
    """Sampling temperature of ``sc<k>``."""


@dataclass
class SequenceOutcome:
    """One decoded sequence: its reasoning, cue and answer."""

    reasoning_ids: list[int]
    cue_tokens: int
    answer_ids: list[int]
    """The answer's tokens, without the EOS or newline that ended it."""
    answer_logprob: float
    """Sum of the log-probabilities of the answer tokens."""
    billed_answer_tokens: int
    """Answer tokens generated, including a newline that ended it (an EOS is not billed)."""
    natural_stop: bool
    """Whether the LM stopped reasoning by itself (cue or EOS) rather than by the budget."""
    score: float = 0.0
    """Beam search score: the sequence's total log-probability."""


@dataclass
class DecodeStats:
    """Work counters of one or more decoding calls."""

    forward_tokens: int = 0
    """Positions run through the LM (rows x new positions, padding included)."""
    forward_calls: int = 0
    """Forward passes."""

    def add(self, other: DecodeStats) -> None:
        """Add another call's counters to these."""
        self.forward_tokens += other.forward_tokens
        self.forward_calls += other.forward_calls


@dataclass
class _Row:
    group: int
    uniforms: np.ndarray | None
    slot: int = 0
    """The row's position in the initial batch (greedy and sc rows are never reordered)."""
    reasoning: list[int] = field(default_factory=list)
    answer: list[int] = field(default_factory=list)
    answer_logprob: float = 0.0
    billed_answer: int = 0
    cue_tokens: int = 0
    forced: list[int] = field(default_factory=list)
    phase: int = _REASONING
    natural_stop: bool = False
    score: float = 0.0

    @property
    def generated(self) -> int:
        return len(self.reasoning) + self.cue_tokens + self.billed_answer

    def outcome(self) -> SequenceOutcome:
        return SequenceOutcome(
            reasoning_ids=list(self.reasoning),
            cue_tokens=self.cue_tokens,
            answer_ids=list(self.answer),
            answer_logprob=self.answer_logprob,
            billed_answer_tokens=self.billed_answer,
            natural_stop=self.natural_stop,
            score=self.score,
        )


class _State:
    """Rows decoding together: their cache, attention mask and bookkeeping."""

    def __init__(
        self,
        model: torch.nn.Module,
        settings: DecodeSettings,
        mode: Mode,
        rows: list[_Row],
        cache: object,
        attention: torch.Tensor,
        positions: torch.Tensor,
        logits: torch.Tensor,
        stats: DecodeStats,
    ) -> None:
        self.model = model
        self.settings = settings
        self.mode = mode
        self.rows = rows
        self.cache = cache
        self.attention = attention
        self.positions = positions
        self.logits = logits
        self.stats = stats
        self.finished: dict[int, list[SequenceOutcome]] = {}
        self.listener: Callable[[int, int], None] | None = None
        """Called with (row slot, token id) for each token of a row's text as it is chosen."""

    def fork(self, indices: list[int]) -> _State:
        """A copy of some rows, with their own cache, for a budget branch."""
        index_tensor = torch.tensor(indices, dtype=torch.long, device=self.attention.device)
        cache = copy.deepcopy(self.cache)
        cache.batch_select_indices(index_tensor)  # type: ignore[attr-defined]
        rows = [copy.deepcopy(self.rows[i]) for i in indices]
        state = _State(
            self.model,
            self.settings,
            self.mode,
            rows,
            cache,
            self.attention[index_tensor],
            self.positions[index_tensor],
            self.logits[index_tensor],
            self.stats,
        )
        groups = {row.group for row in rows}
        state.finished = {g: list(v) for g, v in self.finished.items() if g in groups}
        state.listener = self.listener
        return state

    def select(self, indices: list[int]) -> None:
        """Keep only some rows (in place), e.g. those whose answers are still needed."""
        index_tensor = torch.tensor(indices, dtype=torch.long, device=self.attention.device)
        self.cache.batch_select_indices(index_tensor)  # type: ignore[attr-defined]
        self.rows = [self.rows[i] for i in indices]
        self.attention = self.attention[index_tensor]
        self.positions = self.positions[index_tensor]
        self.logits = self.logits[index_tensor]

    def force_answer(self) -> None:
        """Budget forcing: every row still reasoning gets the answer cue next."""
        for row in self.rows:
            if row.phase == _REASONING:
                row.phase = _ANSWERING
                row.forced = list(self.settings.cue_ids)

    def alive(self) -> bool:
        return any(row.phase != _DONE for row in self.rows)

    def _choose(self) -> tuple[list[int], list[float], list[int]]:
        """Next token, its log-probability and the source row for every row."""
        logprobs = torch.log_softmax(self.logits.float(), dim=-1)
        if self.mode.kind == "beam":
            return self._choose_beam(logprobs)
        if self.mode.kind == "sc":
            probabilities = torch.softmax(self.logits.float() / self.settings.temperature, dim=-1)
            cumulative = torch.cumsum(probabilities, dim=-1)
            draws = torch.tensor(
                [float(row.uniforms[row.generated]) if row.uniforms is not None else 0.0 for row in self.rows],
                dtype=cumulative.dtype,
                device=cumulative.device,
            )
            thresholds = (draws * cumulative[:, -1]).unsqueeze(1)
            chosen = torch.searchsorted(cumulative, thresholds).squeeze(1).clamp(max=logprobs.shape[-1] - 1)
        else:
            chosen = torch.argmax(logprobs, dim=-1)
        chosen_logprobs = logprobs.gather(1, chosen.unsqueeze(1)).squeeze(1).tolist()
        tokens: list[int] = chosen.tolist()
        token_logprobs: list[float] = chosen_logprobs
        for index, row in enumerate(self.rows):
            if row.phase == _DONE:
                tokens[index], token_logprobs[index] = self.settings.pad_id, 0.0
            elif row.forced:
                tokens[index], token_logprobs[index] = row.forced[0], 0.0
        return tokens, token_logprobs, list(range(len(self.rows)))

    def _choose_beam(self, logprobs: torch.Tensor) -> tuple[list[int], list[float], list[int]]:
        width = self.mode.width
        tokens: list[int] = []
        token_logprobs: list[float] = []
        sources: list[int] = []
        new_rows: list[_Row] = []
        by_group: dict[int, list[int]] = {}
        for index, row in enumerate(self.rows):
            by_group.setdefault(row.group, []).append(index)
        for group, members in by_group.items():
            candidates: list[tuple[float, int, int, float]] = []
            for index in members:
                row = self.rows[index]
                if row.phase == _DONE:
                    continue
                if row.forced:
                    candidates.append((row.score, index, row.forced[0], 0.0))
                    continue
                top = torch.topk(logprobs[index], k=min(2 * width, logprobs.shape[-1]))
                for value, token in zip(top.values.tolist(), top.indices.tolist(), strict=True):
                    candidates.append((row.score + value, index, token, value))
            candidates.sort(key=lambda item: (-item[0], item[1], item[2]))
            finished = self.finished.setdefault(group, [])
            chosen: list[tuple[float, int, int, float]] = []
            for candidate in candidates:
                if len(chosen) == width:
                    break
                total, index, token, value = candidate
                row = self.rows[index]
                if row.phase == _ANSWERING and not row.forced and self._ends_answer(token, row):
                    ended = copy.deepcopy(row)
                    self._append(ended, token, value)
                    ended.score = total
                    finished.append(ended.outcome())
                    continue
                chosen.append(candidate)
            finished.sort(key=lambda outcome: -outcome.score)
            del finished[width:]
            best_live = chosen[0][0] if chosen else float("-inf")
            done = len(finished) >= width and finished[-1].score >= best_live
            for slot in range(width):
                if done or slot >= len(chosen):
                    placeholder = copy.deepcopy(self.rows[members[0]])
                    placeholder.phase = _DONE
                    new_rows.append(placeholder)
                    tokens.append(self.settings.pad_id)
                    token_logprobs.append(0.0)
                    sources.append(members[0])
                    continue
                total, index, token, value = chosen[slot]
                row = copy.deepcopy(self.rows[index])
                row.score = total
                new_rows.append(row)
                tokens.append(token)
                token_logprobs.append(value)
                sources.append(index)
        self.rows = new_rows
        return tokens, token_logprobs, sources

    def _ends_answer(self, token: int, row: _Row) -> bool:
        if token in self.settings.eos_ids or token in self.settings.newline_ids:
            return True
        return row.billed_answer + 1 >= self.settings.max_answer_tokens

    def _append(self, row: _Row, token: int, token_logprob: float) -> None:
        """Record a chosen token in a row and move it through its phases."""
        settings = self.settings
        if self.listener is not None and token not in settings.eos_ids:
            ends_answer = row.phase == _ANSWERING and not row.forced and token in settings.newline_ids
            if not ends_answer:
                self.listener(row.slot, token)
        if row.forced:
            row.forced.pop(0)
            row.cue_tokens += 1
            return
        if row.phase == _REASONING:
            if token in settings.eos_ids:
                # The LM ended without the cue: force the cue to read its answer.
                row.natural_stop = True
                row.phase = _ANSWERING
                row.forced = list(settings.cue_ids)
                return
            row.reasoning.append(token)
            cue = list(settings.cue_ids)
            if row.reasoning[-len(cue) :] == cue:
                del row.reasoning[-len(cue) :]
                row.cue_tokens += len(cue)
                row.natural_stop = True
                row.phase = _ANSWERING
            return
        if token in settings.eos_ids:
            row.phase = _DONE
            return
        row.billed_answer += 1
        if token in settings.newline_ids:
            row.phase = _DONE
            return
        row.answer.append(token)
        row.answer_logprob += token_logprob
        if row.billed_answer >= settings.max_answer_tokens:
            row.phase = _DONE

    def step(self) -> None:
        """Choose every row's next token, record it and run it through the LM."""
        tokens, token_logprobs, sources = self._choose()
        if self.mode.kind == "beam":
            source_tensor = torch.tensor(sources, dtype=torch.long, device=self.attention.device)
            self.cache.reorder_cache(source_tensor)  # type: ignore[attr-defined]
            self.attention = self.attention[source_tensor]
            self.positions = self.positions[source_tensor]
        feeds = []
        for row, token, token_logprob in zip(self.rows, tokens, token_logprobs, strict=True):
            active = row.phase != _DONE
            if active:
                self._append(row, token, token_logprob)
            feeds.append(active)
        self._forward(tokens, feeds)

    def _forward(self, tokens: list[int], active: list[bool]) -> None:
        device = self.attention.device
        input_ids = torch.tensor(tokens, dtype=torch.long, device=device).unsqueeze(1)
        mask_column = torch.tensor(active, dtype=self.attention.dtype, device=device).unsqueeze(1)
        self.attention = torch.cat([self.attention, mask_column], dim=1)
        position_ids = self.positions.unsqueeze(1)
        with torch.inference_mode():
            output = self.model(
                input_ids=input_ids,
                attention_mask=self.attention,
                position_ids=position_ids,
                use_cache=True,
                **{_cache_argument(self.model): self.cache},
            )
        self.positions = self.positions + mask_column.squeeze(1).long()
        self.logits = output.logits[:, -1, :]
        self.cache = _returned_cache(output)
        self.stats.forward_tokens += len(tokens)
        self.stats.forward_calls += 1

    def finish(self) -> None:
        """Run the rows until every answer has ended."""
        while self.alive():
            self.step()

    def beam_result(self, group: int) -> list[SequenceOutcome]:
        """The best finished hypothesis of a query's beam."""
        finished = self.finished.get(group, [])
        if not finished:
            raise RuntimeError(f"beam search of query {group} ended with no finished hypothesis")
        return [max(finished, key=lambda outcome: outcome.score)]


def _cache_argument(model: torch.nn.Module) -> str:
    """The forward argument that takes the KV cache.

    transformers 5.24 renamed ``past_key_values`` to ``cache`` (the old name still
    works there, with a warning); earlier releases know only ``past_key_values``.
    """
    name = getattr(model, "_tokenopt_cache_argument", None)
    if name is None:
        name = "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"
        model._tokenopt_cache_argument = name  # type: ignore[assignment]
    return str(name)


def _returned_cache(output: object) -> object:
    cache = getattr(output, "cache", None)
    return cache if cache is not None else getattr(output, "past_key_values", None)


def _prefill(
    model: torch.nn.Module, prompts: list[list[int]], pad_id: int, device: torch.device, stats: DecodeStats
) -> tuple[object, torch.Tensor, torch.Tensor, torch.Tensor]:
    width = max(len(prompt) for prompt in prompts)
    input_ids = torch.full((len(prompts), width), pad_id, dtype=torch.long, device=device)
    attention = torch.zeros((len(prompts), width), dtype=torch.long, device=device)
    for index, prompt in enumerate(prompts):
        input_ids[index, width - len(prompt) :] = torch.tensor(prompt, dtype=torch.long, device=device)
        attention[index, width - len(prompt) :] = 1
    position_ids = (attention.cumsum(dim=1) - 1).clamp(min=0)
    with torch.inference_mode():
        output = model(input_ids=input_ids, attention_mask=attention, position_ids=position_ids, use_cache=True)
    stats.forward_tokens += input_ids.numel()
    stats.forward_calls += 1
    positions = attention.sum(dim=1)
    return _returned_cache(output), attention, positions, output.logits[:, -1, :]


def _start(
    model: torch.nn.Module,
    prompts: list[list[int]],
    mode: Mode,
    max_budget: int,
    settings: DecodeSettings,
    seeds: list[int] | None,
) -> tuple[_State, float]:
    """Prefill the prompts and lay out the rows (k per prompt for ``sc<k>`` and ``beam<k>``)."""
    device = next(model.parameters()).device
    stats = DecodeStats()
    started = time.perf_counter()
    cache, attention, positions, logits = _prefill(model, prompts, settings.pad_id, device, stats)
    width = mode.width
    max_steps = max_budget + len(settings.cue_ids) + settings.max_answer_tokens + 2
    rows: list[_Row] = []
    for group in range(len(prompts)):
        for sample in range(width):
            uniforms = None
            if mode.kind == "sc":
                seed = 0 if seeds is None else seeds[group]
                uniforms = np.random.default_rng([seed, sample]).random(max_steps)
            rows.append(_Row(group=group, uniforms=uniforms, slot=len(rows)))
    if width > 1:
        cache.batch_repeat_interleave(width)  # type: ignore[attr-defined]
        attention = attention.repeat_interleave(width, dim=0)
        positions = positions.repeat_interleave(width, dim=0)
        logits = logits.repeat_interleave(width, dim=0)
    state = _State(model, settings, mode, rows, cache, attention, positions, logits, stats)
    if mode.kind == "beam":
        # All k beams start from the prompt: only the first may expand at step one.
        for index, row in enumerate(state.rows):
            row.score = 0.0 if index % width == 0 else float("-inf")
    return state, started


def decode_each_at_budget(
    model: torch.nn.Module,
    prompts: list[list[int]],
    mode: Mode,
    budgets: list[int],
    settings: DecodeSettings,
    seeds: list[int] | None = None,
    listener: Callable[[int, int], None] | None = None,
) -> tuple[list[list[SequenceOutcome]], DecodeStats]:
    """Serve a batch in which every prompt has its own budget (greedy and ``sc<k>``).

    A row still reasoning when its prompt's budget is reached is forked, forced to
    answer and leaves the batch; the other rows decode on. Each prompt's sequences
    equal :func:`decode_with_budgets`' at that budget, so a server can batch requests
    the policy gave different budgets.

    With a ``listener`` (greedy only), each token of a prompt's text (reasoning, cue,
    answer; not the EOS or the newline that ends the answer) is reported as
    ``listener(prompt index, token id)`` as soon as it is chosen, for streaming.

    Raises:
        ValueError: a ``beam<k>`` mode (its beams of one prompt interact; batch beam
            requests by budget with :func:`decode_with_budgets`), a budget per
            prompt missing, or a listener with a mode other than greedy.
    """
    if mode.kind == "beam":
        raise ValueError("beam search needs one budget per batch: use decode_with_budgets")
    if len(budgets) != len(prompts):
        raise ValueError(f"got {len(budgets)} budgets for {len(prompts)} prompts; give one per prompt")
    if not prompts:
        return [], DecodeStats()
    if listener is not None and mode.kind != "greedy":
        raise ValueError(f"only greedy rows can be streamed as they decode; {mode.name} is known at the end")
    state, _ = _start(model, prompts, mode, max(budgets), settings, seeds)
    state.listener = listener
    n_rows = len(state.rows)
    results: dict[int, SequenceOutcome] = {}

    def drop(indices: list[int]) -> None:
        gone = set(indices)
        keep = [i for i in range(len(state.rows)) if i not in gone]
        if keep:
            state.select(keep)
        else:
            state.rows = []

    def retire(indices: list[int]) -> None:
        for i in indices:
            results[state.rows[i].slot] = state.rows[i].outcome()
        drop(indices)

    for step in range(max(budgets) + 1):
        due = [i for i, row in enumerate(state.rows) if row.phase == _REASONING and budgets[row.group] == step]
        if due:
            branch = state.fork(due)
            branch.force_answer()
            branch.finish()
            for row in branch.rows:
                results[row.slot] = row.outcome()
            drop(due)
        if not any(row.phase == _REASONING for row in state.rows):
            break
        state.step()
        done = [i for i, row in enumerate(state.rows) if row.phase == _DONE]
        if done:
            retire(done)
    # Rows left stopped reasoning by themselves: they answer in the main pass.
    while state.rows and state.alive():
        state.step()
    retire([i for i in range(len(state.rows))])
    outcomes: list[list[SequenceOutcome]] = [[] for _ in prompts]
    for slot in range(n_rows):
        outcomes[slot // mode.width].append(results[slot])
    return outcomes, state.stats


def decode_with_budgets(
    model: torch.nn.Module,
    prompts: list[list[int]],
    mode: Mode,
    budgets: list[int],
    settings: DecodeSettings,
    seeds: list[int] | None = None,
) -> tuple[list[dict[int, list[SequenceOutcome]]], list[dict[int, float]], DecodeStats]:
    """Decode a batch of prompts in one mode and read the outcome at every budget.

    Args:
        model: a causal LM that takes ``input_ids``, ``attention_mask``,
            ``position_ids`` and ``cache``.
        prompts: token ids of each prompt (no padding).
        mode: the decoding mode.
        budgets: increasing reasoning budgets.
        settings: cue, stop tokens and answer length.
        seeds: one seed per prompt for ``sc<k>`` (sample j of prompt i uses the
            stream seeded by ``(seeds[i], j)``); ignored by greedy and beam.

    Returns:
        For each prompt, the sequences it returns at each budget (k for ``sc<k>``,
        one otherwise); for each prompt, the wall time in ms from the batch's start
        until its outcome at each budget was known; and the work counters.
    """
    if not prompts:
        return [], [], DecodeStats()
    state, started = _start(model, prompts, mode, budgets[-1], settings, seeds)
    stats = state.stats

    if mode.kind != "beam":
        return (*_decode_independent_rows(state, budgets, len(prompts), started), stats)
    outcomes: list[dict[int, list[SequenceOutcome]]] = [{} for _ in prompts]
    latency: list[dict[int, float]] = [{} for _ in prompts]
    pending: dict[int, list[int]] = {group: [] for group in range(len(prompts))}
    for step in range(budgets[-1] + 1):
        if step in budgets:
            reasoning_groups = sorted({row.group for row in state.rows if row.phase == _REASONING})
            if reasoning_groups:
                members = set(reasoning_groups)
                branch = state.fork([i for i, row in enumerate(state.rows) if row.group in members])
                branch.force_answer()
                branch.finish()
                elapsed = (time.perf_counter() - started) * 1000.0
                for group in reasoning_groups:
                    outcomes[group][step] = branch.beam_result(group)
                    latency[group][step] = elapsed
            for group in range(len(prompts)):
                if group not in reasoning_groups:
                    pending[group].append(step)
        if step == budgets[-1]:
            break
        if not any(row.phase == _REASONING for row in state.rows):
            for group in range(len(prompts)):
                pending[group].extend(budget for budget in budgets if budget > step)
            break
        state.step()
    # A query whose rows all stopped reasoning by themselves before a budget answers
    # in the main pass; that answer is its outcome at that budget and above.
    waiting = {group for group, steps in pending.items() if steps}
    if waiting:
        state.select([i for i, row in enumerate(state.rows) if row.group in waiting])
        state.finish()
    elapsed = (time.perf_counter() - started) * 1000.0
    for group, steps in pending.items():
        if not steps:
            continue
        result = state.beam_result(group)
        for budget in steps:
            outcomes[group][budget] = result
            latency[group][budget] = elapsed
    return outcomes, latency, stats


def _decode_independent_rows(
    state: _State, budgets: list[int], n_groups: int, started: float
) -> tuple[list[dict[int, list[SequenceOutcome]]], list[dict[int, float]]]:
    """Greedy and sc<k>: rows never interact, so each is forked and finished on its own.

    At a budget only the rows still reasoning are forked; a row that stopped by
    itself keeps its main-pass outcome. Finished rows leave the main batch so that
    they cost no further forward passes.
    """
    n_rows = len(state.rows)
    group_of = [row.group for row in state.rows]
    forced: dict[int, dict[int, SequenceOutcome]] = {budget: {} for budget in budgets}
    forced_at: dict[int, float] = {}
    final: dict[int, SequenceOutcome] = {}
    final_at: dict[int, float] = {}

    def retire_done() -> None:
        done = [i for i, row in enumerate(state.rows) if row.phase == _DONE]
        if not done:
            return
        now = (time.perf_counter() - started) * 1000.0
        for i in done:
            final[state.rows[i].slot] = state.rows[i].outcome()
            final_at[state.rows[i].slot] = now
        if len(done) * 4 >= len(state.rows) or len(done) == len(state.rows):
            keep = [i for i, row in enumerate(state.rows) if row.phase != _DONE]
            if keep:
                state.select(keep)
            else:
                state.rows = []

    for step in range(budgets[-1] + 1):
        if step in budgets:
            reasoning = [i for i, row in enumerate(state.rows) if row.phase == _REASONING]
            if reasoning:
                branch = state.fork(reasoning)
                branch.force_answer()
                branch.finish()
                forced_at[step] = (time.perf_counter() - started) * 1000.0
                for row in branch.rows:
                    forced[step][row.slot] = row.outcome()
        if step == budgets[-1] or not any(row.phase == _REASONING for row in state.rows):
            break
        state.step()
        retire_done()
    # Rows still reasoning at the largest budget were forced there; the rest answer
    # in the main pass.
    keep = [i for i, row in enumerate(state.rows) if row.phase != _REASONING]
    if keep:
        state.select(keep)
        while state.rows and state.alive():
            state.step()
            retire_done()
        retire_done()
    outcomes: list[dict[int, list[SequenceOutcome]]] = [{} for _ in range(n_groups)]
    latency: list[dict[int, float]] = [{} for _ in range(n_groups)]
    for budget in budgets:
        for slot in range(n_rows):
            group = group_of[slot]
            if slot in forced[budget]:
                outcome, at = forced[budget][slot], forced_at[budget]
            else:
                outcome, at = final[slot], final_at[slot]
            outcomes[group].setdefault(budget, []).append(outcome)
            latency[group][budget] = max(latency[group].get(budget, 0.0), at)
    return outcomes, latency
