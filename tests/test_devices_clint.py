"""CLINT: timer and software interrupt lines against guest time."""

from __future__ import annotations

import msgpack
import pytest

from vmcore.clock import GuestClock
from vmcore.devices.clint import MTIME_OFFSET, MTIMECMP_OFFSET, Clint

MSIP, MTIP = 1 << 3, 1 << 7


class Lines:
    def __init__(self) -> None:
        self.mip = 0

    def set_pending(self, mask: int, level: bool) -> None:
        self.mip = (self.mip | mask) if level else (self.mip & ~mask)


def make(instret: list[int]) -> tuple[Clint, GuestClock, Lines]:
    clock = GuestClock(deterministic=True)
    clock.instret = lambda: instret[0]
    lines = Lines()
    return Clint(clock, lines.set_pending), clock, lines


def test_msip_drives_software_interrupt() -> None:
    clint, _, lines = make([0])
    clint.write(0, 4, 1)
    assert lines.mip & MSIP
    assert clint.read(0, 4) == 1
    clint.write(0, 4, 0)
    assert not lines.mip & MSIP


def test_timer_fires_when_mtime_reaches_mtimecmp() -> None:
    instret = [0]
    clint, _, lines = make(instret)
    clint.write(MTIMECMP_OFFSET, 8, 1000)
    assert not lines.mip & MTIP
    assert clint.next_deadline() == 1000
    instret[0] = 999
    clint.update()
    assert not lines.mip & MTIP
    instret[0] = 1000
    clint.update()
    assert lines.mip & MTIP


def test_rearming_mtimecmp_drops_mtip_immediately() -> None:
    instret = [5000]
    clint, _, lines = make(instret)
    clint.write(MTIMECMP_OFFSET, 8, 10)
    assert lines.mip & MTIP
    clint.write(MTIMECMP_OFFSET, 8, 9000)
    assert not lines.mip & MTIP


def test_32bit_halves_of_mtimecmp_and_mtime() -> None:
    instret = [0]
    clint, _, _ = make(instret)
    clint.write(MTIMECMP_OFFSET, 4, 0x89ABCDEF)
    clint.write(MTIMECMP_OFFSET + 4, 4, 0x01234567)
    assert clint.read(MTIMECMP_OFFSET, 8) == 0x0123456789ABCDEF
    assert clint.read(MTIMECMP_OFFSET + 4, 4) == 0x01234567
    instret[0] = (5 << 32) | 7
    assert clint.read(MTIME_OFFSET, 4) == 7
    assert clint.read(MTIME_OFFSET + 4, 4) == 5


def test_guest_write_to_mtime_moves_guest_time() -> None:
    instret = [100]
    clint, clock, _ = make(instret)
    clint.write(MTIME_OFFSET, 8, 1_000_000)
    assert clock.mtime() == 1_000_000
    instret[0] += 50
    assert clint.read(MTIME_OFFSET, 8) == 1_000_050


def test_unarmed_timer_has_no_deadline() -> None:
    clint, _, _ = make([0])
    assert clint.next_deadline() is None


def test_save_restore_reasserts_lines() -> None:
    instret = [2000]
    clint, _, _ = make(instret)
    clint.write(0, 4, 1)
    clint.write(MTIMECMP_OFFSET, 8, 1500)
    state = msgpack.unpackb(msgpack.packb(clint.save()))
    clint2, _, lines2 = make(instret)
    clint2.restore(state)
    assert lines2.mip == MSIP | MTIP
    assert clint2.read(MTIMECMP_OFFSET, 8) == 1500
    with pytest.raises(ValueError):
        clint2.restore({"version": 2})
