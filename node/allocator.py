"""Keeping freed megabyte buffers in the process while a migration streams.

A migration stream allocates a ~1 MiB ``bytes`` for every page batch, on both ends, and
frees it a moment later. glibc returns freed memory at the top of a heap to the kernel
once more than ``M_TRIM_THRESHOLD`` of it has gathered (a few MiB after its dynamic
tuning), so the next batch's buffer is new memory again and every one of its 256 pages
is faulted in: measured here, ~150-200 page faults per MiB received, a third of a bare
gRPC receiver's CPU (1.00 against 0.65 ms per MiB held) and ~10% of Ferry's.
:func:`hold_freed_buffers` raises the trim threshold for the migration (and fixes the mmap
threshold above a batch's size, since setting one turns glibc's dynamic tuning of both
off); :func:`release_freed_buffers` puts a bounded threshold back and returns what
gathered.

Where the C library is not glibc, both do nothing.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging

log = logging.getLogger(__name__)

_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3
# Kept while streaming: a window of batches in flight, twice over.
_HELD_TRIM = 64 << 20
# Above any batch (protocol batches are ~1 MiB; compressed ones are smaller).
_MMAP_THRESHOLD = 32 << 20
# glibc's default trim threshold, before its dynamic tuning raises it.
_DEFAULT_TRIM = 128 << 10


def _libc() -> ctypes.CDLL | None:
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        libc.mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
        libc.malloc_trim.argtypes = [ctypes.c_size_t]
    except (OSError, AttributeError):
        return None
    return libc


_LIBC = _libc()


def hold_freed_buffers() -> None:
    """Keep freed memory (up to 64 MiB) for reuse instead of returning it at once."""
    if _LIBC is None:
        return
    # mallopt answers 1 on success; a C library that refuses simply keeps its behaviour.
    if not (
        _LIBC.mallopt(_M_MMAP_THRESHOLD, _MMAP_THRESHOLD)
        and _LIBC.mallopt(_M_TRIM_THRESHOLD, _HELD_TRIM)
    ):
        log.debug("mallopt refused: freed buffers are returned as before")


def release_freed_buffers() -> None:
    """Return freed memory as glibc's default does, and give back what gathered."""
    if _LIBC is None:
        return
    _LIBC.mallopt(_M_TRIM_THRESHOLD, _DEFAULT_TRIM)
    _LIBC.malloc_trim(0)
