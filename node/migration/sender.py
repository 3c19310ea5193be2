"""The source side of a live migration: pre-copy rounds, convergence policy, switchover.

:class:`MigrationSender` is a pure state machine (no sockets, no threads, no sleeping). Its
driver, the VMM worker, feeds it the destination's messages and the passing of time and
carries out the actions it returns (see :mod:`node.migration.actions`)::

    SETUP ─start()─► HELLO_SENT ─Ack─► ROUND_0 ─► ITERATING ─► SWITCHOVER ─► WAIT_RESUMED
                                                                              │ Resumed
                                                                              ▼
                         CANCELLED / FAILED ◄── any phase before Complete    COMPLETED

Round 0 sends every page that is not zero; each later round sends what the dirty log
recorded during the previous one. A round ends when all its batches are acknowledged; the
sender then fetches the dirty set, measures the round (bandwidth, dirty rate) and predicts
the downtime that stopping now would cost (dirty bytes / bandwidth). Under the budget it
switches over: pause, final dirty fetch, the remaining pages, device state, and
``Complete`` with the memory digest. Otherwise it iterates, and when the remaining bytes
stop falling for ``stall_rounds`` rounds it escalates one step per unproductive round:
throttle the vCPU (20 %, then +10 % up to 99 %), then raise the downtime budget in steps up
to ``max_downtime_max_ms``, then cancel with the reason. The ladder is finite, so a
migration that cannot converge ends by policy, never by hanging.

Until ``Complete`` is sent the destination cannot run the guest, so any cancel or failure
resumes the source VM untouched. After ``Complete`` only the destination's answer settles
it: ``Resumed`` completes, ``Error`` means the destination discarded its copy and the source
resumes, and silence or a broken stream is reported as :class:`OutcomeUnknown` with the
source still paused, for the coordinator to resolve.

Driving it (the worker's loop; the VM runs slices in between)::

    do(sender.start())                          # sends Hello
    while not sender.finished:
        while actions := sender.poll():         # pages, while credit and pacing allow
            do(actions)                         # carry out in order (send, pause, ...)
            sender.transport_time(seconds)      # optional: wire time of a Pages send
        ...run a guest slice; wait for a message, or until sender.ready_at...
        do(sender.receive(message))             # every message from the destination
        do(sender.tick(now))                    # timeouts
    # on a broken stream: do(sender.connection_lost()); on request: do(sender.cancel())

``poll()`` returning [] means "wait": for an Ack (credit, end of round), for
``ready_at`` (pacing, or a scan of mostly-zero RAM that yielded to the guest), or for
the destination's verdict. ``cancel()`` may be called at any time and is idempotent.
The sender must only be called from one thread.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from enum import StrEnum
from typing import Any, Protocol

import msgpack
import numpy as np

# np.unique (and union1d, which calls it) imports numpy.ma on its first call: ~8 ms of CPU
# on an idle host, 20 and more on a busy one. The first call comes when round 0 ends, just
# before the sender asks to pause the guest; imported here, it is paid when the migration
# process starts, ahead of any migration.
import numpy.ma

from node.migration.actions import (
    Action,
    Cancelled,
    Completed,
    Failed,
    OutcomeUnknown,
    PauseVM,
    ResumeVM,
    SendMessage,
    SetThrottle,
)
from node.migration.digest import MemoryDigest, page_hashes
from node.migration.encoding import (
    BATCH_PAGES,
    COMPRESSION_MODES,
    PAGE_SIZE,
    CompressionPolicy,
    wire_size,
)
from node.migration.messages import (
    PROTOCOL_VERSION,
    Abort,
    Ack,
    BuildBatch,
    Complete,
    DeviceState,
    Encoding,
    Error,
    Hello,
    Message,
    Pages,
    Refusal,
    Resumed,
)

# Pages scanned for zeros per step of round 0: ~16 MiB, a couple of milliseconds, so the
# scan interleaves with the guest instead of stalling it for the whole of RAM.
_SCAN_CHUNK = 4096
# Chunks scanned per poll() before yielding to the guest (~64 MiB, ~10 ms), so a mostly
# zero RAM does not stall the vCPU for the whole scan.
_SCAN_CHUNKS_PER_POLL = 16
# A round is "progress" when it leaves at least this much less to send than the best so far.
_PROGRESS = 0.9
# A bandwidth figure from fewer bytes than this is mostly latency; keep the previous one.
_MIN_BANDWIDTH_SAMPLE = 1 << 20
# The link's speed (for the compression choice) is measured over windows of this many
# acknowledged bytes of raw batches: long enough that the first batches' latency washes out.
_LINK_WINDOW = 2 << 20
# While compressing, the sender now and then sends a probe of raw batches (three windows'
# worth, so that whole windows of them are measured however the windows fall): otherwise a
# link that looked slow once (a busy moment) would keep compression on for good, since
# only raw windows measure the link. The first probe comes soon, then they thin out
# (doubling the interval up to a maximum), which on a link that really is slow costs a few
# percent.
_PROBE_FIRST = 8
_PROBE_MAX = 64
_PROBE_BYTES = 3 * _LINK_WINDOW
# More credit than this from a destination is a protocol error, not generosity.
_MAX_CREDIT = 1024
THROTTLE_FIRST = 20
THROTTLE_STEP = 10
THROTTLE_MAX = 99


class DirtyLogLike(Protocol):
    """What the sender needs of a dirty log (``vmcore.memory.DirtyLog`` provides it)."""

    def enable(self) -> None: ...

    def disable(self) -> None: ...

    def fetch_and_reset(self) -> np.ndarray: ...


class Phase(StrEnum):
    SETUP = "setup"
    HELLO_SENT = "hello-sent"
    ROUND_0 = "round-0"
    ITERATING = "iterating"
    SWITCHOVER = "switchover"
    WAIT_RESUMED = "wait-resumed"
    CANCELLING = "cancelling"
    COMPLETED = "completed"
    CANCELLED = "cancelled"
    FAILED = "failed"
    OUTCOME_UNKNOWN = "outcome-unknown"


_TERMINAL = {Phase.COMPLETED, Phase.CANCELLED, Phase.FAILED, Phase.OUTCOME_UNKNOWN}
# Phases in which the destination cannot be running the guest yet.
_BEFORE_COMPLETE = {Phase.HELLO_SENT, Phase.ROUND_0, Phase.ITERATING, Phase.SWITCHOVER}
# query-migrate's status names, so users can compare with QEMU.
_STATUS = {
    Phase.SETUP: "setup",
    Phase.HELLO_SENT: "setup",
    Phase.ROUND_0: "active",
    Phase.ITERATING: "active",
    Phase.SWITCHOVER: "device",
    Phase.WAIT_RESUMED: "device",
    Phase.CANCELLING: "cancelling",
    Phase.COMPLETED: "completed",
    Phase.CANCELLED: "cancelled",
    Phase.FAILED: "failed",
    Phase.OUTCOME_UNKNOWN: "outcome-unknown",
}


@dataclass(frozen=True)
class MigrationOptions:
    """Per-migration knobs, named and defaulted as QEMU and Cloud Hypervisor users expect."""

    max_downtime_ms: float = 300.0
    # The convergence policy may raise the downtime budget up to this, in downtime_steps.
    max_downtime_max_ms: float = 2000.0
    downtime_steps: int = 4
    # Bytes per second on the wire; 0 means unlimited. Not applied while the VM is paused.
    max_bandwidth: float = 0.0
    # Whole migration, from start() to Complete; 0 means no limit.
    timeout_s: float = 0.0
    auto_converge: bool = True
    compression: str = "auto"
    # Rounds without progress before the convergence policy starts escalating.
    stall_rounds: int = 3
    # How long to wait for the destination's verdict once Complete (or a late Abort) is sent.
    resume_timeout_s: float = 30.0

    def check(self) -> None:
        """Raise ValueError with a one-line message for an option a user got wrong."""
        if self.max_downtime_ms <= 0:
            raise ValueError("max_downtime_ms must be positive")
        if self.max_downtime_max_ms < self.max_downtime_ms:
            raise ValueError("max_downtime_max_ms must be at least max_downtime_ms")
        if self.downtime_steps < 1:
            raise ValueError("downtime_steps must be at least 1")
        if self.max_bandwidth < 0:
            raise ValueError("max_bandwidth must be 0 (unlimited) or positive")
        if self.timeout_s < 0:
            raise ValueError("timeout_s must be 0 (no limit) or positive")
        if self.compression not in COMPRESSION_MODES:
            raise ValueError(
                f"unknown compression {self.compression!r}; "
                f"choose one of {', '.join(COMPRESSION_MODES)}"
            )
        if self.stall_rounds < 1:
            raise ValueError("stall_rounds must be at least 1")
        if self.resume_timeout_s <= 0:
            raise ValueError("resume_timeout_s must be positive")


REPORTED_ROUNDS = 64
"""How many rounds :meth:`MigrationSender.stats` lists: round 0 and the latest others. A
migration that creeps towards convergence can run many rounds before its timeout, and every
statistics push carries the list."""


@dataclass(frozen=True)
class RoundStats:
    """What one round moved and what it predicted.

    Kept so users can study a migration round by round (how fast round 0 went, how the
    dirty set shrank, when the policy throttled or raised the budget), which the totals
    alone cannot show. The ``switchover`` round is the last one, sent with the guest
    paused: its duration runs from the pause to ``Complete`` leaving, it has no dirty pages
    (the guest did not run), and its expected downtime is the prediction that started it.
    """

    number: int
    pages: int
    zero_pages: int
    bytes: int
    duration_s: float
    bandwidth: float
    dirty_pages: int
    dirty_rate: float
    expected_downtime_ms: float
    throttle_percent: int
    downtime_budget_ms: float
    switchover: bool = False

    def as_stats(self) -> dict[str, Any]:
        """This round as :meth:`MigrationSender.stats` lists it (MigrationRound's names)."""
        return {
            "number": self.number,
            "pages": self.pages,
            "zero_pages": self.zero_pages,
            "bytes": self.bytes,
            "duration_ms": self.duration_s * 1000,
            "mbps": self.bandwidth * 8 / 1e6,
            "dirty_pages": self.dirty_pages,
            "dirty_pages_rate": self.dirty_rate,
            "expected_downtime_ms": (
                self.expected_downtime_ms if math.isfinite(self.expected_downtime_ms) else 0.0
            ),
            "cpu_throttle_percentage": self.throttle_percent,
            "downtime_budget_ms": self.downtime_budget_ms,
            "switchover": self.switchover,
        }


class MigrationSender:
    """One outgoing migration of one VM's RAM and device state. See the module docstring."""

    def __init__(
        self,
        ram: memoryview,
        dirty_log: DirtyLogLike,
        save_device_state: Callable[[], dict[str, Any]],
        *,
        token: bytes,
        config_hash: str,
        ferry_version: str = "",
        board_config: bytes = b"",
        vm_name: str = "",
        options: MigrationOptions | None = None,
        clock: Callable[[], float] = time.monotonic,
        page_size: int = PAGE_SIZE,
        compression_timer: Callable[[], float] = time.perf_counter,
        never_backed: Callable[[int, int], np.ndarray | None] | None = None,
        build_batch: BuildBatch | None = None,
    ) -> None:
        """``never_backed(first, last)``, if given, says which pages of that range the host
        never backed with memory, so they are zero without being read (see
        :mod:`node.migration.residency`; only the driver knows whether that holds).

        ``build_batch`` makes a raw batch out of runs of RAM (see
        :class:`~node.migration.messages.BuildBatch`): a driver that serialises batches
        passes :func:`node.migration.wire.build_pages`, so that a batch's payload is copied
        once, from RAM straight into the message."""
        self.options = options or MigrationOptions()
        self.options.check()
        if len(ram) == 0 or len(ram) % page_size:
            raise ValueError(f"RAM of {len(ram)} bytes is not a whole number of pages")
        self._ram_size = len(ram)
        self._page_size = page_size
        self._page_count = len(ram) // page_size
        self._ram = memoryview(ram).cast("B")
        self._pages = np.frombuffer(ram, dtype=np.uint8).reshape(self._page_count, page_size)
        self._build_batch = build_batch
        self._words = self._pages.view(np.uint64)
        self._dirty_log = dirty_log
        self._never_backed = never_backed
        # The last answer of never_backed: (first page, end page, holes or None).
        self._holes: tuple[int, int, np.ndarray | None] = (0, 0, None)
        self._holes_span = _SCAN_CHUNK
        self._save_device_state = save_device_state
        self._hello = Hello(
            protocol_version=PROTOCOL_VERSION,
            ferry_version=ferry_version,
            config_hash=config_hash,
            ram_size=self._ram_size,
            page_size=page_size,
            token=token,
            board_config=board_config,
            vm_name=vm_name,
        )
        self._clock = clock
        self._policy = CompressionPolicy(self.options.compression, timer=compression_timer)
        self.digest = MemoryDigest(self._page_count)

        self.phase = Phase.SETUP
        self.reason = ""
        # The pre-copy rounds, and the final one sent with the guest paused once it is.
        self.rounds: list[RoundStats] = []
        self.switchover_round: RoundStats | None = None
        self._logging = False
        self._paused = False
        self._throttle = 0
        self._budget_ms = self.options.max_downtime_ms
        self._best_remaining = math.inf
        self._rounds_without_progress = 0
        self._escalating = False

        # Flow control: batches are numbered from 1; credit is what the destination allows.
        self._credit = 0
        self._next_seq = 1
        self._acked_seq = 0
        self._sent_bytes: dict[int, int] = {}
        self._sent_compressed: set[int] = set()

        # The current round's pages: round 0 scans RAM lazily, later rounds walk an array.
        self._round = 0
        self._scan_pos = 0
        self._todo = np.zeros(0, dtype=np.int64)
        self._todo_pos = 0
        # Whether _todo holds pages a scan just found non-zero (round 0), or pages that
        # still need that check (the dirty log's).
        self._todo_scanned = False
        self._round_last_seq = 0
        self._round_start = 0.0
        self._round_bytes = 0
        self._round_acked_bytes = 0
        self._round_pages = 0
        self._round_zero = 0
        self._final_fetch_done = False
        self._flushed_seq = 0
        self._scan_budget = 0
        self._yielded = False

        # Measurements.
        self._bandwidth = 0.0
        self._dirty_rate = 0.0
        self._expected_downtime_ms = 0.0
        self._start_time = 0.0
        self._started = False
        self._setup_time = 0.0
        self._end_time = 0.0
        self._pause_time = 0.0
        self._resumed_at = 0.0
        self._complete_time = 0.0
        self._transferred = 0
        self._normal = 0
        self._duplicate = 0
        self._compressed_bytes = 0
        self._sync_count = 0
        self._pace_start = 0.0
        self._pace_bytes = 0
        # Driver-reported time on the wire (transport_time), for the compression choice.
        self._last_batch_bytes = 0
        self._tx_bytes = 0
        self._tx_seconds = 0.0
        # The fastest the link has been seen carrying raw batches (see _measure_link).
        self._link_peak = 0.0
        self._link_window_start = 0.0
        self._link_window_bytes = 0
        self._link_window_mixed = False
        self._compressed_since_probe = 0
        self._probe_every = _PROBE_FIRST
        self._probe_bytes_left = 0
        # The first window carries the stream's start-up (connection, first round trips).
        self._link_windows_seen = 0

    # ----------------------------------------------------------------- driver interface

    @property
    def finished(self) -> bool:
        """True once the outcome is settled (completed, cancelled, failed or unknown)."""
        return self.phase in _TERMINAL

    @property
    def ready_at(self) -> float | None:
        """When to poll again without waiting for a message, or None to wait for one.

        Set when pacing (``max_bandwidth``) holds the next batch back, and (to "now") when
        poll() yielded in the middle of scanning RAM so the guest could run a slice.
        """
        if self._yielded:
            return self._clock()
        if not self._pacing() or self._pace_allows(self._clock()):
            return None
        return self._pace_start + self._pace_bytes / self.options.max_bandwidth

    def start(self) -> list[Action]:
        """Begin: send Hello. Nothing touches the VM until the destination accepts."""
        if self.phase is not Phase.SETUP:
            return []
        self._start_time = self._clock()
        self._started = True
        self.phase = Phase.HELLO_SENT
        return [SendMessage(self._hello)]

    def poll(self) -> list[Action]:
        """The next thing to send, if credit and pacing allow; [] means wait for input."""
        if self.phase in (Phase.ROUND_0, Phase.ITERATING):
            return self._poll_round()
        if self.phase is Phase.SWITCHOVER:
            return self._poll_switchover()
        return []

    def receive(self, message: Message) -> list[Action]:
        """Handle one message from the destination. Never raises: nonsense is a failure."""
        try:
            return self._receive(message)
        except Exception as exc:
            return self._protocol_error(
                f"invalid {type(message).__name__}: {type(exc).__name__}: {exc}"
            )

    def _receive(self, message: Message) -> list[Action]:
        now = self._clock()
        phase = self.phase
        if phase in _TERMINAL or phase is Phase.SETUP:
            # Late replies after we gave up (e.g. the Ack in flight when cancel was called).
            return []
        if isinstance(message, Error):
            # The destination discarded its copy (even after Complete, an Error means it
            # never resumed the guest), so the source may safely run on.
            if phase is Phase.CANCELLING:
                return self._stop(Phase.CANCELLED, self.reason, send_abort=False)
            return self._stop(
                Phase.FAILED, f"destination failed: {message.reason}", send_abort=False
            )
        if isinstance(message, Refusal):
            if phase is Phase.HELLO_SENT:
                return self._stop(
                    Phase.FAILED,
                    f"destination refused the migration ({message.reason}): {message.detail}",
                    send_abort=False,
                )
            return self._protocol_error(f"Refusal in phase {phase}")
        if isinstance(message, Resumed):
            if phase in (Phase.WAIT_RESUMED, Phase.CANCELLING):
                return self._complete(now, message.resumed_at)
            return self._protocol_error(f"Resumed in phase {phase}")
        if isinstance(message, Ack):
            return self._on_ack(message, now)
        return self._protocol_error(f"unexpected {type(message).__name__} from destination")

    def tick(self, now: float | None = None) -> list[Action]:
        """Let time pass: enforces ``timeout_s`` and the wait for the destination's verdict."""
        if now is None:
            now = self._clock()
        if self.phase in _BEFORE_COMPLETE:
            limit = self.options.timeout_s
            if limit and now - self._start_time >= limit:
                return self._stop(Phase.FAILED, f"migration timed out after {limit:g} s")
        elif self.phase in (Phase.WAIT_RESUMED, Phase.CANCELLING):
            limit = self.options.resume_timeout_s
            if now - self._complete_time >= limit:
                return self._unknown(
                    f"no answer from the destination {limit:g} s after the final message"
                )
        return []

    def transport_time(self, seconds: float) -> None:
        """Optional driver report: sending the batch just polled took ``seconds``.

        Only the driver can tell time spent on the wire from time spent running the guest
        between two polls. Without these reports "auto" compression compares the
        compressors against the whole loop's throughput, guest slices included, which
        makes a fast link look slow and compression look better than it is.
        """
        if seconds > 0 and self._last_batch_bytes:
            self._tx_bytes += self._last_batch_bytes
            self._tx_seconds += seconds
            self._last_batch_bytes = 0

    def cancel(self, reason: str = "cancelled by request") -> list[Action]:
        """Stop the migration and keep the VM on the source. Idempotent, in every phase.

        Once ``Complete`` is sent the destination may already be resuming the guest, so the
        sender sends Abort and waits for the destination's verdict (bounded by
        ``resume_timeout_s``): if it had resumed, the migration completed despite the cancel.
        """
        if self.phase is Phase.SETUP:
            self.phase = Phase.CANCELLED
            self.reason = reason
            self._end_time = self._clock()
            return [Cancelled(reason)]
        if self.phase in _BEFORE_COMPLETE:
            return self._stop(Phase.CANCELLED, reason)
        if self.phase is Phase.WAIT_RESUMED:
            self.phase = Phase.CANCELLING
            self.reason = reason
            return [SendMessage(Abort(reason))]
        return []

    def connection_lost(self, detail: str = "") -> list[Action]:
        """The stream broke (the destination died, the network dropped)."""
        why = "connection to the destination lost" + (f": {detail}" if detail else "")
        if self.phase in _BEFORE_COMPLETE:
            return self._stop(Phase.FAILED, why, send_abort=False)
        if self.phase is Phase.WAIT_RESUMED:
            return self._unknown(why + " after the final message")
        if self.phase is Phase.CANCELLING:
            return self._unknown(why + " while cancelling after the final message")
        return []

    def stats(self) -> dict[str, Any]:
        """Progress and figures, keyed as QEMU's ``query-migrate`` (times in ms)."""
        now = self._end_time if self.finished else self._clock()
        total_ms = (now - self._start_time) * 1000 if self._started else 0.0
        if self.phase is Phase.COMPLETED:
            downtime_ms = (self._end_time - self._pause_time) * 1000
        elif self._paused:
            downtime_ms = (now - self._pause_time) * 1000
        else:
            downtime_ms = 0.0
        return {
            "status": _STATUS[self.phase],
            "setup-time": self._setup_time * 1000,
            "total-time": total_ms,
            "downtime": downtime_ms,
            # Unknown (no bandwidth measured yet) reads as 0, as QEMU's does.
            "expected-downtime": (
                self._expected_downtime_ms if math.isfinite(self._expected_downtime_ms) else 0.0
            ),
            "transferred": self._transferred,
            "remaining": self._remaining_bytes(),
            "total": self._ram_size,
            "duplicate": self._duplicate,
            "normal": self._normal,
            "compressed-bytes": self._compressed_bytes,
            "dirty-pages-rate": self._dirty_rate,
            "mbps": self._bandwidth * 8 / 1e6,
            "dirty-sync-count": self._sync_count,
            "cpu-throttle-percentage": self._throttle,
            "rounds": [r.as_stats() for r in self._reported_rounds()],
        }

    def _reported_rounds(self) -> list[RoundStats]:
        listed = self.rounds
        if self.switchover_round is not None:
            listed = [*listed, self.switchover_round]
        if len(listed) <= REPORTED_ROUNDS:
            return listed
        return listed[:1] + listed[-(REPORTED_ROUNDS - 1) :]

    # ------------------------------------------------------------------------- rounds

    def _on_ack(self, ack: Ack, now: float) -> list[Action]:
        if not (self._acked_seq <= ack.acked_seq < self._next_seq):
            return self._protocol_error(
                f"Ack for batch {ack.acked_seq}, sent up to {self._next_seq - 1}"
            )
        if not (0 <= ack.credit <= _MAX_CREDIT):
            return self._protocol_error(f"Ack grants {ack.credit} credit")
        if self.phase is Phase.HELLO_SENT:
            if ack.credit < 1:
                return self._protocol_error("destination accepted with no credit")
            self._credit = ack.credit
            return self._begin_round_0(now)
        for seq in range(self._acked_seq + 1, ack.acked_seq + 1):
            size = self._sent_bytes.pop(seq, 0)
            self._round_acked_bytes += size
            self._link_window_bytes += size
            if seq in self._sent_compressed:
                self._sent_compressed.discard(seq)
                self._link_window_mixed = True
        self._acked_seq = ack.acked_seq
        self._credit += ack.credit
        if self.phase in (Phase.ROUND_0, Phase.ITERATING):
            self._measure_bandwidth(now)
            self._measure_link(now)
            if self._round_exhausted() and self._acked_seq >= self._round_last_seq:
                return self._end_round(now)
        return []

    def _begin_round_0(self, now: float) -> list[Action]:
        self._setup_time = now - self._start_time
        self._dirty_log.enable()
        self._logging = True
        self.phase = Phase.ROUND_0
        self._pace_start = now
        self._start_link_window(now)
        self._start_round(0, now)
        return []

    def _start_round(self, number: int, now: float, todo: np.ndarray | None = None) -> None:
        self._round = number
        self._scan_pos = 0
        # Sorted and distinct, so a batch is a run of RAM exactly when its ends say so.
        self._todo = np.zeros(0, dtype=np.int64) if todo is None else np.unique(todo)
        self._todo_scanned = False
        self._todo_pos = 0
        self._round_start = now
        self._round_last_seq = self._next_seq - 1
        self._round_bytes = 0
        self._round_acked_bytes = 0
        self._round_pages = 0
        self._round_zero = 0

    def _round_exhausted(self) -> bool:
        if self._todo_pos < len(self._todo):
            return False
        return self._round != 0 or self._scan_pos >= self._page_count

    def _remaining_bytes(self) -> int:
        if self.phase not in (Phase.ROUND_0, Phase.ITERATING, Phase.SWITCHOVER):
            return 0
        pages = len(self._todo) - self._todo_pos
        if self.phase is Phase.ROUND_0:
            pages += self._page_count - self._scan_pos
        return pages * self._page_size

    def _nonzero_rows(self, rows: np.ndarray) -> np.ndarray:
        """The pages of ``rows`` (sorted) that are not all zero.

        A page whose first word is not zero is not a zero page, and that one word is all
        there is to read of it: the scan touches one cache line of most pages instead of
        the whole page (the pages sent are read again anyway, when they are hashed). Only
        pages that start with a zero word are read in full.
        """
        words = self._words
        first_words = words[rows, 0]
        nonzero = first_words != 0
        unsure = np.flatnonzero(~nonzero)
        if len(unsure):
            # max, not any(): any() first casts every word to a boolean, twice the work.
            nonzero[unsure] = words[rows[unsure]].max(axis=1) != 0
        return rows[nonzero]

    def _never_backed_in(self, first: int, last: int) -> np.ndarray | None:
        """``never_backed`` for the scan's chunk [first, last), asked over a span ahead.

        Asking per chunk costs more than it seems: tmpfs finds the end of a run of data by
        walking its pages to the next hole, however far past the chunk that is, so on RAM
        the guest has written all over every chunk's question walks the rest of RAM
        (measured: 230 ms of CPU per GiB scanned, against 9 ms asking once). Spans that
        grow fourfold keep that to a few walks, while the first answer comes as soon as
        before. A page the guest writes after the answer is in the dirty log anyway, since
        logging started before the scan.
        """
        if self._never_backed is None:
            return None
        start, end, holes = self._holes
        if not (start <= first and last <= end):
            start, end = first, min(self._page_count, first + max(self._holes_span, last - first))
            holes = self._never_backed(start, end)
            self._holes = (start, end, holes)
            self._holes_span *= 4
        return None if holes is None else holes[first - start : last - start]

    def _next_candidates(self) -> np.ndarray | None:
        """Up to a batch of pages to consider next; None when the round has no more or the
        scan budget of this poll is spent (``_round_exhausted`` tells which)."""
        while self._todo_pos >= len(self._todo):
            if self._round != 0 or self._scan_pos >= self._page_count:
                return None
            if self._scan_budget <= 0:
                return None
            self._scan_budget -= 1
            # Round 0: find the next non-zero pages; zero pages match the zeroed destination.
            first = self._scan_pos
            last = min(first + _SCAN_CHUNK, self._page_count)
            skip = self._never_backed_in(first, last)
            if skip is None or not skip.any():
                rows = np.arange(first, last)
            else:
                # Reading a never-backed page would fault it in just to find zeros.
                rows = np.flatnonzero(~skip) + first
            nonzero = self._nonzero_rows(rows)
            self._duplicate += (last - first) - len(nonzero)
            self._round_zero += (last - first) - len(nonzero)
            self._scan_pos = last
            self._todo = nonzero
            self._todo_scanned = True
            self._todo_pos = 0
        batch = self._todo[self._todo_pos : self._todo_pos + BATCH_PAGES]
        self._todo_pos += len(batch)
        return batch

    def _next_pages(self, round_number: int) -> Pages | None:
        """Build the next batch of the current round, or None when it has no more."""
        while (candidates := self._next_candidates()) is not None:
            if self._todo_scanned:
                # Round 0's scan found these pages non-zero a moment ago.
                numbers, zeros = candidates, candidates[:0]
            else:
                numbers = self._nonzero_rows(candidates)
                zeros = (
                    candidates[:0]
                    if len(numbers) == len(candidates)
                    else np.setdiff1d(candidates, numbers, assume_unique=True)
                )
            if len(zeros):
                # A zero page needs a marker only if the destination holds it as non-zero.
                zero_pages = zeros[~self.digest.is_zero(zeros)]
                self.digest.update_zero(zeros)
                self._duplicate += len(zeros)
                self._round_zero += len(zeros)
            else:
                zero_pages = zeros
            if not len(numbers) and not len(zero_pages):
                continue
            batch = self._build(round_number, numbers.astype(np.uint32), zero_pages)
            self._normal += len(numbers)
            self._round_pages += len(numbers) + len(zero_pages)
            return batch
        return None

    def _build(self, round_number: int, numbers: np.ndarray, zero_pages: np.ndarray) -> Pages:
        """The batch of ``numbers`` (non-zero, sorted) and markers for ``zero_pages``, with
        each page's hash recorded from the very bytes that go into the batch.

        Should the guest write a page after the scan that found it non-zero (even zeroing
        it), the batch carries and hashes whatever the copy read, and the dirty log has the
        page for the next round, which resends it and its hash together.
        """
        zero_pages = zero_pages.astype(np.uint32)
        if not len(numbers):
            return Pages(self._next_seq, round_number, Encoding.RAW, numbers, zero_pages)
        link = self._link_bandwidth()
        if self._probe_bytes_left > 0:
            link = math.inf  # a raw probe: see _PROBE_FIRST
            self._probe_bytes_left -= len(numbers) * self._page_size
        codec = self._policy.choose(link, lambda: self._pages[numbers[: self._policy.SAMPLE_PAGES]])
        if codec is None and self._build_batch is not None:
            batch = self._build_batch(
                self._next_seq, round_number, numbers, zero_pages, self._runs(numbers)
            )
            self._hash(numbers, np.frombuffer(batch.payload, dtype=np.uint8))
            return batch
        first, last = int(numbers[0]), int(numbers[-1])
        if last - first == len(numbers) - 1:
            # One run: a view of RAM, copied once, by the serialiser.
            data = self._pages[first : last + 1]
        else:
            data = self._pages[numbers]
        self._hash(numbers, data)
        raw = data.reshape(-1).data
        if codec is None:
            return Pages(self._next_seq, round_number, Encoding.RAW, numbers, zero_pages, raw)
        encoding, payload = self._policy.pack(codec, raw)
        if encoding != "raw" and self.options.compression == "auto":
            self._compressed_since_probe += 1
            if self._compressed_since_probe >= self._probe_every and self._tx_seconds <= 0:
                self._compressed_since_probe = 0
                self._probe_every = min(2 * self._probe_every, _PROBE_MAX)
                self._probe_bytes_left = _PROBE_BYTES
        if encoding != "raw":
            self._compressed_bytes += len(payload)
            self._sent_compressed.add(self._next_seq)
        return Pages(self._next_seq, round_number, encoding, numbers, zero_pages, payload)

    def _runs(self, numbers: np.ndarray) -> list[memoryview]:
        """The pages ``numbers`` (sorted) as views of RAM, one per run of consecutive pages,
        so that joining them is the batch's one copy of its payload."""
        size = self._page_size
        first, last = int(numbers[0]), int(numbers[-1])
        if last - first == len(numbers) - 1:
            return [self._ram[first * size : (last + 1) * size]]
        pages = numbers.astype(np.int64)
        ends = np.flatnonzero(pages[1:] - pages[:-1] != 1)
        # Start and end (exclusive) of every run, alternately, in bytes.
        edges = np.empty(2 * len(ends) + 2, dtype=np.int64)
        edges[0], edges[-1] = first, last + 1
        edges[1:-1:2] = pages[ends] + 1
        edges[2:-1:2] = pages[ends + 1]
        edges *= size
        ram = self._ram
        bounds = iter(edges.tolist())
        return [ram[start:end] for start, end in zip(bounds, bounds, strict=True)]

    def _hash(self, numbers: np.ndarray, contents: np.ndarray) -> None:
        data = contents.reshape(len(numbers), self._page_size)
        self.digest.set_hashes(numbers, page_hashes(numbers, data))

    def _emit(self, batch: Pages) -> SendMessage:
        size = wire_size(batch)
        self._sent_bytes[batch.seq] = size
        self._next_seq += 1
        self._credit -= 1
        self._transferred += size
        self._round_bytes += size
        self._pace_bytes += size
        self._last_batch_bytes = size
        self._round_last_seq = batch.seq
        return SendMessage(batch)

    def _poll_round(self) -> list[Action]:
        now = self._clock()
        self._yielded = False
        self._scan_budget = _SCAN_CHUNKS_PER_POLL
        if self._round_exhausted():
            if self._acked_seq >= self._round_last_seq:
                return self._end_round(now)
            return self._ask_for_ack()
        if self._credit <= 0:
            return []
        if self._pacing() and not self._pace_allows(now):
            return []
        batch = self._next_pages(self._round)
        if batch is None:
            if not self._round_exhausted():
                # Scanned a lot of zero RAM: let the guest run, then continue (ready_at).
                self._yielded = True
                return []
            # Everything left in the round was zero on both sides.
            if self._acked_seq >= self._round_last_seq:
                return self._end_round(now)
            return self._ask_for_ack()
        return [self._emit(batch)]

    def _ask_for_ack(self) -> list[Action]:
        """At the end of a round, have the destination acknowledge everything sent.

        A destination acknowledges a few batches at a time, so the round's last batches
        may wait for company that never comes; a batch that lists no page asks for an
        answer at once. One per round is enough (it is the round's last batch then).
        """
        if self._flushed_seq == self._round_last_seq or self._credit <= 0:
            return []
        flush = Pages(seq=self._next_seq, round=self._round, encoding=Encoding.RAW)
        action = self._emit(flush)
        self._flushed_seq = flush.seq
        return [action]

    def _measure_bandwidth(self, now: float) -> None:
        elapsed = now - self._round_start
        if self._round_acked_bytes >= _MIN_BANDWIDTH_SAMPLE and elapsed > 0:
            self._bandwidth = self._round_acked_bytes / elapsed

    def _start_link_window(self, now: float) -> None:
        self._link_window_start = now
        self._link_window_bytes = 0
        self._link_window_mixed = False

    def _measure_link(self, now: float) -> None:
        """Track the best rate at which raw batches were acknowledged.

        Only windows of raw batches count: compressing makes fewer bytes cross the wire in
        the same time, so a window with compressed batches would make the link look slower
        and compression look better, feeding on itself. The peak, not the average, because
        on one host the stream is bounded by the CPUs both ends share, and a moment of
        contention (or the guest's slice between polls) slows the acknowledgements without
        making the link any slower; only a link slow in every window lets compression in.
        """
        if self._link_window_bytes < _LINK_WINDOW:
            return
        # No compressing happened in a raw window (only the policy's small samples, on
        # the compressor's own clock), so its whole duration was the link's.
        elapsed = now - self._link_window_start
        if elapsed <= 0:
            return  # acknowledgements that arrived together: wait for time to pass
        self._link_windows_seen += 1
        if not self._link_window_mixed and self._link_windows_seen > 1:
            self._link_peak = max(self._link_peak, self._link_window_bytes / elapsed)
        self._start_link_window(now)

    def _link_bandwidth(self) -> float:
        """The link's own bandwidth as best known (0: not yet), for choosing compression."""
        if self._tx_seconds > 0:
            return self._tx_bytes / self._tx_seconds
        return self._link_peak

    def _pacing(self) -> bool:
        return self.options.max_bandwidth > 0 and self.phase is not Phase.SWITCHOVER

    def _pace_allows(self, now: float) -> bool:
        return self._pace_bytes <= (now - self._pace_start) * self.options.max_bandwidth

    def _end_round(self, now: float) -> list[Action]:
        duration = max(now - self._round_start, 1e-9)
        if (
            self._round_bytes
            and self._round_acked_bytes < _MIN_BANDWIDTH_SAMPLE
            and (self._bandwidth <= 0)
        ):
            # Only small rounds so far: a latency-bound figure beats none.
            self._bandwidth = self._round_bytes / duration
        dirty = np.asarray(self._dirty_log.fetch_and_reset(), dtype=np.int64)
        self._sync_count += 1
        self._dirty_rate = len(dirty) / duration
        remaining = len(dirty) * self._page_size
        expected_ms = self._predict_downtime_ms(remaining)
        self._expected_downtime_ms = expected_ms
        self.rounds.append(
            RoundStats(
                number=self._round,
                pages=self._round_pages,
                zero_pages=self._round_zero,
                bytes=self._round_bytes,
                duration_s=duration,
                bandwidth=self._bandwidth,
                dirty_pages=len(dirty),
                dirty_rate=self._dirty_rate,
                expected_downtime_ms=expected_ms,
                throttle_percent=self._throttle,
                downtime_budget_ms=self._budget_ms,
            )
        )
        if expected_ms <= self._budget_ms:
            return self._begin_switchover(now, dirty)
        actions = self._converge(remaining)
        if self.finished:
            return actions
        if expected_ms <= self._budget_ms:
            return actions + self._begin_switchover(now, dirty)
        self.phase = Phase.ITERATING
        self._start_round(self._round + 1, now, dirty)
        return actions

    def _predict_downtime_ms(self, remaining: int) -> float:
        if remaining == 0:
            return 0.0
        if self._bandwidth <= 0:
            return math.inf
        return remaining / self._bandwidth * 1000

    def _converge(self, remaining: int) -> list[Action]:
        """The convergence policy, run after every round that cannot switch over yet."""
        if remaining < self._best_remaining * _PROGRESS:
            self._best_remaining = remaining
            self._rounds_without_progress = 0
            return []
        self._rounds_without_progress += 1
        if not self._escalating and self._rounds_without_progress < self.options.stall_rounds:
            return []
        self._escalating = True
        if self.options.auto_converge and self._throttle < THROTTLE_MAX:
            if self._throttle == 0:
                self._throttle = THROTTLE_FIRST
            else:
                self._throttle = min(self._throttle + THROTTLE_STEP, THROTTLE_MAX)
            return [SetThrottle(self._throttle)]
        ceiling = self.options.max_downtime_max_ms
        if self._budget_ms < ceiling:
            step = (ceiling - self.options.max_downtime_ms) / self.options.downtime_steps
            self._budget_ms = min(self._budget_ms + step, ceiling)
            return []
        mib = remaining / (1 << 20)
        rate = self._bandwidth / 1e6
        return self._stop(
            Phase.CANCELLED,
            f"migration did not converge: {mib:.1f} MiB still dirty after round "
            f"{self._round} at {rate:.1f} MB/s, with the vCPU throttled {self._throttle}% "
            f"and a downtime budget of {self._budget_ms:g} ms",
        )

    # --------------------------------------------------------------------- switchover

    def _begin_switchover(self, now: float, dirty: np.ndarray) -> list[Action]:
        self.phase = Phase.SWITCHOVER
        self._paused = True
        self._pause_time = now
        self._final_fetch_done = False
        self._start_round(self._round + 1, now, dirty)
        return [PauseVM()]

    def _poll_switchover(self) -> list[Action]:
        if not self._final_fetch_done:
            # The driver has paused the vCPU (PauseVM came first), so this set is final.
            last = np.asarray(self._dirty_log.fetch_and_reset(), dtype=np.int64)
            self._sync_count += 1
            self._todo = np.union1d(self._todo[self._todo_pos :], last)
            self._todo_scanned = False
            self._todo_pos = 0
            self._final_fetch_done = True
        if not self._round_exhausted():
            if self._credit <= 0:
                return []
            batch = self._next_pages(self._round)
            if batch is not None:
                return [self._emit(batch)]
        try:
            state = msgpack.packb(self._save_device_state(), use_bin_type=True)
        except Exception as exc:
            # A device that cannot save its state is a local fault: keep the VM here.
            return self._stop(Phase.FAILED, f"saving device state failed: {exc}")
        self.phase = Phase.WAIT_RESUMED
        self._complete_time = self._clock()
        self._transferred += len(state)
        self.switchover_round = RoundStats(
            number=self._round,
            pages=self._round_pages,
            zero_pages=self._round_zero,
            bytes=self._round_bytes,
            duration_s=max(self._complete_time - self._pause_time, 0.0),
            bandwidth=self._bandwidth,
            dirty_pages=0,
            dirty_rate=0.0,
            expected_downtime_ms=self._expected_downtime_ms,
            throttle_percent=self._throttle,
            downtime_budget_ms=self._budget_ms,
            switchover=True,
        )
        return [
            SendMessage(DeviceState(state)),
            SendMessage(Complete(digest=self.digest.value)),
        ]

    # -------------------------------------------------------------------- endings

    def _complete(self, now: float, resumed_at: float) -> list[Action]:
        self.phase = Phase.COMPLETED
        self._end_time = now
        self._resumed_at = resumed_at
        self._stop_logging()
        return [Completed(stats=self.stats(), paused_at=self._pause_time, resumed_at=resumed_at)]

    def _stop(self, phase: Phase, reason: str, send_abort: bool = True) -> list[Action]:
        """End before the destination could run the guest: the source VM runs on."""
        actions: list[Action] = []
        if send_abort and self.phase is not Phase.SETUP:
            actions.append(SendMessage(Abort(reason)))
        self._stop_logging()
        if self._throttle:
            self._throttle = 0
            actions.append(SetThrottle(0))
        if self._paused:
            self._paused = False
            actions.append(ResumeVM())
        self.phase = phase
        self.reason = reason
        self._end_time = self._clock()
        actions.append(Cancelled(reason) if phase is Phase.CANCELLED else Failed(reason))
        return actions

    def _unknown(self, reason: str) -> list[Action]:
        self._stop_logging()
        self.phase = Phase.OUTCOME_UNKNOWN
        self.reason = reason
        self._end_time = self._clock()
        return [OutcomeUnknown(reason)]

    def _protocol_error(self, what: str) -> list[Action]:
        if self.phase in (Phase.WAIT_RESUMED, Phase.CANCELLING):
            return self._unknown(f"protocol error from the destination: {what}")
        return self._stop(Phase.FAILED, f"protocol error from the destination: {what}")

    def _stop_logging(self) -> None:
        if self._logging:
            self._logging = False
            self._dirty_log.disable()
