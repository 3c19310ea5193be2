"""Which pages of guest RAM the host kernel has never backed, so round 0 need not read them.

Round 0 looks at every page to find the non-zero ones. Reading a page of an anonymous
mapping that was never written makes the kernel map its shared zero page, one fault per
page: scanning 1 GiB of mostly untouched RAM costs ~0.3 s on this class of machine, far more
than sending a small working set. Linux says, without faulting anything, which pages of a
mapping are present in memory or swapped out (``/proc/self/pagemap``, 8 bytes per page);
in a *private anonymous* mapping a page that is neither has never been written since it was
mapped or discarded, and reads as zero. So the scan reads only the others.

The destination has the opposite problem: every page of round 0 lands in RAM the kernel has
not backed yet, and writing it faults once per 4 KiB page. :meth:`AnonymousRAM.back` asks
for a whole run of pages at once (``MADV_POPULATE_WRITE``, Linux 5.14+), which costs about
half as much per page as faulting them one at a time.

The pagemap answer holds only for private anonymous memory; in a shared or file-backed
mapping a page that is not present in this process may still hold data. ``vmcore``'s
``GuestRAM`` is a shared ``memfd`` (so that a helper process can map it), and for that the
file itself answers: ``lseek(SEEK_DATA / SEEK_HOLE)`` on the memfd walks its holes, the
pages never written, from any process that holds the descriptor and without faulting
anything (:class:`MemfdRAM`). It matters even more there, because reading a hole of a
shared tmpfs mapping does not map the zero page: it allocates a page. Hence it is the
driver, which knows how its RAM was allocated, that hands ``never_backed`` to the sender.
Anywhere the kernel will not say (not Linux, a restricted /proc, a host page size other
than the guest's), the sender scans every page.
"""

from __future__ import annotations

import ctypes
import mmap
import os
import sys

import numpy as np

from vmcore.memory import file_holes

_PRESENT = np.uint64(1 << 63)
_SWAPPED = np.uint64(1 << 62)
_ENTRY = 8
_MADV_POPULATE_WRITE = 23
# More runs than this in one batch and faulting page by page is as cheap as the calls.
_MAX_RUNS = 16


def _madvise() -> ctypes._CFuncPtr | None:  # type: ignore[name-defined]
    if not sys.platform.startswith("linux"):
        return None
    try:
        # ctypes releases the interpreter lock for the call: other threads run meanwhile.
        libc = ctypes.CDLL(None, use_errno=True)
        madvise = libc.madvise
    except (OSError, AttributeError):
        return None
    madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
    madvise.restype = ctypes.c_int
    return madvise


def _address_of(ram: memoryview, page_size: int) -> int:
    """The page-aligned address of ``ram``'s first byte, or 0 when it cannot be used."""
    if page_size != mmap.PAGESIZE or not len(ram):
        return 0
    address = int(np.frombuffer(ram, dtype=np.uint8).ctypes.data)
    return 0 if address % page_size else address


class _Backing:
    """``back()``: have the kernel back a batch's pages in a few calls."""

    def __init__(self, address: int, page_size: int) -> None:
        self._address = address
        self._page_size = page_size
        self._madvise = _madvise() if address else None

    def back(self, pages: np.ndarray) -> None:
        """Have the kernel back ``pages`` (about to be written) in a few calls, not one
        fault per page. Does nothing where that is not supported; never fails."""
        madvise = self._madvise
        if madvise is None or not len(pages):
            return
        pages = np.asarray(pages, dtype=np.int64)
        breaks = np.flatnonzero(np.diff(pages) != 1) + 1
        if len(breaks) >= _MAX_RUNS:
            return
        size = self._page_size
        for run in np.split(pages, breaks):
            if madvise(self._address + int(run[0]) * size, len(run) * size, _MADV_POPULATE_WRITE):
                # EINVAL before Linux 5.14: fall back to faulting, for good.
                self._madvise = None
                return


class MemfdRAM(_Backing):
    """Residency queries for RAM that is a memfd (``GuestRAM``), mapped at ``ram``.

    ``ram`` may be any process's mapping of the file, read-only included; ``back()``
    needs a writable one. The descriptor stays the caller's to close.
    """

    def __init__(self, fd: int, ram: memoryview, page_size: int = 4096) -> None:
        super().__init__(_address_of(ram, page_size), page_size)
        self._fd = fd
        self._page_count = len(ram) // page_size

    def never_backed(self, first: int, last: int) -> np.ndarray | None:
        """Boolean per page in [first, last): True where the file has a hole (the page was
        never written, so it is zero). None when the file system will not say."""
        return file_holes(self._fd, first, min(last, self._page_count), self._page_size)


class AnonymousRAM(_Backing):
    """Residency queries for one private anonymous mapping (the caller vouches for that)."""

    def __init__(self, ram: memoryview, page_size: int = 4096) -> None:
        super().__init__(_address_of(ram, page_size), page_size)
        self._first_entry = 0
        self._fd: int | None = None
        address = self._address
        if not address:
            return
        try:
            self._fd = os.open("/proc/self/pagemap", os.O_RDONLY)
        except OSError:
            return
        self._first_entry = address // page_size

    def close(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None

    def __del__(self) -> None:
        self.close()

    def never_backed(self, first: int, last: int) -> np.ndarray | None:
        """Boolean per page in [first, last): True where the page was never backed (so it
        is zero). None when the kernel will not say; then every page must be read."""
        if self._fd is None or last <= first:
            return None
        size = (last - first) * _ENTRY
        try:
            raw = os.pread(self._fd, size, (self._first_entry + first) * _ENTRY)
        except OSError:
            return None
        if len(raw) != size:
            return None
        entries = np.frombuffer(raw, dtype=np.uint64)
        backed: np.ndarray = (entries & (_PRESENT | _SWAPPED)) != 0
        return ~backed
