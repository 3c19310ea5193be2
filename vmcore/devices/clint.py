"""The core-local interruptor (SiFive CLINT): machine software and timer interrupts for hart 0.

Register map as on QEMU ``virt``: ``msip`` at 0x0, ``mtimecmp`` at 0x4000, ``mtime`` at
0xBFF8, each 64-bit register also reachable as two 32-bit halves (RV32 firmware and some
drivers write ``mtimecmp`` in halves).

The timer line is evaluated at two moments only: when the guest writes ``mtimecmp`` or
``mtime`` (a handler that re-arms the timer must see MTIP drop at once, or it would trap
again straight after ``mret``), and when the board calls ``update()`` between instruction
chunks. Checking the deadline on every instruction would cost the fast path; the board
instead bounds each chunk so that a deadline is noticed soon enough.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from vmcore.clock import GuestClock
from vmcore.devices.state import check_version

CLINT_BASE = 0x0200_0000
CLINT_SIZE = 0x10000

MSIP_OFFSET = 0x0
MTIMECMP_OFFSET = 0x4000
MTIME_OFFSET = 0xBFF8

_MIP_MSIP = 1 << 3
_MIP_MTIP = 1 << 7
_U64 = (1 << 64) - 1
_STATE_VERSION = 1

SetPending = Callable[[int, bool], None]


class Clint:
    """CLINT for one hart; ``set_pending(mask, level)`` drives the hart's ``mip`` bits."""

    def __init__(self, clock: GuestClock, set_pending: SetPending) -> None:
        self.clock = clock
        self.set_pending = set_pending
        self.msip = 0
        self.mtimecmp = _U64  # reset value: no timer interrupt until firmware arms one
        self._mtip = False

    def reset(self) -> None:
        self.msip = 0
        self.mtimecmp = _U64
        self.set_pending(_MIP_MSIP, False)
        self._mtip = False
        self.set_pending(_MIP_MTIP, False)

    def update(self) -> None:
        """Re-evaluate the timer line against the current guest time."""
        level = self.clock.mtime() >= self.mtimecmp
        if level != self._mtip:
            self._mtip = level
            self.set_pending(_MIP_MTIP, level)

    def next_deadline(self) -> int | None:
        """The mtime at which MTIP will rise, or None if the timer is not armed.

        An already-expired timer returns its (past) deadline so an idle loop wakes at once.
        """
        if self.mtimecmp == _U64:
            return None
        return self.mtimecmp

    # -- bus interface -------------------------------------------------------------------

    def read(self, offset: int, size: int) -> int:
        reg, shift = self._register(offset, size)
        if reg == MSIP_OFFSET:
            value = self.msip
        elif reg == MTIMECMP_OFFSET:
            value = self.mtimecmp
        elif reg == MTIME_OFFSET:
            value = self.clock.mtime() & _U64
        else:
            return 0
        return (value >> shift) & ((1 << (8 * size)) - 1)

    def write(self, offset: int, size: int, value: int) -> None:
        reg, shift = self._register(offset, size)
        if reg == MSIP_OFFSET:
            if shift == 0:
                self.msip = value & 1
                self.set_pending(_MIP_MSIP, bool(self.msip))
        elif reg == MTIMECMP_OFFSET:
            self.mtimecmp = _merge(self.mtimecmp, value, shift, size)
            self.update()
        elif reg == MTIME_OFFSET:
            self.clock.set_mtime(_merge(self.clock.mtime(), value, shift, size))
            self.update()

    @staticmethod
    def _register(offset: int, size: int) -> tuple[int, int]:
        """Split an access into (64-bit register offset, bit shift within it)."""
        if size == 8 and offset % 8 == 0:
            return offset, 0
        if size == 4 and offset % 4 == 0:
            if offset == MSIP_OFFSET:
                return offset, 0
            return offset & ~7, 32 * ((offset >> 2) & 1)
        # Other widths are not defined by the CLINT; treat as an unmapped register.
        return -1, 0

    # -- VM state ------------------------------------------------------------------------

    def save(self) -> dict[str, Any]:
        return {"version": _STATE_VERSION, "msip": self.msip, "mtimecmp": self.mtimecmp}

    def restore(self, state: dict[str, Any]) -> None:
        check_version(state, "clint", _STATE_VERSION)
        self.msip = int(state["msip"]) & 1
        self.mtimecmp = int(state["mtimecmp"]) & _U64
        self.set_pending(_MIP_MSIP, bool(self.msip))
        self._mtip = self.clock.mtime() >= self.mtimecmp
        self.set_pending(_MIP_MTIP, self._mtip)


def _merge(old: int, value: int, shift: int, size: int) -> int:
    mask = ((1 << (8 * size)) - 1) << shift
    return (old & ~mask) | ((value << shift) & mask)
