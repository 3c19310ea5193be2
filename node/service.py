"""The NodeAgent gRPC service: grpcio's handler threads, hopping into the agent's trio loop.

Handlers never touch agent or VM state themselves (DESIGN §6): each one validates the shape
of its request, runs the matching :class:`node.agent.Agent` method in the trio loop with
``trio.from_thread.run``, and turns an ``AgentError`` into the gRPC status and one-line
message a user sees.
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from collections.abc import Awaitable, Callable, Generator, Iterator
from typing import TYPE_CHECKING, Any, TypeVar

import grpc
import trio

from node.console import log_end, read_console
from node.errors import AgentError
from node.migration.wire import MIGRATION_ENDED, changes_until_ended
from node.vmdir import VMDir
from protos.ferry.v1 import node_pb2, node_pb2_grpc, types_pb2, worker_pb2, worker_pb2_grpc

if TYPE_CHECKING:
    from node.agent import Agent

log = logging.getLogger("ferry-node")

T = TypeVar("T")

WATCH_INTERVAL = 0.1


class NodeAgentService(node_pb2_grpc.NodeAgentServicer):
    def __init__(self, agent: Agent, token: trio.lowlevel.TrioToken) -> None:
        self._agent = agent
        self._token = token

    def _run(self, context: grpc.ServicerContext, fn: Callable[..., Awaitable[T]], *args: Any) -> T:
        try:
            return trio.from_thread.run(fn, *args, trio_token=self._token)
        except AgentError as e:
            context.abort(e.code, e.message)
        except trio.RunFinishedError:
            context.abort(grpc.StatusCode.UNAVAILABLE, "the node agent is shutting down")
        except Exception as e:
            log.exception("internal error in %s", getattr(fn, "__name__", fn))
            context.abort(grpc.StatusCode.INTERNAL, f"internal error: {type(e).__name__}: {e}")
        raise AssertionError("context.abort() returns only by raising")

    def CreateVM(
        self, request: node_pb2.CreateVMRequest, context: grpc.ServicerContext
    ) -> types_pb2.VMInfo:
        return self._run(context, self._agent.create_vm, request.spec, request.start)

    def StartVM(self, request: node_pb2.VMRef, context: grpc.ServicerContext) -> types_pb2.VMInfo:
        return self._run(context, self._agent.start_vm, request.name)

    def StopVM(
        self, request: node_pb2.StopVMRequest, context: grpc.ServicerContext
    ) -> types_pb2.VMInfo:
        return self._run(
            context, self._agent.stop_vm, request.name, request.timeout_seconds, request.force
        )

    def PauseVM(self, request: node_pb2.VMRef, context: grpc.ServicerContext) -> types_pb2.VMInfo:
        return self._run(context, self._agent.pause_vm, request.name)

    def ResumeVM(self, request: node_pb2.VMRef, context: grpc.ServicerContext) -> types_pb2.VMInfo:
        return self._run(context, self._agent.resume_vm, request.name)

    def DestroyVM(
        self, request: node_pb2.VMRef, context: grpc.ServicerContext
    ) -> node_pb2.DestroyVMResponse:
        self._run(context, self._agent.destroy_vm, request.name)
        return node_pb2.DestroyVMResponse()

    def GetVM(self, request: node_pb2.VMRef, context: grpc.ServicerContext) -> types_pb2.VMInfo:
        return self._run(context, self._agent.get_vm, request.name)

    def ListVMs(
        self, request: node_pb2.ListVMsRequest, context: grpc.ServicerContext
    ) -> node_pb2.ListVMsResponse:
        return node_pb2.ListVMsResponse(vms=self._run(context, self._agent.list_vms))

    def NodeInfo(
        self, request: node_pb2.NodeInfoRequest, context: grpc.ServicerContext
    ) -> types_pb2.NodeInfo:
        return self._run(context, self._agent.node_info)

    def Snapshot(
        self, request: node_pb2.SnapshotRequest, context: grpc.ServicerContext
    ) -> node_pb2.SnapshotResponse:
        path, size = self._run(context, self._agent.snapshot, request.name, request.path)
        return node_pb2.SnapshotResponse(path=path, size_bytes=size)

    def Restore(
        self, request: node_pb2.RestoreRequest, context: grpc.ServicerContext
    ) -> types_pb2.VMInfo:
        return self._run(context, self._agent.restore, request.name, request.path, request.start)

    # -- console -----------------------------------------------------------------------

    def Console(
        self, request_iterator: Iterator[node_pb2.ConsoleRequest], context: grpc.ServicerContext
    ) -> Iterator[node_pb2.ConsoleOutput]:
        first = next(request_iterator, None)
        if first is None:
            return
        if first.WhichOneof("kind") != "open":
            context.abort(
                grpc.StatusCode.INVALID_ARGUMENT, "the first Console request must be 'open'"
            )
        name = first.open.name
        vm_dir, live = self._run(context, self._agent.console_target, name)
        threading.Thread(
            target=self._forward_input,
            args=(name, request_iterator),
            name=f"console-input-{name}",
            daemon=True,
        ).start()
        offset = first.open.offset
        follow = first.open.follow
        answered = False
        if live:
            offset, answered = yield from self._relay_worker(vm_dir, offset, follow, context)
        # The worker has ended (or never ran): the log holds whatever it did not deliver.
        if offset < 0:
            offset = max(log_end(vm_dir.console_log) + offset, 0)
        while context.is_active() and not (answered and not follow):
            offset, data = read_console(vm_dir.console_log, offset)
            if not data:
                break
            yield node_pb2.ConsoleOutput(offset=offset, data=data)
            offset += len(data)
        state = self._run(context, self._agent.console_state, name, live and follow)
        yield node_pb2.ConsoleOutput(offset=offset, vm_state=state)

    def _relay_worker(
        self, vm_dir: VMDir, offset: int, follow: bool, context: grpc.ServicerContext
    ) -> Generator[node_pb2.ConsoleOutput, None, tuple[int, bool]]:
        """Stream from the worker; returns the offset reached (negative if nothing came)
        and whether the worker ended the stream itself (rather than going away)."""
        channel = grpc.insecure_channel(f"unix:{vm_dir.socket}")
        try:
            stub = worker_pb2_grpc.WorkerStub(channel)
            call = stub.ConsoleOutput(worker_pb2.WorkerConsoleRequest(offset=offset, follow=follow))
            context.add_callback(call.cancel)
            try:
                for chunk in call:
                    yield node_pb2.ConsoleOutput(offset=chunk.offset, data=chunk.data)
                    offset = chunk.offset + len(chunk.data)
            except grpc.RpcError:
                return offset, False  # the worker went away mid-stream; the log has the rest
        finally:
            channel.close()
        return offset, True

    def _forward_input(self, name: str, requests: Iterator[node_pb2.ConsoleRequest]) -> None:
        try:
            for request in requests:
                if request.WhichOneof("kind") == "input" and request.input:
                    try:
                        trio.from_thread.run(
                            self._agent.send_input, name, request.input, trio_token=self._token
                        )
                    except (AgentError, trio.RunFinishedError) as e:
                        log.info("console input for VM %s dropped: %s", name, e)
        except grpc.RpcError:
            pass  # the client went away

    # -- live migration ------------------------------------------------------------------

    def PrepareIncoming(
        self, request: node_pb2.PrepareIncomingRequest, context: grpc.ServicerContext
    ) -> node_pb2.PrepareIncomingResponse:
        return self._run(
            context, self._agent.prepare_incoming, request.spec, request.token, request.timeout_s
        )

    def StartMigration(
        self, request: node_pb2.StartMigrationRequest, context: grpc.ServicerContext
    ) -> types_pb2.MigrationStatus:
        return self._run(
            context,
            self._agent.start_migration,
            request.name,
            request.destination_endpoint,
            request.token,
            request.options,
        )

    def CancelMigration(
        self, request: node_pb2.VMRef, context: grpc.ServicerContext
    ) -> types_pb2.MigrationStatus:
        return self._run(context, self._agent.cancel_migration, request.name)

    def GetMigration(
        self, request: node_pb2.VMRef, context: grpc.ServicerContext
    ) -> types_pb2.MigrationStatus:
        return self._run(context, self._agent.get_migration, request.name)

    def WatchMigration(
        self, request: node_pb2.VMRef, context: grpc.ServicerContext
    ) -> Iterator[types_pb2.MigrationStatus]:
        last = b""
        # Forwarded from the VM's worker, which answers as each step happens; when there is
        # no worker, or it ends (a VM that moved away exits once its migration is over),
        # the agent's own answer (the last migration's saved figures) is polled instead.
        client = self._run(context, self._agent.worker_client, request.name)
        if client is not None:
            with contextlib.suppress(grpc.RpcError, ValueError):  # ValueError: channel closed
                call = client.watch_migration()
                context.add_callback(call.cancel)  # type: ignore[attr-defined]
                for status in call:
                    if status.status == types_pb2.MIGRATION_STATE_NONE:
                        break  # none ran in this worker: the agent may know an earlier one
                    last = status.SerializeToString(deterministic=True)
                    yield status
                    if status.status in MIGRATION_ENDED:
                        return

        def polled() -> Iterator[types_pb2.MigrationStatus]:
            while context.is_active():
                yield self._run(context, self._agent.get_migration, request.name)
                time.sleep(WATCH_INTERVAL)

        yield from changes_until_ended(polled(), last)
