"""The outcome table on disk: schema, version, file names, and the one atomic write.

A table folder written by ``tokenopt collect`` holds:

- ``manifest.json``: schema version, backend and model, the settings, the action
  table and, once done, the row count and the skipped queries;
- ``queries.parquet``: one row per query (id, split, question, answers, prompt
  tokens, and the extra fields of its line);
- ``features.parquet``: one row per query with its ``prompt-text`` feature vector
  (column ``features``; the feature spec is in the file's metadata and in the
  manifest) and, when collected with ``--features lm-hidden``, the LM's hidden state
  of the prompt at prefill (column ``lm_hidden``; where it comes from, model, layer,
  pooling and size, is the manifest's ``lm_hidden`` and the file's
  ``tokenopt.lm_hidden`` metadata). The column is optional: a table collected without
  it gets it later by a prefill pass alone (no decoding), and schema version 2 tables
  without it read as before;
- ``outcomes/part-NNNNN.parquet``: one row per query x budget x mode, written shard
  by shard with atomic renames, so an interrupted run resumes where it stopped.

Writers (collection, export) and readers import these names from here; a reader
never imports a writer.
"""

from __future__ import annotations

import json
import os
import uuid
from collections.abc import Callable
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

__all__ = [
    "FEATURES_FILE",
    "HIDDEN_COLUMN",
    "HIDDEN_METADATA",
    "MANIFEST_FILE",
    "OUTCOMES_DIR",
    "OUTCOME_SCHEMA",
    "QUERIES_FILE",
    "SCHEMA_VERSION",
    "shard_path",
    "write_atomic",
    "write_json_atomic",
    "write_table_atomic",
]

MANIFEST_FILE = "manifest.json"
QUERIES_FILE = "queries.parquet"
FEATURES_FILE = "features.parquet"
HIDDEN_COLUMN = "lm_hidden"
"""The column of ``features.parquet`` holding each query's LM hidden state (float32 lists)."""
HIDDEN_METADATA = "tokenopt.lm_hidden"
"""The ``features.parquet`` metadata key (and, as ``lm_hidden``, the manifest key) of the hidden state's source."""
OUTCOMES_DIR = "outcomes"

SCHEMA_VERSION = 2
"""Version of the outcome table's schema; bumped on any incompatible change.

Version 2 added the per-sequence columns ``sample_answers``, ``sample_em``,
``sample_tokens`` and ``sample_logprobs`` (what early-stopping baselines replay)."""

OUTCOME_SCHEMA = pa.schema(
    [
        ("id", pa.string()),
        ("split", pa.string()),
        ("action", pa.string()),
        ("budget", pa.int32()),
        ("mode", pa.string()),
        ("answer", pa.string()),
        ("em", pa.bool_()),
        ("reasoning_tokens", pa.int32()),
        ("cue_tokens", pa.int32()),
        ("answer_tokens", pa.int32()),
        ("prompt_tokens", pa.int32()),
        ("billed_tokens", pa.int32()),
        ("latency_ms", pa.float32()),
        ("confidence", pa.float32()),
        ("answer_logprob", pa.float32()),
        ("natural_stop", pa.bool_()),
        ("n_sequences", pa.int16()),
        ("sample_answers", pa.list_(pa.string())),
        ("sample_em", pa.list_(pa.bool_())),
        ("sample_tokens", pa.list_(pa.int32())),
        ("sample_logprobs", pa.list_(pa.float32())),
    ],
    metadata={"tokenopt.schema_version": str(SCHEMA_VERSION)},
)
"""The outcome table's columns (documented in docs/collect.md)."""


def shard_path(table_dir: str | Path, index: int) -> Path:
    """The file of outcome shard ``index`` in a table folder."""
    return Path(table_dir) / OUTCOMES_DIR / f"part-{index:05d}.parquet"


def write_atomic(path: str | Path, write: Callable[[Path], object], unique: bool = False) -> None:
    """Write a file so that readers see the old file or the whole new one, never a part.

    ``write`` writes the content to the temporary path it is given; the file is then
    flushed to disk and renamed over ``path``. ``unique`` gives the temporary file a
    random suffix, for writers that may race on the same path (e.g. a retried worker).
    """
    path = Path(path)
    suffix = f".{uuid.uuid4().hex}.partial" if unique else ".partial"
    partial = path.with_name(path.name + suffix)
    try:
        write(partial)
        with partial.open("rb") as handle:
            os.fsync(handle.fileno())
        os.replace(partial, path)
    finally:
        partial.unlink(missing_ok=True)


def write_table_atomic(table: pa.Table, path: str | Path, unique: bool = False) -> None:
    """Write a Parquet file atomically (see :func:`write_atomic`)."""
    write_atomic(path, lambda partial: pq.write_table(table, partial), unique)


def write_json_atomic(data: object, path: str | Path) -> None:
    """Write a JSON file (indented, keys sorted) atomically (see :func:`write_atomic`)."""
    text = json.dumps(data, indent=2, sort_keys=True) + "\n"
    write_atomic(path, lambda partial: partial.write_text(text, encoding="utf-8"))
