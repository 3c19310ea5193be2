"""Round 0 skips RAM the host never backed, without missing a page and without touching it."""

from __future__ import annotations

import mmap
import os

import numpy as np
import pytest

from node.migration import (
    Action,
    Completed,
    MigrationOptions,
    MigrationReceiver,
    MigrationSender,
    SendMessage,
)
from node.migration.residency import AnonymousRAM, MemfdRAM
from vmcore.memory import GuestRAM

PAGE = 4096
PAGES = 2048


class NoDirt:
    def enable(self) -> None: ...

    def disable(self) -> None: ...

    def fetch_and_reset(self) -> np.ndarray:
        return np.zeros(0, dtype=np.int64)


def migrate_in_memory(sender: MigrationSender, receiver: MigrationReceiver) -> list[Action]:
    """Run a migration to its end, messages passed by hand; the sender's other actions."""
    inbox = [a.message for a in sender.start() if isinstance(a, SendMessage)]
    ending: list[Action] = []
    while not sender.finished:
        replies = []
        for message in inbox:
            replies += [a.message for a in receiver.receive(message) if isinstance(a, SendMessage)]
        inbox = []
        for reply in replies:
            for action in sender.receive(reply):
                if isinstance(action, SendMessage):
                    inbox.append(action.message)
                else:
                    ending.append(action)
        while actions := sender.poll():
            inbox += [a.message for a in actions if isinstance(a, SendMessage)]
    return ending


def anonymous_ram() -> tuple[mmap.mmap, np.ndarray]:
    ram = mmap.mmap(-1, PAGES * PAGE, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    return ram, np.frombuffer(ram, dtype=np.uint8).reshape(PAGES, PAGE)


def residency_or_skip(ram: mmap.mmap) -> AnonymousRAM:
    residency = AnonymousRAM(memoryview(ram))
    if residency.never_backed(0, 1) is None:
        pytest.skip("this host does not expose /proc/self/pagemap")
    return residency


def test_only_pages_never_written_are_reported_never_backed() -> None:
    ram, pages = anonymous_ram()
    residency = residency_or_skip(ram)
    pages[[3, 10, 11, 12]] = 7
    pages[20] = 1
    pages[20] = 0  # written, then zero again: backed, and zero
    never = residency.never_backed(0, PAGES)
    assert never is not None
    assert not never[[3, 10, 11, 12, 20]].any()
    # Untouched pages are reported (allow for the kernel backing a neighbour early).
    assert never.sum() >= PAGES - 64
    assert residency.never_backed(5, 13) is not None
    assert residency.never_backed(5, 13).tolist() == never[5:13].tolist()  # type: ignore[union-attr]


def test_round_0_with_the_hint_sends_every_page_and_touches_no_untouched_one() -> None:
    ram, pages = anonymous_ram()
    residency = residency_or_skip(ram)
    rng = np.random.default_rng(3)
    written = np.unique(rng.integers(0, PAGES, size=300))
    pages[written] = rng.integers(1, 256, size=(len(written), PAGE), dtype=np.uint8)
    before = residency.never_backed(0, PAGES)
    sender = MigrationSender(
        memoryview(ram),
        NoDirt(),
        dict,
        token=b"t",
        config_hash="c",
        options=MigrationOptions(compression="none"),
        never_backed=residency.never_backed,
    )
    dest = bytearray(PAGES * PAGE)
    receiver = MigrationReceiver(
        memoryview(dest), token=b"t", config_hash="c", restore=lambda state: None
    )
    assert isinstance(migrate_in_memory(sender, receiver)[-1], Completed)
    # The scan read no page the guest never wrote: RAM stays as sparse as it was.
    after = residency.never_backed(0, PAGES)
    assert before is not None and after is not None
    assert after.sum() == before.sum() and before.sum() > PAGES // 2
    assert bytes(dest) == bytes(ram)


def test_backing_a_run_of_pages_keeps_them_zero_and_backs_only_them() -> None:
    ram, pages = anonymous_ram()
    residency = residency_or_skip(ram)
    residency.back(np.arange(100, 140))
    residency.back(np.array([500, 501, 700]))
    never = residency.never_backed(0, PAGES)
    assert never is not None
    assert not never[100:140].any() and not never[[500, 501, 700]].any()
    assert never[:100].all() and never[140:500].all()
    assert not pages[100:140].any()


def test_a_receiver_that_backs_pages_first_applies_them_exactly() -> None:
    ram, _ = anonymous_ram()
    residency = residency_or_skip(ram)
    source = bytearray(PAGES * PAGE)
    grid = np.frombuffer(source, dtype=np.uint8).reshape(PAGES, PAGE)
    grid[300:900] = np.random.default_rng(4).integers(0, 256, size=(600, PAGE), dtype=np.uint8)
    grid[1500] = 9
    sender = MigrationSender(memoryview(source), NoDirt(), dict, token=b"t", config_hash="c")
    receiver = MigrationReceiver(
        memoryview(ram),
        token=b"t",
        config_hash="c",
        restore=lambda state: None,
        before_write=residency.back,
    )
    migrate_in_memory(sender, receiver)
    assert sender.phase == "completed"
    assert bytes(ram) == bytes(source)


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
        NoDirt(),
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


def test_backing_pages_of_a_memfd_keeps_them_zero_and_allocates_only_them() -> None:
    ram = GuestRAM(PAGES * PAGE)
    residency = MemfdRAM(ram.fd, ram.view)
    residency.back(np.arange(100, 140))
    never = residency.never_backed(0, PAGES)
    assert never is not None
    if never[100:140].all():
        pytest.skip("this kernel cannot populate a mapping ahead of writes (before 5.14)")
    assert not never[100:140].any() and never[:100].all() and never[140:].all()
    assert not np.frombuffer(ram.view, dtype=np.uint8)[100 * PAGE : 140 * PAGE].any()
