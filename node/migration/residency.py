"""Which pages of guest RAM were never written, so round 0 need not read them; and backing
the pages a destination is about to write, in a few calls.

Round 0 looks at every page to find the non-zero ones. Guest RAM is a shared ``memfd``
(``vmcore.memory.GuestRAM``, shared so that the migration process can map it), and reading a
page of a shared tmpfs mapping that was never written does not map the zero page: it
allocates one. Scanning 1 GiB of mostly untouched RAM would cost far more than sending a
small working set, and leave all of it allocated. The file itself says which pages hold
data: ``lseek(SEEK_DATA / SEEK_HOLE)`` walks its holes, the pages never written, from any
process that holds the descriptor and without faulting anything (:class:`MemfdRAM`). It is
the driver, which knows how its RAM was allocated, that hands ``never_backed`` to the
sender; anywhere the file system will not say, the sender scans every page.

The destination has the opposite problem: every page of round 0 lands in RAM the kernel has
not backed yet, and writing it faults once per 4 KiB page. :meth:`MemfdRAM.back` asks for a
whole run of pages at once (``MADV_POPULATE_WRITE``, Linux 5.14+), which costs about half as
much per page as faulting them one at a time.
"""

from __future__ import annotations

import ctypes
import mmap
import sys

import numpy as np

from vmcore.memory import file_holes

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
