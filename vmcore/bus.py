"""The physical address space of a Ferry board: guest RAM plus memory-mapped devices.

The hart reaches RAM through its own fast path (see ``vmcore.memory``); everything else is
an MMIO access that leaves the fast path and lands here. Keeping the device map a sorted,
tiny list is deliberate: MMIO is rare compared with RAM traffic, and a linear scan over
half a dozen regions is faster in CPython than any clever structure.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol


class MMIODevice(Protocol):
    """A device register window. ``offset`` is relative to the window's base."""

    def read(self, offset: int, size: int) -> int: ...

    def write(self, offset: int, size: int, value: int) -> None: ...


class BusError(Exception):
    """An access to a physical address that nothing answers (becomes an access fault)."""

    def __init__(self, addr: int, size: int, write: bool) -> None:
        kind = "store" if write else "load"
        super().__init__(f"{kind} of {size} bytes at unmapped address {addr:#x}")
        self.addr = addr
        self.size = size
        self.write = write


@dataclass(frozen=True)
class Region:
    base: int
    size: int
    name: str
    device: MMIODevice

    def contains(self, addr: int) -> bool:
        return self.base <= addr < self.base + self.size


class Bus:
    """Routes MMIO accesses to devices by physical address."""

    def __init__(self) -> None:
        self.regions: list[Region] = []

    def attach(self, base: int, size: int, device: MMIODevice, name: str) -> None:
        for r in self.regions:
            if base < r.base + r.size and r.base < base + size:
                raise ValueError(f"{name} at {base:#x} overlaps {r.name} at {r.base:#x}")
        self.regions.append(Region(base, size, name, device))
        self.regions.sort(key=lambda r: r.base)

    def find(self, addr: int) -> Region | None:
        for r in self.regions:
            if r.base <= addr < r.base + r.size:
                return r
        return None

    def read(self, addr: int, size: int) -> int:
        r = self.find(addr)
        if r is None or addr + size > r.base + r.size:
            raise BusError(addr, size, False)
        return r.device.read(addr - r.base, size)

    def write(self, addr: int, size: int, value: int) -> None:
        r = self.find(addr)
        if r is None or addr + size > r.base + r.size:
            raise BusError(addr, size, True)
        r.device.write(addr - r.base, size, value)
