import numpy as np
import pytest

from tokenopt.features import FeatureSpec, PromptFeatures


def test_features_are_deterministic_and_shaped():
    extractor = PromptFeatures()
    first = extractor.batch(["C 3+4*2?", "M 1 2 3?"])
    second = PromptFeatures().batch(["C 3+4*2?", "M 1 2 3?"])
    assert first.shape == (2, extractor.dim) and first.dtype == np.float32
    np.testing.assert_array_equal(first, second)
    assert len(extractor.names) == extractor.dim


def test_character_counts_see_difficulty():
    extractor = PromptFeatures()
    plus = extractor.names.index(f"count_{ord('+'):02x}")
    assert extractor("C 1+2+3+4?")[plus] == 3
    assert extractor("C 1+2?")[plus] == 1
    other = extractor.names.index("count_other")
    assert extractor("héllo")[other] == 1


def test_spec_round_trip_and_version_check():
    spec = FeatureSpec()
    assert FeatureSpec.from_dict(spec.to_dict()) == spec
    data = spec.to_dict() | {"version": 99}
    with pytest.raises(ValueError, match="not supported"):
        FeatureSpec.from_dict(data)
