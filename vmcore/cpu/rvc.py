"""The C extension, expanded into the equivalent 32-bit instruction words.

Expanding at decode time means every compressed instruction runs through exactly the same
closure as its 32-bit form, so the two can never disagree; the only difference the
decoder keeps is the instruction length (for the link register and the next pc).
"""

from __future__ import annotations


def _r(f7: int, rs2: int, rs1: int, f3: int, rd: int, op: int) -> int:
    return (f7 << 25) | (rs2 << 20) | (rs1 << 15) | (f3 << 12) | (rd << 7) | op


def _i(imm: int, rs1: int, f3: int, rd: int, op: int) -> int:
    return ((imm & 0xFFF) << 20) | (rs1 << 15) | (f3 << 12) | (rd << 7) | op


def _s(imm: int, rs2: int, rs1: int, f3: int, op: int) -> int:
    imm &= 0xFFF
    return ((imm >> 5) << 25) | (rs2 << 20) | (rs1 << 15) | (f3 << 12) | ((imm & 31) << 7) | op


def _b(imm: int, rs2: int, rs1: int, f3: int) -> int:
    imm &= 0x1FFF
    return (
        (((imm >> 12) & 1) << 31)
        | (((imm >> 5) & 0x3F) << 25)
        | (rs2 << 20)
        | (rs1 << 15)
        | (f3 << 12)
        | (((imm >> 1) & 0xF) << 8)
        | (((imm >> 11) & 1) << 7)
        | 0x63
    )


def _j(imm: int, rd: int) -> int:
    imm &= 0x1FFFFF
    return (
        (((imm >> 20) & 1) << 31)
        | (((imm >> 1) & 0x3FF) << 21)
        | (((imm >> 11) & 1) << 20)
        | (((imm >> 12) & 0xFF) << 12)
        | (rd << 7)
        | 0x6F
    )


def _sext(v: int, bits: int) -> int:
    m = 1 << (bits - 1)
    return (v ^ m) - m


LOAD, STORE, OPIMM, OPIMM32, OP, OP32, LUI, JALR = 0x03, 0x23, 0x13, 0x1B, 0x33, 0x3B, 0x37, 0x67
EBREAK = 0x00100073


def expand(h: int) -> int:
    """Return the 32-bit instruction that the 16-bit parcel ``h`` stands for, or 0 if illegal.

    0 is itself an illegal 32-bit encoding, so it doubles as the "reserved" answer.
    """
    q = h & 3
    f3 = h >> 13
    rd = (h >> 7) & 31
    rs2 = (h >> 2) & 31
    rdp = ((h >> 2) & 7) + 8  # rd' / rs2' in bits 4:2
    rs1p = ((h >> 7) & 7) + 8  # rs1' / rd' in bits 9:7
    imm6 = _sext(((h >> 7) & 0x20) | ((h >> 2) & 31), 6)
    if q == 0:
        if f3 == 0:  # c.addi4spn
            imm = ((h >> 7) & 0x30) | ((h >> 1) & 0x3C0) | ((h >> 4) & 4) | ((h >> 2) & 8)
            return _i(imm, 2, 0, rdp, OPIMM) if imm else 0
        if f3 == 2:  # c.lw
            imm = ((h >> 7) & 0x38) | ((h >> 4) & 4) | ((h << 1) & 0x40)
            return _i(imm, rs1p, 2, rdp, LOAD)
        if f3 == 3:  # c.ld
            imm = ((h >> 7) & 0x38) | ((h << 1) & 0xC0)
            return _i(imm, rs1p, 3, rdp, LOAD)
        if f3 == 6:  # c.sw
            imm = ((h >> 7) & 0x38) | ((h >> 4) & 4) | ((h << 1) & 0x40)
            return _s(imm, rdp, rs1p, 2, STORE)
        if f3 == 7:  # c.sd
            imm = ((h >> 7) & 0x38) | ((h << 1) & 0xC0)
            return _s(imm, rdp, rs1p, 3, STORE)
        return 0  # c.fld, c.fsd (no D), reserved
    if q == 1:
        if f3 == 0:  # c.addi / c.nop
            return _i(imm6, rd, 0, rd, OPIMM)
        if f3 == 1:  # c.addiw
            return _i(imm6, rd, 0, rd, OPIMM32) if rd else 0
        if f3 == 2:  # c.li
            return _i(imm6, 0, 0, rd, OPIMM)
        if f3 == 3:
            if rd == 2:  # c.addi16sp
                imm = (
                    ((h >> 3) & 0x200)
                    | ((h >> 2) & 0x10)
                    | ((h << 1) & 0x40)
                    | ((h << 4) & 0x180)
                    | ((h << 3) & 0x20)
                )
                return _i(_sext(imm, 10), 2, 0, 2, OPIMM) if imm else 0
            # c.lui
            if imm6 == 0:
                return 0
            return ((imm6 << 12) & 0xFFFFF000) | (rd << 7) | LUI
        if f3 == 4:
            f2 = (h >> 10) & 3
            shamt = ((h >> 7) & 0x20) | ((h >> 2) & 31)
            if f2 == 0:  # c.srli
                return _i(shamt, rs1p, 5, rs1p, OPIMM)
            if f2 == 1:  # c.srai
                return _i(0x400 | shamt, rs1p, 5, rs1p, OPIMM)
            if f2 == 2:  # c.andi
                return _i(imm6, rs1p, 7, rs1p, OPIMM)
            sub = (h >> 5) & 3
            if not h & 0x1000:
                f3s, f7 = ((0, 0x20), (4, 0), (6, 0), (7, 0))[sub]
                return _r(f7, rdp, rs1p, f3s, rs1p, OP)
            if sub == 0:  # c.subw
                return _r(0x20, rdp, rs1p, 0, rs1p, OP32)
            if sub == 1:  # c.addw
                return _r(0, rdp, rs1p, 0, rs1p, OP32)
            return 0
        if f3 == 5:  # c.j
            imm = (
                ((h >> 1) & 0x800)
                | ((h >> 7) & 0x10)
                | ((h >> 1) & 0x300)
                | ((h << 2) & 0x400)
                | ((h >> 1) & 0x40)
                | ((h << 1) & 0x80)
                | ((h >> 2) & 0xE)
                | ((h << 3) & 0x20)
            )
            return _j(_sext(imm, 12), 0)
        # c.beqz / c.bnez
        imm = (
            ((h >> 4) & 0x100)
            | ((h >> 7) & 0x18)
            | ((h << 1) & 0xC0)
            | ((h >> 2) & 6)
            | ((h << 3) & 0x20)
        )
        return _b(_sext(imm, 9), 0, rs1p, 0 if f3 == 6 else 1)
    if q == 2:
        if f3 == 0:  # c.slli
            shamt = ((h >> 7) & 0x20) | ((h >> 2) & 31)
            return _i(shamt, rd, 1, rd, OPIMM)
        if f3 == 2:  # c.lwsp
            imm = ((h >> 7) & 0x20) | ((h >> 2) & 0x1C) | ((h << 4) & 0xC0)
            return _i(imm, 2, 2, rd, LOAD) if rd else 0
        if f3 == 3:  # c.ldsp
            imm = ((h >> 7) & 0x20) | ((h >> 2) & 0x18) | ((h << 4) & 0x1C0)
            return _i(imm, 2, 3, rd, LOAD) if rd else 0
        if f3 == 4:
            if not h & 0x1000:
                if rs2 == 0:  # c.jr
                    return _i(0, rd, 0, 0, JALR) if rd else 0
                return _r(0, rs2, 0, 0, rd, OP)  # c.mv
            if rs2 == 0:
                if rd == 0:
                    return EBREAK
                return _i(0, rd, 0, 1, JALR)  # c.jalr
            return _r(0, rs2, rd, 0, rd, OP)  # c.add
        if f3 == 6:  # c.swsp
            imm = ((h >> 7) & 0x3C) | ((h >> 1) & 0xC0)
            return _s(imm, rs2, 2, 2, STORE)
        if f3 == 7:  # c.sdsp
            imm = ((h >> 7) & 0x38) | ((h >> 1) & 0x1C0)
            return _s(imm, rs2, 2, 3, STORE)
        return 0  # c.fldsp, c.fsdsp
    return 0
