"""Guest RAM's backing file: a memfd by default, huge pages on request, and a migration that
moves a guest between the two kinds intact."""

from __future__ import annotations

import mmap

import numpy as np
import pytest
from inmemory import IdleDirtyLog, migrate_in_memory

from node.migration import MigrationOptions, MigrationReceiver, MigrationSender
from node.migration.digest import ram_digest
from node.migration.residency import MemfdRAM
from vmcore import ramfile
from vmcore.memory import GuestRAM

PAGE = 4096
HUGE = 2 << 20
SIZE = 16 << 20


def huge_pages_available() -> bool:
    try:
        ramfile.check_backing("huge")
    except ramfile.RAMBackingError:
        return False
    return True


needs_huge = pytest.mark.skipif(
    not huge_pages_available(), reason="huge-page tmpfs needs CAP_SYS_ADMIN"
)


def test_ram_is_a_memfd_unless_asked_otherwise(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(ramfile.ENVIRONMENT, raising=False)
    assert GuestRAM(SIZE).backing == "memfd"
    monkeypatch.setenv(ramfile.ENVIRONMENT, "auto")
    assert GuestRAM(SIZE).backing in ("memfd", "huge")
    # Smaller than one huge page: auto settles for a memfd.
    assert GuestRAM(64 * PAGE).backing == "memfd"


def test_without_the_right_to_mount_auto_settles_for_a_memfd_and_huge_says_why(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    def refused(size: int) -> int:
        raise PermissionError(1, "Operation not permitted")

    # What an unprivileged node meets: fsopen() is refused.
    monkeypatch.setattr(ramfile, "_huge_tmpfs_file", refused)
    monkeypatch.setenv(ramfile.ENVIRONMENT, "auto")
    assert GuestRAM(SIZE).backing == "memfd"
    monkeypatch.setenv(ramfile.ENVIRONMENT, "huge")
    with pytest.raises(ramfile.RAMBackingError, match=r"cannot have huge pages here: .*permitted"):
        GuestRAM(SIZE)
    with pytest.raises(ramfile.RAMBackingError, match="not permitted"):
        ramfile.check_backing("huge")


def test_a_backing_that_cannot_be_had_is_a_clear_error(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(ramfile.ENVIRONMENT, "hugepages")
    with pytest.raises(ramfile.RAMBackingError, match="FERRY_RAM_BACKING='hugepages'"):
        GuestRAM(SIZE)
    monkeypatch.setenv(ramfile.ENVIRONMENT, "huge")
    with pytest.raises(ramfile.RAMBackingError, match="less than one 2 MiB huge page"):
        GuestRAM(64 * PAGE)
    with pytest.raises(ramfile.RAMBackingError, match="expected one of"):
        ramfile.check_backing("lots")


@needs_huge
def test_huge_backed_ram_is_shared_sparse_and_reports_holes_in_huge_pages(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv(ramfile.ENVIRONMENT, "huge")
    ram = GuestRAM(SIZE)
    assert ram.backing == "huge"
    assert ram.never_written().all()  # type: ignore[union-attr]
    ram.pages(600, 1)[:] = b"\x05" * PAGE
    # Another process's view of the file (as the migration process maps it) sees the store.
    other = mmap.mmap(ram.fd, SIZE, flags=mmap.MAP_SHARED, prot=mmap.PROT_READ)
    assert other[600 * PAGE : 601 * PAGE] == b"\x05" * PAGE
    never = MemfdRAM(ram.fd, memoryview(other)).never_backed(0, SIZE // PAGE)
    assert never is not None
    # Page 600 lies in the second huge page: exactly that 2 MiB stretch is backed.
    per_huge = HUGE // PAGE
    assert np.flatnonzero(~never).tolist() == list(range(per_huge, 2 * per_huge))
    ram.clear()
    assert bytes(ram.pages(600, 1)) == bytes(PAGE)


@needs_huge
@pytest.mark.parametrize(
    "source_backing, destination_backing", [("huge", "memfd"), ("memfd", "huge")]
)
def test_a_guest_moves_intact_between_huge_and_small_pages(
    monkeypatch: pytest.MonkeyPatch, source_backing: str, destination_backing: str
) -> None:
    monkeypatch.setenv(ramfile.ENVIRONMENT, source_backing)
    source = GuestRAM(SIZE)
    monkeypatch.setenv(ramfile.ENVIRONMENT, destination_backing)
    destination = GuestRAM(SIZE)
    assert (source.backing, destination.backing) == (source_backing, destination_backing)
    rng = np.random.default_rng(7)
    grid = np.frombuffer(source.view, dtype=np.uint8).reshape(-1, PAGE)
    written = np.unique(rng.integers(0, len(grid), size=700))
    grid[written] = rng.integers(1, 256, size=(len(written), PAGE), dtype=np.uint8)
    sender = MigrationSender(
        source.view,
        IdleDirtyLog(),
        dict,
        token=b"t",
        config_hash="c",
        options=MigrationOptions(compression="none"),
        never_backed=MemfdRAM(source.fd, source.view).never_backed,
    )
    receiver = MigrationReceiver(
        destination.view,
        token=b"t",
        config_hash="c",
        restore=lambda state: None,
        write_run=MemfdRAM(destination.fd, destination.view).write_run,
    )
    migrate_in_memory(sender, receiver, through_wire=True)
    assert receiver.phase == "resumed", receiver.reason
    assert bytes(destination.view) == bytes(source.view)
    assert ram_digest(destination.view) == ram_digest(source.view) != 0
