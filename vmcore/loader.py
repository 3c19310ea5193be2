"""Loading firmware and kernels into guest RAM: ELF files by their program headers, raw
binaries (a Linux ``Image``, a flat firmware) at a fixed address.

Everything a user can get wrong here (a missing file, an x86 ELF, a file cut short, a
segment that lands outside RAM or on top of another) becomes a ``LoaderError`` whose
message is one line fit to print after ``ferry-vm: error:``. The checks run before a
single byte is written, so a rejected image never leaves RAM half-loaded.
"""

from __future__ import annotations

import io
import os
from dataclasses import dataclass, field
from typing import Protocol

from elftools.common.exceptions import ELFError
from elftools.elf.elffile import ELFFile

ELF_MAGIC = b"\x7fELF"


class LoaderError(Exception):
    """An image that cannot be loaded; the message is one line meant for the user."""


class WritableRAM(Protocol):
    base: int
    size: int

    def write(self, paddr: int, data: bytes) -> None: ...


@dataclass(frozen=True)
class Segment:
    """``data`` goes at ``addr``; the ``memsz - len(data)`` bytes after it are zero (bss)."""

    addr: int
    data: bytes
    memsz: int

    @property
    def end(self) -> int:
        return self.addr + self.memsz


@dataclass
class Image:
    """A parsed image: where it runs from and what it puts where."""

    path: str
    entry: int
    segments: list[Segment] = field(default_factory=list)
    is_elf: bool = False

    @property
    def low(self) -> int:
        return min(s.addr for s in self.segments)

    @property
    def high(self) -> int:
        return max(s.end for s in self.segments)


def _read_file(path: str, what: str) -> bytes:
    try:
        with open(path, "rb") as f:
            return f.read()
    except FileNotFoundError:
        raise LoaderError(f"{what} {path}: no such file") from None
    except IsADirectoryError:
        raise LoaderError(f"{what} {path}: is a directory") from None
    except OSError as e:
        raise LoaderError(f"{what} {path}: {e.strerror or e}") from None


def parse_image(path: str, raw_addr: int, what: str = "kernel") -> Image:
    """Parse ``path`` as an ELF (by its magic) or else as a raw binary placed at ``raw_addr``."""
    data = _read_file(path, what)
    if not data:
        raise LoaderError(f"{what} {path}: file is empty")
    if data[:4] == ELF_MAGIC:
        return _parse_elf(path, data, what)
    return Image(path, raw_addr, [Segment(raw_addr, data, len(data))], is_elf=False)


def _parse_elf(path: str, data: bytes, what: str) -> Image:
    name = f"{what} {os.path.basename(path)}"
    if len(data) < 64:
        raise LoaderError(f"{name}: truncated ELF header ({len(data)} bytes)")
    if data[4] != 2:
        raise LoaderError(f"{name}: 32-bit ELF; Ferry runs RV64 (ELFCLASS64) images")
    if data[5] != 1:
        raise LoaderError(f"{name}: big-endian ELF; RISC-V images are little-endian")
    try:
        elf = ELFFile(io.BytesIO(data))
        machine = elf["e_machine"]
        if machine != "EM_RISCV":
            arch = str(machine).removeprefix("EM_")
            raise LoaderError(f"{name}: ELF for {arch}, not RISC-V")
        segments: list[Segment] = []
        entry = elf["e_entry"]
        physical_entry = None
        for index in range(elf.num_segments()):
            header = elf.get_segment(index).header
            if header["p_type"] != "PT_LOAD" or header["p_memsz"] == 0:
                continue
            offset, filesz, memsz = header["p_offset"], header["p_filesz"], header["p_memsz"]
            if filesz > memsz:
                raise LoaderError(f"{name}: segment {index} has more file bytes than memory")
            if offset + filesz > len(data):
                raise LoaderError(
                    f"{name}: truncated (segment {index} needs bytes up to {offset + filesz}, "
                    f"file has {len(data)})"
                )
            segments.append(Segment(header["p_paddr"], data[offset : offset + filesz], memsz))
            vaddr = header["p_vaddr"]
            if physical_entry is None and vaddr <= entry < vaddr + memsz:
                # A kernel linked to run at a virtual address (vmlinux) names its entry
                # virtually; the hart starts with paging off, at the physical copy.
                physical_entry = header["p_paddr"] + (entry - vaddr)
        if physical_entry is not None:
            entry = physical_entry
    except ELFError as e:
        raise LoaderError(f"{name}: malformed ELF ({e})") from None
    except (ValueError, OverflowError) as e:  # pyelftools' struct errors on a short file
        raise LoaderError(f"{name}: truncated or malformed ELF ({e})") from None
    if not segments:
        raise LoaderError(f"{name}: ELF has no loadable segments")
    return Image(path, entry, segments, is_elf=True)


def check_placement(images: list[Image], ram_base: int, ram_size: int) -> None:
    """Reject segments outside RAM or overlapping each other, across all ``images``."""
    ram_end = ram_base + ram_size
    placed: list[tuple[Segment, str]] = []
    for image in images:
        name = os.path.basename(image.path)
        for seg in image.segments:
            if seg.addr < ram_base or seg.end > ram_end:
                raise LoaderError(
                    f"{name}: segment {seg.addr:#x}-{seg.end:#x} lies outside RAM "
                    f"{ram_base:#x}-{ram_end:#x} (try a larger -m?)"
                )
            for other, other_name in placed:
                if seg.addr < other.end and other.addr < seg.end:
                    raise LoaderError(
                        f"{name}: segment {seg.addr:#x}-{seg.end:#x} overlaps "
                        f"{other_name}'s {other.addr:#x}-{other.end:#x}"
                    )
            placed.append((seg, name))


def load_into(ram: WritableRAM, image: Image) -> None:
    """Copy ``image``'s segments into RAM, zeroing the bss tails (RAM may be reused)."""
    for seg in image.segments:
        if seg.data:
            ram.write(seg.addr, seg.data)
        tail = seg.memsz - len(seg.data)
        if tail:
            ram.write(seg.addr + len(seg.data), bytes(tail))
