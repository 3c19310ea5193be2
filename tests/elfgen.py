"""Hand-built ELF files for loader and CLI tests (valid, wrong-arch, truncated, misplaced)."""

from __future__ import annotations

import struct

EM_RISCV = 243
EM_X86_64 = 62


def make_elf(
    segments: list[tuple[int, bytes, int]],
    entry: int | None = None,
    machine: int = EM_RISCV,
    elf_class: int = 2,
    endian: int = 1,
    virtual_offset: int = 0,
) -> bytes:
    """An ELF64 executable whose PT_LOAD segments are ``(paddr, file_bytes, memsz)``,
    linked ``virtual_offset`` above their physical addresses (as vmlinux is)."""
    ehsize, phentsize = 64, 56
    phoff = ehsize
    data_off = phoff + phentsize * len(segments)
    phdrs = b""
    payload = b""
    for paddr, data, memsz in segments:
        offset = data_off + len(payload)
        vaddr = paddr + virtual_offset
        phdrs += struct.pack("<IIQQQQQQ", 1, 7, offset, vaddr, paddr, len(data), memsz, 0x1000)
        payload += data
    if entry is None:
        entry = segments[0][0] + virtual_offset if segments else 0
    ident = b"\x7fELF" + bytes([elf_class, endian, 1, 0]) + bytes(8)
    header = ident + struct.pack(
        "<HHIQQQIHHHHHH",
        2,  # ET_EXEC
        machine,
        1,
        entry,
        phoff,
        0,
        0,
        ehsize,
        phentsize,
        len(segments),
        64,
        0,
        0,
    )
    return header + phdrs + payload


# -- a few RV64 instruction encoders, enough for tiny hand-written test guests -------------


def lui(rd: int, imm20: int) -> int:
    return ((imm20 & 0xFFFFF) << 12) | (rd << 7) | 0x37


def addi(rd: int, rs1: int, imm: int) -> int:
    return ((imm & 0xFFF) << 20) | (rs1 << 15) | (rd << 7) | 0x13


def lbu(rd: int, rs1: int, imm: int) -> int:
    return ((imm & 0xFFF) << 20) | (rs1 << 15) | (4 << 12) | (rd << 7) | 0x03


def sb(rs2: int, rs1: int, imm: int) -> int:
    return _store(rs2, rs1, imm, 0)


def sw(rs2: int, rs1: int, imm: int) -> int:
    return _store(rs2, rs1, imm, 2)


def _store(rs2: int, rs1: int, imm: int, f3: int) -> int:
    imm &= 0xFFF
    return ((imm >> 5) << 25) | (rs2 << 20) | (rs1 << 15) | (f3 << 12) | ((imm & 31) << 7) | 0x23


def andi(rd: int, rs1: int, imm: int) -> int:
    return ((imm & 0xFFF) << 20) | (rs1 << 15) | (7 << 12) | (rd << 7) | 0x13


def branch(f3: int, rs1: int, rs2: int, offset: int) -> int:
    """beq (f3=0) / bne (f3=1) to ``offset`` bytes from this instruction."""
    o = offset & 0x1FFF
    return (
        (((o >> 12) & 1) << 31)
        | (((o >> 5) & 0x3F) << 25)
        | (rs2 << 20)
        | (rs1 << 15)
        | (f3 << 12)
        | (((o >> 1) & 0xF) << 8)
        | (((o >> 11) & 1) << 7)
        | 0x63
    )


def jal(rd: int, offset: int) -> int:
    o = offset & 0x1FFFFF
    return (
        (((o >> 20) & 1) << 31)
        | (((o >> 1) & 0x3FF) << 21)
        | (((o >> 11) & 1) << 20)
        | (((o >> 12) & 0xFF) << 12)
        | (rd << 7)
        | 0x6F
    )


def program(*insns: int) -> bytes:
    return struct.pack(f"<{len(insns)}I", *insns)


T0, T1, T2 = 5, 6, 7


def finisher_guest(status: int) -> bytes:
    """A bare-metal ELF that writes ``status`` to the test finisher at once."""
    hi = (status + 0x800) >> 12
    lo = status - (hi << 12)
    code = program(lui(T0, 0x100), lui(T1, hi), addi(T1, T1, lo), sw(T1, T0, 0), jal(0, 0))
    return make_elf([(0x8000_0000, code, len(code))])


def spin_guest() -> bytes:
    """A bare-metal ELF that loops forever without touching any device."""
    code = program(jal(0, 0))
    return make_elf([(0x8000_0000, code, len(code))])


def echo_guest() -> bytes:
    """Echoes UART input back, polling LSR; a 'q' ends the run with a pass."""
    code = program(
        lui(T0, 0x10000),  # 0:  t0 = UART
        lbu(T1, T0, 5),  # 4:  poll: t1 = LSR
        andi(T1, T1, 1),  # 8:  data ready?
        branch(0, T1, 0, -8),  # 12: no: poll again
        lbu(T2, T0, 0),  # 16: t2 = RBR
        sb(T2, T0, 0),  # 20: THR = t2
        addi(T1, 0, ord("q")),  # 24
        branch(1, T2, T1, -24),  # 28: not 'q': poll again
        lui(T0, 0x100),  # 32: finisher
        lui(T1, 0x5),  # 36
        addi(T1, T1, 0x555),  # 40: t1 = 0x5555
        sw(T1, T0, 0),  # 44
        jal(0, 0),  # 48
    )
    return make_elf([(0x8000_0000, code, len(code))])
