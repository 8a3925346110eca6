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

Several replicas behind a load balancer each write their own log, and feedback may
reach another replica than the request: a replica started with
``--keep-unmatched-feedback`` keeps feedback for an id it did not log in its
``feedback`` table. :func:`read_decisions` reads any number of logs together (files,
folders, glob patterns), joins every feedback to its request whatever log holds
either, counts a request id found in several logs once, and says so.
"""

from __future__ import annotations

import glob
import json
import sqlite3
import threading
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

import numpy as np

__all__ = [
    "LOG_SUFFIXES",
    "LOG_VERSION",
    "DecisionLog",
    "DecisionRecord",
    "LoggedDecisions",
    "log_paths",
    "read_decisions",
]

LOG_VERSION = 1
"""Version of the log's schema, kept in its ``meta`` table."""
LOG_SUFFIXES = (".sqlite", ".sqlite3", ".db")
"""The files of a folder that :func:`log_paths` reads as decision logs."""
_SIDE_FILES = ("-wal", "-shm", "-journal")
"""SQLite's companions of a log (a glob such as ``logs/*`` matches them too)."""


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
CREATE TABLE IF NOT EXISTS feedback (
    request_id TEXT NOT NULL,
    correct INTEGER,
    gold TEXT,
    received_at REAL NOT NULL
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

    def keep_feedback(self, request_id: str, correct: bool | None, gold: str | None) -> None:
        """Keep feedback for a request this log does not hold (another replica served it).

        The readers join it to the request's row in whichever log holds it; with a gold
        answer and no ``correct``, they score the row's answer against it.
        """
        with self._lock:
            self._connection.execute(
                "INSERT INTO feedback (request_id, correct, gold, received_at) VALUES (?, ?, ?, ?)",
                (request_id, None if correct is None else int(correct), gold, time.time()),
            )

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
    source: list[str] = field(default_factory=list)
    """Per row, the log it was read from."""
    logs: list[str] = field(default_factory=list)
    """The logs read, in the order given."""
    duplicate_ids: dict[str, list[str]] = field(default_factory=dict)
    """Request ids found in more than one log (each counted once, with the first log's row), and those logs."""
    joined_feedback: int = 0
    """Rows whose feedback was kept by another log than the row's (it reached another replica)."""
    unmatched_feedback: dict[str, str] = field(default_factory=dict)
    """Feedback whose request id is in none of the logs read: id -> the log that kept it."""

    def __len__(self) -> int:
        return len(self.id)

    def notes(self) -> list[str]:
        """What reading several logs together did, in words: the logs, joined feedback, duplicates, orphans."""
        notes: list[str] = []
        if len(self.logs) > 1:
            rows = {log: self.source.count(log) for log in self.logs}
            notes.append(
                f"read {len(self.logs)} decision logs together: "
                + ", ".join(f"{log} ({count} rows)" for log, count in rows.items())
            )
        if self.joined_feedback:
            notes.append(
                f"{self.joined_feedback} feedback rows reached another replica than their request and were joined"
            )
        if self.duplicate_ids:
            examples = "; ".join(
                f"{request_id!r} in {', '.join(logs)}" for request_id, logs in list(self.duplicate_ids.items())[:3]
            )
            notes.append(
                f"{len(self.duplicate_ids)} request ids are in more than one log and are counted once, with the row "
                f"of the first log given (a log given twice, or a copy of one?): {examples}"
            )
        if self.unmatched_feedback:
            unmatched = list(self.unmatched_feedback.items())[:3]
            examples = ", ".join(f"{request_id!r} ({log})" for request_id, log in unmatched)
            notes.append(
                f"{len(self.unmatched_feedback)} feedback rows match no request in the logs read (a replica's log "
                f"missing?): {examples}"
            )
        return notes


def log_paths(paths: str | Path | Sequence[str | Path]) -> list[Path]:
    """The decision logs named by files, folders and glob patterns, in the order given, each once.

    A folder stands for its files ending in :data:`LOG_SUFFIXES`; a pattern (``logs/*.sqlite``,
    quoted so that the shell leaves it) for the files it matches, SQLite's ``-wal`` and
    ``-shm`` companions left out.

    Raises:
        FileNotFoundError: a file that does not exist, a folder without a log, a pattern that matches none.
        ValueError: no path at all.
    """
    entries = [paths] if isinstance(paths, str | Path) else list(paths)
    if not entries:
        raise ValueError("no decision log given; name the files the servers write with --log PATH")
    found: dict[Path, Path] = {}
    for entry in entries:
        path = Path(entry)
        if path.is_file():
            matches = [path]
        elif path.is_dir():
            matches = sorted(child for child in path.iterdir() if child.is_file() and child.suffix in LOG_SUFFIXES)
            if not matches:
                raise FileNotFoundError(
                    f"folder {path} holds no decision log (files ending in {', '.join(LOG_SUFFIXES)})"
                )
        elif any(character in str(entry) for character in "*?["):
            matches = []
            for hit in sorted(glob.glob(str(entry))):
                if Path(hit).is_dir():
                    matches += sorted(c for c in Path(hit).iterdir() if c.is_file() and c.suffix in LOG_SUFFIXES)
                elif not hit.endswith(_SIDE_FILES):
                    matches.append(Path(hit))
            if not matches:
                raise FileNotFoundError(f"no decision log matches {str(entry)!r}")
        else:
            raise FileNotFoundError(f"decision log {path} does not exist; the server writes it with --log PATH")
        for match in matches:
            found.setdefault(match.resolve(), match)  # a log named twice is read once
    return list(found.values())


_ROW_COLUMNS = (
    "id, arm, policy_id, bypass, action, action_index, budget, mode, propensity, features, billed_tokens, latency_ms, "
    "status, correct, answer, created, feedback_at"
)
"""The columns the readers use (then ``cost_weight``, NULL in older logs); a newer server's others are left alone."""


def _read_log(path: Path) -> tuple[dict[str, str], list[tuple[Any, ...]], list[tuple[Any, ...]]]:
    """One log's meta table, decision rows (:data:`_ROW_COLUMNS`) and kept feedback (id, correct, gold, time)."""
    try:
        connection = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
        meta = dict(connection.execute("SELECT key, value FROM meta").fetchall())
        stored = {str(row[1]) for row in connection.execute("PRAGMA table_info(decisions)")}
        price = "cost_weight" if "cost_weight" in stored else "NULL"  # a log written before lambda was recorded
        rows = connection.execute(f"SELECT {_ROW_COLUMNS}, {price} FROM decisions ORDER BY created, id").fetchall()
        tables = {name for (name,) in connection.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
        kept = []
        if "feedback" in tables:  # a log written before replicas kept feedback has none
            kept = connection.execute(
                "SELECT request_id, correct, gold, received_at FROM feedback ORDER BY received_at"
            ).fetchall()
    except sqlite3.DatabaseError as error:
        raise ValueError(f"{path} is not a tokenopt decision log (SQLite says: {error})") from None
    finally:
        if "connection" in locals():
            connection.close()
    version = int(meta.get("log_version", LOG_VERSION))
    if version > LOG_VERSION:
        raise ValueError(f"{path} has decision-log version {version}; this tokenopt reads up to {LOG_VERSION}")
    return meta, rows, kept


_ARM_KEYS = ("actions", "feature_spec", "extra_inputs")
"""What an arm's rows mean (action indexes, feature vectors): logs read together must agree on them."""


def read_decisions(path: str | Path | Sequence[str | Path]) -> LoggedDecisions:
    """Read one decision log, or several replicas' logs together (also while servers write them).

    ``path`` is a file, a folder or a glob pattern, or a list of them (:func:`log_paths`).
    Rows are joined by request id: feedback counts whatever log holds it (a replica
    keeps feedback for requests it did not serve, see :meth:`DecisionLog.keep_feedback`;
    the latest feedback for an id wins, as when one log is sent it twice), and a request
    id found in several logs is counted once, with the row of the first log given.
    :meth:`LoggedDecisions.notes` says what the join did.

    Raises:
        FileNotFoundError: no log at ``path``.
        ValueError: a file that is not a decision log, rows whose feature sizes differ,
            or logs whose arm was served with another action table or feature spec.
    """
    from tokenopt.scoring import exact_match

    logs = log_paths(path)
    arms: dict[str, dict[str, object]] = {}
    described_in: dict[str, str] = {}
    rows: dict[str, tuple[tuple[Any, ...], str]] = {}
    duplicates: dict[str, list[str]] = {}
    # Per request id, the latest feedback: (time, correct or None, gold or None, log that holds it).
    feedback: dict[str, tuple[float, Any, str | None, str]] = {}
    for log_path in logs:
        log = str(log_path)
        meta, log_rows, kept = _read_log(log_path)
        for key, value in meta.items():
            if not key.startswith("arm."):
                continue
            arm, description = key.removeprefix("arm."), json.loads(value)
            if arm not in arms:
                arms[arm], described_in[arm] = description, log
                continue
            differing = [name for name in _ARM_KEYS if arms[arm].get(name) != description.get(name)]
            if differing:
                raise ValueError(
                    f"arm {arm} of {log} differs from arm {arm} of {described_in[arm]} in {differing} (policies "
                    f"{description.get('policy_id')!r} and {arms[arm].get('policy_id')!r}): their rows' actions and "
                    "features mean different things; read together only logs of one A/B setup"
                )
        for row in log_rows:
            request_id = str(row[0])
            if request_id in rows:
                duplicates.setdefault(request_id, [rows[request_id][1]]).append(log)
            else:
                rows[request_id] = (row, log)
            if row[13] is not None:
                candidate = (float(row[16] or 0.0), row[13], None, log)
                if request_id not in feedback or candidate[0] >= feedback[request_id][0]:
                    feedback[request_id] = candidate
        for request_id, correct, gold, received_at in kept:
            candidate = (float(received_at), correct, gold, log)
            if str(request_id) not in feedback or candidate[0] >= feedback[str(request_id)][0]:
                feedback[str(request_id)] = candidate

    ordered = sorted(rows.values(), key=lambda item: (item[0][15], item[0][0]))
    joined = 0
    correct_column: list[float] = []
    for row, log in ordered:
        found = feedback.get(str(row[0]))
        if found is None:
            correct_column.append(np.nan)
            continue
        _, correct, gold, holder = found
        if correct is None:  # kept with a gold answer only: score the row's answer against it
            correct = exact_match(str(row[14]), [gold or ""])
        correct_column.append(float(correct))
        joined += holder != log
    unmatched = {request_id: found[3] for request_id, found in feedback.items() if request_id not in rows}

    vectors = [np.frombuffer(row[9], dtype=np.float32) for row, _ in ordered]
    if vectors and any(v.shape != vectors[0].shape for v in vectors):
        if len(logs) == 1:
            sizes = sorted({v.shape[0] for v in vectors})
            raise ValueError(
                f"{logs[0]}: rows have feature vectors of different sizes {sizes}; one log per feature spec"
            )
        first_with: dict[int, str] = {}
        for vector, (row, log) in zip(vectors, ordered, strict=True):
            first_with.setdefault(vector.shape[0], f"{log} (row {str(row[0])!r})")
        raise ValueError(
            "rows have feature vectors of different sizes: "
            + ", ".join(f"{size} in {where}" for size, where in sorted(first_with.items()))
            + "; read together only logs of one feature spec"
        )
    columns: list[tuple[Any, ...]] = list(zip(*(row for row, _ in ordered), strict=True)) if ordered else [()] * 18
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
        correct=np.array(correct_column, dtype=np.float64),
        cost_weight=np.array([np.nan if v is None else float(v) for v in columns[17]], dtype=np.float64),
        arms=arms,
        source=[log for _, log in ordered],
        logs=[str(log) for log in logs],
        duplicate_ids=duplicates,
        joined_feedback=joined,
        unmatched_feedback=unmatched,
    )
