"""The boot ROM at 0x1000: the reset vector that hands a0/a1/a2 to the first stage.

Like QEMU ``virt``'s mask ROM, it sets ``a0`` = hartid (read from ``mhartid``, so the same
code serves every hart), ``a1`` = the devicetree's physical address, ``a2`` = the address of
an OpenSBI ``fw_dynamic_info`` block (so ``fw_dynamic`` firmware learns where the kernel is
and in which mode to enter it; ``fw_jump`` and bare kernels ignore ``a2``), then jumps to
the entry point in M-mode. The entry, the DTB address and the info block are data after
the code, so the ROM is rebuilt, not patched, when they change.

The six instructions are encoded here from the base ISA's formats rather than stored as
opaque hex, so a reader can check each one against the specification.
"""

from __future__ import annotations

import struct
from typing import Any

from vmcore.devices.state import check_version

BOOTROM_BASE = 0x1000
BOOTROM_SIZE = 0xF000  # as QEMU virt's mrom: 0x1000..0x10000

_T0, _A0, _A1, _A2 = 5, 10, 11, 12
_CSR_MHARTID = 0xF14
_FW_DYNAMIC_MAGIC = 0x4942534F  # "OSBI"
_FW_DYNAMIC_VERSION = 2  # the version with a preferred boot hart
_NEXT_MODE_S = 1
_STATE_VERSION = 1


def _i_type(imm: int, rs1: int, funct3: int, rd: int, opcode: int) -> int:
    return ((imm & 0xFFF) << 20) | (rs1 << 15) | (funct3 << 12) | (rd << 7) | opcode


def _u_type(imm20: int, rd: int, opcode: int) -> int:
    return ((imm20 & 0xFFFFF) << 12) | (rd << 7) | opcode


def reset_vector(entry: int, dtb_addr: int, next_addr: int = 0) -> bytes:
    """The ROM image: code that loads a0/a1/a2 and jumps to ``entry``, then its data.

    ``next_addr`` is the stage after the firmware (the kernel), entered in S-mode.
    """
    data_offset = 24  # six 4-byte instructions precede the data words
    info_offset = data_offset + 16  # fw_dynamic_info follows entry and DTB address
    code = [
        _u_type(0, _T0, 0x17),  # auipc t0, 0           ; t0 = address of the ROM
        _i_type(_CSR_MHARTID, 0, 2, _A0, 0x73),  # csrrs a0, mhartid, x0
        _i_type(data_offset + 8, _T0, 3, _A1, 0x03),  # ld a1, 32(t0)   ; DTB address
        _i_type(info_offset, _T0, 0, _A2, 0x13),  # addi a2, t0, 40   ; fw_dynamic info
        _i_type(data_offset, _T0, 3, _T0, 0x03),  # ld t0, 24(t0)        ; entry point
        _i_type(0, _T0, 0, 0, 0x67),  # jalr x0, 0(t0)
    ]
    info = struct.pack(
        "<6Q", _FW_DYNAMIC_MAGIC, _FW_DYNAMIC_VERSION, next_addr, _NEXT_MODE_S, 0, 0
    )
    return struct.pack("<6I", *code) + struct.pack("<QQ", entry, dtb_addr) + info


class BootRom:
    """Read-only memory holding the reset vector; stores are ignored, as in QEMU."""

    def __init__(self, entry: int = 0, dtb_addr: int = 0, next_addr: int = 0) -> None:
        self.entry = entry
        self.dtb_addr = dtb_addr
        self.next_addr = next_addr
        self.image = reset_vector(entry, dtb_addr, next_addr)

    def read(self, offset: int, size: int) -> int:
        chunk = self.image[offset : offset + size]
        return int.from_bytes(chunk.ljust(size, b"\0"), "little")

    def write(self, offset: int, size: int, value: int) -> None:
        return None

    def save(self) -> dict[str, Any]:
        return {
            "version": _STATE_VERSION,
            "entry": self.entry,
            "dtb_addr": self.dtb_addr,
            "next_addr": self.next_addr,
        }

    def restore(self, state: dict[str, Any]) -> None:
        check_version(state, "bootrom", _STATE_VERSION)
        self.entry = int(state["entry"])
        self.dtb_addr = int(state["dtb_addr"])
        self.next_addr = int(state.get("next_addr", 0))
        self.image = reset_vector(self.entry, self.dtb_addr, self.next_addr)
