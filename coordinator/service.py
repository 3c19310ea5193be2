"""The Coordinator gRPC service: grpcio's handler threads, hopping into the trio loop.

Handlers never touch cluster state themselves (DESIGN §6): they call into
:class:`coordinator.cluster.Cluster` and :class:`coordinator.migrate.Mover` through
``trio.from_thread`` and turn a ``CoordinatorError`` into the status code and one-line
message the user sees. Streams (operations, events, console) poll the loop with a short
timeout, so a client that goes away is noticed within a second.
"""

from __future__ import annotations

import contextlib
import logging
import queue
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any, NoReturn, TypeVar

import grpc
import trio

from coordinator.cluster import READY, Cluster
from coordinator.errors import CoordinatorError, not_found
from coordinator.migrate import Mover
from coordinator.operations import RUNNING
from protos.ferry.v1 import (
    coordinator_pb2,
    coordinator_pb2_grpc,
    node_pb2,
    node_pb2_grpc,
    types_pb2,
)

log = logging.getLogger("ferry-coordinator")

T = TypeVar("T")

# How long a console follower waits for a VM that left its node to appear on another.
CONSOLE_MOVE_WAIT = 120.0
_ENDED = {types_pb2.VM_STATE_STOPPED, types_pb2.VM_STATE_FAILED}


@dataclass(frozen=True)
class Location:
    """Where a VM's console is served from right now."""

    node: str
    address: str
    ready: bool
    # A migration or move is in flight.
    moving: bool
    # The generation at which the VM last booted afresh (a restart elsewhere starts a new
    # console); 0 when unknown.
    boot: int


class CoordinatorService(coordinator_pb2_grpc.CoordinatorServicer):
    def __init__(self, cluster: Cluster, mover: Mover, token: trio.lowlevel.TrioToken) -> None:
        self._cluster = cluster
        self._mover = mover
        self._token = token

    # -- plumbing ---------------------------------------------------------------------------

    def _abort(self, context: grpc.ServicerContext, code: grpc.StatusCode, text: str) -> NoReturn:
        context.abort(code, text)
        raise AssertionError("context.abort() returns only by raising")

    def _call(self, context: grpc.ServicerContext, run: Callable[[], T]) -> T:
        try:
            return run()
        except CoordinatorError as e:
            self._abort(context, e.code, e.message)
        except trio.RunFinishedError:
            self._abort(context, grpc.StatusCode.UNAVAILABLE, "the coordinator is shutting down")
        except Exception as e:
            log.exception("internal error")
            self._abort(
                context, grpc.StatusCode.INTERNAL, f"internal error: {type(e).__name__}: {e}"
            )

    def _async(self, context: grpc.ServicerContext, fn: Callable[..., Any], *args: Any) -> Any:
        return self._call(context, lambda: trio.from_thread.run(fn, *args, trio_token=self._token))

    def _sync(self, context: grpc.ServicerContext, fn: Callable[..., T], *args: Any) -> T:
        return self._call(
            context, lambda: trio.from_thread.run_sync(fn, *args, trio_token=self._token)
        )

    def _wait(self, timeout: float) -> None:
        trio.from_thread.run(self._cluster.ops.wait_change, timeout, trio_token=self._token)

    # -- agents -----------------------------------------------------------------------------

    def RegisterNode(
        self, request: coordinator_pb2.RegisterNodeRequest, context: grpc.ServicerContext
    ) -> coordinator_pb2.RegisterNodeResponse:
        interval = self._sync(context, self._cluster.register, request.node)
        return coordinator_pb2.RegisterNodeResponse(heartbeat_interval_seconds=interval)

    def Heartbeat(
        self, request: coordinator_pb2.HeartbeatRequest, context: grpc.ServicerContext
    ) -> coordinator_pb2.HeartbeatResponse:
        known = self._sync(context, self._cluster.heartbeat, request.node)
        return coordinator_pb2.HeartbeatResponse(
            heartbeat_interval_seconds=self._cluster.settings.heartbeat_interval,
            reregister=not known,
        )

    # -- nodes ------------------------------------------------------------------------------

    def _nodes(self) -> list[coordinator_pb2.Node]:
        return [self._cluster.node_view(n) for n in sorted(self._cluster.nodes)]

    def ListNodes(
        self, request: coordinator_pb2.ListNodesRequest, context: grpc.ServicerContext
    ) -> coordinator_pb2.ListNodesResponse:
        return coordinator_pb2.ListNodesResponse(nodes=self._sync(context, self._nodes))

    def GetNode(
        self, request: coordinator_pb2.NodeRef, context: grpc.ServicerContext
    ) -> coordinator_pb2.Node:
        return self._sync(context, self._cluster.node_view, request.name)

    def CordonNode(
        self, request: coordinator_pb2.NodeRef, context: grpc.ServicerContext
    ) -> coordinator_pb2.Node:
        return self._sync(context, self._cluster.cordon, request.name, True)

    def UncordonNode(
        self, request: coordinator_pb2.NodeRef, context: grpc.ServicerContext
    ) -> coordinator_pb2.Node:
        return self._sync(context, self._cluster.cordon, request.name, False)

    def DrainNode(
        self, request: coordinator_pb2.DrainNodeRequest, context: grpc.ServicerContext
    ) -> coordinator_pb2.Operation:
        return self._sync(context, self._mover.drain, request)

    # -- VMs --------------------------------------------------------------------------------

    def _vm_response(self, result: tuple[coordinator_pb2.VM, str]) -> coordinator_pb2.VMResponse:
        vm, op = result
        return coordinator_pb2.VMResponse(vm=vm, operation=op)

    def CreateVM(
        self, request: coordinator_pb2.PlaceVMRequest, context: grpc.ServicerContext
    ) -> coordinator_pb2.VMResponse:
        return self._vm_response(self._async(context, self._cluster.create_vm, request))

    def _copy_vm(self, name: str) -> coordinator_pb2.VM:
        vm = coordinator_pb2.VM()
        vm.CopyFrom(self._cluster.vm(name))
        return vm

    def GetVM(self, request: node_pb2.VMRef, context: grpc.ServicerContext) -> coordinator_pb2.VM:
        return self._sync(context, self._copy_vm, request.name)

    def _list_vms(self, node: str) -> list[coordinator_pb2.VM]:
        if node:
            self._cluster.node(node)
        return [
            self._copy_vm(n)
            for n, vm in sorted(self._cluster.vms.items())
            if not node or vm.node == node
        ]

    def ListVMs(
        self, request: coordinator_pb2.ListClusterVMsRequest, context: grpc.ServicerContext
    ) -> coordinator_pb2.ListClusterVMsResponse:
        vms = self._sync(context, self._list_vms, request.node)
        return coordinator_pb2.ListClusterVMsResponse(vms=vms)

    def StartVM(
        self, request: node_pb2.VMRef, context: grpc.ServicerContext
    ) -> coordinator_pb2.VMResponse:
        return self._vm_response(self._async(context, self._cluster.start_vm, request.name))

    def StopVM(
        self, request: node_pb2.StopVMRequest, context: grpc.ServicerContext
    ) -> coordinator_pb2.VMResponse:
        result = self._async(
            context, self._cluster.stop_vm, request.name, request.timeout_seconds, request.force
        )
        return self._vm_response(result)

    def DeleteVM(
        self, request: node_pb2.VMRef, context: grpc.ServicerContext
    ) -> coordinator_pb2.VMResponse:
        return self._vm_response(self._async(context, self._cluster.delete_vm, request.name))

    def MigrateVM(
        self, request: coordinator_pb2.MigrateVMRequest, context: grpc.ServicerContext
    ) -> coordinator_pb2.Operation:
        return self._sync(context, self._mover.migrate, request.name, request.node, request.options)

    # -- operations and events --------------------------------------------------------------

    def _get_op(self, op_id: str) -> coordinator_pb2.Operation:
        op = self._cluster.ops.get(op_id)
        if op is None:
            raise not_found(f"no operation with id {op_id!r}")
        return op

    def GetOperation(
        self, request: coordinator_pb2.OperationRef, context: grpc.ServicerContext
    ) -> coordinator_pb2.Operation:
        return self._sync(context, self._get_op, request.id)

    def ListOperations(
        self, request: coordinator_pb2.ListOperationsRequest, context: grpc.ServicerContext
    ) -> coordinator_pb2.ListOperationsResponse:
        ops = self._sync(
            context, self._cluster.store.list_operations, request.limit or 50, request.target
        )
        return coordinator_pb2.ListOperationsResponse(operations=ops)

    def WatchOperation(
        self, request: coordinator_pb2.OperationRef, context: grpc.ServicerContext
    ) -> Iterator[coordinator_pb2.Operation]:
        last = b""
        while context.is_active():
            op = self._sync(context, self._get_op, request.id)
            data = op.SerializeToString(deterministic=True)
            if data != last:
                last = data
                yield op
            if op.state != RUNNING:
                return
            self._call(context, lambda: self._wait(1.0))

    def WatchEvents(
        self, request: coordinator_pb2.WatchEventsRequest, context: grpc.ServicerContext
    ) -> Iterator[coordinator_pb2.Event]:
        after = request.after
        while context.is_active():
            events = self._sync(context, self._cluster.store.events_after, after)
            yield from events
            if events:
                after = events[-1].seq
                continue
            if request.no_follow:
                return
            self._call(context, lambda: self._wait(1.0))

    # -- console ----------------------------------------------------------------------------

    def _locate(self, name: str) -> Location:
        vm = self._cluster.vm(name)
        node = self._cluster.nodes[vm.node]
        return Location(
            node=vm.node,
            address=node.address,
            ready=node.state == READY,
            moving=name in self._cluster.moving,
            boot=self._cluster.boots.get(name, 0),
        )

    def Console(
        self, request_iterator: Iterator[node_pb2.ConsoleRequest], context: grpc.ServicerContext
    ) -> Iterator[coordinator_pb2.ConsoleChunk]:
        first = next(request_iterator, None)
        if first is None or first.WhichOneof("kind") != "open":
            self._abort(context, grpc.StatusCode.INVALID_ARGUMENT, "the first request must open")
        name, offset, follow = first.open.name, first.open.offset, first.open.follow
        where = self._sync(context, self._locate, name)
        node, address, boot = where.node, where.address, where.boot
        if not where.ready:
            self._abort(
                context,
                grpc.StatusCode.FAILED_PRECONDITION,
                f"VM {name} is on node {node}, which is down",
            )
        inputs: queue.Queue[bytes] = queue.Queue()

        def pump() -> None:
            with contextlib.suppress(Exception):
                for request in request_iterator:
                    if request.WhichOneof("kind") == "input" and request.input:
                        inputs.put(request.input)

        threading.Thread(target=pump, name=f"console-in-{name}", daemon=True).start()
        current: list[Any] = []
        context.add_callback(lambda: [call.cancel() for call in current])
        # Console offsets belong to the VM, not the node: a migrated VM's destination
        # carries its console history, so each reopen continues where the last one ended.
        next_offset = offset
        while context.is_active():
            stop = threading.Event()

            open_request = node_pb2.ConsoleRequest(
                open=node_pb2.ConsoleOpen(
                    name=name,
                    offset=next_offset,
                    follow=follow,
                )
            )
            channel = grpc.insecure_channel(address)
            ended_state = types_pb2.VM_STATE_UNSPECIFIED
            try:
                call = node_pb2_grpc.NodeAgentStub(channel).Console(
                    _node_requests(open_request, inputs, stop)
                )
                current[:] = [call]
                for message in call:
                    if message.data:
                        next_offset = message.offset + len(message.data)
                        yield coordinator_pb2.ConsoleChunk(data=message.data, node=node)
                    if message.vm_state:
                        ended_state = message.vm_state
            except grpc.RpcError as e:
                if not follow:
                    self._abort(context, e.code(), f"node {node}: {e.details()}")
            finally:
                stop.set()
                channel.close()
            if not follow or ended_state in _ENDED:
                yield coordinator_pb2.ConsoleChunk(node=node, vm_state=ended_state)
                return
            # The stream ended while following: the VM moved away (or its node blinked).
            moved = self._await_move(
                context, name, node, ended_state == types_pb2.VM_STATE_MIGRATED
            )
            if moved is None:
                return
            address = moved.address
            if moved.boot != boot:
                # Booted afresh elsewhere (its node went down): a new console from byte 0.
                next_offset, boot = 0, moved.boot
                yield coordinator_pb2.ConsoleChunk(
                    node=moved.node, notice=f"VM {name} restarted on {moved.node}"
                )
            elif moved.node != node:
                yield coordinator_pb2.ConsoleChunk(
                    node=moved.node, notice=f"VM {name} moved from {node} to {moved.node}"
                )
            node = moved.node

    def _await_move(
        self, context: grpc.ServicerContext, name: str, node: str, migrated: bool
    ) -> Location | None:
        """Wait until the VM has a reachable owner again; None when it is gone.

        A stream that ended with the VM migrated waits for the coordinator to record the new
        owner; one that broke otherwise (the agent restarted, a migration in flight
        failed over) reconnects to wherever the VM is once no move is in progress.
        """
        waited = 0.0
        while context.is_active() and waited < CONSOLE_MOVE_WAIT:
            try:
                where = trio.from_thread.run_sync(self._locate, name, trio_token=self._token)
            except (CoordinatorError, trio.RunFinishedError):
                return None
            if where.node != node and where.ready:
                return where
            if where.ready and not migrated and not where.moving and waited >= 0.2:
                return where
            self._wait(0.2)
            waited += 0.2
        return None


def _node_requests(
    open_request: node_pb2.ConsoleRequest, inputs: queue.Queue[bytes], stop: threading.Event
) -> Iterator[node_pb2.ConsoleRequest]:
    """The request side of one node console stream: open, then the user's keystrokes.

    Input arrives in one queue for the whole client session, so keystrokes typed while the
    VM moves go to whichever node owns it next.
    """
    yield open_request
    while not stop.is_set():
        try:
            data = inputs.get(timeout=0.2)
        except queue.Empty:
            continue
        yield node_pb2.ConsoleRequest(input=data)
