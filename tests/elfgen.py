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
) -> bytes:
    """An ELF64 executable whose PT_LOAD segments are ``(paddr, file_bytes, memsz)``."""
    ehsize, phentsize = 64, 56
    phoff = ehsize
    data_off = phoff + phentsize * len(segments)
    phdrs = b""
    payload = b""
    for paddr, data, memsz in segments:
        offset = data_off + len(payload)
        phdrs += struct.pack(
            "<IIQQQQQQ", 1, 7, offset, paddr, paddr, len(data), memsz, 0x1000
        )
        payload += data
    if entry is None:
        entry = segments[0][0] if segments else 0
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
