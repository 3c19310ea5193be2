"""Loader: what lands where in RAM, and one-line errors for every bad image."""

from __future__ import annotations

from pathlib import Path

import pytest
from elfgen import EM_X86_64, make_elf

from vmcore.loader import LoaderError, check_placement, load_into, parse_image
from vmcore.memory import GuestRAM

BASE = 0x8000_0000
SIZE = 1 << 20


def write(tmp_path: Path, name: str, data: bytes) -> str:
    path = tmp_path / name
    path.write_bytes(data)
    return str(path)


def test_elf_segments_load_at_their_addresses_with_zeroed_bss(tmp_path: Path) -> None:
    elf = make_elf(
        [(BASE + 0x1000, b"\x13\x00\x00\x00", 0x20), (BASE + 0x3000, b"DATA", 4)],
        entry=BASE + 0x1000,
    )
    image = parse_image(write(tmp_path, "k.elf", elf), BASE)
    assert image.is_elf and image.entry == BASE + 0x1000
    ram = GuestRAM(SIZE, BASE)
    ram.write(BASE + 0x1004, b"\xff" * 8)  # stale bytes where bss goes
    check_placement([image], BASE, SIZE)
    load_into(ram, image)
    assert ram.read(BASE + 0x1000, 0x20) == b"\x13\x00\x00\x00" + bytes(0x1C)
    assert ram.read(BASE + 0x3000, 4) == b"DATA"


def test_raw_binary_loads_at_given_address(tmp_path: Path) -> None:
    image = parse_image(write(tmp_path, "Image", b"\x01\x02\x03"), BASE + 0x20_0000)
    assert not image.is_elf
    assert image.entry == BASE + 0x20_0000
    assert image.segments[0].data == b"\x01\x02\x03"


@pytest.mark.parametrize(
    ("data", "message"),
    [
        (make_elf([(BASE, b"x", 1)], machine=EM_X86_64), "ELF for X86_64, not RISC-V"),
        (make_elf([(BASE, b"x", 1)], elf_class=1), "32-bit ELF"),
        (make_elf([(BASE, b"x", 1)], endian=2), "big-endian"),
        (make_elf([(BASE, b"abcdefgh" * 8, 64)])[:-10], "truncated"),
        (make_elf([(BASE, b"x", 1)])[:40], "truncated ELF header"),
        (make_elf([]), "no loadable segments"),
        (b"", "empty"),
    ],
)
def test_bad_images_are_one_line_errors(tmp_path: Path, data: bytes, message: str) -> None:
    with pytest.raises(LoaderError, match=message) as info:
        parse_image(write(tmp_path, "bad.elf", data), BASE)
    assert "\n" not in str(info.value)


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(LoaderError, match="no such file"):
        parse_image(str(tmp_path / "nope.elf"), BASE)


def test_segment_outside_ram_rejected(tmp_path: Path) -> None:
    image = parse_image(write(tmp_path, "k.elf", make_elf([(BASE + SIZE - 2, b"abcd", 4)])), BASE)
    with pytest.raises(LoaderError, match="outside RAM"):
        check_placement([image], BASE, SIZE)
    low = parse_image(write(tmp_path, "l.elf", make_elf([(0x1000, b"abcd", 4)])), BASE)
    with pytest.raises(LoaderError, match="outside RAM"):
        check_placement([low], BASE, SIZE)


def test_overlapping_segments_rejected(tmp_path: Path) -> None:
    elf = make_elf([(BASE, b"a" * 16, 0x100), (BASE + 0x80, b"b", 1)])
    image = parse_image(write(tmp_path, "k.elf", elf), BASE)
    with pytest.raises(LoaderError, match="overlaps"):
        check_placement([image], BASE, SIZE)


def test_overlap_between_firmware_and_kernel_rejected(tmp_path: Path) -> None:
    fw = parse_image(write(tmp_path, "fw.bin", b"f" * 0x3000), BASE, "firmware")
    kernel = parse_image(write(tmp_path, "k.bin", b"k"), BASE + 0x2000)
    with pytest.raises(LoaderError, match="overlaps"):
        check_placement([fw, kernel], BASE, SIZE)


def test_virtually_linked_kernel_enters_at_the_physical_address(tmp_path: Path) -> None:
    elf = make_elf(
        [(BASE + 0x20_0000, b"\x13\x00\x00\x00", 4)], virtual_offset=0xFFFF_FFFF_0000_0000
    )
    image = parse_image(write(tmp_path, "vmlinux", elf), BASE)
    assert image.entry == BASE + 0x20_0000
    assert image.segments[0].addr == BASE + 0x20_0000
