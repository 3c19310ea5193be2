"""A VMM worker's two ends of a live migration: the gRPC stream around the sans-I/O core.

:mod:`node.migration` decides everything (what to send, when to pause, when it is over);
this module only moves its messages over one bidirectional ``Migration.Migrate`` stream
and carries out its actions on the worker's VM, in the worker's trio loop (DESIGN §6).

Both ends use the protocol's own serialised form (:func:`node.migration.wire.migrate_call`,
:func:`~node.migration.wire.migration_handler`): exactly protobuf's wire format, but a page
batch is written with one copy of its payload and read with none, where building protobuf
objects costs three copies each way.

**Source** (:class:`OutgoingMigration`): a trio task drives the sender between the vCPU's
slices. The stream is grpcio's synchronous one, and its two blocking halves live in
threads so that neither ever holds up the guest: grpcio's own request thread takes
ready-made bytes from a queue and writes them, and a reader thread posts the destination's
answers into the loop through a trio channel. Each message is serialised in the loop as
the sender emits it, because a batch's payload may be a view of guest RAM: encoded at
once, the bytes that leave are the pages the sender hashed, and gRPC's thread, which has to
win the interpreter from the vCPU, only writes. The sender's credit window bounds the
queue. A destination that stops answering while messages are outstanding for
:data:`SILENCE_S` counts as a lost connection (the sender then resumes the VM, or reports
the outcome unknown after its final message), so a stalled peer can never hold a migration
forever.

**Destination** (:class:`IncomingMigration`): the Migration service of an incoming worker.
It serves exactly one stream. A reader thread takes each message into the loop, through
the receiver, and queues the receiver's answers; the handler's own thread writes them.
grpcio's synchronous server only asks a handler for its next answer once the last one is
written, so reading in that same thread would add a write to every batch's turn. Refusal,
abort, invalid input, a message that does not decode (gRPC then ends the stream), a broken
stream or :class:`~node.migration.MigrationReceiver`'s idle timeout discard the incoming VM
(the worker then ends; the agent reports the VM failed with the reason).

**Console continuity.** The source's device state carries its console's total byte count
and the last :data:`CONSOLE_HISTORY` bytes of output; the destination's console log takes
them over before the guest's first instruction there. Console offsets are absolute across
the move: a client that followed the source to offset N asks the destination for N and
gets the next byte, never a gap or a repeated byte. Offsets older than the carried history
are no longer kept, and a read from them starts at the oldest byte kept (as the Console
API already allows).
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import math
import queue
import threading
import time
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

import grpc
import msgpack
import trio

from node import FERRY_VERSION
from node.faults import Fault
from node.migration import (
    Action,
    Cancelled,
    Completed,
    DiscardVM,
    Failed,
    GuestRunning,
    MigrationOptions,
    MigrationReceiver,
    MigrationSender,
    OutcomeUnknown,
    Pages,
    PauseVM,
    ResumeVM,
    SendMessage,
    SetThrottle,
)
from node.migration.messages import (
    Complete,
    DestinationMessage,
    DeviceState,
    Hello,
    Message,
    SourceMessage,
)
from node.migration.residency import AnonymousRAM
from node.migration.wire import encode_source, migrate_call, migration_handler, status_to_pb
from protos.ferry.v1 import types_pb2
from vmcore.vm import VMState, config_hash

if TYPE_CHECKING:
    from node.worker import Worker

log = logging.getLogger("ferry-worker")

CONSOLE_HISTORY = 1 << 20
"""Console bytes carried to the destination: the node's default console ring, enough for a
follower to re-read recent output there without costing noticeable downtime."""

SILENCE_S = 10.0
"""A destination that answers nothing this long while messages are outstanding is lost. An
acknowledgement takes milliseconds on a working link; this only catches a stalled peer."""

WINDOW = 16
"""Batches (~1 MiB each) the source may have in flight. Each acknowledgement waits for the
source's loop to finish its current guest slice, so a deeper window keeps the stream busy
while the vCPU runs."""

MAX_MESSAGE = 80 << 20
"""gRPC's 4 MiB default is too small for a device state with its console history; the
receiver caps what it accepts itself (device state 64 MiB)."""

_CHANNEL_OPTIONS = [
    ("grpc.max_receive_message_length", MAX_MESSAGE),
    ("grpc.max_send_message_length", MAX_MESSAGE),
]


def format_endpoint(host: str, port: int) -> str:
    """host:port, with an IPv6 literal in brackets as gRPC targets need it."""
    if ":" in host and not host.startswith("["):
        host = f"[{host}]"
    return f"{host}:{port}"


@dataclasses.dataclass(frozen=True)
class _Lost:
    """The reader thread's last word: the stream ended or broke."""

    detail: str


@dataclasses.dataclass(frozen=True)
class _StreamEnd:
    """The destination's reader thread is done; ``finished``: the receiver reached its end
    (the guest runs here, or the migration failed) rather than the stream breaking."""

    finished: bool


class OutgoingMigration:
    """Streams the worker's running VM to a prepared destination worker."""

    def __init__(
        self,
        worker: Worker,
        endpoint: str,
        token: bytes,
        options: MigrationOptions,
        fault: Fault | None = None,
    ) -> None:
        self._worker = worker
        self.endpoint = endpoint
        self._fault = fault
        vm = worker.vm
        self.sender = MigrationSender(
            vm.ram.view,
            vm.dirty_log,
            self._save_state,
            token=token,
            config_hash=config_hash(vm.config),
            ferry_version=FERRY_VERSION,
            board_config=msgpack.packb(vm.config.to_dict(), use_bin_type=True),
            vm_name=worker.name,
            options=options,
            # GuestRAM is a private anonymous mapping: pages it never backed read as zero.
            never_backed=AnonymousRAM(vm.ram.view).never_backed,
        )
        self._outbox: queue.SimpleQueue[bytes | None] = queue.SimpleQueue()
        self._inbox_in, self._inbox = trio.open_memory_channel[Message | _Lost](math.inf)
        self._call: Any = None
        self._rounds_seen: set[int] = set()
        self._dropped = False
        self._outstanding = False
        self._waiting_since = 0.0
        self.paused_at = 0.0
        self.resumed_at = 0.0
        self.done = trio.Event()

    @property
    def active(self) -> bool:
        return not self.sender.finished

    def status(self) -> types_pb2.MigrationStatus:
        """The migration's statistics as the API reports them (query-migrate names)."""
        status = status_to_pb(
            self.sender.stats(),
            vm=self._worker.name,
            error=self.sender.reason,
            destination=self.endpoint,
        )
        status.paused_at = self.paused_at
        status.resumed_at = self.resumed_at
        return status

    def cancel(self, reason: str = "cancelled by request") -> None:
        self._do(self.sender.cancel(reason))

    def _save_state(self) -> dict[str, Any]:
        state = self._worker.vm.save_state()
        start, history = self._worker.console.history(CONSOLE_HISTORY)
        state["console"] = {"total": self._worker.console.total, "start": start, "data": history}
        return state

    # -- the stream ----------------------------------------------------------------------

    def _post(self, message: Message | _Lost) -> None:
        with contextlib.suppress(trio.ClosedResourceError):
            self._inbox_in.send_nowait(message)

    def _read(self, call: Any, token: trio.lowlevel.TrioToken) -> None:
        # run_sync_soon, not from_thread.run_sync: the reader must not wait for the loop to
        # finish a guest slice before it reads the next answer off the wire.
        detail = "the destination closed the stream"
        try:
            for reply in call:
                token.run_sync_soon(self._post, reply)
        except grpc.RpcError as e:
            # An answer that does not decode ends the call too (INTERNAL).
            detail = f"{e.code().name}: {e.details()}"
        except trio.RunFinishedError:
            return
        with contextlib.suppress(trio.RunFinishedError):
            token.run_sync_soon(self._post, _Lost(detail))

    async def run(self) -> None:
        """Drive the migration to its end; the VM runs its slices in between."""
        channel = grpc.insecure_channel(self.endpoint, options=_CHANNEL_OPTIONS)
        try:
            # grpcio's request thread blocks in the queue's get, never in the trio loop.
            self._call = migrate_call(channel, encoded=True)(iter(self._outbox.get, None))
            threading.Thread(
                target=self._read,
                args=(self._call, trio.lowlevel.current_trio_token()),
                name="migration-reader",
                daemon=True,
            ).start()
            self._do(self.sender.start())
            while not self.sender.finished:
                await self._step()
        finally:
            self._outbox.put(None)
            self._inbox_in.close()
            self.done.set()
            self._worker.migration_ended(self)
            with trio.CancelScope(shield=True):
                if self._call is not None:
                    # Give the last message (an Abort) a moment to leave, then cut the stream.
                    await trio.sleep(0.2)
                    self._call.cancel()
                channel.close()

    async def _step(self) -> None:
        while not self.sender.finished and (actions := self.sender.poll()):
            self._do(actions)
        if self.sender.finished:
            return
        ready = self.sender.ready_at
        wait = 0.1 if ready is None else min(max(0.0, ready - time.monotonic()), 0.1)
        if wait <= 0:
            await trio.sleep(0)  # a slice of guest, then more of the scan
        else:
            with trio.move_on_after(wait):
                self._on_message(await self._inbox.receive())
        while not self.sender.finished:
            try:
                message = self._inbox.receive_nowait()
            except (trio.WouldBlock, trio.EndOfChannel):
                break
            self._on_message(message)
        if not self.sender.finished:
            self._do(self.sender.tick())
        silent = time.monotonic() - self._waiting_since
        if not self.sender.finished and self._outstanding and silent >= SILENCE_S:
            self._do(
                self.sender.connection_lost(f"the destination did not answer for {silent:.0f} s")
            )

    def _on_message(self, message: Message | _Lost) -> None:
        self._outstanding = False
        self._waiting_since = time.monotonic()
        if isinstance(message, _Lost):
            self._do(self.sender.connection_lost(message.detail))
        else:
            self._do(self.sender.receive(message))

    # -- actions -------------------------------------------------------------------------

    def _do(self, actions: list[Action]) -> None:
        worker = self._worker
        vm = worker.vm
        for action in actions:
            if isinstance(action, SendMessage):
                self._send(action.message)
            elif isinstance(action, PauseVM):
                if vm.state is VMState.RUNNING:
                    vm.pause()
                self.paused_at = time.monotonic()
                self._fault_at("switchover")
            elif isinstance(action, ResumeVM):
                if vm.state is VMState.PAUSED:
                    vm.resume()
                worker.wake()
            elif isinstance(action, SetThrottle):
                worker.throttle = action.percent
                log.info("migration: vCPU throttled %d%%", action.percent)
            elif isinstance(action, Completed):
                self.resumed_at = action.resumed_at
                log.info("migration to %s completed: %s", self.endpoint, action.stats)
                worker.migrated_away()
            elif isinstance(action, Cancelled | Failed | OutcomeUnknown):
                worker.throttle = 0
                log.warning("migration to %s ended: %s", self.endpoint, action.reason)

    def _send(self, message: Message) -> None:
        if self._fault is not None:
            if isinstance(message, Hello):
                self._fault_at("hello")
            elif isinstance(message, Pages) and message.round not in self._rounds_seen:
                self._rounds_seen.add(message.round)
                self._fault_at("round0" if message.round == 0 else "round1")
            elif isinstance(message, Complete):
                self._fault_at("complete")
            if self._dropped:
                return
        if not self._outstanding:
            self._outstanding = True
            self._waiting_since = time.monotonic()
        # Now, before the guest runs again: a batch's payload may be a view of its RAM.
        self._outbox.put(encode_source(message))  # type: ignore[arg-type]

    def _fault_at(self, point: str) -> None:
        """A test fault (FERRY_FAULT) just before this point's message leaves. A dropped
        stream is cut before the message goes, so the outcome the test sees is exact."""
        if self._fault is None or self._fault.at("src", point) != "drop" or self._dropped:
            return
        self._dropped = True
        if self._call is not None:
            self._call.cancel()
        self._do(self.sender.connection_lost("fault injected: stream dropped"))


class IncomingMigration:
    """The destination end: one stream into an incoming worker's VM."""

    def __init__(
        self,
        worker: Worker,
        token: bytes,
        timeout_s: float,
        trio_token: trio.lowlevel.TrioToken,
        fault: Fault | None = None,
    ) -> None:
        self._worker = worker
        self._trio_token = trio_token
        self._fault = fault
        self._claimed = False
        self._lock = threading.Lock()
        self._rounds_seen: set[int] = set()
        self.receiver = MigrationReceiver(
            worker.vm.ram.view,
            token=token,
            config_hash=config_hash(worker.vm.config),
            restore=self._restore,
            window=WINDOW,
            idle_timeout_s=timeout_s,
            # GuestRAM is private anonymous memory: have each batch's pages backed at once.
            before_write=AnonymousRAM(worker.vm.ram.view).back,
        )

    def rpc_handler(self) -> grpc.GenericRpcHandler:
        """The ``Migration`` service to register on the incoming worker's gRPC server."""
        return migration_handler(self.migrate)

    # -- in the trio loop ----------------------------------------------------------------

    def _restore(self, state: dict[str, Any]) -> None:
        worker = self._worker
        console = state.get("console")
        worker.vm.load_state(state)
        if isinstance(console, dict):
            worker.console.adopt(int(console["start"]), bytes(console["data"]))
        worker.vm.resume()
        worker.wake()

    def _carry_out(self, actions: list[Action]) -> list[DestinationMessage]:
        replies: list[DestinationMessage] = []
        for action in actions:
            if isinstance(action, SendMessage):
                replies.append(action.message)  # type: ignore[arg-type]
            elif isinstance(action, DiscardVM):
                log.warning("incoming migration failed: %s", action.reason)
                self._worker.discard(action.reason)
            elif isinstance(action, GuestRunning):
                log.info("incoming migration complete: the guest runs here")
                self._worker.stop_incoming_server()
        return replies

    def _handle(self, message: object) -> tuple[list[DestinationMessage], bool]:
        return self._carry_out(self.receiver.receive(message)), self.receiver.finished

    def _lost(self, detail: str) -> None:
        self._carry_out(self.receiver.connection_lost(detail))

    async def watch_idle(self) -> None:
        """Discard the incoming VM once the source has been silent too long."""
        while not self.receiver.finished:
            await trio.sleep(0.5)
            self._carry_out(self.receiver.tick())

    # -- in grpcio's handler thread --------------------------------------------------------

    def migrate(
        self, requests: Iterator[SourceMessage], context: grpc.ServicerContext
    ) -> Iterator[DestinationMessage]:
        """The stream's handler: answers written here while a reader thread reads."""
        with self._lock:
            claimed, self._claimed = self._claimed, True
        if claimed:
            context.abort(
                grpc.StatusCode.FAILED_PRECONDITION,
                "this incoming VM already has its migration stream",
            )
        answers: queue.SimpleQueue[DestinationMessage | _StreamEnd] = queue.SimpleQueue()
        threading.Thread(
            target=self._read, args=(requests, answers), name="migration-in-reader", daemon=True
        ).start()
        while not isinstance(answer := answers.get(), _StreamEnd):
            yield answer
        fault = self._fault
        if (
            answer.finished
            and fault is not None
            and fault.side == "dst"
            and fault.point == "resumed"
        ):
            time.sleep(0.2)  # let Resumed reach the source first
            fault.at("dst", "resumed")

    def _read(
        self,
        requests: Iterator[SourceMessage],
        answers: queue.SimpleQueue[DestinationMessage | _StreamEnd],
    ) -> None:
        run = trio.from_thread.run_sync
        detail = "the source closed the stream"
        finished = False
        try:
            try:
                for request in requests:
                    message, drop = self._inject(request)
                    if drop:
                        detail = "fault injected: stream dropped"
                        break
                    replies, finished = run(self._handle, message, trio_token=self._trio_token)
                    for reply in replies:
                        answers.put(reply)
                    if finished:
                        return
            except grpc.RpcError as e:
                # A message that does not decode ends the stream here too (INTERNAL).
                detail = f"{e.code().name}: {e.details()}" if hasattr(e, "code") else "stream broke"
            run(self._lost, detail, trio_token=self._trio_token)
        except trio.RunFinishedError:
            pass
        finally:
            answers.put(_StreamEnd(finished))

    def _inject(self, message: object) -> tuple[object, bool]:
        """Apply a test fault (FERRY_FAULT) at this message's point; (message, drop)."""
        if self._fault is None:
            return message, False
        point = None
        if isinstance(message, Hello):
            point = "hello"
        elif isinstance(message, Pages) and message.round not in self._rounds_seen:
            self._rounds_seen.add(message.round)
            point = "round0" if message.round == 0 else "round1"
        elif isinstance(message, DeviceState):
            point = "switchover"
        elif isinstance(message, Complete):
            point = "complete"
        action = self._fault.at("dst", point) if point else None
        if action == "corrupt" and isinstance(message, Pages) and len(message.payload):
            # Inside the batch's first page: in round 0 that is the guest's code, which is
            # never dirtied and so never resent to repair the damage.
            payload = bytearray(message.payload)
            payload[min(100, len(payload) - 1)] ^= 0x80
            message = dataclasses.replace(message, payload=bytes(payload))
        return message, action == "drop"
