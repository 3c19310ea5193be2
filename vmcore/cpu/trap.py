"""Synchronous exceptions as Python exceptions.

Instruction closures raise :class:`Trap` from deep inside a block; the run loop catches it,
works out how many instructions of the block retired from ``epc``, and enters the trap
handler. Raising is only paid on the (rare) faulting path: ``try`` is free in CPython 3.11.
"""

from __future__ import annotations

# Exception causes (mcause/scause with the interrupt bit clear).
INSN_MISALIGNED = 0
INSN_ACCESS = 1
ILLEGAL = 2
BREAKPOINT = 3
LOAD_MISALIGNED = 4
LOAD_ACCESS = 5
STORE_MISALIGNED = 6
STORE_ACCESS = 7
ECALL_U = 8
ECALL_S = 9
ECALL_M = 11
INSN_PAGE = 12
LOAD_PAGE = 13
STORE_PAGE = 15

INTERRUPT = 1 << 63

CAUSE_NAMES = {
    0: "instruction address misaligned",
    1: "instruction access fault",
    2: "illegal instruction",
    3: "breakpoint",
    4: "load address misaligned",
    5: "load access fault",
    6: "store/AMO address misaligned",
    7: "store/AMO access fault",
    8: "ecall from U",
    9: "ecall from S",
    11: "ecall from M",
    12: "instruction page fault",
    13: "load page fault",
    15: "store/AMO page fault",
}


class Trap(Exception):
    """A synchronous exception raised by the instruction at ``epc``."""

    __slots__ = ("cause", "epc", "tval")

    def __init__(self, cause: int, tval: int, epc: int) -> None:
        self.cause = cause
        self.tval = tval
        self.epc = epc
