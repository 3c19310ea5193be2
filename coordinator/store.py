"""The coordinator's state store: the interface every backend implements.

The coordinator keeps its working view in memory and writes every change through to a
store, so a restarted coordinator reads back the same nodes, VMs, operations and events.
Records are the API's own protobuf messages: the store persists what users see, and a new
field in the API needs no schema migration. A backend must make each ``transaction()``
atomic (an ownership change and the operation that made it land together or not at all);
SQLite does this in one file, and an etcd backend would with a txn.
"""

from __future__ import annotations

from contextlib import AbstractContextManager
from typing import Protocol

from protos.ferry.v1 import coordinator_pb2


class Store(Protocol):
    """Durable nodes, VMs, operations and events."""

    def transaction(self) -> AbstractContextManager[None]:
        """Group the writes made inside into one atomic commit (nesting joins the outer)."""
        ...

    def load_nodes(self) -> list[coordinator_pb2.Node]: ...

    def put_node(self, node: coordinator_pb2.Node) -> None: ...

    def load_vms(self) -> list[coordinator_pb2.VM]: ...

    def put_vm(self, vm: coordinator_pb2.VM) -> None: ...

    def delete_vm(self, name: str) -> None: ...

    def put_operation(self, operation: coordinator_pb2.Operation) -> None: ...

    def get_operation(self, operation_id: str) -> coordinator_pb2.Operation | None: ...

    def list_operations(self, limit: int, target: str = "") -> list[coordinator_pb2.Operation]:
        """Newest first."""
        ...

    def unfinished_operations(self) -> list[coordinator_pb2.Operation]: ...

    def append_event(self, event: coordinator_pb2.Event) -> int:
        """Store the event under the next sequence number and return that number."""
        ...

    def events_after(self, seq: int, limit: int = 1000) -> list[coordinator_pb2.Event]: ...

    def close(self) -> None: ...
