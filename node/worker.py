"""The VMM worker: one OS process per VM, started and supervised by the node agent.

A process per VM is what keeps one guest's crash (or an emulator bug) from taking the agent
or other VMs down, and what lets several VMs use several cores despite the GIL. The vCPU
runs in slices inside the trio loop (DESIGN §6): between slices the loop serves the agent's
commands and console readers, so nothing needs a lock. gRPC handlers run in grpcio's
threads and only ever hop into that loop with ``trio.from_thread.run``.

The worker writes its own pid file and holds a lock on its VM directory while it lives, and
writes ``status.json`` when its VM ends, so an agent that restarts finds it again (or learns
how it ended) from the data directory alone.

A worker is also one end of a live migration (:mod:`node.migration_endpoint`): a source
worker streams its running VM to a destination worker, which was started with
``--incoming`` and holds a VM that waits for its state. A source whose VM moved away
records ``migrated`` as its final state and exits; an incoming worker whose migration
failed records ``failed`` with the reason (and ``incoming_failed``) and exits. The last
outgoing migration's statistics are kept in ``migration.json`` for the agent.

Exit statuses: 0 the VM ended (its state is in status.json), 3 the VM could not be built
(the message is in status.json), 4 another worker already runs this VM.
"""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import logging
import math
import os
import signal
import sys
import threading
import time
from collections.abc import Awaitable, Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, TypeVar

import grpc
import trio
from google.protobuf import json_format

from node import faults
from node.console import ConsoleLog
from node.migration.wire import changes_until_ended, options_from_pb
from node.migration_endpoint import IncomingMigration, OutgoingMigration, format_endpoint
from node.migration_process import MAX_MESSAGE, SpareProcess
from node.vmdir import VMDir
from protos.ferry.v1 import types_pb2, worker_pb2, worker_pb2_grpc
from vmcore.loader import LoaderError
from vmcore.vm import VM, VMConfig, VMState, VMStateError

SLICE_INSTRUCTIONS = 20_000
"""Instructions per slice: ~1-2 ms of guest time, short enough that commands and console
readers are served promptly, long enough that the loop's own overhead stays small."""

INCOMING_GRACE_S = 5.0
"""How long an incoming migration's stream may take to deliver its last answer once the
worker stops listening (a stalled stream is cut after this)."""

WATCH_WAIT_S = 1.0
"""WatchMigration answers at every change; without one it looks again after this long, so
that a watcher who went away is noticed."""

MIGRATING_SLICE_INSTRUCTIONS = 5_000
"""Instructions per slice while the VM migrates out: the migration process's requests (the
dirty-log fetch that ends each round, the pause that starts the switchover) are served
between slices, and every instruction the guest runs while one waits can dirty pages the
next round must send."""

EXIT_LOAD_FAILED = 3
EXIT_ALREADY_RUNNING = 4

STATE_TO_PROTO = {
    VMState.CREATED: types_pb2.VM_STATE_CREATED,
    VMState.RUNNING: types_pb2.VM_STATE_RUNNING,
    VMState.PAUSED: types_pb2.VM_STATE_PAUSED,
    VMState.STOPPED: types_pb2.VM_STATE_STOPPED,
    VMState.INCOMING: types_pb2.VM_STATE_INCOMING,
    VMState.FAILED: types_pb2.VM_STATE_FAILED,
}

T = TypeVar("T")

_VCPU_ACTIONS = {
    worker_pb2.WORKER_ACTION_START,
    worker_pb2.WORKER_ACTION_PAUSE,
    worker_pb2.WORKER_ACTION_RESUME,
}

log = logging.getLogger("ferry-worker")


class CommandError(Exception):
    """A command the VM refuses; carried to the agent as a gRPC status."""

    def __init__(self, code: grpc.StatusCode, message: str) -> None:
        super().__init__(message)
        self.code = code


class Worker:
    """One VM and its console, driven from the trio loop."""

    def __init__(
        self,
        name: str,
        vm: VM,
        console: ConsoleLog,
        *,
        nursery: trio.Nursery | None = None,
        migration_file: Path | None = None,
    ) -> None:
        self.name = name
        self.vm = vm
        self.console = console
        self._wake = trio.Event()
        self.ended = trio.Event()
        self._nursery = nursery
        self._migration_file = migration_file
        self._fault = faults.from_environment()
        # Auto-converge: the share of each slice's wall time the vCPU sleeps, in percent.
        self.throttle = 0
        self.outgoing: OutgoingMigration | None = None
        # A migration process started in advance, idle until a migration takes it.
        self._spare: SpareProcess | None = None
        self.incoming: IncomingMigration | None = None
        self._incoming_server: grpc.Server | None = None
        # Set when the VM has moved to another node: this copy must never run again.
        self.migrated = False
        # Set when an incoming migration failed: the half-built VM is thrown away.
        self.discarded = ""

    def spec(self) -> types_pb2.VMSpec:
        cfg = self.vm.config
        return types_pb2.VMSpec(
            name=self.name,
            memory_bytes=cfg.memory,
            vcpus=1,
            kernel=cfg.kernel or "",
            bios=cfg.bios,
            append=cfg.append,
            deterministic=cfg.deterministic,
        )

    def state(self) -> types_pb2.VMState.ValueType:
        """The VM's state as the API names it, migrations included."""
        if self.migrated:
            return types_pb2.VM_STATE_MIGRATED
        if self.discarded:
            return types_pb2.VM_STATE_FAILED
        if self.outgoing is not None and self.outgoing.active:
            return types_pb2.VM_STATE_MIGRATING
        return STATE_TO_PROTO[self.vm.state]

    def status(self) -> worker_pb2.WorkerStatus:
        stats = self.vm.stats()
        status = worker_pb2.WorkerStatus(
            name=self.name,
            state=self.state(),
            failure=self.vm.failure or self.discarded,
            instret=stats["instret"],
            mips=stats["mips"],
            guest_seconds=stats["guest_seconds"],
            console_bytes=self.console.total,
            pid=os.getpid(),
            spec=self.spec(),
        )
        if self.vm.exit_code is not None:
            status.exit_code = self.vm.exit_code
        return status

    def wake(self) -> None:
        """Interrupt an idle or paused wait: a command or input may have changed things."""
        self._wake.set()

    async def _sleep(self, seconds: float | None) -> None:
        # An event set by a command that ran before this wait began still counts, so no
        # wake-up is ever lost; the price is an occasional spurious one.
        with trio.move_on_after(math.inf if seconds is None else seconds):
            await self._wake.wait()
        self._wake = trio.Event()

    async def run(self) -> None:
        """Run the vCPU whenever the VM is running, until it stops or fails."""
        try:
            while True:
                state = self.vm.state
                if self.migrated or self.discarded:
                    break
                if state is VMState.RUNNING:
                    began = time.perf_counter()
                    try:
                        result = self.vm.run_slice(self._slice_instructions())
                    except Exception as e:  # VMFailure, or a bug that escaped it
                        if self.vm.state is not VMState.FAILED:
                            self.vm.fail(f"{type(e).__name__}: {e}")
                        break
                    finally:
                        self.console.flush()
                    if result.reason in ("poweroff", "fail"):
                        break
                    if result.reason == "idle":
                        await self._sleep(result.idle_seconds)
                    elif self.throttle:
                        # Run (100 - throttle) % of the time: sleep in proportion to the slice.
                        spent = time.perf_counter() - began
                        await trio.sleep(spent * self.throttle / (100 - self.throttle))
                    else:
                        await trio.sleep(0)
                elif state in (VMState.STOPPED, VMState.FAILED):
                    break
                else:
                    await self._sleep(None)
        finally:
            self.console.flush()
            self.ended.set()

    def _slice_instructions(self) -> int:
        if self.outgoing is not None and self.outgoing.active:
            return MIGRATING_SLICE_INSTRUCTIONS
        return SLICE_INSTRUCTIONS

    # -- commands (run in the trio loop) ---------------------------------------------------

    async def control(self, action: int, timeout: float) -> worker_pb2.WorkerStatus:
        migrating = self.outgoing is not None and self.outgoing.active
        if migrating and action in _VCPU_ACTIONS:
            # The migration owns the vCPU: a guest resumed mid-switchover would change RAM
            # behind the final round, a pause would be undone by a failed migration.
            raise CommandError(
                grpc.StatusCode.FAILED_PRECONDITION,
                f"VM {self.name!r} is migrating; cancel the migration first",
            )
        try:
            if action == worker_pb2.WORKER_ACTION_START:
                self.vm.start()
            elif action == worker_pb2.WORKER_ACTION_PAUSE:
                self.vm.pause()
            elif action == worker_pb2.WORKER_ACTION_RESUME:
                self.vm.resume()
            elif action == worker_pb2.WORKER_ACTION_STOP:
                await self.stop(timeout)
            elif action == worker_pb2.WORKER_ACTION_FORCE_STOP:
                await self.stop(0.0)
            else:
                raise CommandError(grpc.StatusCode.INVALID_ARGUMENT, f"unknown action {action}")
        except VMStateError as e:
            raise CommandError(grpc.StatusCode.FAILED_PRECONDITION, str(e)) from None
        self.wake()
        return self.status()

    async def stop(self, timeout: float) -> None:
        """Ask the guest to power off; hold the power button once ``timeout`` runs out."""
        if self.vm.state in (VMState.STOPPED, VMState.FAILED):
            return
        if timeout > 0 and self.vm.state is VMState.RUNNING and self.vm.request_poweroff():
            self.wake()
            with trio.move_on_after(timeout):
                await self.ended.wait()
        if self.vm.state not in (VMState.STOPPED, VMState.FAILED):
            self.vm.stop()
        self.wake()
        await self.ended.wait()

    async def snapshot(self, path: str) -> int:
        try:
            return self.vm.snapshot(path)
        except VMStateError as e:
            raise CommandError(grpc.StatusCode.FAILED_PRECONDITION, str(e)) from None
        except OSError as e:
            raise CommandError(
                grpc.StatusCode.INVALID_ARGUMENT, f"cannot write snapshot {path}: {e.strerror}"
            ) from None

    async def send_input(self, data: bytes) -> None:
        self.vm.send_input(data)
        self.wake()

    # -- live migration (run in the trio loop) ---------------------------------------------

    def migrated_away(self) -> None:
        """The destination runs the guest now: stop for good, the VM paused as it is."""
        self.migrated = True
        self.wake()

    def discard(self, reason: str) -> None:
        """Throw away an incoming VM whose migration failed; the worker then ends."""
        if self.migrated or self.discarded or self.vm.state is not VMState.INCOMING:
            return
        self.discarded = f"incoming migration failed: {reason}"
        self.vm.stop()
        self.wake()

    def migration_ended(self, migration: OutgoingMigration) -> None:
        """Keep the final statistics where the agent finds them after this worker is gone,
        and have the next migration's process ready unless the VM has left."""
        if self.vm.state in (VMState.RUNNING, VMState.PAUSED) and not self.migrated:
            self.prepare_migration_process()
        if self._migration_file is None:
            return
        text = json_format.MessageToJson(migration.status(), sort_keys=True)
        tmp = self._migration_file.with_suffix(".tmp")
        tmp.write_text(text)
        os.replace(tmp, self._migration_file)

    def start_soon(self, task: Callable[[], Awaitable[None]]) -> None:
        """Run ``task`` in the worker's loop, after whatever the loop is doing now."""
        assert self._nursery is not None
        self._nursery.start_soon(task)

    def prepare_migration_process(self) -> None:
        """Start a migration process in advance, so that its start-up (imports of ~0.4 s)
        is not part of the next migration's setup time. In the loop's own thread: the
        process dies with the thread that started it (see SpareProcess)."""
        if self._spare is not None and self._spare.alive:
            return
        if self._spare is not None:
            self._spare.close()
        self._spare = None
        try:
            self._spare = SpareProcess(self.vm.ram.fd, self.vm.ram.size)
        except OSError as e:
            # Not fatal: a migration starts one when it needs it (and says so if it cannot).
            log.warning("cannot start a migration process in advance: %s", e)

    def _take_migration_process(self) -> SpareProcess:
        spare, self._spare = self._spare, None
        if spare is not None and spare.alive:
            return spare
        if spare is not None:
            spare.close()
        try:
            return SpareProcess(self.vm.ram.fd, self.vm.ram.size)
        except OSError as e:
            raise CommandError(
                grpc.StatusCode.UNAVAILABLE, f"cannot start the migration process: {e}"
            ) from None

    def close_migration_process(self) -> None:
        """Send the idle migration process away (it exits on end-of-file)."""
        if self._spare is not None:
            self._spare.close()
            self._spare = None

    async def listen_incoming(self, token: bytes, host: str, timeout: float) -> str:
        if self.vm.state is not VMState.INCOMING or self.discarded:
            raise CommandError(
                grpc.StatusCode.FAILED_PRECONDITION, "this worker holds no incoming VM"
            )
        if self.incoming is not None:
            raise CommandError(grpc.StatusCode.FAILED_PRECONDITION, "already listening")
        if not token:
            raise CommandError(grpc.StatusCode.INVALID_ARGUMENT, "the token must not be empty")
        assert self._nursery is not None
        incoming = IncomingMigration(
            self, token, timeout, trio.lowlevel.current_trio_token(), self._fault
        )
        server = grpc.server(
            ThreadPoolExecutor(max_workers=4, thread_name_prefix="migration-in"),
            options=[
                ("grpc.max_receive_message_length", MAX_MESSAGE),
                ("grpc.max_send_message_length", MAX_MESSAGE),
                ("grpc.so_reuseport", 0),
            ],
        )
        server.add_generic_rpc_handlers((incoming.rpc_handler(),))
        try:
            port = server.add_insecure_port(format_endpoint(host, 0))
        except RuntimeError:
            port = 0
        if port == 0:
            raise CommandError(
                grpc.StatusCode.INTERNAL, f"cannot listen for the migration on {host}"
            )
        server.start()
        self.incoming = incoming
        self._incoming_server = server
        self._nursery.start_soon(incoming.watch_idle)
        return format_endpoint(host, port)

    async def start_migration(
        self, endpoint: str, token: bytes, options_pb: types_pb2.MigrationOptions
    ) -> types_pb2.MigrationStatus:
        if self.outgoing is not None and self.outgoing.active:
            raise CommandError(
                grpc.StatusCode.FAILED_PRECONDITION, f"VM {self.name!r} is already migrating"
            )
        if self.vm.state is not VMState.RUNNING or self.migrated:
            raise CommandError(
                grpc.StatusCode.FAILED_PRECONDITION,
                f"VM {self.name!r} is {self.vm.state.value}; only a running VM can be "
                "live-migrated",
            )
        if not endpoint:
            raise CommandError(
                grpc.StatusCode.INVALID_ARGUMENT, "destination_endpoint must not be empty"
            )
        if not token:
            raise CommandError(grpc.StatusCode.INVALID_ARGUMENT, "token must not be empty")
        try:
            options = options_from_pb(options_pb)
        except ValueError as e:
            raise CommandError(grpc.StatusCode.INVALID_ARGUMENT, str(e)) from None
        assert self._nursery is not None
        process = self._take_migration_process()
        self.outgoing = OutgoingMigration(self, endpoint, token, options, process)
        self._nursery.start_soon(self.outgoing.run)
        log.info("migrating to %s", endpoint)
        return self.outgoing.status()

    async def cancel_migration(self) -> types_pb2.MigrationStatus:
        if self.outgoing is None:
            return await self.migration_status()
        await self.outgoing.cancel()
        return self.outgoing.status()

    async def migration_status(self) -> types_pb2.MigrationStatus:
        if self.outgoing is None:
            return types_pb2.MigrationStatus(vm=self.name, status=types_pb2.MIGRATION_STATE_NONE)
        return self.outgoing.status()

    async def next_migration_status(self, wait_s: float) -> types_pb2.MigrationStatus:
        """The migration's status once it next changes, or after ``wait_s`` at most."""
        outgoing = self.outgoing
        if outgoing is not None and outgoing.active:
            with trio.move_on_after(wait_s):
                await outgoing.changed()
        return await self.migration_status()

    def stop_incoming_server(self) -> threading.Event | None:
        """Stop listening for migration streams; the one in progress gets a few seconds to
        deliver its last answer (``Resumed``, or a refusal). Returns the event set once it
        has, for a worker about to exit to wait on: leaving at once would reset the
        connection and could destroy an answer still on its way."""
        server, self._incoming_server = self._incoming_server, None
        if server is None:
            return None
        stopped: threading.Event = server.stop(INCOMING_GRACE_S)
        return stopped


class WorkerServicer(worker_pb2_grpc.WorkerServicer):
    """The agent's channel into the worker; every call hops into the trio loop."""

    def __init__(self, worker: Worker, token: trio.lowlevel.TrioToken) -> None:
        self._worker = worker
        self._token = token

    def _call(
        self, context: grpc.ServicerContext, fn: Callable[..., Awaitable[T]], *args: Any
    ) -> T:
        try:
            return trio.from_thread.run(fn, *args, trio_token=self._token)
        except CommandError as e:
            context.abort(e.code, str(e))
        except trio.RunFinishedError:
            context.abort(grpc.StatusCode.UNAVAILABLE, "the VM's worker is shutting down")
        raise AssertionError("context.abort() returns only by raising")

    def GetStatus(
        self, request: worker_pb2.WorkerStatusRequest, context: grpc.ServicerContext
    ) -> worker_pb2.WorkerStatus:
        async def status() -> worker_pb2.WorkerStatus:
            return self._worker.status()

        return self._call(context, status)

    def Control(
        self, request: worker_pb2.WorkerCommand, context: grpc.ServicerContext
    ) -> worker_pb2.WorkerStatus:
        return self._call(context, self._worker.control, request.action, request.timeout_seconds)

    def Snapshot(
        self, request: worker_pb2.WorkerSnapshotRequest, context: grpc.ServicerContext
    ) -> worker_pb2.WorkerSnapshotResponse:
        size = self._call(context, self._worker.snapshot, request.path)
        return worker_pb2.WorkerSnapshotResponse(size_bytes=size)

    def ConsoleInput(
        self, request: worker_pb2.WorkerConsoleInput, context: grpc.ServicerContext
    ) -> worker_pb2.WorkerStatus:
        self._call(context, self._worker.send_input, request.data)
        return worker_pb2.WorkerStatus()

    def ListenIncoming(
        self, request: worker_pb2.WorkerIncomingRequest, context: grpc.ServicerContext
    ) -> worker_pb2.WorkerIncomingResponse:
        endpoint = self._call(
            context, self._worker.listen_incoming, request.token, request.host, request.timeout_s
        )
        return worker_pb2.WorkerIncomingResponse(endpoint=endpoint)

    def StartMigration(
        self, request: worker_pb2.WorkerMigrationRequest, context: grpc.ServicerContext
    ) -> types_pb2.MigrationStatus:
        return self._call(
            context,
            self._worker.start_migration,
            request.endpoint,
            request.token,
            request.options,
        )

    def CancelMigration(
        self, request: worker_pb2.WorkerStatusRequest, context: grpc.ServicerContext
    ) -> types_pb2.MigrationStatus:
        return self._call(context, self._worker.cancel_migration)

    def GetMigration(
        self, request: worker_pb2.WorkerStatusRequest, context: grpc.ServicerContext
    ) -> types_pb2.MigrationStatus:
        return self._call(context, self._worker.migration_status)

    def WatchMigration(
        self, request: worker_pb2.WorkerStatusRequest, context: grpc.ServicerContext
    ) -> Iterator[types_pb2.MigrationStatus]:
        def statuses() -> Iterator[types_pb2.MigrationStatus]:
            yield self._call(context, self._worker.migration_status)
            while context.is_active():
                yield self._call(context, self._worker.next_migration_status, WATCH_WAIT_S)

        yield from changes_until_ended(statuses())

    def ConsoleOutput(
        self, request: worker_pb2.WorkerConsoleRequest, context: grpc.ServicerContext
    ) -> Iterator[worker_pb2.WorkerConsoleChunk]:
        console = self._worker.console

        async def resolve() -> tuple[int, int]:
            return console.resolve(request.offset), console.total

        offset, end = self._call(context, resolve)
        # Without follow, the answer is what was there when asked: a guest that keeps
        # printing must not keep the stream open.
        wait = 1.0 if request.follow else 0.0
        while context.is_active() and (request.follow or offset < end):
            try:
                start, data, ended = trio.from_thread.run(
                    console.wait_read, offset, wait, trio_token=self._token
                )
            except trio.RunFinishedError:
                return
            if not request.follow:
                data = data[: max(end - start, 0)]
            if data:
                yield worker_pb2.WorkerConsoleChunk(offset=start, data=data)
                offset = start + len(data)
            elif ended or not request.follow:
                return


def vm_config(spec: types_pb2.VMSpec) -> VMConfig:
    """The board a VM spec describes: what the worker builds, and what a migration's Hello
    must match (its config hash)."""
    return VMConfig(
        kernel=spec.kernel,
        memory=spec.memory_bytes,
        bios=spec.bios or "none",
        append=spec.append,
        deterministic=spec.deterministic,
    )


def _build_vm(args: argparse.Namespace, vm_dir: VMDir, console: ConsoleLog) -> VM:
    if args.restore:
        return VM.restore_snapshot(args.restore, console=console.write)
    return VM(vm_config(vm_dir.read_spec()), console=console.write, incoming=args.incoming)


def _load_failure_status(args: argparse.Namespace, e: Exception) -> dict[str, Any]:
    # What a user caused (a bad image, config or snapshot) is INVALID_ARGUMENT with the
    # loader's own one-line message; anything else is a Ferry bug and says so.
    if isinstance(e, (LoaderError, ValueError)) or args.restore:
        return {"phase": "load", "code": "INVALID_ARGUMENT", "error": str(e)}
    return {"phase": "load", "code": "INTERNAL", "error": f"{type(e).__name__}: {e}"}


def _final_status(worker: Worker) -> dict[str, Any]:
    stats = worker.vm.stats()
    state = worker.vm.state.value
    if worker.migrated:
        state = "migrated"
    elif worker.discarded:
        state = "failed"
    return {
        "phase": "final",
        "state": state,
        "incoming_failed": bool(worker.discarded),
        "exit_code": worker.vm.exit_code,
        "failure": worker.vm.failure or worker.discarded,
        "instret": stats["instret"],
        "guest_seconds": stats["guest_seconds"],
        "console_bytes": worker.console.total,
    }


async def _serve(args: argparse.Namespace, vm_dir: VMDir) -> int:
    console = ConsoleLog(vm_dir.console_log, args.console_buffer)
    try:
        vm = _build_vm(args, vm_dir, console)
    except Exception as e:
        console.close()
        vm_dir.write_status(_load_failure_status(args, e))
        print(f"ferry-worker: {e}", file=sys.stderr)
        return EXIT_LOAD_FAILED
    with contextlib.suppress(FileNotFoundError):
        vm_dir.socket.unlink()  # a dead predecessor's; the lock says none is alive
    # Each console follower holds a handler thread for as long as it follows; the pool is
    # sized so that followers never starve the agent's commands.
    server = grpc.server(ThreadPoolExecutor(max_workers=64, thread_name_prefix="worker-grpc"))
    async with trio.open_nursery() as nursery:
        worker = Worker(
            args.name, vm, console, nursery=nursery, migration_file=vm_dir.migration_file
        )
        worker_pb2_grpc.add_WorkerServicer_to_server(
            WorkerServicer(worker, trio.lowlevel.current_trio_token()), server
        )
        server.add_insecure_port(f"unix:{vm_dir.socket}")
        server.start()
        if args.start:
            worker.vm.start()
        if not args.incoming:
            worker.prepare_migration_process()

        async def on_signals() -> None:
            with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
                async for _ in signals:
                    nursery.start_soon(worker.stop, 0.0)

        nursery.start_soon(on_signals)
        await worker.run()
        if worker.outgoing is not None:
            if worker.outgoing.active:
                # The guest powered off (or failed) mid-migration: nothing is left to move.
                reason = f"the VM {worker.vm.state.value} during the migration"
                await worker.outgoing.cancel(reason)
            # A VM that migrated away ends the loop as soon as the outcome is in: wait for
            # the migration's final figures to be saved before the server stops answering,
            # or the agent would find neither this worker nor migration.json.
            with trio.move_on_after(5.0):
                await worker.outgoing.done.wait()
        worker.close_migration_process()
        vm_dir.write_status(_final_status(worker))
        console.close()
        incoming_stopped = worker.stop_incoming_server()
        # Let console followers drain the last bytes before the socket goes away.
        await trio.to_thread.run_sync(lambda: server.stop(2.0).wait())
        if incoming_stopped is not None:
            await trio.to_thread.run_sync(incoming_stopped.wait, INCOMING_GRACE_S)
        nursery.cancel_scope.cancel()
    with contextlib.suppress(FileNotFoundError):
        vm_dir.socket.unlink()
    return 0


def _parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m node.worker", description="Run one VM for ferry-node (not for users)."
    )
    parser.add_argument("--data-dir", type=Path, required=True)
    parser.add_argument("--name", required=True)
    parser.add_argument("--console-buffer", type=int, default=1 << 20)
    parser.add_argument("--restore", help="build the VM from this snapshot file (paused)")
    parser.add_argument("--start", action="store_true", help="start the VM once built")
    parser.add_argument(
        "--incoming", action="store_true", help="build the VM empty, to receive a migration"
    )
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = _parse_args(argv)
    # The vCPU holds the GIL for whole slices; every hand-off to a migration or console
    # thread would otherwise wait out the default 5 ms switch interval (measured: round-0
    # throughput up to ~2-3x with 0.5 ms; guest speed is unaffected while no thread waits).
    sys.setswitchinterval(0.0005)
    logging.basicConfig(
        level=logging.INFO,
        format=f"%(asctime)s ferry-worker[{args.name}] %(levelname)s %(message)s",
        stream=sys.stderr,
    )
    vm_dir = VMDir(args.data_dir.resolve(), args.name)
    vm_dir.create()
    lock_fd = os.open(vm_dir.lock_file, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(lock_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        print(f"ferry-worker: VM {args.name} already has a running worker", file=sys.stderr)
        return EXIT_ALREADY_RUNNING
    with contextlib.suppress(FileNotFoundError):
        vm_dir.status_file.unlink()
    vm_dir.pid_file.write_text(f"{os.getpid()}\n")
    try:
        return trio.run(_serve, args, vm_dir)
    finally:
        with contextlib.suppress(FileNotFoundError):
            vm_dir.pid_file.unlink()


def run() -> None:
    """Run the worker and exit without waiting for stray handler threads: a migration
    stream stuck in a dead peer's handler must not keep a finished VM's process alive
    (and its lock held)."""
    code = main()
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


if __name__ == "__main__":
    run()
