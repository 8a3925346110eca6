"""Tokenizers of trace LMs: the demo LM's character tokenizer and byte-level BPE trained on a suite's text.

Both are built with the ``tokenizers`` library.
"""

from __future__ import annotations

import json
import string
from collections.abc import Iterable
from typing import Any

from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers
from transformers import GPT2Tokenizer, PreTrainedTokenizerBase, PreTrainedTokenizerFast, Qwen2Tokenizer

__all__ = ["BPE_FAMILIES", "SPECIAL_TOKENS", "build_tokenizer", "check_round_trip", "train_bpe_tokenizer"]

SPECIAL_TOKENS = {"pad_token": "<pad>", "bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>"}
"""The special tokens, first in the vocabulary (ids 0 to 3)."""

_CHARACTERS = string.digits + string.ascii_letters + " +-*/%=?|:;,.!()[]<>#'\"_\n"

BPE_FAMILIES = ("gpt2", "qwen2")
"""Model types whose own tokenizer pipeline :func:`train_bpe_tokenizer` reproduces."""

_END_OF_TEXT = "<|endoftext|>"
# Qwen2Tokenizer's pre-tokenizer: single digits, words with one leading non-letter, punctuation runs.
_QWEN2_SPLIT = (
    r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"""
    r"""| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"""
)


def build_tokenizer() -> PreTrainedTokenizerFast:
    """Build the tokenizer: one token per character, a BOS token before each prompt.

    Returns:
        The tokenizer wrapped for transformers. Saved with ``save_pretrained`` it
        writes ``tokenizer.json``, which ``AutoTokenizer`` loads back unchanged for
        the demo's Llama config.
    """
    vocab: dict[str, int] = {}
    for token in SPECIAL_TOKENS.values():
        vocab[token] = len(vocab)
    for character in _CHARACTERS:
        vocab.setdefault(character, len(vocab))
    tokenizer = Tokenizer(models.WordLevel(vocab=vocab, unk_token=SPECIAL_TOKENS["unk_token"]))
    tokenizer.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")
    tokenizer.decoder = decoders.Fuse()
    bos = SPECIAL_TOKENS["bos_token"]
    tokenizer.post_processor = processors.TemplateProcessing(
        single=f"{bos} $A", pair=f"{bos} $A $B", special_tokens=[(bos, vocab[bos])]
    )
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, **SPECIAL_TOKENS)


def train_bpe_tokenizer(texts: Iterable[str], family: str, vocab_size: int = 320) -> PreTrainedTokenizerBase:
    """Train a byte-level BPE on a suite's text, in the pipeline of a model family's own tokenizer.

    transformers 5 rebuilds a gpt2 or qwen2 tokenizer's normalizer and pre-tokenizer
    from the model type when ``AutoTokenizer`` loads it (see FINDINGS), so the BPE is
    trained with that family's pipeline and returned as that family's tokenizer class:
    what is saved is then what loads. ``<|endoftext|>`` is the EOS (and padding) token;
    neither family adds a BOS.

    Args:
        texts: the suite's questions, traces, cues and answers.
        family: ``gpt2`` (GPT-2's byte-level regex) or ``qwen2`` (NFC, one token per digit).
        vocab_size: vocabulary size, at least the 256 bytes plus the special token.

    Raises:
        ValueError: an unknown family or a vocabulary smaller than the byte alphabet.
    """
    if family not in BPE_FAMILIES:
        raise ValueError(f"unknown BPE family {family!r}; expected one of {', '.join(BPE_FAMILIES)}")
    alphabet = pre_tokenizers.ByteLevel.alphabet()
    if vocab_size < len(alphabet) + 1:
        raise ValueError(f"vocab_size must be >= {len(alphabet) + 1} (the byte alphabet and EOS); got {vocab_size}")
    bpe = Tokenizer(models.BPE())
    if family == "gpt2":
        bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    else:
        bpe.normalizer = normalizers.NFC()
        bpe.pre_tokenizer = pre_tokenizers.Sequence(
            [
                pre_tokenizers.Split(Regex(_QWEN2_SPLIT), behavior="isolated"),
                pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
            ]
        )
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=[_END_OF_TEXT], initial_alphabet=alphabet, show_progress=False
    )
    bpe.train_from_iterator(texts, trainer=trainer)
    vocab = bpe.get_vocab()
    # The classes take the pairs as tokenizers' BPE does, though their hints say list[str].
    merges: Any = _merges_of(bpe)
    if family == "gpt2":
        return GPT2Tokenizer(vocab=vocab, merges=merges, pad_token=_END_OF_TEXT)
    return Qwen2Tokenizer(vocab=vocab, merges=merges)


def _merges_of(bpe: Tokenizer) -> list[tuple[str, str]]:
    """The trained merges, in order (the tokenizer's JSON is the one public view of them)."""
    merges = json.loads(bpe.to_str())["model"]["merges"]
    return [(m.split(" ", 1)[0], m.split(" ", 1)[1]) if isinstance(m, str) else (m[0], m[1]) for m in merges]


def check_round_trip(
    tokenizer: PreTrainedTokenizerBase, texts: Iterable[str], reference: PreTrainedTokenizerBase | None = None
) -> None:
    """Check that a tokenizer gives every text back, and encodes it as a reference tokenizer does.

    Raises:
        ValueError: the first text that does not survive ``decode(encode(text))``, or whose ids
            differ from the reference's, with both results.
    """
    for text in texts:
        ids = list(tokenizer(text, add_special_tokens=False)["input_ids"])
        decoded = tokenizer.decode(ids, skip_special_tokens=True)
        if decoded != text:
            raise ValueError(f"tokenizer does not round-trip {text!r}: it decodes back as {decoded!r}")
        if reference is not None:
            expected = list(reference(text, add_special_tokens=False)["input_ids"])
            if ids != expected:
                raise ValueError(f"loaded tokenizer encodes {text!r} as {ids}, the built one as {expected}")
