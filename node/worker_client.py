"""The agent's end of the channel to one worker: blocking gRPC calls, run off the trio loop."""

from __future__ import annotations

import functools
from collections.abc import Iterator
from typing import Any

import grpc
import trio

from node.errors import AgentError
from node.vmdir import VMDir
from protos.ferry.v1 import types_pb2, worker_pb2, worker_pb2_grpc

_CHANNEL_OPTIONS = [
    # The socket appears a moment after the worker starts: retry fast instead of grpc's
    # default one-second reconnect backoff.
    ("grpc.initial_reconnect_backoff_ms", 20),
    ("grpc.min_reconnect_backoff_ms", 20),
    ("grpc.max_reconnect_backoff_ms", 200),
]


# A migration's watch lasts as long as the migration; past this the agent polls instead.
WATCH_TIMEOUT_S = 3600.0


class WorkerClient:
    """Calls into one worker; failures come back as ``AgentError`` with the worker's code."""

    def __init__(self, vm_dir: VMDir) -> None:
        self.vm_dir = vm_dir
        self.target = f"unix:{vm_dir.socket}"
        self.channel = grpc.insecure_channel(self.target, options=_CHANNEL_OPTIONS)
        self.stub = worker_pb2_grpc.WorkerStub(self.channel)
        self.closed = False

    def close(self) -> None:
        self.closed = True
        self.channel.close()

    def _ended(self) -> AgentError:
        return AgentError(
            grpc.StatusCode.UNAVAILABLE, f"the worker of VM {self.vm_dir.name!r} has ended"
        )

    async def _call(self, method: str, request: Any, timeout: float, ready: bool = False) -> Any:
        fn = functools.partial(
            getattr(self.stub, method), request, timeout=timeout, wait_for_ready=ready
        )
        # The agent closes this channel the moment the worker's process ends, which can fall
        # between a handler's look at the record and the call running in its thread: grpc
        # then raises ValueError (not yet started) or CANCELLED (in flight). Both mean the
        # worker is gone, which callers already handle as an unreachable worker.
        try:
            return await trio.to_thread.run_sync(fn, abandon_on_cancel=True)
        except ValueError:
            if self.closed:
                raise self._ended() from None
            raise
        except grpc.RpcError as e:
            code = e.code()
            if self.closed and code == grpc.StatusCode.CANCELLED:
                raise self._ended() from None
            if code in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED):
                raise AgentError(
                    grpc.StatusCode.UNAVAILABLE,
                    f"the worker of VM {self.vm_dir.name!r} is not responding",
                ) from None
            raise AgentError(code, e.details() or str(code)) from None

    async def status(self, timeout: float = 5.0, ready: bool = False) -> worker_pb2.WorkerStatus:
        result: worker_pb2.WorkerStatus = await self._call(
            "GetStatus", worker_pb2.WorkerStatusRequest(), timeout, ready
        )
        return result

    async def control(
        self, action: worker_pb2.WorkerAction.ValueType, timeout: float = 0.0
    ) -> worker_pb2.WorkerStatus:
        command = worker_pb2.WorkerCommand(action=action, timeout_seconds=timeout)
        result: worker_pb2.WorkerStatus = await self._call("Control", command, timeout + 10.0)
        return result

    async def snapshot(self, path: str) -> int:
        result: worker_pb2.WorkerSnapshotResponse = await self._call(
            "Snapshot", worker_pb2.WorkerSnapshotRequest(path=path), 600.0
        )
        return result.size_bytes

    async def send_input(self, data: bytes) -> None:
        await self._call("ConsoleInput", worker_pb2.WorkerConsoleInput(data=data), 5.0)

    async def listen_incoming(self, token: bytes, host: str, timeout: float) -> str:
        request = worker_pb2.WorkerIncomingRequest(token=token, host=host, timeout_s=timeout)
        result: worker_pb2.WorkerIncomingResponse = await self._call(
            "ListenIncoming", request, 10.0
        )
        return result.endpoint

    async def start_migration(
        self, endpoint: str, token: bytes, options: types_pb2.MigrationOptions
    ) -> types_pb2.MigrationStatus:
        request = worker_pb2.WorkerMigrationRequest(endpoint=endpoint, token=token, options=options)
        result: types_pb2.MigrationStatus = await self._call("StartMigration", request, 10.0)
        return result

    async def cancel_migration(self) -> types_pb2.MigrationStatus:
        result: types_pb2.MigrationStatus = await self._call(
            "CancelMigration", worker_pb2.WorkerStatusRequest(), 10.0
        )
        return result

    async def get_migration(self) -> types_pb2.MigrationStatus:
        result: types_pb2.MigrationStatus = await self._call(
            "GetMigration", worker_pb2.WorkerStatusRequest(), 5.0
        )
        return result

    def watch_migration(self) -> Iterator[types_pb2.MigrationStatus]:
        """The worker's migration status as it changes (a blocking stream, for a handler
        thread; cancel it through the returned call when the watcher leaves)."""
        call: Iterator[types_pb2.MigrationStatus] = self.stub.WatchMigration(
            worker_pb2.WorkerStatusRequest(), timeout=WATCH_TIMEOUT_S
        )
        return call
