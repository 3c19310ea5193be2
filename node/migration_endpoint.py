"""A VMM worker's two ends of a live migration: the gRPC stream around the sans-I/O core.

:mod:`node.migration` decides everything (what to send, when to pause, when it is over);
this module only moves its messages over one bidirectional ``Migration.Migrate`` stream
and carries out its actions on the worker's VM, in the worker's trio loop (DESIGN §6).

Both ends use the protocol's own serialised form (:func:`node.migration.wire.migrate_call`,
:func:`~node.migration.wire.migration_handler`): exactly protobuf's wire format, but a page
batch is written with one copy of its payload and read with none, where building protobuf
objects costs three copies each way.

**Source** (:class:`OutgoingMigration`): the sender and the stream run in a migration
process (:mod:`node.migration_process`) that maps the guest's RAM, so that scanning,
hashing, encoding and writing pages no longer share the interpreter with the vCPU. What
only the worker can do (pause, resume and throttle the vCPU, save the device state, enable
and fetch the dirty log) the process asks for over its control channel, and this end
answers in the trio loop between guest slices. The process pushes its statistics as it
goes, so status queries are answered here at once, and reports the outcome; if it dies
instead, this end settles the migration from what it was told: before ``Complete`` was
about to leave, the VM resumes and the migration failed; after, the outcome is unknown.

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
import queue
import threading
import time
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

import grpc
import msgpack
import trio

from node import FERRY_VERSION
from node.allocator import hold_freed_buffers, release_freed_buffers
from node.faults import Fault
from node.migration import (
    REPORTED_ROUNDS,
    Action,
    DiscardVM,
    GuestRunning,
    MigrationOptions,
    MigrationReceiver,
    Pages,
    ReceiverPhase,
    RoundStats,
    SendMessage,
)
from node.migration.messages import (
    Complete,
    DestinationMessage,
    DeviceState,
    Hello,
    SourceMessage,
)
from node.migration.residency import MemfdRAM
from node.migration.wire import migration_handler, status_to_pb
from node.migration_control import AsyncChannel, ControlError, field
from node.migration_process import SpareProcess, death_reason
from protos.ferry.v1 import types_pb2
from vmcore.vm import VMState, config_hash

if TYPE_CHECKING:
    from node.worker import Worker

log = logging.getLogger("ferry-worker")

CONSOLE_HISTORY = 1 << 20
"""Console bytes carried to the destination: the node's default console ring, enough for a
follower to re-read recent output there without costing noticeable downtime."""

WINDOW = 16
"""Batches (~1 MiB each) the source may have in flight. Each acknowledgement waits for the
source's loop to finish its current guest slice, so a deeper window keeps the stream busy
while the vCPU runs."""

def format_endpoint(host: str, port: int) -> str:
    """host:port, with an IPv6 literal in brackets as gRPC targets need it."""
    if ":" in host and not host.startswith("["):
        host = f"[{host}]"
    return f"{host}:{port}"


class _StreamEnd:
    """The destination's reader thread is done: the stream's handler has no more answers."""


class OutgoingMigration:
    """Streams the worker's running VM to a prepared destination worker.

    The stream itself runs in a migration process (:mod:`node.migration_process`); this is
    the worker's half: it hands the process the migration, carries out its requests on the
    VM between guest slices, keeps the statistics it pushes (so status queries never wait
    for it) and, should the process die, settles the migration itself.
    """

    def __init__(
        self,
        worker: Worker,
        endpoint: str,
        token: bytes,
        options: MigrationOptions,
        process: SpareProcess,
    ) -> None:
        self._worker = worker
        self.endpoint = endpoint
        self._process = process
        self._channel = AsyncChannel(process.control)
        vm = worker.vm
        self._start = {
            "endpoint": endpoint,
            "token": token,
            "options": dataclasses.asdict(options),
            "config_hash": config_hash(vm.config),
            "ferry_version": FERRY_VERSION,
            "board_config": msgpack.packb(vm.config.to_dict(), use_bin_type=True),
            "vm_name": worker.name,
        }
        self._stats = _initial_stats(vm.ram.size)
        self.reason = ""
        self.paused_at = 0.0
        self.resumed_at = 0.0
        self.finished = False
        # Set once the process said Complete is about to leave: from then on the
        # destination may run the guest, so a dead process leaves the outcome unknown.
        self._complete_sent = False
        self._paused_vm = False
        # Worker clock (time.monotonic) at the switchover's steps: see _downtime_phases.
        self._marks: dict[str, float] = {}
        self._cancels_sent = 0
        self._cancels_seen = 0
        self._update = trio.Event()
        self._start_sent = trio.Event()
        self.done = trio.Event()

    @property
    def active(self) -> bool:
        return not self.finished

    def status(self) -> types_pb2.MigrationStatus:
        """The migration's statistics as the API reports them (query-migrate names)."""
        status = status_to_pb(
            self._stats, vm=self._worker.name, error=self.reason, destination=self.endpoint
        )
        # The vCPU stops here, in the worker: its clock, not the process's (which learns
        # of the pause a reply later), says when the guest stopped.
        status.paused_at = self._marks.get("paused", self.paused_at)
        status.resumed_at = self.resumed_at
        phases = self._downtime_phases()
        status.downtime_phases_ms.update(phases)
        if len(phases) == len(_DOWNTIME_PHASES):
            # The process times downtime from its decision to pause, but the guest runs on
            # until the worker takes that request (a hop, and the end of the guest slice
            # under way: tens of ms on a crowded host). The worker's own span starts when
            # the vCPU stops and ends when it hears the guest runs at the destination.
            status.downtime_ms = sum(phases.values())
        return status

    def _downtime_phases(self) -> dict[str, float]:
        """Where the switchover's time went, from the steps the worker saw (ms); a phase
        still under way is left out."""
        marks = self._marks
        phases = {}
        for name, start, end in _DOWNTIME_PHASES:
            if start in marks and end in marks:
                phases[name] = (marks[end] - marks[start]) * 1000
        return phases

    async def cancel(self, reason: str = "cancelled by request") -> None:
        """Ask the process to cancel and wait (bounded) until it has: the answer then says
        cancelled, or cancelling when Complete had already left. A process that does not
        answer in :data:`CANCEL_ANSWER_S` is killed, which settles the migration too."""
        if self.finished:
            return
        # The process takes nothing before its migration: a cancel must follow the start.
        await self._start_sent.wait()
        if self.finished:
            return
        self._cancels_sent += 1
        with contextlib.suppress(OSError):
            await self._channel.send("cancel", reason=reason)
        with trio.move_on_after(CANCEL_ANSWER_S):
            while not self.finished and self._cancels_seen < self._cancels_sent:
                await self._update.wait()
            return
        log.warning("migration process did not answer a cancel: killing it")
        self._process.kill()
        with trio.move_on_after(CANCEL_ANSWER_S):
            await self.done.wait()

    def _save_state(self) -> dict[str, Any]:
        state = self._worker.vm.save_state()
        start, history = self._worker.console.history(CONSOLE_HISTORY)
        state["console"] = {"total": self._worker.console.total, "start": start, "data": history}
        return state

    def _updated(self) -> None:
        self._update.set()
        self._update = trio.Event()

    async def changed(self) -> None:
        """Return at the next update of the statistics or the outcome."""
        await self._update.wait()

    # -- the control channel ------------------------------------------------------------

    async def run(self) -> None:
        """Serve the process until the migration ends (or the process dies)."""
        try:
            try:
                await self._channel.send("start", **self._start)
            except OSError as e:
                log.error("migration process: %s", e)  # it died; the reads below see it
            finally:
                self._start_sent.set()
            while not self.finished:
                try:
                    message = await self._channel.receive()
                    if message is None:
                        break
                    await self._handle(message)
                except (ControlError, OSError) as e:
                    log.error("migration process: %s; stopping it", e)
                    self._process.kill()
                    break
        finally:
            with trio.CancelScope(shield=True):
                if not self.finished:
                    await self._process_died()
                self.done.set()
                self._updated()
                self._worker.migration_ended(self)
                # The process ends by itself once its last message (an Abort) has left.
                # Closing the channel first would tell it the worker is gone, and it would
                # cut the stream at once, Abort or not.
                await self._reap()
                self._channel.close()

    async def _handle(self, message: dict[str, Any]) -> None:
        """Carry out one message from the process; a request gets its reply at once, in
        the loop, between two guest slices (so a dirty-log fetch never races a store)."""
        op = message["op"]
        if op == "stats":
            self._take_stats(message)
            return
        worker = self._worker
        vm = worker.vm
        reply: dict[str, Any] = {}
        try:
            if op == "enable":
                vm.dirty_log.enable()
            elif op == "disable":
                vm.dirty_log.disable()
            elif op == "fetch":
                reply["pages"] = vm.dirty_log.fetch_and_reset().astype("<u4").tobytes()
            elif op == "pause":
                if vm.state is VMState.RUNNING:
                    vm.pause()
                    self._paused_vm = True
                self._marks["paused"] = time.monotonic()
                # The sender's final fetch and its request for the device state follow
                # every pause: answer both now, saving the paused guest two round trips.
                # Nothing the guest does can come between (its vCPU is stopped).
                reply["pages"] = vm.dirty_log.fetch_and_reset().astype("<u4").tobytes()
                try:
                    reply["state"] = msgpack.packb(self._save_state(), use_bin_type=True)
                except Exception as e:  # reported when the sender asks for the state
                    reply["state_error"] = f"{type(e).__name__}: {e}"
                self._marks["answered"] = time.monotonic()
            elif op == "resume":
                self._resume()
            elif op == "throttle":
                percent = field(message, "percent", int)
                if not 0 <= percent < 100:
                    raise ControlError(f"throttle of {percent}%")
                worker.throttle = percent
                log.info("migration: vCPU throttled %d%%", percent)
            elif op == "completing":
                self._complete_sent = True
                self._marks["completing"] = time.monotonic()
            elif op == "outcome":
                self._take_outcome(message)
            else:
                raise ControlError(f"unknown request {op!r}")
        except ControlError:
            raise
        except Exception as e:  # e.g. a device that cannot save its state
            reply = {"error": f"{type(e).__name__}: {e}"}
        await self._channel.send("reply", to=op, **reply)

    def _resume(self) -> None:
        """Run the vCPU again, if (and only if) this migration paused it."""
        vm = self._worker.vm
        if self._paused_vm and vm.state is VMState.PAUSED:
            vm.resume()
        self._paused_vm = False
        self._worker.wake()

    def _take_stats(self, message: dict[str, Any]) -> None:
        self._stats = _checked_stats(message.get("stats"))
        self.reason = field(message, "reason", str)
        self.paused_at = field(message, "paused_at", float)
        self.resumed_at = field(message, "resumed_at", float)
        self._cancels_seen = field(message, "cancels", int)
        self._updated()

    def _take_outcome(self, message: dict[str, Any]) -> None:
        kind = field(message, "kind", str)
        if kind not in _OUTCOMES:
            raise ControlError(f"unknown outcome {kind!r}")
        self._take_stats(message)
        self.finished = True
        worker = self._worker
        if kind == "completed":
            self._marks["resumed"] = time.monotonic()
            log.info("migration to %s completed: %s", self.endpoint, self._stats)
            worker.migrated_away()
            return
        if kind != "unknown":
            # The process has asked for these already; a second time costs nothing and
            # makes "the VM runs on, untouched" independent of its getting that right.
            worker.throttle = 0
            worker.vm.dirty_log.disable()
            self._resume()
        log.warning("migration to %s ended: %s", self.endpoint, self.reason)

    async def _process_died(self) -> None:
        """The process ended without reporting an outcome: settle the migration here."""
        code = await self._exit_code(2.0)
        if code is None:
            self._process.kill()
        reason = death_reason(code)
        stats = dict(self._stats)
        if self._complete_sent:
            # Complete may have reached the destination: only it knows whether the guest
            # runs there. The copy here stays paused, as for a stream lost at this point.
            stats["status"] = "outcome-unknown"
            reason += " after the final message"
        else:
            stats["status"] = "failed"
            self._worker.throttle = 0
            self._worker.vm.dirty_log.disable()
            self._resume()
        stats["cpu-throttle-percentage"] = self._worker.throttle
        self._stats = stats
        self.reason = reason
        self.finished = True
        log.warning("migration to %s ended: %s", self.endpoint, reason)

    async def _exit_code(self, timeout: float) -> int | None:
        with trio.move_on_after(timeout):
            while (code := self._process.process.poll()) is None:
                await trio.sleep(0.01)
            return code
        return None

    async def _reap(self) -> None:
        """Wait for the process to exit (it does once the outcome is reported, after a
        moment for a last Abort to leave); one that does not is killed."""
        if await self._exit_code(5.0) is None:
            self._process.kill()
            await self._exit_code(5.0)


_DOWNTIME_PHASES = (
    ("pause", "paused", "answered"),
    ("final-round", "answered", "completing"),
    ("destination", "completing", "resumed"),
)
"""A switchover's phases: (name, the step it starts at, the step it ends at)."""

SPARE_AFTER_RESUME_S = 0.1
"""How long after an incoming guest resumes its worker starts a spare migration process."""

CANCEL_ANSWER_S = 5.0
"""How long a cancel waits for the migration process to take it before killing it: it
answers within a few milliseconds unless something is badly wrong with it."""

_OUTCOMES = ("completed", "cancelled", "failed", "unknown")


def _initial_stats(ram_size: int) -> dict[str, Any]:
    """The statistics before the process has pushed any: setup, nothing moved yet."""
    return {
        "status": "setup",
        "setup-time": 0.0,
        "total-time": 0.0,
        "downtime": 0.0,
        "expected-downtime": 0.0,
        "transferred": 0,
        "remaining": 0,
        "total": ram_size,
        "duplicate": 0,
        "normal": 0,
        "compressed-bytes": 0,
        "dirty-pages-rate": 0.0,
        "mbps": 0.0,
        "dirty-sync-count": 0,
        "cpu-throttle-percentage": 0,
        "rounds": [],
    }


_ROUND_TEMPLATE = RoundStats(0, 0, 0, 0, 0.0, 0.0, 0, 0.0, 0.0, 0, 0.0).as_stats()
_UINT32, _UINT64 = 1 << 32, 1 << 64
# The unsigned fields' bounds, from the messages the figures go into as they are.
_ROUND_LIMITS = {
    f.name: _UINT32 if f.type == f.TYPE_UINT32 else _UINT64
    for f in types_pb2.MigrationRound.DESCRIPTOR.fields
    if f.type in (f.TYPE_UINT32, f.TYPE_UINT64)
} | {"cpu_throttle_percentage": 101}
_STATS_LIMITS = {"cpu-throttle-percentage": 101}


def _checked_stats(raw: object) -> dict[str, Any]:
    """The process's statistics, each key present with a value of the expected type, and
    counts within what the API's fields hold (a bad one would fail every status query)."""
    if not isinstance(raw, dict):
        raise ControlError("stats is not a map")
    template = _initial_stats(0)
    stats = {
        key: field(raw, key, type(value)) for key, value in template.items() if key != "rounds"
    }
    _check_counts("stats:", stats, _STATS_LIMITS)
    stats["rounds"] = _checked_rounds(field(raw, "rounds", list))
    return stats


def _check_counts(what: str, values: dict[str, Any], limits: dict[str, int]) -> None:
    for key, value in values.items():
        if type(value) is int and not 0 <= value < limits.get(key, _UINT64):
            raise ControlError(f"{what} {key} {value} is out of range")


def _checked_rounds(rounds: list[Any]) -> list[dict[str, Any]]:
    """The per-round figures, each a map of :class:`RoundStats` fields of the right types and
    counts within their MigrationRound fields (they go into them as they are)."""
    if len(rounds) > REPORTED_ROUNDS:
        raise ControlError(f"stats: {len(rounds)} rounds, more than {REPORTED_ROUNDS}")
    checked = []
    for item in rounds:
        if not isinstance(item, dict):
            raise ControlError("stats: a round is not a map")
        one = {key: field(item, key, type(value)) for key, value in _ROUND_TEMPLATE.items()}
        _check_counts("stats: round", one, _ROUND_LIMITS)
        checked.append(one)
    return checked


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
        # The receiver is called from the trio loop and, for page batches, from the
        # stream's reader thread: one call at a time.
        self._receiving = threading.Lock()
        self._rounds_seen: set[int] = set()
        self.receiver = MigrationReceiver(
            worker.vm.ram.view,
            token=token,
            config_hash=config_hash(worker.vm.config),
            restore=self._restore,
            window=WINDOW,
            idle_timeout_s=timeout_s,
            # Pages go into the memfd by pwrite, not faulted into the mapping one by one.
            write_run=MemfdRAM(worker.vm.ram.fd, worker.vm.ram.view).write_run,
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
                # Resumed, among the replies, is on its way only once this returns, and
                # until the source hears it the guest's downtime is still counted there:
                # the tidying up waits its turn in the loop.
                self._worker.start_soon(self._after_resume)
        return replies

    async def _after_resume(self) -> None:
        self._worker.stop_incoming_server()
        # The guest may move on from here: have a migration process ready for it, a moment
        # later, so that its start-up (~0.3 s of CPU) does not compete with the end of the
        # switchover (Resumed reaching the source, which counts downtime until then).
        await trio.sleep(SPARE_AFTER_RESUME_S)
        if self._worker.vm.state is VMState.RUNNING:
            self._worker.prepare_migration_process()

    def _handle(self, message: object) -> tuple[list[DestinationMessage], bool]:
        with self._receiving:
            actions = self.receiver.receive(message)
            finished = self.receiver.finished
        return self._carry_out(actions), finished

    def _lost(self, detail: str) -> None:
        with self._receiving:
            actions = self.receiver.connection_lost(detail)
        self._carry_out(actions)

    async def watch_idle(self) -> None:
        """Discard the incoming VM once the source has been silent too long."""
        while not self.receiver.finished:
            await trio.sleep(0.5)
            with self._receiving:
                actions = self.receiver.tick()
            self._carry_out(actions)

    def _receive_pages(self, batch: Pages) -> tuple[list[DestinationMessage], bool]:
        """A page batch, taken in the reader thread: it only writes RAM the incoming VM
        does not run on yet, and answers with an Ack. Hopping into the trio loop for every
        batch would cost two thread switches per MiB; only a batch that ends the
        migration (invalid input) has actions the loop must carry out."""
        with self._receiving:
            actions = self.receiver.receive(batch)
            finished = self.receiver.finished
        sends = [action for action in actions if isinstance(action, SendMessage)]
        if len(sends) == len(actions):
            return [send.message for send in sends], finished  # type: ignore[misc]
        replies = trio.from_thread.run_sync(self._carry_out, actions, trio_token=self._trio_token)
        return replies, finished

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
        # Each batch arrives in a new ~1 MiB buffer: reuse freed ones, not fresh memory.
        hold_freed_buffers()
        threading.Thread(
            target=self._read, args=(requests, answers), name="migration-in-reader", daemon=True
        ).start()
        while not isinstance(answer := answers.get(), _StreamEnd):
            yield answer

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
                    if isinstance(message, Pages):
                        replies, finished = self._receive_pages(message)
                    else:
                        replies, finished = run(
                            self._handle, message, trio_token=self._trio_token
                        )
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
            answers.put(_StreamEnd())
            release_freed_buffers()
            if finished:
                self._fault_after_resumed()

    def _fault_after_resumed(self) -> None:
        """The test fault ``dst:*:resumed``. Fired from the reader thread, not the stream's
        handler: once the source has Resumed it may end the stream, and grpcio then never
        runs the handler past its last answer."""
        fault = self._fault
        resumed = self.receiver.phase is ReceiverPhase.RESUMED
        if resumed and fault is not None and fault.side == "dst" and fault.point == "resumed":
            time.sleep(0.2)  # let Resumed reach the source first
            fault.at("dst", "resumed")

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
