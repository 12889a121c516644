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

DEFAULT_WORKSPACE = Path.home() / "ApertisStudio"
RUN_STATUSES = ("queued", "running", "stopping", "finished", "failed", "interrupted")
ACTIVE_STATUSES = ("running", "stopping")  # a worker process should be alive
RESUMABLE_STATUSES = ("finished", "failed", "interrupted")

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

_RUN_FIELDS = {"name", "status", "pid", "config", "mode", "extra_steps", "step", "total_steps", "started", "ended",
               "exit_code", "exit_reason", "log_tail"}


def new_id(prefix: str) -> str:
    """Sortable, readable and unique enough for one workspace: prefix-YYYYmmdd-HHMMSS-xxxx."""
    return f"{prefix}-{time.strftime('%Y%m%d-%H%M%S')}-{secrets.token_hex(2)}"


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
        self._connection().executescript(_SCHEMA)  # executescript manages its own transaction


    def _connection(self) -> sqlite3.Connection:
        # A connection must not cross a fork or a thread boundary, so it is keyed by both.
        conn = getattr(self._local, "conn", None)
        if conn is None or self._local.pid != os.getpid():
            conn = sqlite3.connect(self.db_path, timeout=30, isolation_level=None, check_same_thread=True)
            conn.row_factory = sqlite3.Row
            conn.execute("PRAGMA journal_mode=WAL")
            conn.execute("PRAGMA busy_timeout=30000")
            conn.execute("PRAGMA synchronous=NORMAL")  # WAL + NORMAL is durable across app crashes
            self._local.conn, self._local.pid = conn, os.getpid()
        return conn

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
        """Close this thread's connection (others close when their thread ends)."""
        conn = getattr(self._local, "conn", None)
        if conn is not None:
            conn.close()
            self._local.conn = None


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

    def delete_dataset(self, dataset_id: str) -> None:
        with self.transaction() as db:
            db.execute("DELETE FROM datasets WHERE id = ?", (dataset_id,))


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
        unknown = set(fields) - _RUN_FIELDS
        if unknown:
            raise ValueError(f"cannot set run fields {sorted(unknown)}; settable: {sorted(_RUN_FIELDS)}")
        if "status" in fields and fields["status"] not in RUN_STATUSES:
            raise ValueError(f"unknown run status {fields['status']!r}; one of {RUN_STATUSES}")
        assignments = ", ".join(f"{key} = ?" for key in fields)
        with self.transaction() as db:
            db.execute(f"UPDATE runs SET {assignments} WHERE id = ?", (*fields.values(), run_id))

    def transition_run(self, run_id: str, expected: Iterable[str], **fields: Any) -> bool:
        """Update a run only if its status is one of `expected` (compare-and-set); True if it changed.

        The UI and a worker may both try to move a run (stop vs finish); this keeps the first one."""
        expected = tuple(expected)
        if set(fields) - _RUN_FIELDS:
            raise ValueError(f"cannot set run fields {sorted(set(fields) - _RUN_FIELDS)}")
        assignments = ", ".join(f"{key} = ?" for key in fields)
        marks = ",".join("?" * len(expected))
        with self.transaction() as db:
            cursor = db.execute(
                f"UPDATE runs SET {assignments} WHERE id = ? AND status IN ({marks})",
                (*fields.values(), run_id, *expected),
            )
            return cursor.rowcount == 1

    def delete_run(self, run_id: str) -> None:
        with self.transaction() as db:
            for table, column in (("metrics", "run_id"), ("events", "run_id"), ("runs", "id")):
                db.execute(f"DELETE FROM {table} WHERE {column} = ?", (run_id,))


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
                db.executemany("INSERT INTO metrics(run_id, step, key, value, json, t) VALUES (?, ?, ?, ?, ?, ?)", records)
        return len(records)

    def drop_metrics_after(self, run_id: str, step: int) -> None:
        """A resumed run repeats the steps after its checkpoint; their old rows go so each step appears once."""
        with self.transaction() as db:
            db.execute("DELETE FROM metrics WHERE run_id = ? AND step > ?", (run_id, step))

    def metrics(self, run_id: str, keys: Iterable[str] | None = None, after_step: int = -1) -> list[dict[str, Any]]:
        """Rows {step, key, value, t} in step order; `value` is the number or the decoded JSON."""
        sql, params = "SELECT step, key, value, json, t FROM metrics WHERE run_id = ? AND step > ?", [run_id, after_step]
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
        return [r["key"] for r in self._rows("SELECT DISTINCT key FROM metrics WHERE run_id = ? ORDER BY key", (run_id,))]

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


    def add_model(self, name: str, path: str | os.PathLike, kind: str = "bundle", run_id: str | None = None, card: str = "") -> str:
        existing = self._one("SELECT id FROM models WHERE path = ?", (str(path),))
        if existing:  # re-registering the same folder (a run finishing twice, an import) updates it
            with self.transaction() as db:
                db.execute("UPDATE models SET name = ?, kind = ?, card = ? WHERE id = ?", (name, kind, card, existing["id"]))
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


def _decode_json(row: dict[str, Any] | None, column: str) -> dict[str, Any] | None:
    if row is not None and row.get(column):
        row[column] = json.loads(row[column])
    return row
