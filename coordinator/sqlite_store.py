"""The default state store: one SQLite file (WAL mode), nothing to install.

WAL lets readers (a second coordinator process opened read-only for debugging, or
``sqlite3`` on the command line) look at the file while the coordinator writes; every write
is a short transaction, and a crash loses at most the transaction in flight.
"""

from __future__ import annotations

import contextlib
import sqlite3
from collections.abc import Iterator
from pathlib import Path

from protos.ferry.v1 import coordinator_pb2

SCHEMA_VERSION = 1

_SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS nodes (name TEXT PRIMARY KEY, data BLOB NOT NULL);
CREATE TABLE IF NOT EXISTS vms (name TEXT PRIMARY KEY, data BLOB NOT NULL);
CREATE TABLE IF NOT EXISTS operations (
    id TEXT PRIMARY KEY,
    created_at REAL NOT NULL,
    target TEXT NOT NULL,
    finished INTEGER NOT NULL,
    data BLOB NOT NULL
);
CREATE INDEX IF NOT EXISTS operations_by_time ON operations (created_at);
CREATE TABLE IF NOT EXISTS events (seq INTEGER PRIMARY KEY AUTOINCREMENT, data BLOB NOT NULL);
"""

_RUNNING = coordinator_pb2.OPERATION_STATE_RUNNING


class StoreError(Exception):
    """The state file cannot be used (wrong format, newer schema, unwritable)."""


class SqliteStore:
    """:class:`coordinator.store.Store` on one SQLite file."""

    def __init__(self, path: Path | str) -> None:
        try:
            # The coordinator calls the store only from its trio thread, but it is opened
            # before trio starts; check_same_thread would reject that hand-over.
            self._db = sqlite3.connect(str(path), isolation_level=None, check_same_thread=False)
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute("PRAGMA synchronous=NORMAL")
            self._db.executescript(_SCHEMA)
            row = self._db.execute("SELECT value FROM meta WHERE key='schema'").fetchone()
        except sqlite3.DatabaseError as e:
            raise StoreError(f"state file {path}: {e}") from None
        if row is None:
            self._db.execute("INSERT INTO meta VALUES ('schema', ?)", (str(SCHEMA_VERSION),))
        elif int(row[0]) > SCHEMA_VERSION:
            raise StoreError(
                f"state file {path} has schema {row[0]}, newer than this coordinator's "
                f"{SCHEMA_VERSION}"
            )
        self._depth = 0

    @contextlib.contextmanager
    def transaction(self) -> Iterator[None]:
        if self._depth:
            self._depth += 1
            try:
                yield
            finally:
                self._depth -= 1
            return
        self._db.execute("BEGIN IMMEDIATE")
        self._depth = 1
        try:
            yield
        except BaseException:
            self._depth = 0
            self._db.execute("ROLLBACK")
            raise
        self._depth = 0
        self._db.execute("COMMIT")

    def load_nodes(self) -> list[coordinator_pb2.Node]:
        rows = self._db.execute("SELECT data FROM nodes ORDER BY name").fetchall()
        return [coordinator_pb2.Node.FromString(r[0]) for r in rows]

    def put_node(self, node: coordinator_pb2.Node) -> None:
        self._db.execute(
            "INSERT OR REPLACE INTO nodes VALUES (?, ?)", (node.name, node.SerializeToString())
        )

    def load_vms(self) -> list[coordinator_pb2.VM]:
        rows = self._db.execute("SELECT data FROM vms ORDER BY name").fetchall()
        return [coordinator_pb2.VM.FromString(r[0]) for r in rows]

    def put_vm(self, vm: coordinator_pb2.VM) -> None:
        self._db.execute(
            "INSERT OR REPLACE INTO vms VALUES (?, ?)", (vm.spec.name, vm.SerializeToString())
        )

    def delete_vm(self, name: str) -> None:
        self._db.execute("DELETE FROM vms WHERE name = ?", (name,))

    def put_operation(self, operation: coordinator_pb2.Operation) -> None:
        self._db.execute(
            "INSERT OR REPLACE INTO operations VALUES (?, ?, ?, ?, ?)",
            (
                operation.id,
                operation.created_at,
                operation.target,
                int(operation.state != _RUNNING),
                operation.SerializeToString(),
            ),
        )

    def get_operation(self, operation_id: str) -> coordinator_pb2.Operation | None:
        row = self._db.execute(
            "SELECT data FROM operations WHERE id = ?", (operation_id,)
        ).fetchone()
        return None if row is None else coordinator_pb2.Operation.FromString(row[0])

    def list_operations(self, limit: int, target: str = "") -> list[coordinator_pb2.Operation]:
        if target:
            rows = self._db.execute(
                "SELECT data FROM operations WHERE target = ? "
                "ORDER BY created_at DESC, id DESC LIMIT ?",
                (target, limit),
            ).fetchall()
        else:
            rows = self._db.execute(
                "SELECT data FROM operations ORDER BY created_at DESC, id DESC LIMIT ?", (limit,)
            ).fetchall()
        return [coordinator_pb2.Operation.FromString(r[0]) for r in rows]

    def unfinished_operations(self) -> list[coordinator_pb2.Operation]:
        rows = self._db.execute("SELECT data FROM operations WHERE finished = 0").fetchall()
        return [coordinator_pb2.Operation.FromString(r[0]) for r in rows]

    def append_event(self, event: coordinator_pb2.Event) -> int:
        with self.transaction():
            cursor = self._db.execute("INSERT INTO events (data) VALUES (x'')")
            seq = cursor.lastrowid
            assert seq is not None
            event.seq = seq
            self._db.execute(
                "UPDATE events SET data = ? WHERE seq = ?", (event.SerializeToString(), seq)
            )
        return seq

    def events_after(self, seq: int, limit: int = 1000) -> list[coordinator_pb2.Event]:
        rows = self._db.execute(
            "SELECT data FROM events WHERE seq > ? ORDER BY seq LIMIT ?", (seq, limit)
        ).fetchall()
        return [coordinator_pb2.Event.FromString(r[0]) for r in rows]

    def close(self) -> None:
        self._db.close()
