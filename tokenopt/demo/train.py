"""Training of a trace LM: the embedded demo LM (a ~0.9M-parameter Llama) and the suites' LMs.

The LM learns to write a family's reasoning trace, the answer cue and the answer.
:func:`train_lm` trains any :class:`TraceTask` (a draw of examples, an answer cue
and a tokenizer) on a Llama, GPT-2 or Qwen2 architecture; :func:`train_demo_lm` is
it on the demo suite. Examples are encoded by the tokenizer as transformers loads it
back from the saved folder (``AutoTokenizer``), the path every user of the model takes.
Traces are cut at random points before the cue (the forced cue after a cut is not
a training target), so an answer forced after a cut trace is the LM's best guess
from what it has reasoned so far: budget forcing, as in s1 (Muennighoff et al.,
2025), is meaningful at every budget.
"""

from __future__ import annotations

import logging
import math
import re
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from transformers import (
    AutoTokenizer,
    GPT2Config,
    GPT2LMHeadModel,
    LlamaConfig,
    LlamaForCausalLM,
    PretrainedConfig,
    PreTrainedModel,
    PreTrainedTokenizerBase,
    Qwen2Config,
    Qwen2ForCausalLM,
)

from tokenopt.demo.suite import ANSWER_CUE, TRAINING_WEIGHTS, DemoExample, make_example
from tokenopt.demo.tokenizer import build_tokenizer, check_round_trip

__all__ = ["ARCHITECTURES", "DEMO_TASK", "DemoTrainConfig", "TraceTask", "train_demo_lm", "train_lm"]

ARCHITECTURES = ("llama", "gpt2", "qwen2")
"""Model types :func:`train_lm` builds (``config.json``'s ``model_type``)."""

logger = logging.getLogger(__name__)

_IGNORE = -100
_BUCKET_BATCHES = 8


@dataclass(frozen=True)
class TraceTask:
    """What a trace LM is trained on: examples with traces, the answer cue and the tokenizer."""

    draw: Callable[[np.random.Generator], DemoExample]
    """One training example from the task's distribution (the only source of randomness is the generator)."""
    build_tokenizer: Callable[[], PreTrainedTokenizerBase]
    """Builds the tokenizer (deterministically); it is saved, loaded back and checked before training."""
    answer_cue: str = ANSWER_CUE
    """The cue between trace and answer (what collection appends when the budget runs out)."""


DEMO_TASK = TraceTask(draw=lambda rng: make_example(rng, weights=TRAINING_WEIGHTS), build_tokenizer=build_tokenizer)
"""The embedded demo LM's task: the demo suite at its training weights, one token per character."""


@dataclass
class DemoTrainConfig:
    """Settings of a trace LM's architecture and training schedule; the defaults are the demo LM's."""

    architecture: str = "llama"
    """Model type: llama, gpt2 or qwen2."""

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
    num_kv_heads: int | None = None
    """Key-value heads (grouped-query attention) for llama and qwen2; None: as many as num_heads."""
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


class _Encoder:
    """Token ids of an example's parts, each encoded apart as generation meets them."""

    def __init__(self, tokenizer: PreTrainedTokenizerBase, answer_cue: str) -> None:
        self.tokenizer = tokenizer
        self.cue = self.piece(answer_cue)
        if not self.cue:
            raise ValueError(f"answer cue {answer_cue!r} encodes to no tokens with this tokenizer")
        eos = tokenizer.eos_token_id
        if not isinstance(eos, int):
            raise ValueError("the tokenizer defines no EOS token; the LM must learn to end its answer")
        self.eos = eos

    def prompt(self, question: str) -> list[int]:
        # With special tokens (a BOS where the tokenizer adds one), as collection encodes a prompt.
        return list(self.tokenizer(question)["input_ids"])

    def piece(self, text: str) -> list[int]:
        return list(self.tokenizer(text, add_special_tokens=False)["input_ids"]) if text else []


def _encode_example(
    encoder: _Encoder, question: list[int], trace: list[int], cut: int, answer: str
) -> tuple[list[int], list[int]]:
    natural_stop = cut == len(trace)
    kept = trace[:cut]
    tail = encoder.piece(answer) + [encoder.eos]
    input_ids = question + kept + encoder.cue + tail
    labels = [_IGNORE] * len(question) + kept + (encoder.cue if natural_stop else [_IGNORE] * len(encoder.cue)) + tail
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


def _draw_answer(rng: np.random.Generator, example: DemoExample, cut: int) -> str:
    """The answer a training example ends with: the gold one, or one drawn from the example's choices."""
    choices = example.reasoned_answer_choices if cut > 0 and example.reasoned_answer_choices else example.answer_choices
    if not choices:
        return example.answer
    names = [name for name, _ in choices]
    weights = np.array([weight for _, weight in choices])
    return names[int(rng.choice(len(names), p=weights / weights.sum()))]


def _draw_rows(
    rng: np.random.Generator, count: int, config: DemoTrainConfig, task: TraceTask, encoder: _Encoder
) -> list[tuple[list[int], list[int]]]:
    rows = []
    for _ in range(count):
        example = task.draw(rng)
        trace = encoder.piece(example.trace)
        cut = _draw_cut(rng, len(trace), config)
        answer = _draw_answer(rng, example, cut)
        rows.append(_encode_example(encoder, encoder.prompt(example.question), trace, cut, answer))
    return rows


def _length_bucketed_batches(
    rng: np.random.Generator, config: DemoTrainConfig, task: TraceTask, encoder: _Encoder
) -> list[list[tuple[list[int], list[int]]]]:
    """Draw several batches at once and group them by length, to spend less on padding.

    Each step still sees examples from one draw of the suite's distribution; only
    the order within a group of ``_BUCKET_BATCHES`` steps changes.
    """
    rows = _draw_rows(rng, config.batch_size * _BUCKET_BATCHES, config, task, encoder)
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


_EMBEDDING_NAMES = ("embed_tokens", ".wte.", ".wpe.")
_LAYER_INDEX = re.compile(r"\.(?:layers|h)\.(\d+)\.")


def _parameter_groups(model: PreTrainedModel, config: DemoTrainConfig) -> list[dict[str, object]]:
    """Group parameters by depth for layer-wise lr decay (Clark et al., 2020, ELECTRA)."""
    depth_of_top = config.num_layers + 1
    groups: dict[tuple[int, bool], list[torch.nn.Parameter]] = {}
    for name, parameter in model.named_parameters():
        embedding = any(part in name for part in _EMBEDDING_NAMES)
        layer = _LAYER_INDEX.search(name)
        if embedding:
            depth = 0
        elif layer is not None:
            depth = int(layer.group(1)) + 1
        else:
            depth = depth_of_top
        decays = parameter.ndim >= 2 and not embedding
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


def _model_config(config: DemoTrainConfig, tokenizer: PreTrainedTokenizerBase) -> PretrainedConfig:
    """The architecture's config for a tokenizer's vocabulary and special tokens."""
    pad, bos, eos = tokenizer.pad_token_id, tokenizer.bos_token_id, tokenizer.eos_token_id
    if pad is None:
        pad = eos
    shared: dict[str, Any] = {"vocab_size": len(tokenizer), "pad_token_id": pad}
    shared.update(bos_token_id=bos, eos_token_id=eos)
    kv_heads = config.num_kv_heads or config.num_heads
    if config.architecture == "gpt2":
        return GPT2Config(
            n_positions=config.max_positions,
            n_embd=config.hidden_size,
            n_layer=config.num_layers,
            n_head=config.num_heads,
            n_inner=config.intermediate_size,
            resid_pdrop=0.0,
            embd_pdrop=0.0,
            attn_pdrop=config.dropout,
            tie_word_embeddings=True,
            **shared,
        )
    llama_like: dict[str, Any] = {
        "hidden_size": config.hidden_size,
        "intermediate_size": config.intermediate_size,
        "num_hidden_layers": config.num_layers,
        "num_attention_heads": config.num_heads,
        "num_key_value_heads": kv_heads,
        "max_position_embeddings": config.max_positions,
        "attention_dropout": config.dropout,
        "tie_word_embeddings": True,
    }
    if config.architecture == "qwen2":
        return Qwen2Config(use_sliding_window=False, **llama_like, **shared)
    return LlamaConfig(**llama_like, **shared)


_MODEL_CLASSES: dict[str, type[PreTrainedModel]] = {
    "llama": LlamaForCausalLM,
    "gpt2": GPT2LMHeadModel,
    "qwen2": Qwen2ForCausalLM,
}


def _check_config(config: DemoTrainConfig) -> None:
    if config.architecture not in ARCHITECTURES:
        raise ValueError(f"unknown architecture {config.architecture!r}; expected one of {', '.join(ARCHITECTURES)}")
    if config.steps < 1 or config.batch_size < 1:
        raise ValueError(f"steps and batch_size must be >= 1; got {config.steps} and {config.batch_size}")
    if config.hidden_size % config.num_heads:
        raise ValueError(f"hidden_size {config.hidden_size} is not a multiple of num_heads {config.num_heads}")
    if config.num_kv_heads is not None and config.num_heads % config.num_kv_heads:
        raise ValueError(f"num_heads {config.num_heads} is not a multiple of num_kv_heads {config.num_kv_heads}")


def _saved_tokenizer(
    out_dir: Path, config: PretrainedConfig, task: TraceTask, rng: np.random.Generator
) -> PreTrainedTokenizerBase:
    """Save the task's tokenizer beside the model config and load it back as transformers will.

    ``AutoTokenizer`` picks the tokenizer class from ``config.json``'s model type, and for
    some types (gpt2, qwen2) rebuilds the pipeline with that family's own pre-tokenizer;
    training on what it loads keeps training and collection on the same token ids.

    Raises:
        ValueError: the loaded tokenizer does not give back the task's text, or encodes
            it differently from the tokenizer that was built.
    """
    built = task.build_tokenizer()
    out_dir.mkdir(parents=True, exist_ok=True)
    config.save_pretrained(out_dir)
    built.save_pretrained(out_dir)
    loaded = AutoTokenizer.from_pretrained(out_dir, local_files_only=True)
    samples = [task.draw(rng) for _ in range(64)]
    texts = [task.answer_cue] + [text for e in samples for text in (e.question, e.trace, e.answer) if text]
    check_round_trip(loaded, texts, reference=built)
    return loaded


def train_lm(
    out_dir: str | Path,
    task: TraceTask,
    config: DemoTrainConfig | None = None,
    progress: Callable[[int, int, float], None] | None = None,
) -> dict[str, object]:
    """Train a trace LM on a task and save it with ``save_pretrained`` (model and tokenizer).

    Args:
        out_dir: folder for ``config.json``, ``model.safetensors`` and the tokenizer files.
        task: the examples, answer cue and tokenizer.
        config: the architecture and schedule; the defaults when None.
        progress: called as ``progress(step, total_steps, loss)`` after each step.

    Returns:
        A summary: parameter count, final loss (mean of the last 50 steps), seconds, config.

    Raises:
        ValueError: a bad setting (named), or a tokenizer that does not survive saving and loading.
    """
    config = config or DemoTrainConfig()
    _check_config(config)
    out_dir = Path(out_dir)
    torch.manual_seed(config.seed)
    previous_threads = torch.get_num_threads()
    torch.set_num_threads(config.threads)
    try:
        model_config = _model_config(config, task.build_tokenizer())
        # The round-trip check draws from its own stream, so the training stream is the seed's alone.
        tokenizer = _saved_tokenizer(out_dir, model_config, task, np.random.default_rng([config.seed, 1]))
        encoder = _Encoder(tokenizer, task.answer_cue)
        pad = model_config.pad_token_id
        model = _MODEL_CLASSES[config.architecture](model_config)
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
                pending = _length_bucketed_batches(rng, config, task, encoder)
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
        model.generation_config.pad_token_id = pad
        model.save_pretrained(out_dir)
        summary = {
            "architecture": config.architecture,
            "parameters": sum(p.numel() for p in model.parameters()),
            "vocabulary": len(tokenizer),
            "final_loss": float(np.mean(recent)),
            "seconds": time.perf_counter() - started,
            "config": asdict(config),
        }
        logger.info("trace LM trained: %s", summary)
        return summary
    finally:
        torch.set_num_threads(previous_threads)


def train_demo_lm(
    out_dir: str | Path,
    config: DemoTrainConfig | None = None,
    progress: Callable[[int, int, float], None] | None = None,
) -> dict[str, object]:
    """Train the demo LM (:data:`DEMO_TASK`) and save it with ``save_pretrained``.

    Args:
        out_dir: folder for ``config.json``, ``model.safetensors`` and ``tokenizer.json``.
        config: the architecture and schedule; the defaults when None.
        progress: called as ``progress(step, total_steps, loss)`` after each step.

    Returns:
        A summary: parameter count, final loss (mean of the last 50 steps), seconds.
    """
    return train_lm(out_dir, DEMO_TASK, config, progress)
