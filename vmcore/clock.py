"""Guest time: the 10 MHz ``mtime`` the guest sees through the CLINT and the ``time`` CSR.

Guest time is VM state, not host time. It advances only while the VM runs, so a paused,
snapshotted or migrated guest sees neither a jump (time that passed while it was frozen) nor
a stall (time running backwards after restore). Two sources drive it:

* real time: host monotonic nanoseconds while running, frozen while paused;
* deterministic: one tick (100 ns) per retired instruction, so two runs of the same image
  observe exactly the same times and print exactly the same bytes. A hart idling in WFI
  would stop deterministic time forever, so the board jumps it to the next timer deadline.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

from vmcore.devices.state import check_version

TIMEBASE_HZ = 10_000_000
"""Ticks per guest second, as on QEMU ``virt`` (the devicetree's ``timebase-frequency``)."""

NS_PER_TICK = 1_000_000_000 // TIMEBASE_HZ

_STATE_VERSION = 1


class GuestClock:
    """The board's one source of ``mtime``.

    ``instret`` is the retired-instruction counter deterministic time is built from; the board
    binds it to the hart once the hart exists (the hart needs the clock first, to read time).
    """

    def __init__(self, deterministic: bool = False) -> None:
        self.deterministic = deterministic
        self.instret: Callable[[], int] = lambda: 0
        # Real time: mtime = _base + (now - _started_ns) / 100 while running, else _base.
        self._base = 0
        self._started_ns: int | None = None
        # Deterministic: mtime = _base + instret() - _instret_base.
        self._instret_base = 0

    @property
    def running(self) -> bool:
        return self._started_ns is not None

    def mtime(self) -> int:
        """The current guest time in ticks; the hart calls this for every ``time`` CSR read."""
        if self.deterministic:
            return self._base + self.instret() - self._instret_base
        if self._started_ns is None:
            return self._base
        return self._base + (time.monotonic_ns() - self._started_ns) // NS_PER_TICK

    def resume(self) -> None:
        """Let real time flow into the guest (no effect on deterministic time)."""
        if self._started_ns is None:
            self._started_ns = time.monotonic_ns()

    def pause(self) -> None:
        """Freeze real guest time; it continues from the same tick on ``resume``."""
        if self._started_ns is not None:
            self._base = self.mtime()
            self._started_ns = None

    def set_mtime(self, value: int) -> None:
        """Make ``mtime`` read ``value`` now (a guest store to the CLINT's mtime register)."""
        value &= (1 << 64) - 1
        if self.deterministic:
            self._base = value
            self._instret_base = self.instret()
        else:
            self._base = value
            if self._started_ns is not None:
                self._started_ns = time.monotonic_ns()

    def skip_to(self, value: int) -> None:
        """Jump forward to ``value`` (deterministic idle); never moves time backwards."""
        now = self.mtime()
        if value > now:
            self.set_mtime(value)

    def save(self) -> dict[str, Any]:
        state: dict[str, Any] = {"version": _STATE_VERSION, "mtime": self.mtime()}
        if self.deterministic:
            # The hart's counter is restored beside us, in either order; remember the pairing.
            state["instret"] = self.instret()
        return state

    def restore(self, state: dict[str, Any]) -> None:
        """Continue from the saved tick: the guest sees no jump and no stall."""
        check_version(state, "clock", _STATE_VERSION)
        running = self.running
        self._started_ns = None
        self._base = int(state["mtime"])
        if self.deterministic:
            if "instret" not in state:
                raise ValueError("clock state is from a real-time VM; this VM is deterministic")
            self._instret_base = int(state["instret"])
        elif running:
            self.resume()
