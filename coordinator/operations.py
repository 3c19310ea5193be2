"""Operations and events: the coordinator's record of every change, and how clients follow it.

Everything lives in the trio loop. Each change is written through to the store and then
wakes everyone waiting in :meth:`OperationLog.wait_change` (the gRPC streaming handlers, in
their threads, poll that with a timeout so a departed client is noticed).
"""

from __future__ import annotations

import time
import uuid

import trio

from coordinator.store import Store
from protos.ferry.v1 import coordinator_pb2

RUNNING = coordinator_pb2.OPERATION_STATE_RUNNING
SUCCEEDED = coordinator_pb2.OPERATION_STATE_SUCCEEDED
FAILED = coordinator_pb2.OPERATION_STATE_FAILED


class OperationLog:
    """Creates, updates and finishes operations; appends events; wakes watchers."""

    def __init__(self, store: Store) -> None:
        self.store = store
        self.running: dict[str, coordinator_pb2.Operation] = {}
        self._changed = trio.Event()

    def notify(self) -> None:
        self._changed.set()
        self._changed = trio.Event()

    async def wait_change(self, timeout: float) -> None:
        """Return at the next change, or after ``timeout`` seconds."""
        changed = self._changed
        with trio.move_on_after(timeout):
            await changed.wait()

    def start(
        self, kind: str, target: str, items: list[coordinator_pb2.OperationItem] | None = None
    ) -> coordinator_pb2.Operation:
        now = time.time()
        op = coordinator_pb2.Operation(
            id=f"op-{uuid.uuid4().hex[:12]}",
            kind=kind,
            target=target,
            state=RUNNING,
            created_at=now,
            updated_at=now,
            items=items or [],
        )
        self.running[op.id] = op
        self.save(op)
        return op

    def save(self, op: coordinator_pb2.Operation) -> None:
        """Persist the operation's current state (call after changing it)."""
        op.updated_at = time.time()
        if op.items:
            op.progress = sum(i.progress for i in op.items) / len(op.items)
        self.store.put_operation(op)
        self.notify()

    def finish(self, op: coordinator_pb2.Operation, error: str = "") -> None:
        op.state = FAILED if error else SUCCEEDED
        op.error = error
        if not error:
            op.progress = 1.0
        self.running.pop(op.id, None)
        self.save(op)
        if error:
            self.event("operation-failed", message=f"{op.kind} {op.target}: {error}", op=op)

    def get(self, op_id: str) -> coordinator_pb2.Operation | None:
        op = self.running.get(op_id)
        if op is not None:
            copy = coordinator_pb2.Operation()
            copy.CopyFrom(op)
            return copy
        return self.store.get_operation(op_id)

    def event(
        self,
        kind: str,
        *,
        node: str = "",
        vm: str = "",
        message: str = "",
        op: coordinator_pb2.Operation | None = None,
    ) -> None:
        self.store.append_event(
            coordinator_pb2.Event(
                time=time.time(),
                kind=kind,
                node=node,
                vm=vm,
                message=message,
                operation=op.id if op is not None else "",
            )
        )
        self.notify()

    def abandon_unfinished(self) -> None:
        """Operations a previous coordinator process left running can never finish now."""
        for op in self.store.unfinished_operations():
            for item in op.items:
                if item.state == RUNNING:
                    item.state = FAILED
                    item.message = "the coordinator restarted while this ran"
            op.state = FAILED
            op.error = "the coordinator restarted while this operation ran"
            self.store.put_operation(op)
