"""The snapshot file format rejects anything it did not write, before restoring a byte."""

from __future__ import annotations

from pathlib import Path

import pytest

from vmcore.snapshot import PAGE_SIZE, SnapshotError, read_snapshot, write_snapshot

RAM_PAGES = 64


def make_ram() -> bytearray:
    ram = bytearray(RAM_PAGES * PAGE_SIZE)
    ram[0:5] = b"hello"
    ram[7 * PAGE_SIZE + 100] = 0x42
    ram[-1] = 0xFF
    return ram


def test_round_trip_stores_only_nonzero_pages(tmp_path: Path) -> None:
    ram = make_ram()
    path = tmp_path / "vm.snap"
    state = {"version": 1, "hart": {"pc": 0x80000000, "x": list(range(32))}}
    size = write_snapshot(path, state, memoryview(ram))
    assert size < 4 * PAGE_SIZE + 1024  # three non-zero pages, not 64
    snap = read_snapshot(path)
    assert snap.state == state
    assert list(snap.page_numbers) == [0, 7, RAM_PAGES - 1]
    restored = bytearray(len(ram))
    snap.apply_ram(memoryview(restored))
    assert restored == ram


def test_wrong_ram_size_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "vm.snap"
    write_snapshot(path, {}, memoryview(make_ram()))
    with pytest.raises(SnapshotError, match="RAM"):
        read_snapshot(path).apply_ram(memoryview(bytearray(PAGE_SIZE)))


@pytest.mark.parametrize(
    ("mangle", "message"),
    [
        (lambda b: b[:5], "too short"),
        (lambda b: b"NOTASNAP" + b[8:], "bad magic"),
        (lambda b: b[:8] + b"\x09\x00\x00\x00" + b[12:], "format 9"),
        (lambda b: b[:-100], "truncated"),
        (lambda b: b + b"extra", "trailing"),
        (lambda b: b[:-10] + bytes([b[-10] ^ 1]) + b[-9:], "digest"),
    ],
)
def test_damaged_files_are_rejected_whole(tmp_path: Path, mangle: object, message: str) -> None:
    path = tmp_path / "vm.snap"
    write_snapshot(path, {"version": 1}, memoryview(make_ram()))
    assert callable(mangle)
    path.write_bytes(mangle(path.read_bytes()))
    with pytest.raises(SnapshotError, match=message):
        read_snapshot(path)


def test_missing_file_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(SnapshotError, match="cannot read"):
        read_snapshot(tmp_path / "nope.snap")
