"""The one feature extractor, shared by collection and serving.

It computes a query's feature vector from the prompt text alone, with numpy and
the standard library, so that training and serving cannot drift apart and a server
needs neither torch nor transformers. The spec (its name, version and settings) is
saved with every outcome table and every exported policy, and a policy refuses
features made with another spec.
"""

from __future__ import annotations

import hashlib
import string
from dataclasses import asdict, dataclass

import numpy as np

__all__ = ["FeatureSpec", "PromptFeatures"]

_ALPHABET = string.printable[:95]  # digits, letters, punctuation and space


@dataclass(frozen=True)
class FeatureSpec:
    """What the extractor computes; equal specs give equal features."""

    name: str = "prompt-text"
    """Extractor name."""
    version: int = 1
    """Bumped whenever the computation changes."""
    alphabet: str = _ALPHABET
    """Characters counted one by one; any other character counts as 'other'."""
    hash_buckets: int = 32
    """Buckets for hashed word unigrams and bigrams (0 turns them off)."""

    def to_dict(self) -> dict[str, object]:
        """The spec as a JSON-ready dict, with the feature names."""
        data: dict[str, object] = asdict(self)
        data["names"] = PromptFeatures(self).names
        return data

    @classmethod
    def from_dict(cls, data: dict[str, object]) -> FeatureSpec:
        """The spec saved by :meth:`to_dict`.

        Raises:
            ValueError: the saved spec is of another extractor or version.
        """
        spec = cls(
            name=str(data["name"]),
            version=int(data["version"]),  # type: ignore[call-overload]
            alphabet=str(data["alphabet"]),
            hash_buckets=int(data["hash_buckets"]),  # type: ignore[call-overload]
        )
        if spec.name != cls.name or spec.version != cls.version:
            raise ValueError(
                f"feature spec {spec.name} v{spec.version} is not supported; this tokenopt computes "
                f"{cls.name} v{cls.version}"
            )
        return spec


class PromptFeatures:
    """Length, character classes, per-character counts and hashed word n-grams.

    Args:
        spec: the extractor's settings.
    """

    _SUMMARY = ("log_chars", "log_words", "frac_digit", "frac_alpha", "frac_upper", "frac_space", "frac_punct")

    def __init__(self, spec: FeatureSpec | None = None) -> None:
        self.spec = spec or FeatureSpec()
        self._index = {character: i for i, character in enumerate(self.spec.alphabet)}
        self.names = (
            list(self._SUMMARY)
            + [f"count_{ord(c):02x}" for c in self.spec.alphabet]
            + ["count_other"]
            + [f"ngram_{i}" for i in range(self.spec.hash_buckets)]
        )
        self.dim = len(self.names)

    def _bucket(self, token: str) -> int:
        digest = hashlib.blake2b(token.encode("utf-8"), digest_size=4).digest()
        return int.from_bytes(digest, "big") % self.spec.hash_buckets

    def __call__(self, text: str) -> np.ndarray:
        """The feature vector (float32) of one prompt text."""
        vector = np.zeros(self.dim, dtype=np.float32)
        length = max(1, len(text))
        words = text.split()
        vector[0] = np.log1p(len(text))
        vector[1] = np.log1p(len(words))
        vector[2] = sum(c.isdigit() for c in text) / length
        vector[3] = sum(c.isalpha() for c in text) / length
        vector[4] = sum(c.isupper() for c in text) / length
        vector[5] = sum(c.isspace() for c in text) / length
        vector[6] = sum(c in string.punctuation for c in text) / length
        offset = len(self._SUMMARY)
        other = offset + len(self.spec.alphabet)
        for character in text:
            vector[offset + self._index[character] if character in self._index else other] += 1.0
        if self.spec.hash_buckets:
            grams = [w.lower() for w in words] + [
                f"{a.lower()} {b.lower()}" for a, b in zip(words, words[1:], strict=False)
            ]
            for gram in grams:
                vector[other + 1 + self._bucket(gram)] += 1.0
        return vector

    def batch(self, texts: list[str]) -> np.ndarray:
        """Feature vectors of many prompts, as an (n, dim) float32 array."""
        if not texts:
            return np.zeros((0, self.dim), dtype=np.float32)
        return np.stack([self(text) for text in texts])
