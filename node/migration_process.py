"""The migration process: a live migration's source side, in a process of its own.

**Why a process.** A VMM worker interprets its guest in Python, and the interpreter lock is
shared by everything in the process. When the source side of a migration (zero scan,
hashing, encoding, gRPC writes) ran in the worker, it and the vCPU took turns: round 0 moved
a fraction of what the stream can carry and the guest slowed several times over while it
migrated (DESIGN §6). A thread would share that lock; a process has its own. Guest RAM is a
memfd (``vmcore.memory.GuestRAM``), so this process maps the very same pages read-only from
the descriptor it inherits and runs :class:`~node.migration.MigrationSender` and the
``Migrate`` stream on them, in parallel with the guest, on the other core.

**What stays in the worker.** Whatever touches the VM: pause, resume, throttle, saving the
device state (with the console history the destination adopts), and the dirty log, whose
fetch-and-reset must fall between two guest slices so that no store is lost. The helper asks
for those over the control channel (:mod:`node.migration_control`) and blocks for the
answer; the worker serves the requests in its trio loop between slices, exactly where the
in-process driver did them. Reading RAM while the guest writes it is safe for the same
reason the in-process sender's page views were: a page written after the dirty log was
enabled (or last fetched) is in the next fetch, and the final fetch happens with the vCPU
paused, so each page's last copy, and its hash, is the one the destination keeps.

**Never lose a VM, across processes.** The helper tells the worker, and waits for its
acknowledgement, before the ``Complete`` message leaves. So when the helper dies (the
control socket reaches end-of-file), the worker knows which side of that line it died on:
before it, the destination cannot run the guest, and the worker resumes its VM and reports
the migration failed ("migration process died: exit code N"); after it, the outcome is
unknown and the VM stays paused, as when a stream breaks after ``Complete``. When the
worker dies, the helper sees end-of-file on the control socket (and, should it be blocked
elsewhere, the kernel's parent-death signal, ``PR_SET_PDEATHSIG``), cuts the stream, so
the destination discards its copy, and exits.

**Start-up.** Importing grpc, numpy and the migration core costs about 0.3-0.4 s of CPU
here, which must not land in a migration's setup time. So a worker starts one helper in
advance (:class:`SpareProcess`), which imports everything and then waits idle on its
control socket; a migration takes it, and the worker starts the next one when the
migration ends (or on demand, should the spare have gone). Measured here: 0.3 s of CPU
once, when the worker comes up, and 51 MiB resident (31 MiB proportional, since the
interpreter's and libraries' file pages are shared) per idle helper, i.e. per VM. A
node-wide zygote (one pre-imported process forking a helper per migration, handed the
memfd over ``SCM_RIGHTS``) would cost that once per node rather than per VM, but the
helper would no longer be the worker's child: no parent-death signal and no exit status
for the worker to report, so every "the other side died" path would need a liveness
protocol of its own. One spare per worker keeps those paths short and exact; a node
packed with small VMs that rarely migrate is where the zygote would pay.
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import ctypes
import dataclasses
import logging
import mmap
import os
import queue
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from typing import Any, NoReturn

import grpc
import msgpack
import numpy as np

from node import faults
from node.allocator import hold_freed_buffers
from node.migration import (
    Action,
    Cancelled,
    Completed,
    Failed,
    MigrationOptions,
    MigrationSender,
    OutcomeUnknown,
    Pages,
    PauseVM,
    ResumeVM,
    SendMessage,
    SetThrottle,
)
from node.migration.messages import Complete, Hello, Message
from node.migration.residency import MemfdRAM
from node.migration.wire import build_pages, encode_source, migrate_call
from node.migration_control import BlockingChannel, ControlError, field, pair
from node.supervisor import signal_name

log = logging.getLogger("ferry-migration")

SILENCE_S = 10.0
"""A destination that answers nothing this long while messages are outstanding is lost. An
acknowledgement takes milliseconds on a working link; this only catches a stalled peer."""

STATS_INTERVAL_S = 0.05
"""How often the helper pushes its statistics to the worker (and at every phase change), so
the worker answers GetMigration and WatchMigration without asking."""

MAX_MESSAGE = 80 << 20
"""gRPC's 4 MiB default is too small for a device state with its console history; the
receiver caps what it accepts itself (device state 64 MiB)."""

_CHANNEL_OPTIONS = [
    ("grpc.max_receive_message_length", MAX_MESSAGE),
    ("grpc.max_send_message_length", MAX_MESSAGE),
]

EXIT_WORKER_GONE = 3
EXIT_BAD_REQUEST = 4

_PR_SET_PDEATHSIG = 1


# -- in the worker: starting a helper -------------------------------------------------------


class SpareProcess:
    """A started migration process, idle on its control socket until given a migration.

    Created in the worker's main thread: the parent-death signal fires when the *thread*
    that forked the child ends, so a helper started from a short-lived thread would die
    with that thread.
    """

    def __init__(self, ram_fd: int, ram_size: int) -> None:
        self.control, helper_end = pair()
        command = [
            sys.executable,
            "-m",
            "node.migration_process",
            "--control-fd",
            str(helper_end.fileno()),
            "--ram-fd",
            str(ram_fd),
            "--ram-size",
            str(ram_size),
            "--worker-pid",
            str(os.getpid()),
        ]
        try:
            self.process = subprocess.Popen(
                command, stdin=subprocess.DEVNULL, pass_fds=(helper_end.fileno(), ram_fd)
            )
        except BaseException:
            self.control.close()
            raise
        finally:
            helper_end.close()

    @property
    def alive(self) -> bool:
        return self.process.poll() is None

    def close(self) -> None:
        """Send it away (end-of-file on its socket) without waiting; idempotent."""
        self.control.close()
        with contextlib.suppress(OSError):
            self.process.poll()

    def kill(self) -> None:
        with contextlib.suppress(OSError):
            self.process.kill()


def death_reason(returncode: int | None) -> str:
    """How a helper ended, in the words the migration's error reports."""
    if returncode is None:
        return "migration process stopped answering"
    if returncode < 0:
        return f"migration process died: exit code {returncode} ({signal_name(-returncode)})"
    return f"migration process died: exit code {returncode}"


# -- in the helper ---------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class _Reply:
    message: Message


@dataclasses.dataclass(frozen=True)
class _Lost:
    detail: str


@dataclasses.dataclass(frozen=True)
class _Cancel:
    reason: str


_Event = _Reply | _Lost | _Cancel


class _DirtyLog:
    """The worker's dirty log, seen from the helper (``DirtyLogLike``)."""

    def __init__(self, driver: SourceDriver, page_count: int) -> None:
        self._driver = driver
        self._page_count = page_count
        # The final fetch, which the worker makes the moment it pauses the guest and sends
        # with its answer to the pause: one round trip less while the guest is stopped.
        self.fetched_at_pause: bytes | None = None

    def enable(self) -> None:
        self._driver.request("enable")

    def disable(self) -> None:
        self.fetched_at_pause = None
        self._driver.request("disable")

    def fetch_and_reset(self) -> np.ndarray:
        raw, self.fetched_at_pause = self.fetched_at_pause, None
        if raw is None:
            raw = field(self._driver.request("fetch"), "pages", bytes)
        if len(raw) % 4:
            raise ControlError("dirty page list is not whole uint32s")
        pages = np.frombuffer(raw, dtype="<u4").astype(np.int64)
        if len(pages) and int(pages.max()) >= self._page_count:
            raise ControlError("dirty page number outside RAM")
        return pages


def _options(raw: object) -> MigrationOptions:
    """MigrationOptions from the worker's map: known names, each of its default's type."""
    if not isinstance(raw, dict):
        raise ControlError("options is not a map")
    defaults = MigrationOptions()
    values: dict[str, Any] = {}
    for f in dataclasses.fields(MigrationOptions):
        if f.name in raw:
            kind = type(getattr(defaults, f.name))
            values[f.name] = field(raw, f.name, kind)
    try:
        return MigrationOptions(**values)
    except (TypeError, ValueError) as e:
        raise ControlError(f"invalid options: {e}") from None


class SourceDriver:
    """Runs one migration's source side: the sender, the stream, the worker's requests.

    **Who drives the sender.** grpcio's synchronous client writes a stream's messages from
    a request thread of its own, which pulls the next one from the request iterator once
    it has written the one before. That iterator (:meth:`_requests`) runs the sender: each
    batch is built when gRPC asks for it and handed over in the same thread, still warm in
    the cache, where a queue fed from the main thread cost a thread hand-off per batch, and
    the main thread, the request thread and the interpreter lock taking turns (measured:
    ~0.3 ms of CPU per MiB, a fifth of this process's whole cost). While gRPC is busy
    writing, or blocked on a slow or stalled destination, the main thread steps in to
    handle what cannot wait for the next pull: the worker's cancel, the destination's
    answers, timeouts and statistics. The two never drive at once: whoever drives holds
    :attr:`_lock`, so the sender is still called by one thread at a time.

    Two more threads only read: one posts the destination's answers as events, the other
    the worker's cancels as events and its replies to the one blocked request.
    """

    def __init__(
        self,
        channel: BlockingChannel,
        ram: memoryview,
        ram_fd: int,
        worker_pid: int,
        fault: faults.Fault | None,
    ) -> None:
        self._channel = channel
        self._ram = ram
        self._ram_fd = ram_fd
        self._worker_pid = worker_pid
        self._fault = fault
        self._events: queue.SimpleQueue[_Event] = queue.SimpleQueue()
        self._replies: queue.SimpleQueue[dict[str, Any]] = queue.SimpleQueue()
        # Encoded messages the sender produced and gRPC has not pulled yet.
        self._outbox: collections.deque[bytes] = collections.deque()
        self._lock = threading.Lock()
        # Set once the call exists (the request thread may start pulling before that).
        self._call_ready = threading.Event()
        # Set when the request iterator ends, normally or by an error (kept in _error).
        self._requests_done = threading.Event()
        self._error: Exception | None = None
        # Set (under the lock) when the main thread stops waiting for gRPC to pull: the
        # iterator then ends, should gRPC ever ask it again.
        self._closing = False
        self._stream_over = threading.Event()
        self._call: Any = None
        self._sender: MigrationSender | None = None
        # The worker's answer to the switchover's pause, holding the device state.
        self._saved_at_pause: dict[str, Any] | None = None
        self._rounds_seen: set[int] = set()
        self._dropped = False
        self._outstanding = False
        self._waiting_since = 0.0
        self._paused_at = 0.0
        self._resumed_at = 0.0
        self._cancels = 0
        self._pushed_at = 0.0
        self._pushed_phase = ""

    # -- the worker ----------------------------------------------------------------------

    def request(self, op: str, **fields: Any) -> dict[str, Any]:
        """Ask the worker and wait for its answer (it comes between two guest slices)."""
        try:
            self._channel.send(op, **fields)
        except OSError:
            self._worker_gone()
        # At end-of-file the control reader ends the process; no answer comes then.
        reply = self._replies.get()
        if reply.get("to") != op:
            raise ControlError(f"worker answered {reply.get('to')!r} to {op!r}")
        error = reply.get("error")
        if error:
            raise RuntimeError(str(error))
        return reply

    def _worker_gone(self) -> NoReturn:
        """The worker is gone: nobody is left to resume or discard anything here. Cut the
        stream (the destination then discards its copy) and end at once."""
        log.warning("the worker is gone: cutting the migration stream")
        if self._call is not None:
            with contextlib.suppress(Exception):
                self._call.cancel()
        logging.shutdown()
        os._exit(EXIT_WORKER_GONE)

    def _read_control(self) -> None:
        while True:
            try:
                message = self._channel.receive()
            except (ControlError, OSError) as e:
                log.error("control channel: %s", e)
                message = None
            if message is None:
                # Whoever drives the sender may be waiting on gRPC, so end here and now.
                self._worker_gone()
            op = message["op"]
            if op == "reply":
                self._replies.put(message)
            elif op == "cancel":
                reason = message.get("reason")
                self._events.put(_Cancel(reason if isinstance(reason, str) else "cancelled"))
            else:
                log.error("control channel: unexpected %r from the worker", op)

    def _save_state(self) -> dict[str, Any]:
        # The sender saves the state only in its switchover, after its pause, whose answer
        # carried it (saved while the vCPU was stopped).
        saved, self._saved_at_pause = self._saved_at_pause, None
        if saved is None:
            raise ControlError("the device state was asked for before the guest was paused")
        error = saved.get("state_error")
        if error:
            raise RuntimeError(str(error))
        state = msgpack.unpackb(field(saved, "state", bytes), raw=False)
        if not isinstance(state, dict):
            raise ControlError("device state is not a map")
        return state

    def _push(self, now: float, *, force: bool = False) -> None:
        sender = self._sender
        assert sender is not None
        phase = str(sender.phase)
        if not force and phase == self._pushed_phase and now - self._pushed_at < STATS_INTERVAL_S:
            return
        self._pushed_at, self._pushed_phase = now, phase
        try:
            self._channel.send(
                "stats",
                stats=sender.stats(),
                reason=sender.reason,
                paused_at=self._paused_at,
                resumed_at=self._resumed_at,
                cancels=self._cancels,
            )
        except OSError:
            self._worker_gone()

    # -- the migration -------------------------------------------------------------------

    def run(self, start: dict[str, Any]) -> None:
        """Run the migration ``start`` describes to its end."""
        endpoint = field(start, "endpoint", str)
        page_count = len(self._ram) // 4096
        self._dirty_log = _DirtyLog(self, page_count)
        self._sender = MigrationSender(
            self._ram,
            self._dirty_log,
            self._save_state,
            token=field(start, "token", bytes),
            config_hash=field(start, "config_hash", str),
            ferry_version=field(start, "ferry_version", str),
            board_config=field(start, "board_config", bytes),
            vm_name=field(start, "vm_name", str),
            options=_options(start.get("options")),
            # The memfd itself says which pages were never written; reading one through
            # the mapping would allocate it.
            never_backed=MemfdRAM(self._ram_fd, self._ram).never_backed,
            # Batches serialised as they are built: one copy of each payload, RAM to bytes.
            build_batch=build_pages,
        )
        threading.Thread(target=self._read_control, name="control-reader", daemon=True).start()
        channel = grpc.insecure_channel(endpoint, options=_CHANNEL_OPTIONS)
        try:
            self._call = migrate_call(channel, encoded=True)(self._requests())
            threading.Thread(target=self._read_stream, name="migration-reader", daemon=True).start()
            with self._lock:
                self._do(self._sender.start())
                self._push(time.monotonic(), force=True)
            self._call_ready.set()
            self._watch()
        finally:
            with self._lock:
                self._closing = True
            if self._call is not None:
                # Let the last message (an Abort) leave: the destination ends the stream
                # once it has it. Then cut the stream, whatever state it is in.
                self._stream_over.wait(0.2)
                self._call.cancel()
            channel.close()

    def _requests(self) -> Iterator[bytes]:
        """The stream's messages, made as gRPC's request thread asks for each."""
        self._call_ready.wait()
        try:
            while True:
                try:
                    message = self._next_message()
                except Exception as e:
                    self._error = e
                    return
                if message is None:
                    return
                yield message
        finally:
            self._requests_done.set()

    def _next_message(self) -> bytes | None:
        """Drive the sender until it has a message to send; None once it has finished."""
        sender = self._sender
        assert sender is not None
        with self._lock:
            while not self._closing:
                if self._outbox:
                    return self._outbox.popleft()
                if sender.finished:
                    return None
                self._step()
            return None

    def _watch(self) -> None:
        """While gRPC pulls messages, tend to what cannot wait for its next pull; return once
        the migration has ended."""
        sender = self._sender
        assert sender is not None
        ended_at = 0.0
        while not self._requests_done.wait(STATS_INTERVAL_S):
            # A free lock means the request thread is inside gRPC, writing (or blocked on
            # the destination); a held one, that it is driving the sender itself.
            if not self._lock.acquire(blocking=False):
                continue
            try:
                self._tend()
                if sender.finished:
                    # Ended while gRPC was busy (a cancel, a broken stream, silence): the
                    # last messages get a moment to be pulled, unless the stream is gone.
                    now = time.monotonic()
                    ended_at = ended_at or now
                    if not self._outbox or self._stream_over.is_set() or now - ended_at > 0.2:
                        break
            finally:
                self._lock.release()
        if self._error is not None:
            raise self._error
        with self._lock:
            # gRPC stopped pulling before the end (the stream ended under it): the outcome
            # is settled here, from the events (a lost stream, a verdict that came first).
            while not sender.finished:
                self._step()

    def _read_stream(self) -> None:
        detail = "the destination closed the stream"
        try:
            for reply in self._call:
                self._events.put(_Reply(reply))
        except grpc.RpcError as e:
            # An answer that does not decode ends the call too (INTERNAL).
            detail = f"{e.code().name}: {e.details()}"
        self._events.put(_Lost(detail))
        self._stream_over.set()

    def _step(self) -> None:
        """One step of driving the sender (the caller holds the lock): the next message if
        the sender has one, else a wait for an event (or a timeout), and the timers."""
        sender = self._sender
        assert sender is not None
        # Answers first, so credit and the round's end are current before polling.
        self._take_events()
        if sender.finished:
            return
        if actions := sender.poll():
            self._do(actions)
            self._push(time.monotonic())
            return
        now = time.monotonic()
        ready = sender.ready_at
        timeout = 0.1 if ready is None else min(max(0.0, ready - now), 0.1)
        timeout = min(timeout, max(0.0, self._pushed_at + STATS_INTERVAL_S - now))
        try:
            event = self._events.get(timeout=timeout) if timeout > 0 else None
        except queue.Empty:
            event = None
        if event is not None:
            self._on_event(event)
        self._tend()

    def _tend(self) -> None:
        """What must not wait for the next message (the caller holds the lock): the events
        that came in, timeouts, a silent destination, statistics."""
        sender = self._sender
        assert sender is not None
        self._take_events()
        if not sender.finished:
            self._do(sender.tick())
        now = time.monotonic()
        silent = now - self._waiting_since
        if not sender.finished and self._outstanding and silent >= SILENCE_S:
            self._do(sender.connection_lost(f"the destination did not answer for {silent:.0f} s"))
        self._push(now)

    def _take_events(self) -> None:
        """Handle every event already posted, without waiting."""
        sender = self._sender
        assert sender is not None
        while not sender.finished:
            try:
                event = self._events.get_nowait()
            except queue.Empty:
                return
            self._on_event(event)

    def _on_event(self, event: _Event) -> None:
        sender = self._sender
        assert sender is not None
        if isinstance(event, _Cancel):
            self._cancels += 1
            self._do(sender.cancel(event.reason))
            self._push(time.monotonic(), force=True)
        else:
            self._outstanding = False
            self._waiting_since = time.monotonic()
            if isinstance(event, _Lost):
                self._do(sender.connection_lost(event.detail))
            else:
                self._do(sender.receive(event.message))

    def _do(self, actions: list[Action]) -> None:
        for action in actions:
            if isinstance(action, SendMessage):
                self._send(action.message)
            elif isinstance(action, PauseVM):
                reply = self.request("pause")
                self._paused_at = time.monotonic()
                # The worker answers the pause with what the switchover asks next: the
                # final dirty set and the device state (or why it could not be saved).
                self._dirty_log.fetched_at_pause = field(reply, "pages", bytes)
                self._saved_at_pause = reply
                self._fault_at("switchover")
            elif isinstance(action, ResumeVM):
                self._dirty_log.fetched_at_pause = None
                self._saved_at_pause = None
                self.request("resume")
            elif isinstance(action, SetThrottle):
                self.request("throttle", percent=action.percent)
            elif isinstance(action, Completed):
                self._resumed_at = action.resumed_at
                self._outcome("completed", "")
            elif isinstance(action, Cancelled):
                self._outcome("cancelled", action.reason)
            elif isinstance(action, Failed):
                self._outcome("failed", action.reason)
            elif isinstance(action, OutcomeUnknown):
                self._outcome("unknown", action.reason)

    def _outcome(self, kind: str, reason: str) -> None:
        sender = self._sender
        assert sender is not None
        self.request(
            "outcome",
            kind=kind,
            reason=reason,
            stats=sender.stats(),
            paused_at=self._paused_at,
            resumed_at=self._resumed_at,
            cancels=self._cancels,
        )

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
        if isinstance(message, Complete):
            # From the worker's acknowledgement on, the helper's death leaves the outcome
            # unknown instead of resuming the VM: the destination may be about to run it.
            self.request("completing")
        if not self._outstanding:
            self._outstanding = True
            self._waiting_since = time.monotonic()
        self._outbox.append(encode_source(message))  # type: ignore[arg-type]

    def _fault_at(self, point: str) -> None:
        """A test fault (FERRY_FAULT) just before this point's message leaves. A dropped
        stream is cut before the message goes, so the outcome the test sees is exact."""
        if self._fault is None or self._dropped:
            return
        if self._fault.at("src", point, self._worker_pid) != "drop":
            return
        self._dropped = True
        if self._call is not None:
            self._call.cancel()
        assert self._sender is not None
        self._do(self._sender.connection_lost("fault injected: stream dropped"))


def _die_with_parent(worker_pid: int) -> None:
    """Have the kernel kill this process when the worker dies, even mid-call."""
    if sys.platform.startswith("linux"):
        with contextlib.suppress(OSError, AttributeError):
            libc = ctypes.CDLL(None, use_errno=True)
            libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
    if os.getppid() != worker_pid:
        # The worker died before the signal was armed.
        os._exit(EXIT_WORKER_GONE)


def _parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m node.migration_process",
        description="Run a live migration's source side for a VMM worker (not for users).",
    )
    parser.add_argument("--control-fd", type=int, required=True)
    parser.add_argument("--ram-fd", type=int, required=True)
    parser.add_argument("--ram-size", type=int, required=True)
    parser.add_argument("--worker-pid", type=int, required=True)
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = _parse_args(argv)
    _die_with_parent(args.worker_pid)
    # Stop the terminal's or the agent's interrupt from hitting this process directly: it
    # ends when its worker does.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    # The destination's answers (grpcio's reader threads) would otherwise wait out the
    # default 5 ms switch interval behind the scan and hashing in the request thread.
    sys.setswitchinterval(0.0005)
    # Every batch is a new ~1 MiB buffer: keep freed ones for the next (node/allocator.py).
    # The process lives for one migration, so nothing needs giving back after.
    hold_freed_buffers()
    logging.basicConfig(
        level=logging.INFO,
        format=f"%(asctime)s ferry-migration[{args.worker_pid}] %(levelname)s %(message)s",
        stream=sys.stderr,
    )
    channel = BlockingChannel(socket.socket(fileno=args.control_fd))
    ram_map = mmap.mmap(args.ram_fd, args.ram_size, flags=mmap.MAP_SHARED, prot=mmap.PROT_READ)
    try:
        start = channel.receive()
    except ControlError as e:
        log.error("control channel: %s", e)
        return EXIT_BAD_REQUEST
    if start is None:
        return 0  # the worker ended while this spare waited: nothing to do
    if start["op"] != "start":
        log.error("control channel: expected start, got %r", start["op"])
        return EXIT_BAD_REQUEST
    driver = SourceDriver(
        channel, memoryview(ram_map), args.ram_fd, args.worker_pid, faults.from_environment()
    )
    try:
        driver.run(start)
    except ControlError as e:
        # The worker sent what the protocol does not allow: a bug, said in one line.
        log.error("control channel: %s", e)
        return EXIT_BAD_REQUEST
    return 0


def run() -> None:
    """Run and exit without waiting for grpcio's threads (a stream stuck on a dead peer)."""
    code = main()
    logging.shutdown()
    sys.stderr.flush()
    os._exit(code)


if __name__ == "__main__":
    run()
