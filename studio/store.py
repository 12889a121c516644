"""The studio workspace: folders for datasets, runs and models, and the SQLite registry that indexes them.

The registry is shared by the UI process and every worker process. SQLite in WAL mode lets readers and
one writer work at once; each thread (and each process) opens its own connection, transactions are short,
and a busy timeout makes a writer wait for another instead of failing.
"""

from __future__ import annotations

import contextlib
import csv
import io
import json
import math
import os
import secrets
import sqlite3
import threading
import time
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

from . import run_states

DEFAULT_WORKSPACE = Path.home() / "ApertisStudio"
RUN_STATUSES = run_states.STATES  # the words and their moves live in run_states; these names are kept for callers
ACTIVE_STATUSES = run_states.ACTIVE
RESUMABLE_STATUSES = run_states.RESUMABLE
SCHEMA_VERSION = 2  # PRAGMA user_version; 2: run statuses follow run_states (see _migrate)

_SCHEMA = """
CREATE TABLE IF NOT EXISTS datasets(
    id TEXT PRIMARY KEY, name TEXT NOT NULL, path TEXT NOT NULL, created REAL NOT NULL, summary TEXT);
CREATE TABLE IF NOT EXISTS runs(
    id TEXT PRIMARY KEY, name TEXT NOT NULL, status TEXT NOT NULL, pid INTEGER, config TEXT NOT NULL,
    out_dir TEXT NOT NULL, dataset_id TEXT, mode TEXT NOT NULL DEFAULT 'new', extra_steps INTEGER DEFAULT 0,
    step INTEGER DEFAULT 0, total_steps INTEGER DEFAULT 0, created REAL NOT NULL, started REAL, ended REAL,
    exit_code INTEGER, exit_reason TEXT, log_tail TEXT);
CREATE TABLE IF NOT EXISTS metrics(
    run_id TEXT NOT NULL, step INTEGER NOT NULL, key TEXT NOT NULL, value REAL, json TEXT, t REAL);
CREATE INDEX IF NOT EXISTS metrics_by_run ON metrics(run_id, step);
CREATE TABLE IF NOT EXISTS events(
    id INTEGER PRIMARY KEY AUTOINCREMENT, run_id TEXT, t REAL NOT NULL, kind TEXT NOT NULL, payload TEXT);
CREATE INDEX IF NOT EXISTS events_by_run ON events(run_id, id);
CREATE TABLE IF NOT EXISTS models(
    id TEXT PRIMARY KEY, name TEXT NOT NULL, path TEXT NOT NULL, kind TEXT NOT NULL, run_id TEXT,
    created REAL NOT NULL, card TEXT);
CREATE TABLE IF NOT EXISTS settings(key TEXT PRIMARY KEY, value TEXT NOT NULL);
"""

_RUN_FIELDS = {
    "name",
    "pid",
    "config",
    "mode",
    "extra_steps",
    "step",
    "total_steps",
    "started",
    "ended",
    "exit_code",
    "exit_reason",
    "log_tail",
}


def new_id(prefix: str) -> str:
    """Sortable, readable and unique in a workspace: prefix-YYYYmmdd-HHMMSS-xxxxxxxx.

    32 random bits, because many ids can be made within one second (16 bits collided in a test)."""
    return f"{prefix}-{time.strftime('%Y%m%d-%H%M%S')}-{secrets.token_hex(4)}"


class Store:
    """One workspace on disk. Cheap to create; safe to share between threads (connections are per thread)."""

    def __init__(self, workspace: str | os.PathLike | None = None):
        self.root = Path(workspace or DEFAULT_WORKSPACE).expanduser().resolve()
        self.datasets_dir = self.root / "datasets"
        self.runs_dir = self.root / "runs"
        self.models_dir = self.root / "models"
        self.tmp_dir = self.root / "tmp"
        for folder in (self.datasets_dir, self.runs_dir, self.models_dir, self.tmp_dir):
            folder.mkdir(parents=True, exist_ok=True)
        self.db_path = self.root / "studio.db"
        self._local = threading.local()
        self._opened: list[tuple[int, sqlite3.Connection]] = []  # (pid, connection): close() reaches them all
        self._opened_lock = threading.Lock()
        self._generation = 0  # bumped by close(): a thread's old connection is then replaced, not reused
        self._connection().executescript(_SCHEMA)  # executescript manages its own transaction
        self._migrate()

    def _connection(self) -> sqlite3.Connection:
        # A connection must not cross a fork or a thread boundary, so it is keyed by both. It is only ever
        # used by the thread that opened it; check_same_thread is off so that close() may close it.
        local = self._local
        conn = getattr(local, "conn", None)
        if conn is None or local.pid != os.getpid() or local.generation != self._generation:
            conn = sqlite3.connect(self.db_path, timeout=30, isolation_level=None, check_same_thread=False)
            conn.row_factory = sqlite3.Row
            conn.execute("PRAGMA journal_mode=WAL")
            conn.execute("PRAGMA busy_timeout=30000")
            conn.execute("PRAGMA synchronous=NORMAL")  # WAL + NORMAL is durable across app crashes
            with self._opened_lock:
                self._opened.append((os.getpid(), conn))
                local.conn, local.pid, local.generation = conn, os.getpid(), self._generation
        return conn

    def _migrate(self) -> None:
        """Bring run statuses written by an older studio into the run_states vocabulary (once per workspace).

        Before version 2 a run stopped on request, or taken out of the queue, was recorded as "interrupted";
        it becomes "stopped". A word the table does not know (a newer or damaged registry) becomes
        "interrupted" with a reason naming the old word, so the run can still be resumed or deleted."""
        if self._connection().execute("PRAGMA user_version").fetchone()[0] >= SCHEMA_VERSION:
            return  # the usual case: no write lock taken
        with self.transaction() as db:
            if db.execute("PRAGMA user_version").fetchone()[0] >= SCHEMA_VERSION:
                return  # another process migrated it meanwhile
            db.execute(
                "UPDATE runs SET status = ? WHERE status = ? AND (exit_reason LIKE 'stopped on request%' "
                "OR exit_reason LIKE 'cancelled before it started%')",
                (run_states.STOPPED, run_states.INTERRUPTED),
            )
            marks = ",".join("?" * len(RUN_STATUSES))
            db.execute(
                f"UPDATE runs SET exit_reason = 'its status was ' || quote(status) || ', a word this studio does not "
                f"know; press Resume to continue it from its last checkpoint', status = ? WHERE status NOT IN ({marks})",
                (run_states.INTERRUPTED, *RUN_STATUSES),
            )
            db.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")

    @contextlib.contextmanager
    def transaction(self) -> Iterator[sqlite3.Connection]:
        """A short write transaction; IMMEDIATE takes the write lock up front so it cannot deadlock."""
        conn = self._connection()
        conn.execute("BEGIN IMMEDIATE")
        try:
            yield conn
        except BaseException:
            conn.execute("ROLLBACK")
            raise
        conn.execute("COMMIT")

    def _rows(self, sql: str, params: Iterable[Any] = ()) -> list[dict[str, Any]]:
        return [dict(row) for row in self._connection().execute(sql, tuple(params)).fetchall()]

    def _one(self, sql: str, params: Iterable[Any] = ()) -> dict[str, Any] | None:
        return next(iter(self._rows(sql, params)), None)

    def close(self) -> None:
        """Close every connection this process opened on the registry (the studio's shutdown). Using the
        store afterwards opens a fresh connection, so a late request fails no worse than a slow one."""
        with self._opened_lock:
            opened, self._opened = self._opened, []
            self._generation += 1
        for pid, conn in opened:
            if pid == os.getpid():  # one inherited through a fork belongs to the parent
                with contextlib.suppress(sqlite3.Error):
                    conn.close()

    def add_dataset(self, name: str, path: str | os.PathLike, summary: dict[str, Any] | None = None) -> str:
        dataset_id = new_id("data")
        with self.transaction() as db:
            db.execute(
                "INSERT INTO datasets(id, name, path, created, summary) VALUES (?, ?, ?, ?, ?)",
                (dataset_id, name, str(path), time.time(), json.dumps(summary or {})),
            )
        return dataset_id

    def get_dataset(self, dataset_id: str) -> dict[str, Any] | None:
        return _decode_json(self._one("SELECT * FROM datasets WHERE id = ?", (dataset_id,)), "summary")

    def list_datasets(self) -> list[dict[str, Any]]:
        return [_decode_json(row, "summary") for row in self._rows("SELECT * FROM datasets ORDER BY created DESC")]

    def update_dataset_summary(self, dataset_id: str, **values: Any) -> None:
        summary = (self.get_dataset(dataset_id) or {}).get("summary") or {}
        with self.transaction() as db:
            db.execute("UPDATE datasets SET summary = ? WHERE id = ?", (json.dumps({**summary, **values}), dataset_id))

    def create_run(self, name: str, config_yaml: str, dataset_id: str | None = None) -> dict[str, Any]:
        """Register a queued run; its out_dir is runs/<id> inside the workspace."""
        run_id = new_id("run")
        out_dir = self.runs_dir / run_id
        with self.transaction() as db:
            db.execute(
                "INSERT INTO runs(id, name, status, config, out_dir, dataset_id, created) VALUES (?, ?, 'queued', ?, ?, ?, ?)",
                (run_id, name or run_id, config_yaml, str(out_dir), dataset_id, time.time()),
            )
        return self.get_run(run_id)

    def get_run(self, run_id: str) -> dict[str, Any] | None:
        return self._one("SELECT * FROM runs WHERE id = ?", (run_id,))

    def list_runs(self, statuses: Iterable[str] | None = None) -> list[dict[str, Any]]:
        if statuses is None:
            return self._rows("SELECT * FROM runs ORDER BY created DESC")
        statuses = tuple(statuses)
        marks = ",".join("?" * len(statuses))
        return self._rows(f"SELECT * FROM runs WHERE status IN ({marks}) ORDER BY created", statuses)

    def update_run(self, run_id: str, **fields: Any) -> None:
        """Set a run's other fields (progress, pid, ...); its status changes only through transition_run."""
        if "status" in fields:
            raise ValueError("a run's status changes only through transition_run, which checks run_states' table")
        _check_run_fields(fields)
        assignments = ", ".join(f"{key} = ?" for key in fields)
        with self.transaction() as db:
            db.execute(f"UPDATE runs SET {assignments} WHERE id = ?", (*fields.values(), run_id))

    def transition_run(self, run_id: str, status: str, expected: Iterable[str] | None = None, **fields: Any) -> bool:
        """Move a run to `status` and set `fields`, only if run_states allows the move from its current status
        (and that status is one of `expected`, when given): a compare-and-set; True if the run changed.

        The UI and a worker may both try to move a run (stop against finish); the first one wins and the
        other gets False. Naming an unknown status, or an `expected` status that can never reach `status`,
        is a mistake in the caller and raises ValueError."""
        if status not in RUN_STATUSES:
            raise ValueError(f"unknown run status {status!r}; one of {RUN_STATUSES}")
        allowed = run_states.sources(status)
        if expected is not None:
            impossible = sorted(set(expected) - set(allowed))
            if impossible:
                raise ValueError(
                    f"a run cannot move from {impossible} to {status!r}; the table allows it from {allowed}"
                )
            allowed = tuple(expected)
        _check_run_fields(fields)
        assignments = ", ".join(f"{key} = ?" for key in ("status", *fields))
        marks = ",".join("?" * len(allowed))
        with self.transaction() as db:
            cursor = db.execute(
                f"UPDATE runs SET {assignments} WHERE id = ? AND status IN ({marks})",
                (status, *fields.values(), run_id, *allowed),
            )
            return cursor.rowcount == 1

    def add_metrics(self, run_id: str, rows: Iterable[tuple[int, str, Any]]) -> int:
        """Store (step, key, value) rows in one transaction. Finite numbers go to `value`; anything else
        (lists such as expert utilisation, text such as sample generations) is kept as JSON."""
        now = time.time()
        records = []
        for step, key, value in rows:
            if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value):
                records.append((run_id, int(step), key, float(value), None, now))
            else:
                records.append((run_id, int(step), key, None, json.dumps(value, default=str), now))
        if records:
            with self.transaction() as db:
                db.executemany(
                    "INSERT INTO metrics(run_id, step, key, value, json, t) VALUES (?, ?, ?, ?, ?, ?)", records
                )
        return len(records)

    def drop_metrics_after(self, run_id: str, step: int) -> None:
        """A resumed run repeats the steps after its checkpoint; their old rows go so each step appears once."""
        with self.transaction() as db:
            db.execute("DELETE FROM metrics WHERE run_id = ? AND step > ?", (run_id, step))

    def metrics(self, run_id: str, keys: Iterable[str] | None = None, after_step: int = -1) -> list[dict[str, Any]]:
        """Rows {step, key, value, t} in step order; `value` is the number or the decoded JSON."""
        sql, params = (
            "SELECT step, key, value, json, t FROM metrics WHERE run_id = ? AND step > ?",
            [run_id, after_step],
        )
        if keys is not None:
            keys = list(keys)
            sql += f" AND key IN ({','.join('?' * len(keys))})"
            params += keys
        rows = self._rows(sql + " ORDER BY step, rowid", params)
        for row in rows:
            encoded = row.pop("json")
            if encoded is not None:
                row["value"] = json.loads(encoded)
        return rows

    def series(self, run_id: str, key: str) -> tuple[list[int], list[Any]]:
        rows = self.metrics(run_id, [key])
        return [r["step"] for r in rows], [r["value"] for r in rows]

    def metric_count(self, run_id: str) -> int:
        return self._connection().execute("SELECT COUNT(*) FROM metrics WHERE run_id = ?", (run_id,)).fetchone()[0]

    def metric_keys(self, run_id: str) -> list[str]:
        return [
            r["key"] for r in self._rows("SELECT DISTINCT key FROM metrics WHERE run_id = ? ORDER BY key", (run_id,))
        ]

    def metrics_csv(self, run_id: str) -> str:
        """One row per step, one column per numeric key (the results.csv shape)."""
        table: dict[int, dict[str, float]] = {}
        for row in self._rows("SELECT step, key, value FROM metrics WHERE run_id = ? AND value IS NOT NULL", (run_id,)):
            table.setdefault(row["step"], {})[row["key"]] = row["value"]
        keys = sorted({key for values in table.values() for key in values})
        out = io.StringIO()
        writer = csv.writer(out, lineterminator="\n")
        writer.writerow(["step", *keys])
        for step in sorted(table):
            writer.writerow([step, *(table[step].get(key, "") for key in keys)])
        return out.getvalue()

    def add_events(self, run_id: str | None, events: Iterable[tuple[float, str, Any]]) -> None:
        records = [(run_id, t, kind, json.dumps(payload, default=str)) for t, kind, payload in events]
        if records:
            with self.transaction() as db:
                db.executemany("INSERT INTO events(run_id, t, kind, payload) VALUES (?, ?, ?, ?)", records)

    def events(self, run_id: str, kinds: Iterable[str] | None = None, after_id: int = 0) -> list[dict[str, Any]]:
        sql, params = "SELECT * FROM events WHERE run_id = ? AND id > ?", [run_id, after_id]
        if kinds is not None:
            kinds = list(kinds)
            sql += f" AND kind IN ({','.join('?' * len(kinds))})"
            params += kinds
        return [_decode_json(row, "payload") for row in self._rows(sql + " ORDER BY id", params)]

    def add_model(
        self, name: str, path: str | os.PathLike, kind: str = "bundle", run_id: str | None = None, card: str = ""
    ) -> str:
        existing = self._one("SELECT id FROM models WHERE path = ?", (str(path),))
        if existing:  # re-registering the same folder (a run finishing twice, an import) updates it
            with self.transaction() as db:
                db.execute(
                    "UPDATE models SET name = ?, kind = ?, card = ? WHERE id = ?", (name, kind, card, existing["id"])
                )
            return existing["id"]
        model_id = new_id("model")
        with self.transaction() as db:
            db.execute(
                "INSERT INTO models(id, name, path, kind, run_id, created, card) VALUES (?, ?, ?, ?, ?, ?, ?)",
                (model_id, name, str(path), kind, run_id, time.time(), card),
            )
        return model_id

    def get_model(self, model_id: str) -> dict[str, Any] | None:
        return self._one("SELECT * FROM models WHERE id = ?", (model_id,))

    def list_models(self) -> list[dict[str, Any]]:
        return self._rows("SELECT * FROM models ORDER BY created DESC")

    def delete_model(self, model_id: str) -> None:
        with self.transaction() as db:
            db.execute("DELETE FROM models WHERE id = ?", (model_id,))

    def get_setting(self, key: str, default: Any = None) -> Any:
        row = self._one("SELECT value FROM settings WHERE key = ?", (key,))
        return json.loads(row["value"]) if row else default

    def set_setting(self, key: str, value: Any) -> None:
        with self.transaction() as db:
            db.execute("INSERT OR REPLACE INTO settings(key, value) VALUES (?, ?)", (key, json.dumps(value)))


def _check_run_fields(fields: dict[str, Any]) -> None:
    unknown = set(fields) - _RUN_FIELDS
    if unknown:
        raise ValueError(f"cannot set run fields {sorted(unknown)}; settable: {sorted(_RUN_FIELDS)}")


def _decode_json(row: dict[str, Any] | None, column: str) -> dict[str, Any] | None:
    if row is not None and row.get(column):
        row[column] = json.loads(row[column])
    return row
