"""The decision log: one SQLite row per served request, with feedback attached later.

The server appends a row for every request it answers (and for every request it
refuses after deciding); ``POST /v1/feedback`` attaches an outcome to a row by its
request id. The file is SQLite in WAL mode, so ``tokenopt ab-report`` and
``tokenopt train --from-log`` can read it while the server writes.

Rows hold the prompt's feature vector (float32 bytes), not the prompt, unless the
server runs with ``--log-prompts``: training from the log needs the features only.
The propensity column is the probability with which the serving rule picked the
logged action (1 for a deterministic policy; lower with ``--explore``), which is what
off-policy training from the log weights by.
"""

from __future__ import annotations

import json
import sqlite3
import threading
import time
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

import numpy as np

__all__ = ["LOG_VERSION", "DecisionLog", "DecisionRecord", "LoggedDecisions", "read_decisions"]

LOG_VERSION = 1
"""Version of the log's schema, kept in its ``meta`` table."""


@dataclass
class DecisionRecord:
    """What the server decided for one request and what it cost."""

    id: str
    """The request id returned to the client (``cmpl-...`` or ``chatcmpl-...``)."""
    arm: str
    """A/B arm: ``A``, or ``B`` when a second policy is served."""
    policy_id: str
    """Id of the policy that decided (``bypass`` when the policy was turned off)."""
    endpoint: str
    """``completions`` or ``chat.completions``."""
    bypass: bool
    """Whether the client turned the policy off for this request."""
    action: str
    """Action name, e.g. ``b16/sc5``."""
    action_index: int
    """Index of the action in the policy's action table (-1 when bypassed)."""
    budget: int
    """Reasoning budget the request was served with (after the client's cap)."""
    mode: str
    """Decoding mode the request was served with."""
    propensity: float
    """Probability that the serving rule picked this action for these features."""
    features: bytes
    """The policy's input features, float32 bytes."""
    prompt_tokens: int = 0
    reasoning_tokens: int = 0
    answer_tokens: int = 0
    """Cue and answer tokens, summed over the sequences the mode runs."""
    billed_tokens: int = 0
    """Reasoning + cue + answer tokens over every sequence: what the request cost."""
    forced: bool = False
    """Whether budget forcing cut the reasoning short."""
    answer: str = ""
    """The extracted answer the response carried."""
    latency_ms: float = 0.0
    policy_ms: float = 0.0
    """Time the policy took to decide (features included)."""
    status: int = 200
    """HTTP status of the response."""
    user_key: str = ""
    """The key the arm was hashed from (a hash of it, never the raw header)."""
    prompt: str | None = None
    """The prompt text, only with ``--log-prompts``."""
    created: float = 0.0
    """Unix time the request was received."""
    cost_weight: float | None = None
    """The price lambda in force for the arm when the request was decided (the budget
    controller's, a price-conditioned policy's default, or the one a fixed policy was
    trained at; None where unknown, and in logs written before it was recorded)."""
    checkpoints: list[tuple[int, str, float, str]] = field(default_factory=list, repr=False)
    """A probe controller's checkpoints: (budget, probe answer, its log-probability,
    decision); written to the ``checkpoints`` table, not to the row."""


_COLUMNS = [f.name for f in fields(DecisionRecord) if f.name != "checkpoints"]
_SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS decisions (
    id TEXT PRIMARY KEY,
    arm TEXT NOT NULL,
    policy_id TEXT NOT NULL,
    endpoint TEXT NOT NULL,
    bypass INTEGER NOT NULL,
    action TEXT NOT NULL,
    action_index INTEGER NOT NULL,
    budget INTEGER NOT NULL,
    mode TEXT NOT NULL,
    propensity REAL NOT NULL,
    features BLOB NOT NULL,
    prompt_tokens INTEGER NOT NULL,
    reasoning_tokens INTEGER NOT NULL,
    answer_tokens INTEGER NOT NULL,
    billed_tokens INTEGER NOT NULL,
    forced INTEGER NOT NULL,
    answer TEXT NOT NULL,
    latency_ms REAL NOT NULL,
    policy_ms REAL NOT NULL,
    status INTEGER NOT NULL,
    user_key TEXT NOT NULL,
    prompt TEXT,
    created REAL NOT NULL,
    correct INTEGER,
    gold TEXT,
    feedback_at REAL,
    cost_weight REAL
);
CREATE TABLE IF NOT EXISTS checkpoints (
    request_id TEXT NOT NULL,
    step INTEGER NOT NULL,
    budget INTEGER NOT NULL,
    answer TEXT NOT NULL,
    logprob REAL NOT NULL,
    decision TEXT NOT NULL,
    PRIMARY KEY (request_id, step)
);
"""


class DecisionLog:
    """Append-only decision log in SQLite (WAL mode), safe to share between threads.

    Args:
        path: the log file; created with its folder when missing.
        arms: per arm, what a reader needs to interpret the rows (policy id, action
            table, feature spec), stored in the ``meta`` table.

    Raises:
        ValueError: the file exists but is not a tokenopt decision log, or was
            written by a newer schema.
    """

    def __init__(self, path: str | Path, arms: dict[str, dict[str, object]] | None = None) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._lock = threading.Lock()
        try:
            self._connection = sqlite3.connect(self.path, check_same_thread=False, isolation_level=None)
            self._connection.execute("PRAGMA journal_mode=WAL")
            self._connection.execute("PRAGMA synchronous=NORMAL")
            self._connection.executescript(_SCHEMA)
        except sqlite3.DatabaseError as error:
            raise ValueError(f"{self.path} is not a tokenopt decision log (SQLite says: {error})") from None
        columns = {str(row[1]) for row in self._connection.execute("PRAGMA table_info(decisions)")}
        if "cost_weight" not in columns:  # a log written before lambda was recorded: add the column, keep the rows
            self._connection.execute("ALTER TABLE decisions ADD COLUMN cost_weight REAL")
        version = self._meta("log_version")
        if version is None:
            self._set_meta("log_version", str(LOG_VERSION))
        elif int(version) > LOG_VERSION:
            raise ValueError(f"{self.path} has decision-log version {version}; this tokenopt reads up to {LOG_VERSION}")
        for arm, description in (arms or {}).items():
            self.describe_arm(arm, description)

    def describe_arm(self, arm: str, description: dict[str, object]) -> None:
        """Record what a reader needs to interpret an arm's rows (policy id, actions, features)."""
        self._set_meta(f"arm.{arm}", json.dumps(description, sort_keys=True))

    def _meta(self, key: str) -> str | None:
        row = self._connection.execute("SELECT value FROM meta WHERE key = ?", (key,)).fetchone()
        return None if row is None else str(row[0])

    def _set_meta(self, key: str, value: str) -> None:
        with self._lock:
            self._connection.execute("INSERT OR REPLACE INTO meta (key, value) VALUES (?, ?)", (key, value))

    def append(self, record: DecisionRecord, checkpoints: list[tuple[int, str, float, str]] | None = None) -> None:
        """Write one request's row (and its probe checkpoints: budget, answer, logprob, decision)."""
        values = asdict(record)
        values["created"] = values["created"] or time.time()
        placeholders = ", ".join("?" for _ in _COLUMNS)
        with self._lock:
            self._connection.execute("BEGIN")
            try:
                self._connection.execute(
                    f"INSERT INTO decisions ({', '.join(_COLUMNS)}) VALUES ({placeholders})",
                    [values[name] for name in _COLUMNS],
                )
                for step, (budget, answer, logprob, decision) in enumerate(checkpoints or []):
                    self._connection.execute(
                        "INSERT INTO checkpoints VALUES (?, ?, ?, ?, ?, ?)",
                        (record.id, step, budget, answer, logprob, decision),
                    )
                self._connection.execute("COMMIT")
            except BaseException:
                self._connection.execute("ROLLBACK")
                raise

    def attach_feedback(self, request_id: str, correct: bool | None, gold: str | None) -> tuple[str, bool] | None:
        """Attach an outcome to a logged request.

        With a gold answer and no ``correct``, correctness is the exact match of the
        logged answer against it.

        Returns:
            The request's arm and its correctness, or None when the id is unknown.
        """
        from tokenopt.scoring import exact_match

        with self._lock:
            row = self._connection.execute("SELECT answer, arm FROM decisions WHERE id = ?", (request_id,)).fetchone()
            if row is None:
                return None
            if correct is None:
                correct = exact_match(str(row[0]), [gold or ""])
            self._connection.execute(
                "UPDATE decisions SET correct = ?, gold = ?, feedback_at = ? WHERE id = ?",
                (int(correct), gold, time.time(), request_id),
            )
        return str(row[1]), bool(correct)

    def count(self) -> int:
        """Rows written so far."""
        with self._lock:
            return int(self._connection.execute("SELECT COUNT(*) FROM decisions").fetchone()[0])

    def close(self) -> None:
        """Checkpoint the WAL into the main file and close."""
        with self._lock:
            self._connection.execute("PRAGMA wal_checkpoint(TRUNCATE)")
            self._connection.close()


@dataclass
class LoggedDecisions:
    """The rows of a decision log as columns (what the readers of the log use)."""

    id: list[str]
    arm: np.ndarray
    policy_id: list[str]
    bypass: np.ndarray
    action: list[str]
    action_index: np.ndarray
    budget: np.ndarray
    mode: list[str]
    propensity: np.ndarray
    features: np.ndarray
    """(rows, dim) float32; rows whose feature size differs from the first are refused."""
    billed_tokens: np.ndarray
    latency_ms: np.ndarray
    status: np.ndarray
    correct: np.ndarray
    """1.0 or 0.0 where feedback exists, NaN where it does not."""
    cost_weight: np.ndarray
    """The price lambda each row was decided at; NaN where none was recorded (older logs)."""
    arms: dict[str, dict[str, object]]
    """Per arm, the policy description stored by the server."""

    def __len__(self) -> int:
        return len(self.id)


def read_decisions(path: str | Path) -> LoggedDecisions:
    """Read a decision log (also while a server is writing it).

    Raises:
        FileNotFoundError: no file at ``path``.
        ValueError: the file is not a decision log, or its rows' feature sizes differ.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"decision log {path} does not exist; the server writes it with --log PATH")
    try:
        connection = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
        meta = dict(connection.execute("SELECT key, value FROM meta").fetchall())
        stored = {str(row[1]) for row in connection.execute("PRAGMA table_info(decisions)")}
        price = "cost_weight" if "cost_weight" in stored else "NULL"  # logs before lambda was recorded
        rows = connection.execute(
            "SELECT id, arm, policy_id, bypass, action, action_index, budget, mode, propensity, features, "
            f"billed_tokens, latency_ms, status, correct, {price} FROM decisions ORDER BY created, id"
        ).fetchall()
    except sqlite3.DatabaseError as error:
        raise ValueError(f"{path} is not a tokenopt decision log (SQLite says: {error})") from None
    finally:
        if "connection" in locals():
            connection.close()
    version = int(meta.get("log_version", LOG_VERSION))
    if version > LOG_VERSION:
        raise ValueError(f"{path} has decision-log version {version}; this tokenopt reads up to {LOG_VERSION}")
    vectors = [np.frombuffer(row[9], dtype=np.float32) for row in rows]
    if vectors and any(v.shape != vectors[0].shape for v in vectors):
        sizes = sorted({v.shape[0] for v in vectors})
        raise ValueError(f"{path}: rows have feature vectors of different sizes {sizes}; one log per feature spec")
    columns: list[tuple[Any, ...]] = list(zip(*rows, strict=True)) if rows else [() for _ in range(15)]
    return LoggedDecisions(
        id=[str(v) for v in columns[0]],
        arm=np.array(columns[1], dtype=object),
        policy_id=[str(v) for v in columns[2]],
        bypass=np.array(columns[3], dtype=bool),
        action=[str(v) for v in columns[4]],
        action_index=np.array(columns[5], dtype=np.int64),
        budget=np.array(columns[6], dtype=np.int64),
        mode=[str(v) for v in columns[7]],
        propensity=np.array(columns[8], dtype=np.float64),
        features=np.stack(vectors) if vectors else np.zeros((0, 0), dtype=np.float32),
        billed_tokens=np.array(columns[10], dtype=np.float64),
        latency_ms=np.array(columns[11], dtype=np.float64),
        status=np.array(columns[12], dtype=np.int64),
        correct=np.array([np.nan if v is None else float(v) for v in columns[13]], dtype=np.float64),
        cost_weight=np.array([np.nan if v is None else float(v) for v in columns[14]], dtype=np.float64),
        arms={key.removeprefix("arm."): json.loads(value) for key, value in meta.items() if key.startswith("arm.")},
    )
