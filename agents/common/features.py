"""A run's feature spec: fitted on the table's train split by ``tokenopt train --features``, read back by export.

``prompt-text`` uses the vectors the table recorded as they are; ``lm-hidden`` fits
its projection on the train split's recorded hidden states only (val and test are
projected, never fitted on), so validation and test scores stay honest. The fitted
spec is written into the run folder (``features.json`` and ``features.npz``, plain
arrays) and the export copies it into ``policy.json`` and ``policy.npz``.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

import numpy as np

from tokenopt.agents.common.run_dir import RunDir
from tokenopt.features import PROMPT_TEXT, Features, FeatureSpec, HiddenSource
from tokenopt.table import OutcomeMatrix
from tokenopt.table.schema import write_atomic

__all__ = ["fit_table_features", "load_run_features", "save_run_features"]


def fit_table_features(
    name: str, matrix: OutcomeMatrix, manifest: dict[str, Any], dim: int
) -> tuple[Features, OutcomeMatrix]:
    """The spec ``name`` fitted on the matrix's train split, and the matrix with those features.

    Raises:
        ValueError: an unknown spec, a table that has not recorded what the spec needs,
            or no train query.
    """
    train = np.asarray(matrix.splits == "train")
    if not train.any():
        raise ValueError("fitting the feature spec needs queries in the train split")
    source = HiddenSource.from_dict(manifest["lm_hidden"]) if "lm_hidden" in manifest else None
    prompt_spec = FeatureSpec.from_dict(manifest["feature_spec"])
    features, vectors = Features.fit(name, matrix.features, matrix.hidden, source, train, dim, prompt_spec)
    if not np.isfinite(vectors).all():
        rows = np.flatnonzero(~np.isfinite(vectors).all(axis=1))
        raise ValueError(f"query {matrix.ids[rows[0]]!r} (and {len(rows) - 1} more) has features that are not finite")
    return features, dataclasses.replace(matrix, features=vectors)


def save_run_features(run: RunDir, features: Features) -> None:
    """Write the fitted spec into the run folder (nothing for prompt-text, which the table's manifest holds)."""
    if features.name == PROMPT_TEXT:
        return
    arrays = features.arrays()

    def write_arrays(partial: Path) -> None:
        with partial.open("wb") as handle:
            np.savez(handle, **arrays)  # type: ignore[arg-type]

    write_atomic(run.feature_arrays, write_arrays)
    text = json.dumps(features.to_dict(), indent=2) + "\n"
    write_atomic(run.feature_spec, lambda partial: partial.write_text(text, encoding="utf-8"))


def load_run_features(run: RunDir, manifest: dict[str, Any]) -> Features:
    """The run's fitted spec: its own ``features.json``/``.npz``, else the table's prompt-text spec."""
    spec_path = run.feature_spec
    if not spec_path.is_file():
        return Features.from_dict(manifest["feature_spec"])
    with np.load(run.feature_arrays, allow_pickle=False) as data:
        arrays = {key: data[key] for key in data.files}
    return Features.from_dict(json.loads(spec_path.read_text(encoding="utf-8")), arrays)
