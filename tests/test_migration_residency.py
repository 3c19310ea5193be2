"""Round 0 skips guest RAM never written, without missing a page and without touching it;
the destination writes what arrives through the file, allocating only those pages."""

from __future__ import annotations

import mmap
import os

import numpy as np
from inmemory import IdleDirtyLog, migrate_in_memory

from node.migration import MigrationOptions, MigrationReceiver, MigrationSender
from node.migration.residency import MemfdRAM
from vmcore.memory import GuestRAM

PAGE = 4096
PAGES = 2048


# -- guest RAM as the VM has it: a shared memfd ------------------------------------------------


def allocated_pages(ram: GuestRAM) -> int:
    return os.fstat(ram.fd).st_blocks * 512 // PAGE


def test_a_memfd_reports_exactly_the_pages_never_written_to_any_mapping_of_it() -> None:
    ram = GuestRAM(PAGES * PAGE)
    ram.pages(3, 1)[:] = b"\x07" * PAGE
    ram.pages(10, 3)[:] = b"\x01" * (3 * PAGE)
    ram.pages(20, 1)[5] = 1
    ram.pages(20, 1)[5] = 0  # written, then zero again: backed, and zero
    ram.pages(PAGES - 1, 1)[-1] = 9
    # Another mapping of the file (as the migration process has, read-only) sees the same.
    other = mmap.mmap(ram.fd, PAGES * PAGE, flags=mmap.MAP_SHARED, prot=mmap.PROT_READ)
    residency = MemfdRAM(ram.fd, memoryview(other))
    never = residency.never_backed(0, PAGES)
    assert never is not None
    assert sorted(np.flatnonzero(~never)) == [3, 10, 11, 12, 20, PAGES - 1]
    assert ram.never_written().tolist() == never.tolist()  # type: ignore[union-attr]
    assert residency.never_backed(5, 13).tolist() == never[5:13].tolist()  # type: ignore[union-attr]
    assert residency.never_backed(100, 200).all()  # type: ignore[union-attr]


def test_round_0_over_a_memfd_sends_every_page_and_allocates_no_untouched_one() -> None:
    ram = GuestRAM(PAGES * PAGE)
    rng = np.random.default_rng(5)
    written = np.unique(rng.integers(0, PAGES, size=300))
    grid = np.frombuffer(ram.view, dtype=np.uint8).reshape(PAGES, PAGE)
    grid[written] = rng.integers(1, 256, size=(len(written), PAGE), dtype=np.uint8)
    before = allocated_pages(ram)
    reader = mmap.mmap(ram.fd, PAGES * PAGE, flags=mmap.MAP_SHARED, prot=mmap.PROT_READ)
    sender = MigrationSender(
        memoryview(reader),
        IdleDirtyLog(),
        dict,
        token=b"t",
        config_hash="c",
        options=MigrationOptions(compression="none"),
        never_backed=MemfdRAM(ram.fd, memoryview(reader)).never_backed,
    )
    dest = bytearray(PAGES * PAGE)
    receiver = MigrationReceiver(
        memoryview(dest), token=b"t", config_hash="c", restore=lambda state: None
    )
    migrate_in_memory(sender, receiver)
    assert sender.phase == "completed"
    # Reading a hole of a shared mapping would have allocated it: none was read.
    assert allocated_pages(ram) == before <= len(written) + 16
    assert bytes(dest) == bytes(ram.view)


def test_writing_runs_through_a_memfd_shows_in_its_mapping_and_allocates_only_them() -> None:
    ram = GuestRAM(PAGES * PAGE)
    residency = MemfdRAM(ram.fd, ram.view)
    data = np.random.default_rng(5).integers(0, 256, size=(40, PAGE), dtype=np.uint8)
    residency.write_run(100, data)
    never = residency.never_backed(0, PAGES)
    assert never is not None
    assert not never[100:140].any() and never[:100].all() and never[140:].all()
    grid = np.frombuffer(ram.view, dtype=np.uint8).reshape(PAGES, PAGE)
    assert (grid[100:140] == data).all()


def test_a_receiver_writing_through_the_memfd_applies_batches_exactly() -> None:
    ram = GuestRAM(PAGES * PAGE)
    source = bytearray(PAGES * PAGE)
    grid = np.frombuffer(source, dtype=np.uint8).reshape(PAGES, PAGE)
    grid[300:900] = np.random.default_rng(4).integers(0, 256, size=(600, PAGE), dtype=np.uint8)
    grid[1500] = 9
    # Every other page of a range: batches of many one-page runs.
    grid[1600:2000:2] = np.arange(200, dtype=np.uint8)[:, None] + 1
    sender = MigrationSender(memoryview(source), IdleDirtyLog(), dict, token=b"t", config_hash="c")
    receiver = MigrationReceiver(
        ram.view,
        token=b"t",
        config_hash="c",
        restore=lambda state: None,
        write_run=MemfdRAM(ram.fd, ram.view).write_run,
    )
    migrate_in_memory(sender, receiver)
    assert sender.phase == "completed"
    # Only what arrived was allocated: the pages sent, not the holes between them. (Checked
    # first: reading the holes below to compare contents allocates them.)
    assert allocated_pages(ram) <= 601 + 200 + 16
    assert bytes(ram.view) == bytes(source)
