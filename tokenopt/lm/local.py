"""The transformers backend: any local causal-LM folder, or the embedded demo LM."""

from __future__ import annotations

import importlib.util
import logging
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from tokenopt.actions import Mode
from tokenopt.demo import DEMO_MODEL_DIR
from tokenopt.lm.decoding import (
    DecodeSettings,
    DecodeStats,
    SequenceOutcome,
    decode_each_at_budget,
    decode_with_budgets,
)
from tokenopt.prompt import PromptFormat
from tokenopt.scoring import majority_vote, vote_share

__all__ = [
    "Completion",
    "ModeOutcome",
    "PlainCompletion",
    "TransformersLM",
    "model_source",
    "resolve_device",
    "resolve_dtype",
    "summarise",
]

logger = logging.getLogger(__name__)


@dataclass
class ModeOutcome:
    """What one (query, budget, mode) action returned and cost."""

    answer: str
    reasoning_tokens: int
    cue_tokens: int
    answer_tokens: int
    billed_tokens: int
    """Reasoning + cue + answer tokens, summed over the sequences the mode runs."""
    confidence: float
    """Mean log-probability of the answer tokens; the vote share for ``sc<k>``."""
    answer_logprob: float
    """Mean log-probability of the returned answer's tokens (every mode)."""
    natural_stop: bool
    """Whether the LM stopped reasoning by itself (for sc<k>: every sample did)."""
    n_sequences: int
    latency_ms: float
    sample_answers: list[str] = field(default_factory=list)
    """The answer of each sequence, in sampling order (k for ``sc<k>``, one otherwise)."""
    sample_tokens: list[int] = field(default_factory=list)
    """Billed tokens of each sequence (for ``beam<k>`` the one entry bills all k beams)."""
    sample_logprobs: list[float] = field(default_factory=list)
    """Mean log-probability of each sequence's answer tokens."""


def resolve_device(device: str = "auto") -> torch.device:
    """The device to run on: ``auto`` picks cuda, then mps, then cpu.

    Raises:
        ValueError: the device is unknown or not available on this machine.
    """
    if device == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    try:
        resolved = torch.device(device)
    except RuntimeError:
        raise ValueError(f"unknown device {device!r}: expected auto, cpu, cuda, cuda:N or mps") from None
    if resolved.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {device!r} requested but torch sees no CUDA device; use --device cpu or auto")
    return resolved


def resolve_dtype(dtype: str, device: torch.device) -> torch.dtype:
    """The parameter dtype: ``auto`` is float32 on cpu and bfloat16 on cuda."""
    choices = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
    if dtype == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    if dtype not in choices:
        raise ValueError(f"unknown dtype {dtype!r}: expected auto, {', '.join(choices)}")
    return choices[dtype]


def summarise(
    mode: Mode,
    answers: list[str],
    mean_logprobs: list[float],
    reasoning_tokens: list[int],
    cue_tokens: list[int],
    answer_tokens: list[int],
    natural_stops: list[bool],
    latency_ms: float,
) -> ModeOutcome:
    """Vote and bill the sequences one action returned (every backend summarises here).

    ``sc<k>`` returns the vote's winner and bills every sample; greedy and ``beam<k>``
    return their one sequence, billed ``width`` times (k beams decode in parallel).
    The lists hold one entry per sequence; answer tokens include a newline that
    ended the answer.
    """
    if mode.kind == "sc":
        chosen = majority_vote(answers, mean_logprobs)
        confidence = vote_share(answers, chosen)
        multiplier = 1
    else:
        chosen, multiplier, confidence = 0, mode.width, mean_logprobs[0]
    reasoning = multiplier * sum(reasoning_tokens)
    cue = multiplier * sum(cue_tokens)
    answer = multiplier * sum(answer_tokens)
    return ModeOutcome(
        answer=answers[chosen],
        reasoning_tokens=reasoning,
        cue_tokens=cue,
        answer_tokens=answer,
        billed_tokens=reasoning + cue + answer,
        confidence=float(confidence),
        answer_logprob=float(mean_logprobs[chosen]),
        natural_stop=all(natural_stops),
        n_sequences=mode.width,
        latency_ms=latency_ms,
        sample_answers=answers,
        sample_tokens=[
            multiplier * (r + c + a) for r, c, a in zip(reasoning_tokens, cue_tokens, answer_tokens, strict=True)
        ],
        sample_logprobs=[float(lp) for lp in mean_logprobs],
    )


@dataclass
class Completion:
    """One request served with budget forcing: its outcome and the text returned."""

    outcome: ModeOutcome
    text: str
    """Reasoning, cue and answer of the returned sequence (the voted one for ``sc<k>``)."""
    prompt_tokens: int
    forced: bool
    """Whether the budget ran out before the LM answered by itself."""


@dataclass
class PlainCompletion:
    """One sequence of plain generation (no budget forcing)."""

    text: str
    token_ids: list[int]
    token_logprobs: list[float]
    """Log-probability of each generated token under the model (before temperature)."""
    finish_reason: str
    """``stop`` (EOS or a stop string) or ``length`` (``max_tokens`` reached)."""


def model_source(model: str | Path | None) -> tuple[Path, bool]:
    """Where a model is loaded from: (its folder, whether it is local); None is the embedded demo LM.

    Raises:
        FileNotFoundError: a folder that does not exist (a name that is not a hub id ``org/name``).
    """
    path = Path(model) if model is not None else DEMO_MODEL_DIR
    local = path.exists()
    if not local and (model is None or str(model).startswith((".", "/", "~")) or str(model).count("/") != 1):
        raise FileNotFoundError(
            f"model folder {str(path)!r} does not exist; give a folder written by save_pretrained or a hub id"
        )
    return path, local


def encode_prompt(
    tokenizer: Any, prompt_format: PromptFormat, question: str, model_name: str = "the model"
) -> list[int]:
    """Token ids of a question's prompt: the template, then the chat template when the format asks for it.

    Raises:
        ValueError: ``use_chat_template`` with a tokenizer that has no chat template.
    """
    if prompt_format.use_chat_template:
        if not getattr(tokenizer, "chat_template", None):
            raise ValueError(f"--chat-template: the tokenizer of {model_name!r} has no chat template")
        encoded = tokenizer.apply_chat_template(
            prompt_format.chat_messages(question), add_generation_prompt=True, tokenize=True
        )
        # transformers 5 returns a BatchEncoding (a Mapping, not a dict); older versions a list of ids.
        ids: Any = encoded["input_ids"] if isinstance(encoded, Mapping) else encoded
        return [int(i) for i in ids]
    return list(tokenizer(prompt_format.prompt_text(question))["input_ids"])


def gguf_source(path: Path) -> tuple[str, dict[str, str]]:
    """The folder and ``gguf_file`` argument that load a GGUF checkpoint with transformers.

    transformers dequantises the file's weights to floating point on load.

    Raises:
        ValueError: a file that is not ``.gguf``.
        ImportError: the ``gguf`` or ``accelerate`` package is missing (``pip install 'tokenopt[gguf]'``).
    """
    if path.suffix.lower() != ".gguf":
        raise ValueError(f"model {str(path)!r} is a file, not a .gguf checkpoint; give a model folder or a .gguf file")
    missing = [name for name in ("gguf", "accelerate") if importlib.util.find_spec(name) is None]
    if missing:
        raise ImportError(
            f"loading {path.name} needs the {' and '.join(missing)} package(s): pip install 'tokenopt[gguf]'"
        )
    return str(path.parent), {"gguf_file": path.name}


class TransformersLM:
    """A causal LM loaded with transformers, decoding with budget forcing.

    Args:
        model: a local model folder, a ``.gguf`` file or a hub id; None loads the embedded demo LM.
        device: ``auto`` (cuda, then mps, then cpu), or a torch device string.
        dtype: ``auto``, ``float32``, ``float16`` or ``bfloat16``.
        prompt_format: prompt template, answer cue and answer extraction.
        temperature: sampling temperature of ``sc<k>``.
    """

    def __init__(
        self,
        model: str | Path | None = None,
        device: str = "auto",
        dtype: str = "auto",
        prompt_format: PromptFormat | None = None,
        temperature: float = 1.0,
    ) -> None:
        if temperature <= 0:
            raise ValueError(f"temperature must be > 0; got {temperature}")
        self.prompt_format = prompt_format or PromptFormat()
        self.temperature = temperature
        self.name = str(model) if model is not None else "demo"
        path, local = model_source(model)
        self.device = resolve_device(device)
        self.dtype = resolve_dtype(dtype, self.device)
        source = str(path) if local else str(model)
        extra: dict[str, str] = {}
        if local and path.is_file():
            source, extra = gguf_source(path)
        try:
            self.tokenizer = AutoTokenizer.from_pretrained(source, local_files_only=local, **extra)
            loaded = AutoModelForCausalLM.from_pretrained(source, local_files_only=local, dtype=self.dtype, **extra)
        except OSError as error:
            raise FileNotFoundError(f"could not load a causal LM from {source!r}: {error}") from None
        loaded.to(self.device)  # type: ignore[arg-type]
        self.model = loaded.eval()
        self.max_context = int(getattr(self.model.config, "max_position_embeddings", 0) or 2048)
        pad = self.tokenizer.pad_token_id
        eos_ids = set()
        for candidate in (self.tokenizer.eos_token_id, getattr(self.model.generation_config, "eos_token_id", None)):
            if isinstance(candidate, int):
                eos_ids.add(candidate)
            elif isinstance(candidate, list | tuple):
                eos_ids.update(int(i) for i in candidate)
        if not eos_ids:
            raise ValueError(f"model {source!r} defines no EOS token; set eos_token_id in its config")
        cue_ids = tuple(self.tokenizer(self.prompt_format.answer_cue, add_special_tokens=False)["input_ids"])
        if not cue_ids:
            raise ValueError(f"answer cue {self.prompt_format.answer_cue!r} encodes to no tokens with this tokenizer")
        vocabulary = self.tokenizer.convert_ids_to_tokens(list(range(len(self.tokenizer))))
        newline_ids = frozenset(
            i for i, token in enumerate(vocabulary) if token is not None and ("\n" in token or "Ċ" in token)
        )
        self.settings = DecodeSettings(
            cue_ids=cue_ids,
            eos_ids=frozenset(eos_ids),
            newline_ids=newline_ids,
            pad_id=pad if pad is not None else min(eos_ids),
            max_answer_tokens=self.prompt_format.max_answer_tokens,
            temperature=temperature,
        )
        self.stats = DecodeStats()

    def encode_prompt(self, question: str) -> list[int]:
        """Token ids of the prompt for a question."""
        return encode_prompt(self.tokenizer, self.prompt_format, question, self.name)

    @property
    def num_layers(self) -> int:
        """The model's transformer blocks (its hidden states are the embeddings, then one per block)."""
        return int(getattr(self.model.config, "num_hidden_layers", 0) or getattr(self.model.config, "n_layer", 0))

    @property
    def hidden_size(self) -> int:
        """The width of the model's hidden states."""
        return int(getattr(self.model.config, "hidden_size", 0) or getattr(self.model.config, "n_embd", 0))

    def default_hidden_layer(self) -> int:
        """The middle block's output: the default layer of the ``lm-hidden`` features (see HiddenSource)."""
        return max(1, (self.num_layers + 1) // 2)

    @torch.no_grad()
    def prompt_hidden(self, prompts: list[list[int]], layer: int, batch_size: int = 32) -> np.ndarray:
        """Each prompt's hidden state at prefill: the mean over its tokens of hidden state ``layer``.

        A prefill pass only (no decoding, no LM head). Batches are padded on the right:
        in a causal LM the prompt's tokens never attend to the pads after them and keep
        the positions of the unpadded prompt, so a row is the prompt's own prefill (up to
        floating-point summation order), as a server computes it for one request.

        Args:
            prompts: token ids of each prompt.
            layer: index into the hidden states, 0 (embeddings) to ``num_layers`` (the last block).
            batch_size: prompts per forward pass.

        Returns:
            (prompts, hidden size) float32.

        Raises:
            ValueError: ``layer`` out of range, or an empty prompt.
        """
        if not 0 <= layer <= self.num_layers:
            raise ValueError(f"hidden layer {layer} is out of range for {self.name!r}: expected 0..{self.num_layers}")
        if any(not prompt for prompt in prompts):
            raise ValueError("a prompt with no tokens has no hidden state")
        base = self.model.base_model
        pooled = []
        for start in range(0, len(prompts), batch_size):
            chunk = prompts[start : start + batch_size]
            width = max(len(prompt) for prompt in chunk)
            ids = torch.full((len(chunk), width), self.settings.pad_id, dtype=torch.long)
            mask = torch.zeros((len(chunk), width), dtype=torch.long)
            for row, prompt in enumerate(chunk):
                ids[row, : len(prompt)] = torch.tensor(prompt, dtype=torch.long)
                mask[row, : len(prompt)] = 1
            output = base(input_ids=ids.to(self.device), attention_mask=mask.to(self.device), output_hidden_states=True)
            states = output.hidden_states[layer].float()
            weights = mask.to(self.device).unsqueeze(-1).float()
            pooled.append(((states * weights).sum(dim=1) / weights.sum(dim=1)).cpu().numpy())
        if not pooled:
            return np.zeros((0, self.hidden_size), dtype=np.float32)
        return np.concatenate(pooled).astype(np.float32)

    def encode_prompts(self, questions: list[str]) -> list[list[int]]:
        """Token ids of the prompt of each question."""
        return [self.encode_prompt(question) for question in questions]

    def fits(self, prompt_ids: list[int], max_budget: int) -> bool:
        """Whether prompt, the largest budget, the cue and an answer fit in the context."""
        needed = len(prompt_ids) + max_budget + len(self.settings.cue_ids) + self.settings.max_answer_tokens + 1
        return needed <= self.max_context

    def extract_answer(self, answer_ids: list[int]) -> str:
        """The answer text: decoded, stripped, and passed through the answer regex."""
        return self.prompt_format.extract_answer(str(self.tokenizer.decode(answer_ids, skip_special_tokens=True)))

    def _summarise(self, sequences: list[SequenceOutcome], mode: Mode, latency_ms: float) -> ModeOutcome:
        return summarise(
            mode,
            answers=[self.extract_answer(sequence.answer_ids) for sequence in sequences],
            mean_logprobs=[s.answer_logprob / max(1, len(s.answer_ids)) for s in sequences],
            reasoning_tokens=[len(s.reasoning_ids) for s in sequences],
            cue_tokens=[s.cue_tokens for s in sequences],
            answer_tokens=[s.billed_answer_tokens for s in sequences],
            natural_stops=[s.natural_stop for s in sequences],
            latency_ms=latency_ms,
        )

    def run(
        self, prompts: list[list[int]], mode: Mode, budgets: list[int], seeds: list[int] | None = None
    ) -> list[dict[int, ModeOutcome]]:
        """Decode a batch in one mode and summarise each query's outcome at every budget."""
        outcomes, latency, stats = decode_with_budgets(self.model, prompts, mode, budgets, self.settings, seeds)
        self.stats.add(stats)
        return [
            {budget: self._summarise(sequences, mode, latency[i][budget]) for budget, sequences in per_query.items()}
            for i, per_query in enumerate(outcomes)
        ]

    def complete(
        self,
        prompts: list[list[int]],
        mode: Mode,
        budget: int | list[int],
        seeds: list[int] | None = None,
        max_answer_tokens: int | None = None,
        listener: Callable[[int, int], None] | None = None,
    ) -> list[Completion]:
        """Serve a batch with budget forcing, returning text as well as outcomes.

        Args:
            prompts: token ids of each prompt.
            mode: decoding mode shared by the batch.
            budget: reasoning budget shared by the batch, or one per prompt (greedy
                and ``sc<k>``: each row leaves the batch at its own budget).
            seeds: one seed per prompt for ``sc<k>``.
            max_answer_tokens: a smaller answer cap than the prompt format's (a client's
                ``max_tokens`` may leave less room).
            listener: called with (prompt index, token id) as each token of a greedy
                row's text is chosen (one budget per prompt only), for streaming.
        """
        settings = self.settings
        if max_answer_tokens is not None:
            settings = replace(settings, max_answer_tokens=max(1, min(max_answer_tokens, settings.max_answer_tokens)))
        started = time.perf_counter()
        if isinstance(budget, list):
            sequences_of, stats = decode_each_at_budget(
                self.model, prompts, mode, budget, settings, seeds, listener=listener
            )
        else:
            if listener is not None:
                raise ValueError("streaming needs one budget per prompt (a list), as the server passes")
            outcomes, _, stats = decode_with_budgets(self.model, prompts, mode, [budget], settings, seeds)
            sequences_of = [per_budget[budget] for per_budget in outcomes]
        latency_ms = (time.perf_counter() - started) * 1000.0
        self.stats.add(stats)
        cue = self.prompt_format.answer_cue
        completions = []
        for prompt, sequences in zip(prompts, sequences_of, strict=True):
            summary = self._summarise(sequences, mode, latency_ms)
            chosen = 0
            if mode.kind == "sc":
                # The sample the vote returned: the winning answer's most confident sample.
                matching = [i for i, answer in enumerate(summary.sample_answers) if answer == summary.answer]
                chosen = max(matching, key=lambda i: summary.sample_logprobs[i])
            sequence = sequences[chosen]
            reasoning = str(self.tokenizer.decode(sequence.reasoning_ids, skip_special_tokens=True))
            answer = str(self.tokenizer.decode(sequence.answer_ids, skip_special_tokens=True))
            completions.append(
                Completion(
                    outcome=summary,
                    text=f"{reasoning}{cue}{answer}",
                    prompt_tokens=len(prompt),
                    forced=not summary.natural_stop,
                )
            )
        return completions

    @torch.no_grad()
    def generate_plain(
        self,
        prompt: list[int],
        max_tokens: int,
        n: int = 1,
        temperature: float = 0.0,
        seed: int = 0,
        stop: list[str] | None = None,
    ) -> list[PlainCompletion]:
        """Plain generation, as any completions server does: no cue, no forcing.

        Greedy at temperature 0, otherwise ``n`` samples seeded by ``seed``. A stop
        string cuts the text before it (finish reason ``stop``).
        """
        if max_tokens < 1:
            return [PlainCompletion("", [], [], "length") for _ in range(n)]
        input_ids = torch.tensor([prompt], dtype=torch.long, device=self.device)
        sampling = temperature > 0
        generator_kwargs: dict[str, object] = {"do_sample": sampling, "num_return_sequences": n}
        if sampling:
            generator_kwargs["temperature"] = temperature
            torch.manual_seed(seed)
        elif n > 1:
            raise ValueError(f"n={n} needs temperature > 0 (greedy decoding returns one sequence)")
        output = self.model.generate(
            input_ids,
            attention_mask=torch.ones_like(input_ids),
            max_new_tokens=max_tokens,
            pad_token_id=self.settings.pad_id,
            eos_token_id=sorted(self.settings.eos_ids),
            return_dict_in_generate=True,
            output_logits=True,
            top_k=0 if sampling else None,
            top_p=1.0 if sampling else None,
            **generator_kwargs,
        )
        generated = output.sequences[:, len(prompt) :]
        logprobs = torch.stack(output.logits, dim=1).float().log_softmax(-1)
        results = []
        for row in range(generated.shape[0]):
            ids: list[int] = []
            values: list[float] = []
            finish = "length"
            for step, token in enumerate(generated[row].tolist()):
                if token in self.settings.eos_ids:
                    finish = "stop"
                    break
                ids.append(int(token))
                values.append(float(logprobs[row, step, token]))
            text = str(self.tokenizer.decode(ids, skip_special_tokens=True))
            for marker in stop or []:
                cut = text.find(marker) if marker else -1
                if cut >= 0:
                    text, finish = text[:cut], "stop"
                    kept = len(self.tokenizer(text, add_special_tokens=False)["input_ids"]) if text else 0
                    ids, values = ids[:kept], values[:kept]
            results.append(PlainCompletion(text=text, token_ids=ids, token_logprobs=values, finish_reason=finish))
        return results
