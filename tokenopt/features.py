"""The feature specs, shared by collection, training and serving: numpy and the standard library only.

A feature spec is a named, pluggable part (:data:`FEATURE_SPECS`; ``tokenopt train
--features NAME`` picks one):

- ``prompt-text``: computed from the prompt text alone (:class:`PromptFeatures`), so
  it works everywhere, upstream servers included;
- ``lm-hidden``: the LM's own representation of the prompt, the mean over the
  prompt's tokens of one layer's hidden state at prefill (:class:`HiddenSource`),
  which collection records in the table and a local server computes before it
  decides; training fits a projection (PCA, :class:`HiddenProjection`) on the train
  split and the export stores it, so the runtime takes the raw vector
  (``decide(prompt, hidden=...)``) and stays numpy-only;
- ``prompt-text+lm-hidden``: both, concatenated.

:class:`Features` is a spec in use. Its dict (``to_dict``) is saved with every
exported policy, its arrays (the projection) in ``policy.npz``, and a policy refuses
features made with another spec. A ``prompt-text`` policy saves exactly the dict it
always did (:class:`FeatureSpec`), so every exported policy still loads.
"""

from __future__ import annotations

import difflib
import hashlib
import math
import string
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from typing import cast

import numpy as np

__all__ = [
    "DEFAULT_HIDDEN_DIM",
    "FEATURE_SPECS",
    "LM_HIDDEN",
    "PROMPT_TEXT",
    "FeatureSpec",
    "Features",
    "HiddenProjection",
    "HiddenSource",
    "PromptFeatures",
    "check_feature_spec_name",
]

PROMPT_TEXT = "prompt-text"
"""The prompt's text: length, character classes, per-character counts, hashed word n-grams."""
LM_HIDDEN = "lm-hidden"
"""The LM's mean-pooled hidden state of one layer at prefill, projected on the train split's principal axes."""

FEATURE_SPECS: dict[str, str] = {
    PROMPT_TEXT: "numpy over the prompt's text (length, character classes and counts, hashed word n-grams)",
    LM_HIDDEN: "the LM's hidden state at prefill (mean over the prompt's tokens, one layer), PCA-projected",
    f"{PROMPT_TEXT}+{LM_HIDDEN}": "both, concatenated (prompt-text first)",
}
"""The feature specs by name, with what each computes: what ``tokenopt train --features`` accepts."""

DEFAULT_HIDDEN_DIM = 32
"""Principal components kept of the hidden state (fewer when the train split has fewer queries)."""


def check_feature_spec_name(name: str) -> list[str]:
    """The parts of a feature spec name (``prompt-text``, ``lm-hidden`` or both).

    Raises:
        ValueError: not a known spec; the message lists them and the closest match.
    """
    if name not in FEATURE_SPECS:
        close = difflib.get_close_matches(name, list(FEATURE_SPECS), n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        raise ValueError(f"unknown feature spec {name!r}{hint}; expected one of {', '.join(FEATURE_SPECS)}")
    return name.split("+")


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

    Vectorised: one count of the text's code points (numpy over its bytes), the
    character classes and the per-character counts read from that count through
    lookup tables, and one ``str.split`` pass for the words, whose n-grams' buckets are
    read from a cache in C (``map``) and counted by ``np.bincount``. Only the distinct
    code points outside ASCII (few, in most prompts) and the hashing of n-grams the cache
    has not seen stay in Python; prompts share most of their words.

    Args:
        spec: the extractor's settings.
    """

    _SUMMARY = ("log_chars", "log_words", "frac_digit", "frac_alpha", "frac_upper", "frac_space", "frac_punct")
    _CACHE_SIZE = 1 << 16
    """Most n-gram buckets remembered; the cache starts afresh when full."""

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
        offset = len(self._SUMMARY)
        self._other = offset + len(self.spec.alphabet)
        self._slot = {character: offset + i for character, i in self._index.items()}
        # What one occurrence of each ASCII code point adds to the vector: its five
        # character classes (divided by the length later) and one count in its slot (a
        # later duplicate in the alphabet wins, as in a dict). The counts of a text's
        # code points times this table give all of that in one product.
        self._ascii_table = np.zeros((128, self.dim), dtype=np.float64)
        for code in range(128):
            self._ascii_table[code] = self._row(chr(code))
        self._buckets: dict[str | tuple[str, str], int] = {}

    def _row(self, character: str) -> np.ndarray:
        """What one occurrence of a character adds to the vector (before the length division)."""
        row = np.zeros(self.dim, dtype=np.float64)
        row[2:7] = _classes(character)
        row[self._slot.get(character, self._other)] = 1.0
        return row

    def _bucket(self, gram: str | tuple[str, str]) -> int:
        """The hash bucket of a word (a string) or a word bigram (a pair), cached."""
        bucket = self._buckets.get(gram)
        if bucket is None:
            text = gram if isinstance(gram, str) else f"{gram[0]} {gram[1]}"
            digest = hashlib.blake2b(text.encode("utf-8"), digest_size=4).digest()
            bucket = int.from_bytes(digest, "big") % self.spec.hash_buckets
            if len(self._buckets) >= self._CACHE_SIZE:
                self._buckets.clear()
            self._buckets[gram] = bucket
        return bucket

    def __call__(self, text: str) -> np.ndarray:
        """The feature vector (float32) of one prompt text."""
        length = len(text)
        if text.isascii():
            vector = np.bincount(np.frombuffer(text.encode("ascii"), dtype=np.uint8), minlength=128) @ self._ascii_table
        else:
            # UTF-32 gives one unit per code point (surrogatepass: a lone surrogate is one too).
            points = np.frombuffer(text.encode("utf-32-le", "surrogatepass"), dtype="<u4")
            is_ascii = points < 128
            vector = np.bincount(points[is_ascii], minlength=128) @ self._ascii_table
            unique, counts = np.unique(points[~is_ascii], return_counts=True)
            for point, count in zip(unique.tolist(), counts.tolist(), strict=True):
                vector += count * self._row(chr(point))
        # Lower-casing never makes or unmakes whitespace (tests check every code point), so
        # the words of the lowered text are the lowered words.
        words = text.lower().split()
        vector[0] = math.log1p(length)
        vector[1] = math.log1p(len(words))
        vector[2:7] /= max(1, length)
        if self.spec.hash_buckets and words:
            # Every word and bigram looked up in the bucket cache in C (map), counted by bincount;
            # Python hashes only the n-grams the cache has not seen.
            cached = self._buckets.get
            found: list[int | None] = list(map(cached, words))
            found += map(cached, zip(words, words[1:], strict=False))
            if None in found:
                grams: list[str | tuple[str, str]] = [*words, *zip(words, words[1:], strict=False)]
                found = [self._bucket(gram) if b is None else b for gram, b in zip(grams, found, strict=True)]
            vector[self._other + 1 :] = np.bincount(cast(list[int], found), minlength=self.spec.hash_buckets)
        return vector.astype(np.float32)

    def batch(self, texts: list[str]) -> np.ndarray:
        """Feature vectors of many prompts, as an (n, dim) float32 array."""
        if not texts:
            return np.zeros((0, self.dim), dtype=np.float32)
        return np.stack([self(text) for text in texts])


def _classes(character: str) -> tuple[bool, bool, bool, bool, bool]:
    """Whether a character is a digit, a letter, upper case, whitespace, ASCII punctuation."""
    return (
        character.isdigit(),
        character.isalpha(),
        character.isupper(),
        character.isspace(),
        character in string.punctuation,
    )


@dataclass(frozen=True)
class HiddenSource:
    """Where an ``lm-hidden`` vector comes from; recorded in the table and in the policy.

    The mean over the prompt's tokens, rather than the last token's state: with a chat
    template the last tokens are the template's fixed generation prompt, and a small
    character-level LM's last token is the question's final character, whereas the
    mean reads every token of the question directly. A middle layer by default:
    probes of a causal LM's hidden states read task properties best from the middle
    layers (Azaria & Mitchell 2023, "The Internal State of an LLM Knows When It's
    Lying"), while the last layers specialise in the next token.
    """

    model: str
    """The LM's name as collection records it (``demo``, a folder, a ``.gguf`` file or a hub id)."""
    layer: int
    """Index into the model's hidden states: 0 is the embeddings, ``i`` the output of block ``i``."""
    size: int
    """The hidden size (the vector's length)."""
    pooling: str = "mean"
    """How the prompt's token states are pooled: ``mean`` over the prompt's tokens."""

    def to_dict(self) -> dict[str, object]:
        """The source as a JSON-ready dict."""
        return asdict(self)

    @classmethod
    def from_dict(cls, data: Mapping[str, object]) -> HiddenSource:
        """The source saved by :meth:`to_dict`.

        Raises:
            ValueError: a field is missing or of the wrong type, or the pooling is not ``mean``.
        """
        try:
            source = cls(
                model=str(data["model"]),
                layer=int(data["layer"]),  # type: ignore[call-overload]
                size=int(data["size"]),  # type: ignore[call-overload]
                pooling=str(data.get("pooling", "mean")),
            )
        except (KeyError, TypeError, ValueError) as error:
            raise ValueError(f"malformed lm-hidden source {dict(data)!r}: {error}") from None
        if source.pooling != "mean" or source.size < 1:
            raise ValueError(f"lm-hidden source: pooling must be 'mean' and size >= 1; got {source}")
        return source


class HiddenProjection:
    """A centred linear projection of the hidden state onto principal axes (PCA).

    Args:
        mean: (hidden size,) the train split's mean hidden state.
        components: (hidden size, k) the principal axes, one per column.
    """

    def __init__(self, mean: np.ndarray, components: np.ndarray) -> None:
        self.mean = np.asarray(mean, dtype=np.float64)
        self.components = np.ascontiguousarray(components, dtype=np.float64)
        if self.mean.ndim != 1 or self.components.ndim != 2 or self.components.shape[0] != self.mean.shape[0]:
            raise ValueError(
                f"a projection takes a mean of shape (h,) and components of shape (h, k); got "
                f"{self.mean.shape} and {self.components.shape}"
            )
        if not (np.isfinite(self.mean).all() and np.isfinite(self.components).all()):
            raise ValueError("the projection holds values that are not finite")
        self.dim = int(self.components.shape[1])

    @classmethod
    def fit(cls, hidden: np.ndarray, dim: int = DEFAULT_HIDDEN_DIM) -> HiddenProjection:
        """The first ``dim`` principal axes of these hidden states (the train split's).

        Each axis's sign is fixed (its largest entry positive), so a fit is deterministic.

        Raises:
            ValueError: fewer than 2 states, or ``dim`` < 1.
        """
        hidden = np.asarray(hidden, dtype=np.float64)
        if hidden.ndim != 2 or hidden.shape[0] < 2:
            raise ValueError(f"fitting a projection needs at least 2 hidden states; got shape {hidden.shape}")
        if dim < 1:
            raise ValueError(f"the projection's dimension must be >= 1; got {dim}")
        mean = hidden.mean(axis=0)
        _, _, axes = np.linalg.svd(hidden - mean, full_matrices=False)
        components = axes[: min(dim, axes.shape[0])].T
        signs = np.sign(components[np.abs(components).argmax(axis=0), np.arange(components.shape[1])])
        return cls(mean, components * np.where(signs == 0, 1.0, signs))

    def __call__(self, hidden: np.ndarray) -> np.ndarray:
        """The projected vector(s), float32: (h,) -> (k,), or (n, h) -> (n, k)."""
        return ((np.asarray(hidden, dtype=np.float64) - self.mean) @ self.components).astype(np.float32)


class Features:
    """A feature spec in use: what a policy's inputs are made of, and how to make them.

    Build one with :meth:`fit` (training, from a table's recorded columns) or
    :meth:`from_dict` (loading a policy). ``prompt`` and ``hidden`` are the parts;
    at least one is set.

    Args:
        prompt: the ``prompt-text`` extractor, or None.
        source: where the ``lm-hidden`` vector comes from, or None.
        projection: the fitted projection of the ``lm-hidden`` vector (with ``source``).
    """

    ARRAYS = ("features_hidden_mean", "features_hidden_components")
    """Names of the projection's arrays in ``policy.npz``."""

    def __init__(
        self,
        prompt: PromptFeatures | None = None,
        source: HiddenSource | None = None,
        projection: HiddenProjection | None = None,
    ) -> None:
        if prompt is None and source is None:
            raise ValueError("a feature spec needs at least one part: prompt-text or lm-hidden")
        if (source is None) != (projection is None):
            raise ValueError("lm-hidden needs both its source and its fitted projection")
        if source is not None and projection is not None and projection.mean.shape != (source.size,):
            raise ValueError(
                f"the projection takes {projection.mean.shape[0]} inputs; the source's hidden size is {source.size}"
            )
        self.prompt, self.source, self.projection = prompt, source, projection
        self.name = "+".join(
            part for part, present in ((PROMPT_TEXT, prompt), (LM_HIDDEN, source)) if present is not None
        )
        self.names: list[str] = list(prompt.names) if prompt is not None else []
        if projection is not None:
            self.names += [f"hidden_pc{i}" for i in range(projection.dim)]
        self.dim = len(self.names)
        self.needs_hidden = source is not None
        """Whether a decision needs the LM's hidden state (``hidden=``)."""

    @classmethod
    def fit(
        cls,
        name: str,
        prompt_features: np.ndarray | None,
        hidden: np.ndarray | None,
        source: HiddenSource | None,
        train: np.ndarray,
        dim: int = DEFAULT_HIDDEN_DIM,
        prompt_spec: FeatureSpec | None = None,
    ) -> tuple[Features, np.ndarray]:
        """The spec ``name`` fitted on a table's columns, and every query's feature vector.

        Args:
            name: a name of :data:`FEATURE_SPECS`.
            prompt_features: (queries, d) the table's recorded ``prompt-text`` vectors.
            hidden: (queries, hidden size) the table's recorded ``lm-hidden`` vectors, or None.
            source: where ``hidden`` came from (the table's record), or None.
            train: boolean mask of the queries the projection is fitted on (the train split only).
            dim: principal components kept.
            prompt_spec: the ``prompt-text`` spec the table recorded.

        Raises:
            ValueError: an unknown name, or a part the table has not recorded.
        """
        parts = check_feature_spec_name(name)
        prompt = projection = None
        columns = []
        if PROMPT_TEXT in parts:
            if prompt_features is None:
                raise ValueError("the table has no prompt-text features (features.parquet); collect it again")
            prompt = PromptFeatures(prompt_spec)
            columns.append(np.asarray(prompt_features, dtype=np.float32))
        if LM_HIDDEN in parts:
            if hidden is None or source is None:
                raise ValueError(
                    f"feature spec {name!r} needs the LM's hidden states, which this table has not recorded; add "
                    "them without decoding again: `tokenopt collect --out TABLE --features lm-hidden` with the "
                    "table's own --model and settings (a prefill pass over its queries)"
                )
            projection = HiddenProjection.fit(np.asarray(hidden)[np.asarray(train, dtype=bool)], dim)
            columns.append(projection(hidden))
        else:
            source = None
        return cls(prompt, source, projection), np.concatenate(columns, axis=1)

    def to_dict(self) -> dict[str, object]:
        """The spec as ``policy.json`` records it (``prompt-text`` alone: the dict it always was)."""
        if self.source is None:
            assert self.prompt is not None
            return self.prompt.spec.to_dict()
        assert self.projection is not None
        data: dict[str, object] = {"name": self.name, "version": 1}
        if self.prompt is not None:
            data["prompt_text"] = self.prompt.spec.to_dict()
        data["hidden"] = self.source.to_dict()
        data["projection"] = {"dim": self.projection.dim, "mean": self.ARRAYS[0], "components": self.ARRAYS[1]}
        data["names"] = self.names
        return data

    def arrays(self) -> dict[str, np.ndarray]:
        """The arrays ``policy.npz`` stores for this spec (the projection; none for prompt-text)."""
        if self.projection is None:
            return {}
        return {self.ARRAYS[0]: self.projection.mean, self.ARRAYS[1]: self.projection.components}

    @classmethod
    def from_dict(cls, data: Mapping[str, object], arrays: Mapping[str, np.ndarray] | None = None) -> Features:
        """The spec saved by :meth:`to_dict`, with its arrays.

        Raises:
            ValueError: an unknown spec or version, a malformed field, or a missing array.
        """
        name = str(data.get("name"))
        if name == PROMPT_TEXT:
            return cls(PromptFeatures(FeatureSpec.from_dict(dict(data))))
        parts = check_feature_spec_name(name)
        if data.get("version") != 1:
            raise ValueError(f"feature spec {name} v{data.get('version')} is not supported; this tokenopt reads v1")
        prompt_data, hidden_data = data.get("prompt_text"), data.get("hidden")
        prompt = None
        if PROMPT_TEXT in parts:
            if not isinstance(prompt_data, Mapping):
                raise ValueError(f"feature spec {name} has no prompt_text part")
            prompt = PromptFeatures(FeatureSpec.from_dict(dict(prompt_data)))
        if not isinstance(hidden_data, Mapping):
            raise ValueError(f"feature spec {name} has no hidden part")
        source = HiddenSource.from_dict(hidden_data)
        arrays = arrays or {}
        missing = [key for key in cls.ARRAYS if key not in arrays]
        if missing:
            raise ValueError(f"feature spec {name} needs the arrays {missing} in policy.npz")
        return cls(prompt, source, HiddenProjection(arrays[cls.ARRAYS[0]], arrays[cls.ARRAYS[1]]))

    def _check_hidden(self, hidden: np.ndarray | None, rows: int | None) -> np.ndarray:
        assert self.source is not None
        if hidden is None:
            raise ValueError(
                f"this policy's features ({self.name}) need the LM's hidden state: the mean over the prompt's tokens "
                f"of layer {self.source.layer} of {self.source.model!r} at prefill, {self.source.size} numbers; pass "
                "it as hidden= (tokenopt serve computes it with a local --model; an upstream server cannot)"
            )
        vector = np.asarray(hidden, dtype=np.float64)
        expected = (self.source.size,) if rows is None else (rows, self.source.size)
        if vector.shape != expected:
            raise ValueError(f"hidden has shape {vector.shape}; this policy's features take {expected}")
        if not np.isfinite(vector).all():
            raise ValueError("hidden holds values that are not finite")
        return vector

    def __call__(self, text: str, hidden: np.ndarray | None = None) -> np.ndarray:
        """The feature vector (float32) of one prompt (and its hidden state, when the spec needs it).

        Raises:
            ValueError: the spec needs ``hidden`` and it is missing, of the wrong shape or not finite.
        """
        if self.source is None:
            assert self.prompt is not None
            return self.prompt(text)
        assert self.projection is not None
        projected = self.projection(self._check_hidden(hidden, None))
        return projected if self.prompt is None else np.concatenate([self.prompt(text), projected])

    def batch(self, texts: list[str], hidden: np.ndarray | None = None) -> np.ndarray:
        """Feature vectors of many prompts, (n, dim) float32; ``hidden`` is (n, hidden size) when needed."""
        if self.source is None:
            assert self.prompt is not None
            return self.prompt.batch(texts)
        assert self.projection is not None
        projected = self.projection(self._check_hidden(hidden, len(texts)))
        return projected if self.prompt is None else np.concatenate([self.prompt.batch(texts), projected], axis=1)
