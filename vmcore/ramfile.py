"""The file that holds guest RAM: a ``memfd``, or on request a tmpfs file of huge pages.

Guest RAM is a shared file mapping (``vmcore.memory``) so that the migration process can map
the same pages. A ``memfd`` lives on the kernel's internal tmpfs, which on a stock host
(``shmem_enabled`` = ``never``) backs every page with its own 4 KiB page: each is allocated,
charged and mapped on its own, so a migration's destination pays ~0.4 ms of kernel time per
MiB it lands even in memory the host has ready, and each 4 KiB the migration process reads
through its mapping is a fault of its own.

A tmpfs *mount* decides its page size by its own ``huge=`` option instead. With
``FERRY_RAM_BACKING=huge`` (or ``auto``) in a node's environment, RAM is created on a private
tmpfs mounted with ``huge=within_size``: 2 MiB pages, as QEMU backs guest RAM with
transparent huge pages. Landing a MiB in such a file costs ~0.08 ms when the memory is warm.
The mount is made with the new mount API and never attached anywhere (``fsopen`` →
``fsconfig`` → ``fsmount``; the file is created and unlinked through the detached mount's
descriptor), so nothing appears in the host's mount table and the file vanishes with its
last descriptor and mapping, exactly like a ``memfd``. Mounting takes ``CAP_SYS_ADMIN``;
``auto`` falls back to a ``memfd`` without it, ``huge`` fails with a clear error.

Why ``memfd`` is the default: on a virtual machine whose host takes back free memory (free
page reporting, as on the machines Ferry is developed on, where blocks of 2 MiB and more that
stay free ~2 s go back to the host), a fresh huge page is nearly always one the host must
back again, at ~2 ms per MiB, while 4 KiB pages come mostly from recently freed memory that
never left. There huge pages made migrations slower and their times erratic (1 GiB guest,
128 MiB written: 184–642 ms against 193–262 with a ``memfd``). On hardware of its own, or a
host that does not reclaim, ``huge`` is the faster choice. Its other price is granularity: a
guest that touches one byte of a 2 MiB stretch gets all of it allocated, and the file reports
holes (``SEEK_HOLE``) only in whole 2 MiB pages.
"""

from __future__ import annotations

import ctypes
import os
from typing import Literal

Backing = Literal["huge", "memfd"]
BACKINGS = ("memfd", "huge", "auto")

ENVIRONMENT = "FERRY_RAM_BACKING"
_FSOPEN_CLOEXEC = 0x1
_FSCONFIG_SET_STRING = 1
_FSCONFIG_CMD_CREATE = 6
_FSMOUNT_CLOEXEC = 0x1
_MOUNT_ATTR_NOSUID, _MOUNT_ATTR_NODEV, _MOUNT_ATTR_NOEXEC = 0x2, 0x4, 0x8
_HUGE_PAGE = 2 << 20


class RAMBackingError(OSError):
    """Guest RAM could not be backed as asked."""


def open_ram_file(size: int) -> tuple[int, Backing]:
    """A new, empty (sparse) file of ``size`` bytes for guest RAM, open read-write and
    close-on-exec, and which backing it has. The caller owns the descriptor."""
    choice = os.environ.get(ENVIRONMENT) or "memfd"
    if choice not in BACKINGS:
        raise RAMBackingError(f"{ENVIRONMENT}={choice!r}: expected one of {', '.join(BACKINGS)}")
    if choice != "memfd" and size >= _HUGE_PAGE:
        try:
            return _huge_tmpfs_file(size), "huge"
        except OSError as exc:
            if choice == "huge":
                raise RAMBackingError(f"guest RAM cannot have huge pages here: {exc}") from exc
    elif choice == "huge":
        raise RAMBackingError(f"{size} bytes of RAM is less than one 2 MiB huge page")
    fd = os.memfd_create("ferry-guest-ram", os.MFD_CLOEXEC)
    try:
        os.ftruncate(fd, size)
    except OSError:
        os.close(fd)
        raise
    return fd, "memfd"


def _checked(result: int) -> int:
    if result < 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))
    return result


def _huge_tmpfs_file(size: int) -> int:
    """A file of ``size`` bytes on a private, detached tmpfs with ``huge=within_size``."""
    libc = ctypes.CDLL(None, use_errno=True)
    fsopen = getattr(libc, "fsopen", None)
    if fsopen is None:
        raise OSError(38, "this C library has no fsopen (the new mount API)")
    fs_fd = _checked(fsopen(b"tmpfs", _FSOPEN_CLOEXEC))
    try:
        for key, value in (
            (b"huge", b"within_size"),
            # The mount holds this one file: its size is the RAM's, rounded up to whole pages.
            (b"size", str(-(-size // _HUGE_PAGE) * _HUGE_PAGE).encode()),
            (b"nr_inodes", b"4"),
            (b"mode", b"0700"),
        ):
            _checked(libc.fsconfig(fs_fd, _FSCONFIG_SET_STRING, key, value, 0))
        _checked(libc.fsconfig(fs_fd, _FSCONFIG_CMD_CREATE, None, None, 0))
        attributes = _MOUNT_ATTR_NOSUID | _MOUNT_ATTR_NODEV | _MOUNT_ATTR_NOEXEC
        mount_fd = _checked(libc.fsmount(fs_fd, _FSMOUNT_CLOEXEC, attributes))
    finally:
        os.close(fs_fd)
    try:
        fd = os.open(
            "guest-ram", os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600, dir_fd=mount_fd
        )
        os.unlink("guest-ram", dir_fd=mount_fd)
    finally:
        os.close(mount_fd)
    try:
        os.ftruncate(fd, size)
    except OSError:
        os.close(fd)
        raise
    return fd


def check_backing(choice: str) -> None:
    """Raise :class:`RAMBackingError` unless RAM can be backed as ``choice`` says here (a
    node checks at start-up rather than failing its first VM)."""
    if choice not in BACKINGS:
        raise RAMBackingError(f"expected one of {', '.join(BACKINGS)}, got {choice!r}")
    if choice == "huge":
        try:
            os.close(_huge_tmpfs_file(_HUGE_PAGE))
        except OSError as exc:
            raise RAMBackingError(f"guest RAM cannot have huge pages here: {exc}") from exc
