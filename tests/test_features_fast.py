"""The vectorised prompt features equal the original per-character loop, value for value.

The loop below is the extractor as it was before vectorisation (tokenopt 0.1.0,
issue 13 item 6), kept here only as the reference: every exported ``prompt-text``
policy was trained on its values, so the fast one must give the same float32 bits.
"""

from __future__ import annotations

import hashlib
import string

import numpy as np
import pytest

from tokenopt.features import FeatureSpec, PromptFeatures


def reference_features(spec: FeatureSpec, text: str) -> np.ndarray:
    """The original extractor: Python loops over the characters and the words."""
    index = {character: i for i, character in enumerate(spec.alphabet)}
    summary = 7
    dim = summary + len(spec.alphabet) + 1 + spec.hash_buckets
    vector = np.zeros(dim, dtype=np.float32)
    length = max(1, len(text))
    words = text.split()
    vector[0] = np.log1p(len(text))
    vector[1] = np.log1p(len(words))
    vector[2] = sum(c.isdigit() for c in text) / length
    vector[3] = sum(c.isalpha() for c in text) / length
    vector[4] = sum(c.isupper() for c in text) / length
    vector[5] = sum(c.isspace() for c in text) / length
    vector[6] = sum(c in string.punctuation for c in text) / length
    other = summary + len(spec.alphabet)
    for character in text:
        vector[summary + index[character] if character in index else other] += 1.0
    if spec.hash_buckets:
        grams = [w.lower() for w in words] + [
            f"{a.lower()} {b.lower()}" for a, b in zip(words, words[1:], strict=False)
        ]
        for gram in grams:
            digest = hashlib.blake2b(gram.encode("utf-8"), digest_size=4).digest()
            vector[other + 1 + int.from_bytes(digest, "big") % spec.hash_buckets] += 1.0
    return vector


# Characters that stress the classes: Unicode digits, letters with case, every kind of
# whitespace str.split() knows (\x1c-\x1f, NBSP, ideographic space, line separators),
# characters whose lower case is longer (U+0130), combining marks, emoji, CJK.
_SPECIAL = (
    "0123456789 \t\n\r\x0b\x0c\x1c\x1d\x1e\x1f\x85\xa0\u1680\u2000\u2007\u200b\u2028\u2029\u202f\u205f\u3000"
    "\u0660\u0669\u00b2\u00b9\u2155\u0966\uff11ÀÉßẞİıσςΣ\u0307\u0301ǅǈﬁ€£¥—–…«»“”😀🙂中文日本語한국어"
    "Z:;?!.,+-*/=()[]{}<>_~`'\"@#$%^&|\\"
)


def _random_texts(seed: int, count: int) -> list[str]:
    rng = np.random.default_rng(seed)
    printable = string.printable
    texts = ["", " ", "a", "   leading and trailing   ", "İstanbul İİ ııı", "x\u3000y\xa0z\x1cw"]
    for _ in range(count):
        length = int(rng.integers(0, 600))
        kind = rng.integers(0, 4)
        if kind == 0:  # printable ASCII
            chars = rng.choice(list(printable), size=length)
        elif kind == 1:  # a mix with the special characters
            chars = rng.choice(list(printable + _SPECIAL * 2), size=length)
        elif kind == 2:  # any code point of the BMP and beyond, surrogates aside
            points = rng.integers(1, 0x2FFFF, size=length)
            points = points[(points < 0xD800) | (points > 0xDFFF)]
            chars = np.array([chr(int(p)) for p in points], dtype=object)
        else:  # words of the demo's kind
            vocabulary = ["C", "Q:", "what", "is", "3+4*2", "max", "of", "9", "key", "=", "Answer"]
            words = rng.choice(vocabulary, size=length // 4)
            chars = np.array(list(" ".join(words)), dtype=object)
        texts.append("".join(chars.tolist()))
    return texts


@pytest.mark.parametrize(
    "spec", [FeatureSpec(), FeatureSpec(hash_buckets=0), FeatureSpec(alphabet="abcaé\u3000 ", hash_buckets=7)]
)
def test_fast_features_equal_the_reference_loop_bit_for_bit(spec: FeatureSpec) -> None:
    extractor = PromptFeatures(spec)
    texts = _random_texts(seed=13, count=400)
    for text in texts + texts[:50]:  # the second pass reads n-gram buckets from the cache
        fast, reference = extractor(text), reference_features(spec, text)
        assert fast.dtype == np.float32 and fast.shape == (extractor.dim,)
        assert np.array_equal(fast.view(np.uint32), reference.view(np.uint32)), text[:80]


def test_an_n_gram_cache_that_fills_up_starts_afresh_and_changes_nothing() -> None:
    class SmallCache(PromptFeatures):
        _CACHE_SIZE = 8  # a text of the demo's kind fills it; some have more words than it holds

    extractor = SmallCache(FeatureSpec(hash_buckets=7))
    texts = _random_texts(seed=21, count=60)
    assert max(len(text.split()) for text in texts) > SmallCache._CACHE_SIZE
    for text in texts + texts[::-1]:
        reference = reference_features(extractor.spec, text)
        assert np.array_equal(extractor(text).view(np.uint32), reference.view(np.uint32)), text[:80]
        assert len(extractor._buckets) <= SmallCache._CACHE_SIZE


def test_batch_equals_one_by_one() -> None:
    extractor = PromptFeatures()
    texts = _random_texts(seed=5, count=40)
    assert np.array_equal(extractor.batch(texts), np.stack([reference_features(extractor.spec, t) for t in texts]))
    assert extractor.batch([]).shape == (0, extractor.dim)


def test_a_lone_surrogate_is_counted_as_one_other_character() -> None:
    # The words are hashed as UTF-8, which a lone surrogate cannot be: outside a word it still counts.
    extractor = PromptFeatures(FeatureSpec(hash_buckets=0))
    text = "ab \udc80 c"
    assert np.array_equal(extractor(text), reference_features(extractor.spec, text))


def test_lower_casing_never_makes_or_unmakes_whitespace() -> None:
    # The extractor splits the lowered text: the same words, lowered, as long as no code
    # point gains or loses whitespace by lower-casing (and whitespace gives no context to
    # a final sigma: it is neither cased nor case-ignorable).
    changed = [
        hex(point)
        for point in range(0x110000)
        if not 0xD800 <= point <= 0xDFFF and chr(point).isspace() != any(c.isspace() for c in chr(point).lower())
    ]
    assert changed == []
    text = "ΟΔΟΣ ΣΑΣ\u3000ΣΣ\xa0İİ Σ"
    assert text.lower().split() == [word.lower() for word in text.split()]
