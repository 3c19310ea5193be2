"""Moving VMs between nodes: live migration of one VM, and draining a whole node.

The coordinator only orchestrates (DESIGN §4): it asks the destination to prepare an
incoming VM, hands the endpoint and one-time token to the source, follows the source's
statistics, and when the switchover is complete moves ownership in the store (generation
+1) before discarding the source's copy. Any failure before the switchover leaves the VM
running on the source, and the destination's half-built copy is removed.
"""

from __future__ import annotations

import logging

import grpc
import trio

from coordinator.cluster import READY, Cluster
from coordinator.errors import CoordinatorError, invalid, precondition
from coordinator.operations import FAILED, RUNNING, SUCCEEDED
from protos.ferry.v1 import coordinator_pb2, node_pb2, types_pb2

log = logging.getLogger("ferry-coordinator")

_TERMINAL = {
    types_pb2.MIGRATION_STATE_COMPLETED,
    types_pb2.MIGRATION_STATE_FAILED,
    types_pb2.MIGRATION_STATE_CANCELLED,
    # The stream broke after the final message: only the destination knows the outcome.
    types_pb2.MIGRATION_STATE_UNKNOWN,
}
DEFAULT_PARALLEL = 2
# How long a destination may keep an UNKNOWN outcome open (still INCOMING) before the
# coordinator removes its copy: the final message was sent before the stream broke, so a
# destination that was going to resume has done so long before this.
SETTLE_TIMEOUT = 5.0


_MOVING = (types_pb2.MIGRATION_STATE_ACTIVE, types_pb2.MIGRATION_STATE_DEVICE)


def migration_progress(status: types_pb2.MigrationStatus) -> tuple[float | None, str]:
    """(progress in [0, 0.99], one-line message) of a migration; progress is None (keep
    what was shown) outside the phases that move memory.

    Progress is the share of guest RAM not waiting to be sent: in round 0, how far the
    scan of RAM has come; after it, how little is dirty. Bytes sent would not do: zero
    pages are never sent, so a mostly empty guest would sit near 0 until the end, and a
    guest that dirties memory faster than the link would creep towards 100% while getting
    no closer. A migration that does not converge stays where it is.
    """
    state = types_pb2.MigrationState.Name(status.status).removeprefix("MIGRATION_STATE_").lower()
    if status.status == types_pb2.MIGRATION_STATE_ACTIVE:
        # The rounds listed while it runs are the finished ones: the next is under way.
        state += f", round {status.rounds[-1].number + 1 if status.rounds else 0}"
    message = f"{state}: {status.transferred >> 20} MiB sent"
    if status.status not in _MOVING or not status.total:
        return None, message
    left = min(status.remaining, status.total)
    message += f", {status.remaining >> 20} MiB to go"
    if status.cpu_throttle_percentage:
        message += f", vCPU throttled {status.cpu_throttle_percentage}%"
    return min(0.99, 1 - left / status.total), message


class Mover:
    """Runs migrations and drains as background tasks recorded in operations."""

    def __init__(self, cluster: Cluster, nursery: trio.Nursery) -> None:
        self.cluster = cluster
        self.nursery = nursery

    # -- one VM ----------------------------------------------------------------------------

    def migrate(
        self, name: str, node: str, options: types_pb2.MigrationOptions
    ) -> coordinator_pb2.Operation:
        """Validate, choose the destination, and start the migration; returns its operation."""
        c = self.cluster
        vm = c.idle_vm(name)
        if node:
            c.node(node)
            if node == vm.node:
                raise invalid(f"VM {name} already runs on {node}")
        if c.nodes[vm.node].state != READY:
            raise precondition(f"VM {name} is on node {vm.node}, which is down")
        if vm.state != types_pb2.VM_STATE_RUNNING:
            raise precondition(
                f"VM {name} is {types_pb2.VMState.Name(vm.state).removeprefix('VM_STATE_').lower()}"
                "; only a running VM can be live-migrated"
            )
        dest = c.place(vm, only=node, exclude=vm.node)
        item = coordinator_pb2.OperationItem(
            vm=name, state=RUNNING, source=vm.node, destination=dest, message="queued"
        )
        op = c.ops.start("migrate-vm", name, [item])
        vm.operation = op.id
        c.moving[name] = dest
        self.nursery.start_soon(self._run_one, op, name, dest, options)
        return op

    async def _run_one(
        self,
        op: coordinator_pb2.Operation,
        name: str,
        dest: str,
        options: types_pb2.MigrationOptions,
    ) -> None:
        error = ""
        try:
            await self._migrate(op, op.items[0], name, dest, options)
        except CoordinatorError as e:
            error = e.message
        self.cluster.ops.finish(op, error)

    async def _migrate(
        self,
        op: coordinator_pb2.Operation,
        item: coordinator_pb2.OperationItem,
        name: str,
        dest: str,
        options: types_pb2.MigrationOptions,
    ) -> None:
        """Live-migrate ``name`` to ``dest``; raises CoordinatorError (item marked failed)."""
        c = self.cluster
        vm = c.vms[name]
        source = vm.node
        item.source = source
        item.destination = dest
        try:
            item.message = "preparing the destination"
            c.ops.save(op)
            c.ops.event(
                "vm-migrating",
                node=source,
                vm=name,
                message=f"VM {name}: {source} -> {dest}",
                op=op,
            )
            prepared = await c.call(
                dest, "PrepareIncoming", node_pb2.PrepareIncomingRequest(spec=vm.spec)
            )
            item.message = "migrating"
            c.ops.save(op)
            await c.call(
                source,
                "StartMigration",
                node_pb2.StartMigrationRequest(
                    name=name,
                    destination_endpoint=prepared.endpoint,
                    token=prepared.token,
                    options=options,
                ),
            )
            final = await self._follow(op, item, source, name)
            if final.status == types_pb2.MIGRATION_STATE_UNKNOWN:
                final = await self._settle_unknown(final, name, source, dest)
            if final.status != types_pb2.MIGRATION_STATE_COMPLETED:
                state = types_pb2.MigrationState.Name(final.status).removeprefix("MIGRATION_STATE_")
                raise CoordinatorError(
                    grpc.StatusCode.ABORTED,
                    f"migration of {name} {state.lower()}: {final.error or 'no reason given'}",
                )
        except Exception as caught:
            e = _as_error(caught, name)
            c.moving.pop(name, None)
            vm.operation = ""
            item.state = FAILED
            item.message = e.message
            c.ops.save(op)
            c.ops.event(
                "vm-migration-failed",
                node=source,
                vm=name,
                message=f"migration failed: {e.message}",
                op=op,
            )
            # The VM still runs on the source; the destination's half-built copy must go.
            try:
                await c.call(dest, "DestroyVM", node_pb2.VMRef(name=name), timeout=30)
            except CoordinatorError as cleanup:
                if cleanup.code != grpc.StatusCode.NOT_FOUND:
                    log.warning("cleaning up %s on %s: %s", name, dest, cleanup.message)
            raise e from None
        with c.store.transaction():
            vm.node = dest
            vm.generation += 1
            vm.operation = ""
            vm.state = types_pb2.VM_STATE_RUNNING
            c.moving.pop(name, None)
            c.store.put_vm(vm)
            item.state = SUCCEEDED
            item.progress = 1.0
            item.message = "completed"
            c.ops.save(op)
        c.ops.event(
            "vm-migrated",
            node=dest,
            vm=name,
            message=(
                f"VM {name}: {source} -> {dest}, downtime {item.migration.downtime_ms:.1f} ms, "
                f"total {item.migration.total_time_ms:.0f} ms"
            ),
            op=op,
        )
        try:
            await c.call(source, "DestroyVM", node_pb2.VMRef(name=name), timeout=30)
        except CoordinatorError as e:
            log.warning("discarding the migrated copy of %s on %s: %s", name, source, e.message)
        try:
            info = await c.call(dest, "GetVM", node_pb2.VMRef(name=name), timeout=10)
            if c.vms.get(name) is vm and not vm.operation:
                c._observe(vm, info)
                c.store.put_vm(vm)
        except CoordinatorError:
            pass

    async def _settle_unknown(
        self, final: types_pb2.MigrationStatus, name: str, source: str, dest: str
    ) -> types_pb2.MigrationStatus:
        """The stream broke after the final message: the destination says who runs the guest.

        The source holds its copy paused until told. If the destination runs the guest the
        migration completed; otherwise the source resumes and the migration failed.
        """
        c = self.cluster
        settled = types_pb2.MigrationStatus()
        settled.CopyFrom(final)
        running = False
        # An incoming VM that still waits may yet resume (the final message in flight):
        # give it a moment, then make sure it never does by removing it.
        for _ in range(int(SETTLE_TIMEOUT / 0.1)):
            try:
                info = await c.call(dest, "GetVM", node_pb2.VMRef(name=name), timeout=30)
            except CoordinatorError:
                break
            if info.state != types_pb2.VM_STATE_INCOMING:
                running = info.state == types_pb2.VM_STATE_RUNNING
                break
            await trio.sleep(0.1)
        else:
            # Still waiting: removing the incoming copy makes sure it never resumes there.
            try:
                await c.call(dest, "DestroyVM", node_pb2.VMRef(name=name), timeout=30)
            except CoordinatorError as e:
                raise CoordinatorError(
                    grpc.StatusCode.ABORTED,
                    f"migration of {name}: outcome unknown and {dest} did not settle "
                    f"({e.message}); the VM stays paused on {source}",
                ) from None
        if running:
            settled.status = types_pb2.MIGRATION_STATE_COMPLETED
            return settled
        await c.call(source, "ResumeVM", node_pb2.VMRef(name=name), timeout=30)
        settled.status = types_pb2.MIGRATION_STATE_FAILED
        settled.error = final.error or "the stream broke at switchover; the source resumed"
        return settled

    async def _follow(
        self,
        op: coordinator_pb2.Operation,
        item: coordinator_pb2.OperationItem,
        source: str,
        name: str,
    ) -> types_pb2.MigrationStatus:
        """Copy the source's migration statistics into the operation until it ends."""
        c = self.cluster
        stub = c.stub(source)

        def update(status: types_pb2.MigrationStatus) -> None:
            item.migration.CopyFrom(status)
            progress, item.message = migration_progress(status)
            if progress is not None:
                item.progress = progress
            c.ops.save(op)

        def watch() -> None:
            try:
                for status in stub.WatchMigration(node_pb2.VMRef(name=name), timeout=900):
                    trio.from_thread.run_sync(update, status)
                    if status.status in _TERMINAL:
                        return
            except grpc.RpcError as e:
                log.info("watching the migration of %s ended: %s", name, e.code())

        await trio.to_thread.run_sync(watch, abandon_on_cancel=True)
        # The stream may end before the last status (or not exist): ask until it is final.
        while True:
            status = await c.call(source, "GetMigration", node_pb2.VMRef(name=name), timeout=30)
            if status.status in _TERMINAL:
                update(status)
                return status
            update(status)
            await trio.sleep(0.1)

    # -- a whole node ------------------------------------------------------------------------

    def drain(self, request: coordinator_pb2.DrainNodeRequest) -> coordinator_pb2.Operation:
        c = self.cluster
        node = c.node(request.name)
        if node.state != READY:
            raise precondition(f"node {request.name} is down; a drain needs it to migrate VMs")
        if node.draining:
            raise precondition(f"node {request.name} is already draining")
        names = sorted(v.spec.name for v in c.vms.values() if v.node == request.name)
        for name in names:
            c.idle_vm(name)
        items = [
            coordinator_pb2.OperationItem(
                vm=n, state=RUNNING, source=request.name, message="queued"
            )
            for n in names
        ]
        op = c.ops.start("drain-node", request.name, items)
        with c.store.transaction():
            node.cordoned = True
            node.draining = True
            node.drained = False
            c.store.put_node(node)
        for name in names:
            c.vms[name].operation = op.id
        c.ops.event(
            "node-cordoned", node=request.name, message=f"node {request.name} draining", op=op
        )
        parallel = request.max_parallel or c.settings.drain_parallel or DEFAULT_PARALLEL
        self.nursery.start_soon(self._run_drain, op, request.name, parallel, request.options)
        return op

    async def _run_drain(
        self,
        op: coordinator_pb2.Operation,
        node_name: str,
        parallel: int,
        options: types_pb2.MigrationOptions,
    ) -> None:
        c = self.cluster
        limit = trio.Semaphore(parallel)

        async def move(item: coordinator_pb2.OperationItem) -> None:
            async with limit:
                vm = c.vms.get(item.vm)
                if vm is None:
                    item.state = SUCCEEDED
                    item.progress = 1.0
                    item.message = "deleted meanwhile"
                    c.ops.save(op)
                    return
                vm.operation = ""
                try:
                    dest = c.place(vm, exclude=node_name)
                except CoordinatorError as e:
                    item.state = FAILED
                    item.message = f"cannot be placed: {e.message}"
                    c.ops.save(op)
                    return
                vm.operation = op.id
                c.moving[item.vm] = dest
                item.destination = dest
                try:
                    if vm.state == types_pb2.VM_STATE_RUNNING:
                        await self._migrate(op, item, item.vm, dest, options)
                    else:
                        await self._cold_move(op, item, item.vm, dest)
                except CoordinatorError:
                    pass  # recorded in the item

        async with trio.open_nursery() as nursery:
            for item in op.items:
                nursery.start_soon(move, item)
        node = c.nodes[node_name]
        failed = [i for i in op.items if i.state != SUCCEEDED]
        with c.store.transaction():
            node.draining = False
            node.drained = not failed
            c.store.put_node(node)
        if failed:
            reasons = "; ".join(f"{i.vm}: {i.message}" for i in failed)
            c.ops.finish(op, f"{len(failed)} of {len(op.items)} VMs were not moved ({reasons})")
        else:
            c.ops.finish(op)
            c.ops.event(
                "node-drained",
                node=node_name,
                message=f"node {node_name} drained: {len(op.items)} VMs moved",
                op=op,
            )

    async def _cold_move(
        self,
        op: coordinator_pb2.Operation,
        item: coordinator_pb2.OperationItem,
        name: str,
        dest: str,
    ) -> None:
        """A VM that is not running moves as its spec: built on the destination, not started."""
        c = self.cluster
        vm = c.vms[name]
        source = vm.node
        try:
            item.message = "moving (not running)"
            c.ops.save(op)
            info = await c.call(
                dest, "CreateVM", node_pb2.CreateVMRequest(spec=vm.spec, start=False)
            )
        except Exception as caught:
            e = _as_error(caught, name)
            c.moving.pop(name, None)
            vm.operation = ""
            item.state = FAILED
            item.message = e.message
            c.ops.save(op)
            raise e from None
        with c.store.transaction():
            vm.node = dest
            vm.generation += 1
            c.boots[name] = vm.generation  # rebuilt from its spec: a new console
            vm.operation = ""
            c.moving.pop(name, None)
            c._observe(vm, info, quiet=True)
            c.store.put_vm(vm)
            item.state = SUCCEEDED
            item.progress = 1.0
            item.message = "moved (not running)"
            c.ops.save(op)
        c.ops.event(
            "vm-migrated",
            node=dest,
            vm=name,
            message=f"VM {name}: {source} -> {dest} (not running)",
            op=op,
        )
        try:
            await c.call(source, "DestroyVM", node_pb2.VMRef(name=name), timeout=30)
        except CoordinatorError as e:
            log.warning("removing the moved VM %s from %s: %s", name, source, e.message)


def _as_error(error: Exception, vm: str) -> CoordinatorError:
    """A failure of a background move as the one line its operation reports.

    Anything but a CoordinatorError is a bug: it is logged with its traceback and fails this
    VM's move only, never the coordinator (whose nursery would otherwise go down with it).
    """
    if isinstance(error, CoordinatorError):
        return error
    log.exception("moving VM %s", vm)
    return CoordinatorError(
        grpc.StatusCode.INTERNAL, f"internal error: {type(error).__name__}: {error}"
    )
