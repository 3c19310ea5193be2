"""Guest RAM and its dirty log.

RAM is one ``mmap`` of whole 4 KiB pages so that a migration sender can hand out page
batches as memoryviews without copying, and numpy can scan it for zero pages at memory
bandwidth. The mapping is of a ``memfd`` (an anonymous tmpfs file; or one of huge pages,
see ``vmcore.ramfile``) shared, not private anonymous memory, so that another process can
map the very same pages from the file descriptor: a live migration's source side runs in a
helper process of its own, off the vCPU's interpreter (``node.migration_process``). The
file starts sparse; a page costs memory once it is touched, and the file says which pages
never were (``SEEK_DATA``). Unlike private anonymous memory, *reading* an untouched page
through the mapping backs it too, so whole-RAM scans should skip the holes the file reports.

The dirty log follows KVM's contract. The hart keeps a software write-TLB that is its store
fast path; while logging is on, a page is "write-protected" simply by being absent from that
TLB. The first store to such a page therefore takes the hart's slow path, which calls
:meth:`DirtyLog.mark` and only then lets the page into the fast path. ``fetch_and_reset``
clears the bitmap and tells every listener (the hart) to drop its write-TLB, which
re-protects all pages at once. Because the vCPU runs in the same thread as the caller, no
store can land between the copy of the bitmap and the re-protection, so no store is lost.
"""

from __future__ import annotations

import errno
import mmap
import os
import time
import weakref
from collections import deque
from collections.abc import Callable

import numpy as np

from vmcore.ramfile import open_ram_file

PAGE_SHIFT = 12
PAGE_SIZE = 1 << PAGE_SHIFT


def file_holes(fd: int, first: int, last: int, page_size: int = PAGE_SIZE) -> np.ndarray | None:
    """Boolean per page in [first, last) of the file ``fd``: True where the file has a hole
    (the page was never written, so it reads as zero). None when the file system will not
    say. Asking costs two ``lseek`` calls per run of data and touches no page."""
    if last <= first:
        return None
    hole = np.ones(last - first, dtype=bool)
    offset, end = first * page_size, last * page_size
    try:
        while offset < end:
            data = os.lseek(fd, offset, os.SEEK_DATA)
            if data >= end:
                break
            data_end = min(os.lseek(fd, data, os.SEEK_HOLE), end)
            # A partly written page is data (tmpfs keeps whole pages anyway).
            hole[data // page_size - first : -(-data_end // page_size) - first] = False
            offset = data_end
    except OSError as e:
        if e.errno == errno.ENXIO:  # no data from offset to the end of the file
            return hole
        return None
    return hole


class DirtyLog:
    """Which RAM pages were written since the last fetch, while logging is enabled.

    The bitmap is a ``bytearray`` (one byte per page) because the hart's slow path sets a
    single entry from Python, where ``bytearray`` item assignment is several times cheaper
    than numpy scalar indexing; numpy sees the same bytes through a zero-copy view for the
    bulk operations.
    """

    def __init__(self, page_count: int) -> None:
        self.page_count = page_count
        self.enabled = False
        self.bitmap = bytearray(page_count)
        self._np = np.frombuffer(self.bitmap, dtype=np.uint8)
        # Called whenever pages become write-protected again, so fast paths that cached
        # write permission forget it.
        self.protect_listeners: list[Callable[[], None]] = []
        # Cumulative count of clean->dirty transitions, sampled for dirty_rate().
        self.marks = 0
        self._samples: deque[tuple[float, int]] = deque(maxlen=4096)

    def enable(self) -> None:
        """Start logging: every page counts as clean and is write-protected."""
        self._np[:] = 0
        self.enabled = True
        self._samples.clear()
        self._sample()
        self._reprotect()

    def disable(self) -> None:
        """Stop logging; stores no longer need to take the slow path."""
        self.enabled = False
        self._np[:] = 0

    def mark(self, page: int) -> None:
        """Record a write to ``page`` (a page number relative to the start of RAM)."""
        if self.enabled and not self.bitmap[page]:
            self.bitmap[page] = 1
            self.marks += 1

    def mark_range(self, first: int, last: int) -> None:
        """Record writes to pages ``first..last`` inclusive (device/DMA writes)."""
        if self.enabled:
            seg = self._np[first : last + 1]
            self.marks += int(seg.size - np.count_nonzero(seg))
            seg[:] = 1

    def fetch_and_reset(self) -> np.ndarray:
        """Return the sorted page numbers written since the previous fetch, and re-protect them.

        Returns an empty array when logging is disabled.
        """
        if not self.enabled:
            return np.zeros(0, dtype=np.int64)
        pages = np.flatnonzero(self._np)
        self._np[pages] = 0
        self._reprotect()
        self._sample()
        return pages

    def peek(self) -> np.ndarray:
        """The pages currently marked dirty, without resetting anything."""
        return np.flatnonzero(self._np)

    def dirty_rate(self, window_s: float = 1.0) -> float:
        """Pages newly dirtied per second over (about) the last ``window_s`` seconds.

        Like QEMU's calc-dirty-rate this counts each page once per fetch interval: a page
        rewritten many times between two fetches costs migration only one resend. Samples
        are taken at every fetch and at every call to this method.
        """
        now = self._sample()
        t_now, m_now = now
        oldest = now
        for t, m in self._samples:
            if t_now - t <= window_s:
                oldest = (t, m)
                break
        dt = t_now - oldest[0]
        if dt <= 0:
            return 0.0
        return (m_now - oldest[1]) / dt

    def _sample(self) -> tuple[float, int]:
        s = (time.monotonic(), self.marks)
        self._samples.append(s)
        return s

    def _reprotect(self) -> None:
        for cb in self.protect_listeners:
            cb()


class GuestRAM:
    """The guest's physical RAM: ``size`` bytes starting at guest physical address ``base``."""

    def __init__(self, size: int, base: int = 0x8000_0000) -> None:
        if size <= 0 or size % PAGE_SIZE:
            raise ValueError(f"RAM size must be a positive multiple of 4 KiB, got {size}")
        self.base = base
        self.size = size
        self.end = base + size
        self.page_count = size >> PAGE_SHIFT
        # Neither a memfd nor a shared mapping of it is checked against the host's memory
        # up front, so a size the host could never back would only fail once touched.
        # Ask the question private anonymous memory is asked (the kernel's overcommit
        # check, which touches nothing): ENOMEM here is a clear "cannot allocate".
        mmap.mmap(-1, size, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS).close()
        # The file descriptor another process maps to see this RAM (CLOEXEC: only a child
        # it is explicitly passed to gets it). The mapping outlives the descriptor.
        # Huge pages where the host allows them (see vmcore.ramfile for why and how).
        self.fd, self.backing = open_ram_file(size)
        self._fd_closer = weakref.finalize(self, os.close, self.fd)
        try:
            self.buf = mmap.mmap(self.fd, size, flags=mmap.MAP_SHARED)
        except OSError:
            self.close()
            raise
        self.view = memoryview(self.buf)
        self.dirty_log = DirtyLog(self.page_count)
        # Called with (first_page, last_page) after a non-CPU write, so the hart can drop
        # instructions it decoded from those pages.
        self.write_listeners: list[Callable[[int, int], None]] = []

    def close(self) -> None:
        """Close the file descriptor (idempotent). The RAM itself stays mapped and usable;
        only sharing it with a process that has not mapped it yet is no longer possible."""
        self._fd_closer()

    def never_written(self, first: int = 0, last: int | None = None) -> np.ndarray | None:
        """Boolean per page in [first, last): True where the page was never written, so it
        is zero and need not be read (reading it through the mapping would allocate it).
        None when the host will not say."""
        return file_holes(self.fd, first, self.page_count if last is None else last)

    def contains(self, paddr: int, n: int = 1) -> bool:
        return self.base <= paddr and paddr + n <= self.end

    def pages(self, first: int, count: int) -> memoryview:
        """``count`` pages starting at page number ``first``, as a view (no copy)."""
        if first < 0 or count < 0 or first + count > self.page_count:
            raise ValueError(f"pages {first}+{count} outside RAM of {self.page_count} pages")
        return self.view[first << PAGE_SHIFT : (first + count) << PAGE_SHIFT]

    def read(self, paddr: int, n: int) -> bytes:
        """Copy ``n`` bytes at guest physical address ``paddr`` (for loaders and devices)."""
        if not self.contains(paddr, n) or n < 0:
            raise ValueError(f"read of {n} bytes at {paddr:#x} is outside RAM")
        off = paddr - self.base
        return bytes(self.view[off : off + n])

    def write(self, paddr: int, data: bytes | bytearray | memoryview) -> None:
        """Store ``data`` at ``paddr`` as a device or loader would: marks the pages dirty."""
        n = len(data)
        if not self.contains(paddr, n):
            raise ValueError(f"write of {n} bytes at {paddr:#x} is outside RAM")
        if n == 0:
            return
        off = paddr - self.base
        self.view[off : off + n] = data
        first, last = off >> PAGE_SHIFT, (off + n - 1) >> PAGE_SHIFT
        self.dirty_log.mark_range(first, last)
        for cb in self.write_listeners:
            cb(first, last)

    def zero_page_mask(self, first: int, count: int) -> np.ndarray:
        """Boolean array: True where the page ``first + i`` is all zeros."""
        words = np.frombuffer(self.pages(first, count), dtype=np.uint64)
        return np.asarray(~words.reshape(count, PAGE_SIZE // 8).any(axis=1), dtype=bool)

    def clear(self) -> None:
        """Zero all of RAM (e.g. before receiving a migrated VM)."""
        try:
            # Hand the pages back to the kernel: they read as zero and cost nothing again.
            self.buf.madvise(mmap.MADV_REMOVE)
        except OSError:
            np.frombuffer(self.buf, dtype=np.uint64)[:] = 0
        self.dirty_log.mark_range(0, self.page_count - 1)
        for cb in self.write_listeners:
            cb(0, self.page_count - 1)
