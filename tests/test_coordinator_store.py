"""The SQLite state store: what a restarted coordinator reads back, and atomic commits."""

from __future__ import annotations

from pathlib import Path

import pytest

from coordinator.sqlite_store import SqliteStore, StoreError
from protos.ferry.v1 import coordinator_pb2, types_pb2


def vm(name: str, node: str = "n1", generation: int = 1) -> coordinator_pb2.VM:
    return coordinator_pb2.VM(
        spec=types_pb2.VMSpec(name=name, memory_bytes=16 << 20), node=node, generation=generation
    )


def test_everything_survives_reopening_the_file(tmp_path: Path) -> None:
    path = tmp_path / "state.db"
    store = SqliteStore(path)
    store.put_node(coordinator_pb2.Node(name="n1", address="h:1", cordoned=True))
    store.put_vm(vm("a"))
    store.put_vm(vm("b"))
    store.delete_vm("b")
    op = coordinator_pb2.Operation(
        id="op-1",
        kind="create-vm",
        target="a",
        created_at=1.0,
        state=coordinator_pb2.OPERATION_STATE_RUNNING,
    )
    store.put_operation(op)
    first = store.append_event(coordinator_pb2.Event(kind="node-up", node="n1"))
    second = store.append_event(coordinator_pb2.Event(kind="vm-placed", vm="a"))
    store.close()

    again = SqliteStore(path)
    assert [(n.name, n.cordoned) for n in again.load_nodes()] == [("n1", True)]
    assert [v.spec.name for v in again.load_vms()] == ["a"]
    assert again.get_operation("op-1") == op
    assert [o.id for o in again.unfinished_operations()] == ["op-1"]
    events = again.events_after(0)
    assert [(e.seq, e.kind) for e in events] == [(first, "node-up"), (second, "vm-placed")]
    assert second == first + 1
    assert again.events_after(first)[0].kind == "vm-placed"
    # Sequence numbers keep counting after a restart: watchers resume without gaps.
    assert again.append_event(coordinator_pb2.Event(kind="node-down")) == second + 1


def test_a_failed_transaction_leaves_nothing_behind(tmp_path: Path) -> None:
    store = SqliteStore(tmp_path / "state.db")
    store.put_vm(vm("a", "n1", 1))
    with pytest.raises(RuntimeError), store.transaction():
        store.put_vm(vm("a", "n2", 2))
        store.put_operation(coordinator_pb2.Operation(id="op-x", target="a"))
        raise RuntimeError("crash between the two writes")
    assert [(v.node, v.generation) for v in store.load_vms()] == [("n1", 1)]
    assert store.get_operation("op-x") is None
    with store.transaction(), store.transaction():  # nested: one commit
        store.put_vm(vm("a", "n2", 2))
    assert store.load_vms()[0].generation == 2


def test_operations_list_newest_first_and_by_target(tmp_path: Path) -> None:
    store = SqliteStore(tmp_path / "state.db")
    for i, target in enumerate(["a", "b", "a"]):
        store.put_operation(
            coordinator_pb2.Operation(id=f"op-{i}", target=target, created_at=float(i))
        )
    assert [o.id for o in store.list_operations(10)] == ["op-2", "op-1", "op-0"]
    assert [o.id for o in store.list_operations(10, "a")] == ["op-2", "op-0"]
    assert [o.id for o in store.list_operations(1)] == ["op-2"]


def test_a_file_that_is_not_a_state_store_is_a_clear_error(tmp_path: Path) -> None:
    bogus = tmp_path / "notes.txt"
    bogus.write_text("not a database at all, just some words " * 100)
    with pytest.raises(StoreError, match=r"notes\.txt"):
        SqliteStore(bogus)
