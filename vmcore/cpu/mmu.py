"""Sv39 address translation: the page-table walker with hardware A/D updates.

The walker is the slow path behind the hart's software TLBs; it runs on a TLB miss only.
A/D updates are stores to guest RAM, so they go through the hart's physical-write helper
and are seen by the dirty log like any other store.
"""

from __future__ import annotations

import struct
from typing import TYPE_CHECKING

from vmcore.cpu.trap import (
    INSN_ACCESS,
    INSN_PAGE,
    LOAD_ACCESS,
    LOAD_PAGE,
    STORE_ACCESS,
    STORE_PAGE,
    Trap,
)

if TYPE_CHECKING:
    from vmcore.cpu.hart import Hart

FETCH, LOAD, STORE = 0, 1, 2
PAGE_FAULT = (INSN_PAGE, LOAD_PAGE, STORE_PAGE)
ACCESS_FAULT = (INSN_ACCESS, LOAD_ACCESS, STORE_ACCESS)

PTE_V, PTE_R, PTE_W, PTE_X, PTE_U, PTE_G, PTE_A, PTE_D = 1, 2, 4, 8, 16, 32, 64, 128
MSTATUS_SUM = 1 << 18
MSTATUS_MXR = 1 << 19
SATP_MODE_SV39 = 8

_U64 = struct.Struct("<Q")


def walk(h: Hart, va: int, acc: int, priv: int, epc: int) -> int:
    """Translate virtual address ``va`` for access ``acc`` at privilege ``priv`` (Sv39 on).

    Returns the physical address or raises the page fault (tval = ``va``) or, when a page
    table lies outside RAM, the access fault of the access type.
    """
    # Bits 63:39 must all equal bit 38.
    top = va >> 38
    if top != 0 and top != (1 << 26) - 1:
        raise Trap(PAGE_FAULT[acc], va, epc)
    ram = h.ram
    buf = ram.buf
    base = ram.base
    end = ram.end
    a = (h.satp & ((1 << 44) - 1)) << 12
    level = 2
    while True:
        pte_addr = a + (((va >> (12 + 9 * level)) & 511) << 3)
        if not base <= pte_addr < end:
            raise Trap(ACCESS_FAULT[acc], va, epc)
        pte = _U64.unpack_from(buf, pte_addr - base)[0]
        if not pte & PTE_V or (pte & (PTE_R | PTE_W)) == PTE_W or pte >> 54:
            raise Trap(PAGE_FAULT[acc], va, epc)
        if pte & (PTE_R | PTE_X):
            break
        level -= 1
        if level < 0:
            raise Trap(PAGE_FAULT[acc], va, epc)
        a = ((pte >> 10) & ((1 << 44) - 1)) << 12
    # Leaf: check permissions.
    mstatus = h.mstatus
    if acc == FETCH:
        ok = pte & PTE_X
    elif acc == LOAD:
        ok = pte & PTE_R or (pte & PTE_X and mstatus & MSTATUS_MXR)
    else:
        ok = pte & PTE_W
    if not ok:
        raise Trap(PAGE_FAULT[acc], va, epc)
    if pte & PTE_U:
        if priv == 1 and (acc == FETCH or not mstatus & MSTATUS_SUM):
            raise Trap(PAGE_FAULT[acc], va, epc)
    elif priv == 0:
        raise Trap(PAGE_FAULT[acc], va, epc)
    ppn = (pte >> 10) & ((1 << 44) - 1)
    if level and ppn & ((1 << (9 * level)) - 1):
        raise Trap(PAGE_FAULT[acc], va, epc)  # misaligned superpage
    want = PTE_A | (PTE_D if acc == STORE else 0)
    if pte & want != want:
        h.phys_write_ram(pte_addr, 8, pte | want)
    offset_mask = (1 << (12 + 9 * level)) - 1
    return ((ppn << 12) & ~offset_mask) | (va & offset_mask)
