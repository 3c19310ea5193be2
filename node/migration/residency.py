"""Which pages of guest RAM were never written, so round 0 need not read them; and writing
the pages a destination receives into the file rather than through its mapping.

Round 0 looks at every page to find the non-zero ones. Guest RAM is a shared ``memfd``
(``vmcore.memory.GuestRAM``, shared so that the migration process can map it), and reading a
page of a shared tmpfs mapping that was never written does not map the zero page: it
allocates one. Scanning 1 GiB of mostly untouched RAM would cost far more than sending a
small working set, and leave all of it allocated. The file itself says which pages hold
data: ``lseek(SEEK_DATA / SEEK_HOLE)`` walks its holes, the pages never written, from any
process that holds the descriptor and without faulting anything (:class:`MemfdRAM`). It is
the driver, which knows how its RAM was allocated, that hands ``never_backed`` to the
sender; anywhere the file system will not say, the sender scans every page.

The destination has the opposite problem: every page of round 0 lands in RAM never written
before. Stored through the mapping, each 4 KiB page costs a fault that allocates it and
maps it (~0.6 ms per MiB here, as much as a third of what receiving the MiB over gRPC
costs). ``pwrite`` into the file allocates the pages without mapping them (~0.35 ms per
MiB), and the copy runs with the interpreter lock released, beside the thread that reads
the stream. The guest maps each page later, on its first touch, a cheap minor fault spread
over its run. :meth:`MemfdRAM.write_run` is that write.
"""

from __future__ import annotations

import os

import numpy as np

from vmcore.memory import file_holes


class MemfdRAM:
    """Residency queries for, and writes into, RAM that is a memfd (``GuestRAM``) mapped at
    ``ram``.

    ``ram`` may be any process's mapping of the file, read-only included (only its size is
    used); ``write_run()`` needs the descriptor open for writing. The descriptor stays the
    caller's to close.
    """

    def __init__(self, fd: int, ram: memoryview, page_size: int = 4096) -> None:
        self._fd = fd
        self._page_size = page_size
        self._page_count = len(ram) // page_size

    def never_backed(self, first: int, last: int) -> np.ndarray | None:
        """Boolean per page in [first, last): True where the file has a hole (the page was
        never written, so it is zero). None when the file system will not say."""
        return file_holes(self._fd, first, min(last, self._page_count), self._page_size)

    def write_run(self, first: int, data: np.ndarray) -> None:
        """Write ``data`` (rows of whole pages) to the pages from ``first`` on, through the
        file: see the module docstring. The caller has checked the pages are in range."""
        view = np.ascontiguousarray(data).reshape(-1).data
        offset = first * self._page_size
        while len(view):
            written = os.pwrite(self._fd, view, offset)
            view, offset = view[written:], offset + written
