"""Training of the embedded demo LM: a ~0.9M-parameter Llama on the demo suite.

The LM learns to write a family's reasoning trace, the answer cue and the answer.
Traces are cut at random points before the cue (the forced cue after a cut is not
a training target), so an answer forced after a cut trace is the LM's best guess
from what it has reasoned so far: budget forcing, as in s1 (Muennighoff et al.,
2025), is meaningful at every budget.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from tokenopt.demo.suite import ANSWER_CUE, TRAINING_WEIGHTS, DemoExample, make_example
from tokenopt.demo.tokenizer import build_tokenizer

__all__ = ["DemoTrainConfig", "train_demo_lm"]

logger = logging.getLogger(__name__)

_IGNORE = -100
_BUCKET_BATCHES = 8


@dataclass
class DemoTrainConfig:
    """Settings of the demo LM's architecture and training schedule."""

    steps: int = 2000
    """Optimiser steps."""
    batch_size: int = 96
    """Examples per step (drawn fresh from the suite's distribution)."""
    learning_rate: float = 2e-3
    """Peak learning rate of the top layer (AdamW, linear warm-up, cosine decay)."""
    warmup_steps: int = 100
    """Steps of linear warm-up."""
    layer_decay: float = 0.8
    """Layer-wise learning-rate decay: layer i of L trains at lr * decay ** (L - i)."""
    weight_decay: float = 0.01
    """Decoupled weight decay on matrices (not on norms or embeddings)."""
    dropout: float = 0.0
    """Attention dropout. The data are drawn fresh each step, so nothing is seen twice."""
    hidden_size: int = 128
    """Width of the residual stream."""
    intermediate_size: int = 256
    """Width of the MLP."""
    num_layers: int = 4
    """Number of transformer blocks."""
    num_heads: int = 4
    """Attention heads per block."""
    max_positions: int = 128
    """Context length of the LM."""
    full_trace_fraction: float = 0.45
    """Share of examples with the whole trace and the LM's own answer cue."""
    direct_fraction: float = 0.15
    """Share of examples cut at budget 0 (the cue forced at once)."""
    seed: int = 0
    """Seed of the data stream and the initial weights."""
    threads: int = 2
    """CPU threads for torch."""


def _encode_example(
    example: DemoExample, cut: int, answer: str, vocab: dict[str, int], bos: int, eos: int
) -> tuple[list[int], list[int]]:
    prompt = [bos] + [vocab[c] for c in example.question]
    trace = [vocab[c] for c in example.trace[:cut]]
    natural_stop = cut == len(example.trace)
    cue = [vocab[ANSWER_CUE]]
    tail = [vocab[c] for c in answer] + [eos]
    input_ids = prompt + trace + cue + tail
    labels = [_IGNORE] * len(prompt) + trace + (cue if natural_stop else [_IGNORE]) + tail
    return input_ids, labels


def _draw_cut(rng: np.random.Generator, trace_length: int, config: DemoTrainConfig) -> int:
    if trace_length == 0:
        return 0
    draw = rng.random()
    if draw < config.full_trace_fraction:
        return trace_length
    if draw < config.full_trace_fraction + config.direct_fraction:
        return 0
    return int(rng.integers(1, trace_length)) if trace_length > 1 else 0


def _draw_rows(
    rng: np.random.Generator, count: int, config: DemoTrainConfig, vocab: dict[str, int], bos: int, eos: int
) -> list[tuple[list[int], list[int]]]:
    rows = []
    for _ in range(count):
        example = make_example(rng, weights=TRAINING_WEIGHTS)
        cut = _draw_cut(rng, len(example.trace), config)
        answer = example.answer
        if example.answer_choices:
            names = [name for name, _ in example.answer_choices]
            weights = np.array([weight for _, weight in example.answer_choices])
            answer = names[int(rng.choice(len(names), p=weights / weights.sum()))]
        rows.append(_encode_example(example, cut, answer, vocab, bos, eos))
    return rows


def _length_bucketed_batches(
    rng: np.random.Generator, config: DemoTrainConfig, vocab: dict[str, int], bos: int, eos: int
) -> list[list[tuple[list[int], list[int]]]]:
    """Draw several batches at once and group them by length, to spend less on padding.

    Each step still sees examples from one draw of the suite's distribution; only
    the order within a group of ``_BUCKET_BATCHES`` steps changes.
    """
    rows = _draw_rows(rng, config.batch_size * _BUCKET_BATCHES, config, vocab, bos, eos)
    rows.sort(key=lambda row: len(row[0]))
    batches = [rows[i : i + config.batch_size] for i in range(0, len(rows), config.batch_size)]
    order = rng.permutation(len(batches))
    return [batches[i] for i in order]


def _collate(rows: list[tuple[list[int], list[int]]], pad: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    width = max(len(ids) for ids, _ in rows)
    input_ids = torch.full((len(rows), width), pad, dtype=torch.long)
    labels = torch.full((len(rows), width), _IGNORE, dtype=torch.long)
    attention = torch.zeros((len(rows), width), dtype=torch.long)
    for row, (ids, targets) in enumerate(rows):
        input_ids[row, : len(ids)] = torch.tensor(ids)
        labels[row, : len(targets)] = torch.tensor(targets)
        attention[row, : len(ids)] = 1
    return input_ids, labels, attention


def _parameter_groups(model: LlamaForCausalLM, config: DemoTrainConfig) -> list[dict[str, object]]:
    """Group parameters by depth for layer-wise lr decay (Clark et al., 2020, ELECTRA)."""
    depth_of_top = config.num_layers + 1
    groups: dict[tuple[int, bool], list[torch.nn.Parameter]] = {}
    for name, parameter in model.named_parameters():
        if "embed_tokens" in name:
            depth = 0
        elif ".layers." in name:
            depth = int(name.split(".layers.")[1].split(".")[0]) + 1
        else:
            depth = depth_of_top
        decays = parameter.ndim >= 2 and "embed_tokens" not in name
        groups.setdefault((depth, decays), []).append(parameter)
    return [
        {
            "params": parameters,
            "lr_scale": config.layer_decay ** (depth_of_top - depth),
            "weight_decay": config.weight_decay if decays else 0.0,
        }
        for (depth, decays), parameters in sorted(groups.items())
    ]


def _learning_rate(step: int, config: DemoTrainConfig) -> float:
    if step < config.warmup_steps:
        return config.learning_rate * (step + 1) / config.warmup_steps
    progress = (step - config.warmup_steps) / max(1, config.steps - config.warmup_steps)
    return config.learning_rate * 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))


def train_demo_lm(
    out_dir: str | Path,
    config: DemoTrainConfig | None = None,
    progress: Callable[[int, int, float], None] | None = None,
) -> dict[str, object]:
    """Train the demo LM and save it with ``save_pretrained``.

    Args:
        out_dir: folder for ``config.json``, ``model.safetensors`` and ``tokenizer.json``.
        config: the architecture and schedule; the defaults when None.
        progress: called as ``progress(step, total_steps, loss)`` after each step.

    Returns:
        A summary: parameter count, final loss (mean of the last 50 steps), seconds.
    """
    config = config or DemoTrainConfig()
    out_dir = Path(out_dir)
    torch.manual_seed(config.seed)
    previous_threads = torch.get_num_threads()
    torch.set_num_threads(config.threads)
    try:
        tokenizer = build_tokenizer()
        vocab = tokenizer.get_vocab()
        pad, bos, eos = tokenizer.pad_token_id, tokenizer.bos_token_id, tokenizer.eos_token_id
        model_config = LlamaConfig(
            vocab_size=len(vocab),
            hidden_size=config.hidden_size,
            intermediate_size=config.intermediate_size,
            num_hidden_layers=config.num_layers,
            num_attention_heads=config.num_heads,
            num_key_value_heads=config.num_heads,
            max_position_embeddings=config.max_positions,
            attention_dropout=config.dropout,
            tie_word_embeddings=True,
            pad_token_id=pad,
            bos_token_id=bos,
            eos_token_id=eos,
        )
        model = LlamaForCausalLM(model_config)
        model.train()
        groups = _parameter_groups(model, config)
        optimizer = torch.optim.AdamW(groups, lr=config.learning_rate, betas=(0.9, 0.98))
        rng = np.random.default_rng(config.seed)
        started = time.perf_counter()
        recent: list[float] = []
        pending: list[list[tuple[list[int], list[int]]]] = []
        for step in range(config.steps):
            lr = _learning_rate(step, config)
            for group in optimizer.param_groups:
                group["lr"] = lr * group["lr_scale"]
            if not pending:
                pending = _length_bucketed_batches(rng, config, vocab, bos, eos)
            input_ids, labels, attention = _collate(pending.pop(), pad)
            loss = model(input_ids=input_ids, attention_mask=attention, labels=labels).loss
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            optimizer.step()
            recent = (recent + [loss.item()])[-50:]
            if progress is not None:
                progress(step + 1, config.steps, recent[-1])
        model.eval()
        out_dir.mkdir(parents=True, exist_ok=True)
        model.generation_config.pad_token_id = pad
        model.save_pretrained(out_dir)
        tokenizer.save_pretrained(out_dir)
        summary = {
            "parameters": sum(p.numel() for p in model.parameters()),
            "final_loss": float(np.mean(recent)),
            "seconds": time.perf_counter() - started,
            "config": asdict(config),
        }
        logger.info("demo LM trained: %s", summary)
        return summary
    finally:
        torch.set_num_threads(previous_threads)
