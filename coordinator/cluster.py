"""The coordinator's view of the cluster: nodes, VMs, their health, and reconciliation.

Every method runs in the trio loop (the gRPC handlers hop in with ``trio.from_thread.run``),
so the in-memory view needs no locks. The view is written through to the store on every
change, and a restarted coordinator loads it back, gives every node one heartbeat timeout
to check in, and reconciles what each node reports against what the store wants (desired
vs observed state, and who owns each VM).

Ownership: a VM belongs to exactly one node, recorded here with a generation number that
goes up whenever ownership moves (a migration or a reschedule after its node went down).
A copy of the VM on any other node is stale and is stopped there.
"""

from __future__ import annotations

import functools
import logging
import re
import time
from dataclasses import dataclass
from typing import Any

import grpc
import trio

from coordinator import scheduler
from coordinator.errors import (
    CoordinatorError,
    exhausted,
    exists,
    invalid,
    not_found,
    precondition,
)
from coordinator.operations import OperationLog
from coordinator.store import Store
from protos.ferry.v1 import coordinator_pb2, node_pb2, node_pb2_grpc, types_pb2

log = logging.getLogger("ferry-coordinator")

NAME_RE = re.compile(r"[a-z0-9][a-z0-9-]{0,62}")
PAGE = 4096
READY = coordinator_pb2.NODE_STATE_READY
DOWN = coordinator_pb2.NODE_STATE_DOWN

# States in which a VM holds its node's resources (the agent counts them the same way).
LIVE = {
    types_pb2.VM_STATE_CREATED,
    types_pb2.VM_STATE_RUNNING,
    types_pb2.VM_STATE_PAUSED,
    types_pb2.VM_STATE_INCOMING,
    types_pb2.VM_STATE_MIGRATING,
}
# Resources stay reserved while the coordinator cannot tell (node down, just created).
HOLDING = LIVE | {types_pb2.VM_STATE_UNKNOWN, types_pb2.VM_STATE_UNSPECIFIED}

_EVENT_FOR_STATE = {
    types_pb2.VM_STATE_RUNNING: "vm-started",
    types_pb2.VM_STATE_STOPPED: "vm-stopped",
    types_pb2.VM_STATE_FAILED: "vm-failed",
}

NODE_CALL_TIMEOUT = 60.0


@dataclass
class Settings:
    heartbeat_timeout: float = 10.0
    weigher: str = "spread"
    # What happens to a down node's VMs that should be running: "keep" waits for the node to
    # return; "restart" boots them afresh elsewhere (their memory is lost, as with HA).
    on_node_down: str = "keep"
    drain_parallel: int = 2

    @property
    def heartbeat_interval(self) -> float:
        # Three heartbeats per timeout, so one lost packet never marks a node down.
        return max(0.05, min(2.0, self.heartbeat_timeout / 3))


def state_name(state: int) -> str:
    return types_pb2.VMState.Name(state).removeprefix("VM_STATE_").lower()  # type: ignore[arg-type]


class Cluster:
    """Nodes and VMs, health, placement and the simple (synchronous) VM operations."""

    def __init__(self, store: Store, settings: Settings) -> None:
        self.store = store
        self.settings = settings
        self.ops = OperationLog(store)
        self.nodes: dict[str, coordinator_pb2.Node] = {n.name: n for n in store.load_nodes()}
        self.vms: dict[str, coordinator_pb2.VM] = {v.spec.name: v for v in store.load_vms()}
        # monotonic time of each node's last heartbeat; loaded nodes get a full timeout to
        # check in with a restarted coordinator.
        now = time.monotonic()
        self.last_seen: dict[str, float] = dict.fromkeys(self.nodes, now)
        # Nodes that have reported their VMs since this process started: only their word
        # can make a copy elsewhere stale.
        self.reported: set[str] = set()
        # What each node last said it holds (including VMs the coordinator does not manage).
        self.reported_used: dict[str, types_pb2.Resources] = {}
        # VM name -> destination node, while a migration or move is in flight.
        self.moving: dict[str, str] = {}
        # VM name -> the generation at which it last booted afresh (not carried over by a
        # live migration): console readers start over when it changes.
        self.boots: dict[str, int] = {}
        self._cleaning: set[tuple[str, str]] = set()
        self._stubs: dict[str, node_pb2_grpc.NodeAgentStub] = {}
        self._channels: dict[str, grpc.Channel] = {}
        self.nursery: trio.Nursery | None = None
        self.ops.abandon_unfinished()
        for vm in self.vms.values():
            vm.operation = ""
        for node in self.nodes.values():
            if node.draining:
                node.draining = False
                store.put_node(node)

    # -- node RPCs -------------------------------------------------------------------------

    def stub(self, node: str) -> node_pb2_grpc.NodeAgentStub:
        address = self.nodes[node].address
        stub = self._stubs.get(address)
        if stub is None:
            channel = grpc.insecure_channel(address)
            self._channels[address] = channel
            stub = self._stubs[address] = node_pb2_grpc.NodeAgentStub(channel)
        return stub

    async def call(
        self, node: str, method: str, request: Any, timeout: float = NODE_CALL_TIMEOUT
    ) -> Any:
        """Call the node's agent from a worker thread; errors become CoordinatorError."""
        fn = getattr(self.stub(node), method)
        try:
            return await trio.to_thread.run_sync(
                functools.partial(fn, request, timeout=timeout), abandon_on_cancel=True
            )
        except grpc.RpcError as e:
            code = e.code()
            if code in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED):
                raise CoordinatorError(
                    grpc.StatusCode.UNAVAILABLE, f"node {node} is unreachable ({code.name})"
                ) from None
            raise CoordinatorError(code, f"node {node}: {e.details()}") from None

    def close(self) -> None:
        for channel in self._channels.values():
            channel.close()

    # -- lookups ---------------------------------------------------------------------------

    def node(self, name: str) -> coordinator_pb2.Node:
        node = self.nodes.get(name)
        if node is None:
            raise not_found(f"no node named {name!r}")
        return node

    def vm(self, name: str) -> coordinator_pb2.VM:
        vm = self.vms.get(name)
        if vm is None:
            raise not_found(f"no VM named {name!r}")
        return vm

    def idle_vm(self, name: str) -> coordinator_pb2.VM:
        """The VM, refusing if another operation is changing it right now."""
        vm = self.vm(name)
        if vm.operation:
            raise precondition(f"VM {name} is busy with operation {vm.operation}")
        return vm

    def node_view(self, name: str) -> coordinator_pb2.Node:
        """The node as the API shows it: with current usage and VM count."""
        node = coordinator_pb2.Node()
        node.CopyFrom(self.node(name))
        vcpus, memory = self._used(name)
        node.used.vcpus = vcpus
        node.used.memory_bytes = memory
        node.vm_count = sum(1 for vm in self.vms.values() if vm.node == name)
        return node

    def _used(self, name: str) -> tuple[int, int]:
        vcpus = memory = 0
        for vm in self.vms.values():
            if vm.node == name and vm.state in HOLDING:
                vcpus += vm.spec.vcpus or 1
                memory += vm.spec.memory_bytes
        for vm_name, dest in self.moving.items():
            if dest == name and vm_name in self.vms:
                spec = self.vms[vm_name].spec
                vcpus += spec.vcpus or 1
                memory += spec.memory_bytes
        reported = self.reported_used.get(name)
        if reported is not None:
            # VMs the node runs on its own (created through its API) hold resources too.
            vcpus = max(vcpus, reported.vcpus)
            memory = max(memory, reported.memory_bytes)
        return vcpus, memory

    def scheduler_views(self) -> list[scheduler.NodeView]:
        views = []
        for name, node in sorted(self.nodes.items()):
            vcpus, memory = self._used(name)
            groups = frozenset(
                vm.anti_affinity_group
                for vm in self.vms.values()
                if vm.anti_affinity_group
                and (vm.node == name or self.moving.get(vm.spec.name) == name)
            )
            views.append(
                scheduler.NodeView(
                    name=name,
                    ready=node.state == READY,
                    capacity_vcpus=node.capacity.vcpus,
                    capacity_memory=node.capacity.memory_bytes,
                    used_vcpus=vcpus,
                    used_memory=memory,
                    cordoned=node.cordoned,
                    draining=node.draining,
                    labels=dict(node.labels),
                    groups=groups,
                )
            )
        return views

    def place(self, vm: coordinator_pb2.VM, *, only: str = "", exclude: str = "") -> str:
        """Choose a node for ``vm``. A VM that moves excludes its current node, so its own
        resources and anti-affinity group there never count against the choice."""
        request = scheduler.PlacementRequest(
            vcpus=vm.spec.vcpus or 1,
            memory=vm.spec.memory_bytes,
            node_selector=dict(vm.node_selector),
            anti_affinity_group=vm.anti_affinity_group,
            exclude=frozenset({exclude} if exclude else ()),
            only=only,
        )
        views = self.scheduler_views()
        try:
            return scheduler.place(request, views, self.settings.weigher)
        except scheduler.NoPlacement as e:
            if only and only not in self.nodes:
                raise not_found(f"no node named {only!r}") from None
            raise exhausted(str(e)) from None

    # -- agents: registration, heartbeats, health -----------------------------------------

    def register(self, info: types_pb2.NodeInfo) -> float:
        self._accept(info, registering=True)
        return self.settings.heartbeat_interval

    def heartbeat(self, info: types_pb2.NodeInfo) -> bool:
        """Record a heartbeat; False if the node must register first."""
        if info.name not in self.nodes:
            return False
        self._accept(info, registering=False)
        return True

    def _accept(self, info: types_pb2.NodeInfo, registering: bool) -> None:
        if not NAME_RE.fullmatch(info.name):
            raise invalid(f"node name {info.name!r} is not valid")
        node = self.nodes.get(info.name)
        new = node is None
        if node is None:
            node = coordinator_pb2.Node(name=info.name)
            self.nodes[info.name] = node
        was_down = node.state != READY
        node.address = info.address
        node.state = READY
        node.capacity.CopyFrom(info.capacity)
        node.labels.clear()
        node.labels.update(info.labels)
        node.ferry_version = info.ferry_version
        node.last_heartbeat = time.time()
        self.last_seen[info.name] = time.monotonic()
        self.reported_used[info.name] = info.used
        if new or was_down or registering:
            self.store.put_node(node)
        if new or was_down:
            what = "registered" if new else "is back"
            log.info("node %s %s at %s", info.name, what, info.address)
            self.ops.event("node-up", node=info.name, message=f"node {info.name} {what}")
        self._reconcile(info)
        self.reported.add(info.name)

    async def watch_health(self) -> None:
        """Mark nodes that stopped heartbeating down (and act on their VMs by policy)."""
        period = max(0.02, min(0.5, self.settings.heartbeat_timeout / 5))
        while True:
            await trio.sleep(period)
            now = time.monotonic()
            for name, node in list(self.nodes.items()):
                if node.state == READY and now - self.last_seen.get(name, now) > (
                    self.settings.heartbeat_timeout
                ):
                    self._mark_down(node)

    def _mark_down(self, node: coordinator_pb2.Node) -> None:
        node.state = DOWN
        self.reported.discard(node.name)
        self.reported_used.pop(node.name, None)
        self.store.put_node(node)
        why = f"node {node.name} missed heartbeats for {self.settings.heartbeat_timeout:g} s"
        log.warning("%s: marked down", why)
        self.ops.event("node-down", node=node.name, message=why)
        for vm in self.vms.values():
            if vm.node != node.name:
                continue
            vm.state = types_pb2.VM_STATE_UNKNOWN
            vm.failure = f"node {node.name} is down"
            self.store.put_vm(vm)
            self.ops.event("vm-unknown", node=node.name, vm=vm.spec.name, message=vm.failure)
            if (
                self.settings.on_node_down == "restart"
                and vm.desired_state == types_pb2.VM_STATE_RUNNING
                and not vm.operation
                and self.nursery is not None
            ):
                self.nursery.start_soon(self._reschedule, vm.spec.name)

    async def _reschedule(self, name: str) -> None:
        """Boot a VM whose node is down afresh on another node (its memory is lost)."""
        vm = self.vms.get(name)
        if vm is None or vm.operation:
            return
        old = vm.node
        op = self.ops.start("reschedule-vm", name)
        vm.operation = op.id
        try:
            dest = self.place(vm, exclude=old)
            self.moving[name] = dest
            info = await self.call(
                dest, "CreateVM", node_pb2.CreateVMRequest(spec=vm.spec, start=True)
            )
        except CoordinatorError as e:
            self.ops.finish(op, e.message)
            return
        finally:
            vm.operation = ""
            self.moving.pop(name, None)
        with self.store.transaction():
            vm.node = dest
            vm.generation += 1
            self.boots[name] = vm.generation
            vm.failure = ""
            self._observe(vm, info, quiet=True)
            self.store.put_vm(vm)
            self.ops.finish(op)
        self.ops.event(
            "vm-rescheduled",
            node=dest,
            vm=name,
            message=f"VM {name} restarted on {dest} (generation {vm.generation}); {old} is down",
            op=op,
        )

    # -- reconciliation ------------------------------------------------------------------

    def _observe(self, vm: coordinator_pb2.VM, info: types_pb2.VMInfo, quiet: bool = False) -> bool:
        """Take the node's report of an owned VM; True if its state changed."""
        changed = vm.state != info.state
        vm.state = info.state
        if info.state != types_pb2.VM_STATE_UNKNOWN:
            vm.failure = info.failure
        if info.HasField("exit_code"):
            vm.exit_code = info.exit_code
        else:
            vm.ClearField("exit_code")
        vm.mips = info.mips
        vm.guest_seconds = info.guest_seconds
        vm.console_bytes = info.console_bytes
        if changed and not quiet:
            kind = _EVENT_FOR_STATE.get(info.state)
            if kind:
                detail = f": {info.failure}" if info.failure else ""
                self.ops.event(
                    kind,
                    node=vm.node,
                    vm=vm.spec.name,
                    message=f"VM {vm.spec.name} is {state_name(info.state)}{detail}",
                )
        return changed

    def _reconcile(self, info: types_pb2.NodeInfo) -> None:
        node = info.name
        seen = set()
        for reported in info.vms:
            name = reported.spec.name
            seen.add(name)
            vm = self.vms.get(name)
            if vm is None or vm.operation or name in self.moving:
                continue  # not ours, or an operation is changing it right now
            if vm.node == node:
                if self._observe(vm, reported):
                    self.store.put_vm(vm)
                if vm.desired_state == types_pb2.VM_STATE_STOPPED and reported.state in (
                    types_pb2.VM_STATE_RUNNING,
                    types_pb2.VM_STATE_PAUSED,
                ):
                    self._spawn_cleanup(node, name, destroy=False)
                continue
            owner = self.nodes.get(vm.node)
            if (
                vm.state == types_pb2.VM_STATE_MIGRATED
                and reported.state == types_pb2.VM_STATE_RUNNING
            ):
                # A migration finished while the coordinator was away: follow the VM.
                self._transfer(vm, node, reported, "found running after a migration")
                continue
            if owner is None or vm.node not in self.reported:
                continue  # its owner has not spoken yet: do not judge which copy is live
            self._spawn_cleanup(node, name, destroy=True, generation=vm.generation)
        for vm in self.vms.values():
            if (
                vm.node == node
                and vm.spec.name not in seen
                and not vm.operation
                and vm.spec.name not in self.moving
                and vm.state != types_pb2.VM_STATE_FAILED
            ):
                vm.state = types_pb2.VM_STATE_FAILED
                vm.failure = f"node {node} no longer has this VM"
                self.store.put_vm(vm)
                self.ops.event("vm-failed", node=node, vm=vm.spec.name, message=vm.failure)

    def _transfer(
        self, vm: coordinator_pb2.VM, node: str, info: types_pb2.VMInfo, why: str
    ) -> None:
        old = vm.node
        vm.node = node
        vm.generation += 1
        self._observe(vm, info, quiet=True)
        self.store.put_vm(vm)
        self.ops.event(
            "vm-migrated",
            node=node,
            vm=vm.spec.name,
            message=f"VM {vm.spec.name}: {old} -> {node} ({why})",
        )

    def _spawn_cleanup(
        self, node: str, name: str, *, destroy: bool, generation: int | None = None
    ) -> None:
        key = (node, name)
        if key in self._cleaning or self.nursery is None:
            return
        self._cleaning.add(key)
        self.nursery.start_soon(self._cleanup, node, name, destroy, generation)

    async def _cleanup(self, node: str, name: str, destroy: bool, generation: int | None) -> None:
        """Stop a copy that must not run: a stale copy (destroyed) or one that should be off."""
        try:
            if destroy:
                vm = self.vms.get(name)
                owner = vm.node if vm is not None else "?"
                await self.call(node, "DestroyVM", node_pb2.VMRef(name=name))
                message = (
                    f"stale copy of VM {name} stopped on {node}: {owner} owns it "
                    f"at generation {generation}"
                )
                log.info("%s", message)
                self.ops.event("vm-stale-stopped", node=node, vm=name, message=message)
            else:
                await self.call(node, "StopVM", node_pb2.StopVMRequest(name=name, force=True))
                log.info("VM %s on %s stopped: its desired state is stopped", name, node)
        except CoordinatorError as e:
            log.warning("cleaning up VM %s on %s: %s", name, node, e.message)
        except Exception:
            # A bug here must not take the coordinator's nursery down; the next heartbeat
            # tries again.
            log.exception("cleaning up VM %s on %s", name, node)
        finally:
            self._cleaning.discard((node, name))

    # -- VM operations (synchronous: the RPC returns when they are done) -------------------

    def _check_spec(self, spec: types_pb2.VMSpec) -> None:
        if not NAME_RE.fullmatch(spec.name):
            raise invalid(
                f"spec.name {spec.name!r} is not a valid VM name "
                "(1-63 of a-z, 0-9 and '-', starting with a letter or digit)"
            )
        if spec.memory_bytes == 0:
            raise invalid("spec.memory_bytes is required")
        if spec.memory_bytes % PAGE:
            raise invalid(f"spec.memory_bytes {spec.memory_bytes} is not a multiple of 4 KiB")
        if not spec.kernel:
            raise invalid("spec.kernel is required")

    async def create_vm(
        self, request: coordinator_pb2.PlaceVMRequest
    ) -> tuple[coordinator_pb2.VM, str]:
        spec = request.spec
        self._check_spec(spec)
        if spec.name in self.vms:
            raise exists(f"a VM named {spec.name!r} already exists (on {self.vms[spec.name].node})")
        vm = coordinator_pb2.VM(
            spec=spec,
            desired_state=types_pb2.VM_STATE_CREATED
            if request.no_start
            else types_pb2.VM_STATE_RUNNING,
            node_selector=request.node_selector,
            anti_affinity_group=request.anti_affinity_group,
            created_at=time.time(),
            generation=1,
        )
        vm.node = self.place(vm, only=request.node)
        op = self.ops.start("create-vm", spec.name)
        op.message = f"placed on {vm.node}"
        vm.operation = op.id
        self.vms[spec.name] = vm  # holds the node's resources while it is built
        try:
            info = await self.call(
                vm.node, "CreateVM", node_pb2.CreateVMRequest(spec=spec, start=not request.no_start)
            )
        except CoordinatorError as e:
            del self.vms[spec.name]
            self.ops.finish(op, e.message)
            raise
        vm.operation = ""
        with self.store.transaction():
            vm.spec.CopyFrom(info.spec)
            self._observe(vm, info, quiet=True)
            self.store.put_vm(vm)
            self.ops.finish(op)
        self.ops.event(
            "vm-placed",
            node=vm.node,
            vm=spec.name,
            message=f"VM {spec.name} placed on {vm.node}",
            op=op,
        )
        if vm.state == types_pb2.VM_STATE_RUNNING:
            self.ops.event(
                "vm-started",
                node=vm.node,
                vm=spec.name,
                message=f"VM {spec.name} is running",
                op=op,
            )
        return vm, op.id

    def _reachable(self, vm: coordinator_pb2.VM) -> None:
        if self.nodes[vm.node].state != READY:
            raise precondition(f"VM {vm.spec.name} is on node {vm.node}, which is down")

    async def _simple(
        self, kind: str, name: str, desired: int | None, method: str, request: Any, timeout: float
    ) -> tuple[coordinator_pb2.VM, str]:
        vm = self.idle_vm(name)
        self._reachable(vm)
        op = self.ops.start(kind, name)
        vm.operation = op.id
        try:
            info = await self.call(vm.node, method, request, timeout=timeout)
        except CoordinatorError as e:
            self.ops.finish(op, e.message)
            raise
        finally:
            vm.operation = ""
        with self.store.transaction():
            if desired is not None:
                vm.desired_state = desired  # type: ignore[assignment]
            self._observe(vm, info)
            self.store.put_vm(vm)
            self.ops.finish(op)
        return vm, op.id

    async def start_vm(self, name: str) -> tuple[coordinator_pb2.VM, str]:
        return await self._simple(
            "start-vm", name, types_pb2.VM_STATE_RUNNING, "StartVM", node_pb2.VMRef(name=name), 60
        )

    async def stop_vm(
        self, name: str, timeout: float, force: bool
    ) -> tuple[coordinator_pb2.VM, str]:
        request = node_pb2.StopVMRequest(name=name, timeout_seconds=timeout, force=force)
        return await self._simple(
            "stop-vm", name, types_pb2.VM_STATE_STOPPED, "StopVM", request, (timeout or 10) + 30
        )

    async def delete_vm(self, name: str) -> tuple[coordinator_pb2.VM, str]:
        vm = self.idle_vm(name)
        self._reachable(vm)
        op = self.ops.start("delete-vm", name)
        vm.operation = op.id
        try:
            await self.call(vm.node, "DestroyVM", node_pb2.VMRef(name=name))
        except CoordinatorError as e:
            if e.code != grpc.StatusCode.NOT_FOUND:
                vm.operation = ""
                self.ops.finish(op, e.message)
                raise
        with self.store.transaction():
            del self.vms[name]
            self.store.delete_vm(name)
            self.ops.finish(op)
        self.ops.event("vm-deleted", node=vm.node, vm=name, message=f"VM {name} deleted", op=op)
        vm.operation = ""
        vm.state = types_pb2.VM_STATE_STOPPED
        return vm, op.id

    # -- nodes -----------------------------------------------------------------------------

    def cordon(self, name: str, on: bool) -> coordinator_pb2.Node:
        node = self.node(name)
        if not on and node.draining:
            raise precondition(f"node {name} is draining; wait for the drain to end")
        op = self.ops.start("cordon-node" if on else "uncordon-node", name)
        with self.store.transaction():
            node.cordoned = on
            if not on:
                node.drained = False
            self.store.put_node(node)
            self.ops.finish(op)
        kind = "node-cordoned" if on else "node-uncordoned"
        self.ops.event(kind, node=name, message=f"node {name} {kind.removeprefix('node-')}", op=op)
        return self.node_view(name)
