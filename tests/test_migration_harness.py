"""An in-memory wire between a MigrationSender and a MigrationReceiver, and a fake guest.

Not a test module itself (it holds no tests); the migration tests import it. Time is a fake
clock that the wire advances by each message's transfer time at a chosen link bandwidth,
so bandwidth, dirty rate and predicted downtime are deterministic and no test depends on
the speed of the machine running it.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from node.migration import (
    Abort,
    Action,
    Cancelled,
    Complete,
    Completed,
    DeviceState,
    DiscardVM,
    Failed,
    GuestRunning,
    Hello,
    Message,
    MigrationOptions,
    MigrationReceiver,
    MigrationSender,
    OutcomeUnknown,
    Pages,
    PauseVM,
    ResumeVM,
    SendMessage,
    SetThrottle,
    wire,
)
from node.migration.encoding import wire_size
from protos.ferry.v1 import migration_pb2 as pb

PAGE = 4096
TOKEN = b"one-time-token-0123456789abcdef"
CONFIG = "cfg-" + "ab" * 30


class FakeClock:
    """A monotonic clock that moves only when told to."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


class FakeDirtyLog:
    """The dirty-log interface of vmcore.memory.DirtyLog, fed by the fake guest."""

    def __init__(self, page_count: int) -> None:
        self.bitmap = np.zeros(page_count, dtype=bool)
        self.enabled = False
        self.enable_calls = 0
        self.fetches = 0

    def enable(self) -> None:
        self.bitmap[:] = False
        self.enabled = True
        self.enable_calls += 1

    def disable(self) -> None:
        self.enabled = False
        self.bitmap[:] = False

    def mark(self, pages: np.ndarray) -> None:
        if self.enabled:
            self.bitmap[pages] = True

    def fetch_and_reset(self) -> np.ndarray:
        self.fetches += 1
        if not self.enabled:
            return np.zeros(0, dtype=np.int64)
        pages = np.flatnonzero(self.bitmap)
        self.bitmap[pages] = False
        return pages


class FakeGuest:
    """A RAM image plus a "vCPU" that dirties pages of a working set whenever it runs.

    ``pages_per_slice`` pages are written per slice, scaled down by the throttle when
    ``obeys_throttle``; ``zero_fraction`` of the writes zero the page instead.
    """

    def __init__(
        self,
        page_count: int,
        *,
        seed: int = 0,
        filled: int | None = None,
        working_set: int | None = None,
        pages_per_slice: int = 0,
        zero_fraction: float = 0.0,
        obeys_throttle: bool = True,
    ) -> None:
        self.page_count = page_count
        self.ram = bytearray(page_count * PAGE)
        self.pages = np.frombuffer(self.ram, dtype=np.uint8).reshape(page_count, PAGE)
        self.log = FakeDirtyLog(page_count)
        self.rng = np.random.default_rng(seed)
        filled = page_count // 2 if filled is None else filled
        if filled:
            chosen = self.rng.choice(page_count, size=filled, replace=False)
            self.pages[chosen] = self.rng.integers(0, 256, size=(filled, PAGE), dtype=np.uint8)
        self.working_set = page_count if working_set is None else working_set
        self.pages_per_slice = pages_per_slice
        self.zero_fraction = zero_fraction
        self.obeys_throttle = obeys_throttle
        self.paused = False
        self.throttle = 0
        self.pause_count = 0
        self.resume_count = 0
        self.slices = 0

    def write(self, pages: np.ndarray, zero: bool = False) -> None:
        pages = np.asarray(pages, dtype=np.int64)
        if zero:
            self.pages[pages] = 0
        else:
            self.pages[pages] = self.rng.integers(1, 256, size=(len(pages), PAGE), dtype=np.uint8)
        self.log.mark(pages)

    def run_slice(self) -> None:
        if self.paused or not self.pages_per_slice:
            return
        self.slices += 1
        n = self.pages_per_slice
        if self.obeys_throttle and self.throttle:
            n = n * (100 - self.throttle) // 100
        if n <= 0:
            return
        pages = self.rng.integers(0, self.working_set, size=n)
        zeroed = self.rng.random(n) < self.zero_fraction
        self.write(pages[~zeroed])
        self.write(pages[zeroed], zero=True)


@dataclass
class Outcome:
    """Everything both ends asked for, in order, and how each ended."""

    source: list[Action] = field(default_factory=list)
    destination: list[Action] = field(default_factory=list)
    restored: list[dict[str, Any]] = field(default_factory=list)
    sent: list[Message] = field(default_factory=list)

    @property
    def source_end(self) -> Action | None:
        ends = [
            a for a in self.source if isinstance(a, Completed | Cancelled | Failed | OutcomeUnknown)
        ]
        assert len(ends) <= 1, f"more than one ending: {ends}"
        return ends[0] if ends else None

    @property
    def destination_running(self) -> bool:
        return any(isinstance(a, GuestRunning) for a in self.destination)

    @property
    def destination_discarded(self) -> bool:
        return any(isinstance(a, DiscardVM) for a in self.destination)

    def throttles(self) -> list[int]:
        return [a.percent for a in self.source if isinstance(a, SetThrottle)]


Tamper = Callable[[Message], Message | None]


class Loopback:
    """Drives a sender and a receiver against each other, with a guest running between."""

    def __init__(
        self,
        guest: FakeGuest,
        *,
        options: MigrationOptions | None = None,
        link_bandwidth: float = 100e6,
        token: bytes = TOKEN,
        config: str = CONFIG,
        dest_token: bytes = TOKEN,
        dest_config: str = CONFIG,
        dest_pages: int | None = None,
        device_state: dict[str, Any] | None = None,
        restore: Callable[[dict[str, Any]], None] | None = None,
        window: int = 4,
        via_protobuf: bool = False,
        compression_timer: Callable[[], float] | None = None,
        transport_seconds: float | None = None,
    ) -> None:
        self.guest = guest
        # Send every message through the protobuf mapping and its serialised bytes.
        self.via_protobuf = via_protobuf
        # If set, the driver reports this much wire time for every batch it sends.
        self.transport_seconds = transport_seconds
        self.clock = FakeClock()
        self.link_bandwidth = link_bandwidth
        self.device_state = device_state if device_state is not None else {"hart": {"pc": 1}}
        self.outcome = Outcome()
        self.sender = MigrationSender(
            memoryview(guest.ram),
            guest.log,
            self._save,
            token=token,
            config_hash=config,
            ferry_version="test",
            options=options,
            clock=self.clock,
            compression_timer=compression_timer or self.clock,
        )
        pages = guest.page_count if dest_pages is None else dest_pages
        self.dest_ram = bytearray(pages * PAGE)
        self.receiver = MigrationReceiver(
            memoryview(self.dest_ram),
            token=dest_token,
            config_hash=dest_config,
            restore=restore or self.outcome.restored.append,
            window=window,
            clock=self.clock,
        )
        self.to_dest: deque[Message] = deque()
        self.to_source: deque[Message] = deque()
        self.connected = True
        # A stalled destination reads nothing: messages pile up on the wire.
        self.destination_stalled = False

    def _save(self) -> dict[str, Any]:
        assert self.guest.paused, "device state saved while the vCPU runs"
        return self.device_state

    # -- carrying out actions

    def source_do(self, actions: list[Action]) -> None:
        for action in actions:
            self.outcome.source.append(action)
            if isinstance(action, SendMessage):
                self.outcome.sent.append(action.message)
                if self.connected:
                    self.to_dest.append(self._over_wire(action.message))
                if self.transport_seconds is not None and isinstance(action.message, Pages):
                    self.sender.transport_time(self.transport_seconds)
            elif isinstance(action, PauseVM):
                assert not self.guest.paused
                self.guest.paused = True
                self.guest.pause_count += 1
            elif isinstance(action, ResumeVM):
                assert self.guest.paused
                self.guest.paused = False
                self.guest.resume_count += 1
            elif isinstance(action, SetThrottle):
                self.guest.throttle = action.percent

    def dest_do(self, actions: list[Action]) -> None:
        for action in actions:
            self.outcome.destination.append(action)
            if isinstance(action, SendMessage) and self.connected:
                self.to_source.append(self._over_wire(action.message))

    def _over_wire(self, message: Message) -> Message:
        if not self.via_protobuf:
            return message
        if isinstance(message, Hello | Pages | DeviceState | Complete | Abort):
            data = wire.source_to_pb(message).SerializeToString()
            return wire.source_from_pb(pb.SourceMessage.FromString(data))
        data = wire.destination_to_pb(message).SerializeToString()
        return wire.destination_from_pb(pb.DestinationMessage.FromString(data))

    # -- the loop

    def step(self, tamper: Tamper | None = None) -> bool:
        """One round of the event loop; returns whether anything happened."""
        progressed = False
        if not self.sender.finished:
            while actions := self.sender.poll():
                self.source_do(actions)
                progressed = True
        while self.to_dest and not self.destination_stalled:
            msg = self.to_dest.popleft()
            size = wire_size(msg) if isinstance(msg, Pages) else 64
            self.clock.advance(size / self.link_bandwidth)
            if tamper is not None:
                replaced = tamper(msg)
                if replaced is None:
                    continue
                msg = replaced
            self.dest_do(self.receiver.receive(msg))
            progressed = True
        while self.to_source:
            self.source_do(self.sender.receive(self.to_source.popleft()))
            progressed = True
        self.guest.run_slice()
        if not progressed:
            ready = self.sender.ready_at
            # Nothing to do until a timeout or pacing: let a little time pass.
            self.clock.now = max(self.clock.now + 0.05, ready or 0.0)
        self.source_do(self.sender.tick())
        if not self.receiver.finished:
            self.dest_do(self.receiver.tick())
        return progressed

    def start(self) -> None:
        self.source_do(self.sender.start())

    def run(
        self,
        *,
        tamper: Tamper | None = None,
        until: Callable[[Loopback], bool] | None = None,
        max_steps: int = 20000,
    ) -> Outcome:
        """Run until the sender finishes and the wire is empty (or ``until`` holds)."""
        if self.sender.phase == "setup":
            self.start()
        for _ in range(max_steps):
            if until is not None and until(self):
                return self.outcome
            wire_idle = not self.to_source and (not self.to_dest or self.destination_stalled)
            if self.sender.finished and wire_idle:
                return self.outcome
            self.step(tamper)
        raise AssertionError(f"migration still in phase {self.sender.phase} after {max_steps}")

    def drop_connection(self) -> None:
        self.connected = False
        self.to_dest.clear()
        self.to_source.clear()
        self.source_do(self.sender.connection_lost("test dropped it"))
        self.dest_do(self.receiver.connection_lost("test dropped it"))
