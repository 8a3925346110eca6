"""The demo LM's character-level tokenizer, built with the ``tokenizers`` library."""

from __future__ import annotations

import string

from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, processors
from transformers import PreTrainedTokenizerFast

__all__ = ["SPECIAL_TOKENS", "build_tokenizer"]

SPECIAL_TOKENS = {"pad_token": "<pad>", "bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>"}
"""The special tokens, first in the vocabulary (ids 0 to 3)."""

_CHARACTERS = string.digits + string.ascii_letters + " +-*/%=?|:;,.!()[]<>#'\"_\n"


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
