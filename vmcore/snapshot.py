"""The snapshot file: a whole VM (config, device state, RAM) in one self-checking file.

Layout (all integers little-endian)::

    magic  b"FERRYSNP"            8 bytes
    format version                u32
    header length                 u32
    header                        msgpack map: ram_size, page_size, pages_stored,
                                  state_length, digest (BLAKE2b-256 of the body, hex)
    body = state                  msgpack map (config + every component's save() dict)
         + page numbers           u32 × pages_stored, strictly increasing
         + page contents          4096 × pages_stored

Zero pages are not stored: a restored VM starts from zeroed RAM, exactly as a migration
destination does. The digest covers the whole body and is checked before anything is
restored, so a corrupted, truncated or foreign file is rejected whole, never half-applied.
"""

from __future__ import annotations

import hashlib
import os
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import msgpack
import numpy as np

MAGIC = b"FERRYSNP"
FORMAT_VERSION = 1
PAGE_SIZE = 4096
_PREFIX = struct.Struct("<8sII")
# A header is a handful of small fields; anything bigger is not ours.
_MAX_HEADER = 64 * 1024


class SnapshotError(Exception):
    """A snapshot file that cannot be restored; the message says why, in one line."""


@dataclass(frozen=True)
class Snapshot:
    """A validated snapshot, read fully into memory."""

    state: dict[str, Any]
    ram_size: int
    page_numbers: np.ndarray
    page_data: memoryview

    def apply_ram(self, ram_view: memoryview) -> None:
        """Copy the stored pages into a zeroed RAM buffer of the snapshot's size."""
        if len(ram_view) != self.ram_size:
            raise SnapshotError(
                f"snapshot holds {self.ram_size} bytes of RAM, the VM has {len(ram_view)}"
            )
        dst = np.frombuffer(ram_view, dtype=np.uint8).reshape(-1, PAGE_SIZE)
        src = np.frombuffer(self.page_data, dtype=np.uint8).reshape(-1, PAGE_SIZE)
        dst[self.page_numbers] = src


def nonzero_pages(ram_view: memoryview, never_written: np.ndarray | None = None) -> np.ndarray:
    """Page numbers of every page holding a non-zero byte (numpy: ~9 GB/s, see bench).

    ``never_written`` (a boolean per page, e.g. ``GuestRAM.never_written()``) names pages
    known to be zero, which are then not read at all: reading a never-written page of
    shared memory would make the kernel allocate it, so a snapshot of a mostly idle VM
    would leave all of its RAM allocated.
    """
    words = np.frombuffer(ram_view, dtype=np.uint64).reshape(-1, PAGE_SIZE // 8)
    if never_written is None or len(never_written) != len(words):
        return np.flatnonzero(words.any(axis=1)).astype(np.uint32)
    written = np.flatnonzero(~never_written)
    return written[words[written].any(axis=1)].astype(np.uint32)


def write_snapshot(
    path: str | os.PathLike[str],
    state: dict[str, Any],
    ram_view: memoryview,
    never_written: np.ndarray | None = None,
) -> int:
    """Write a snapshot atomically (temp file + rename); returns the file size.

    ``never_written``: pages known to be zero without reading them (see nonzero_pages).
    """
    if len(ram_view) % PAGE_SIZE:
        raise ValueError("RAM size must be a whole number of pages")
    pages = nonzero_pages(ram_view, never_written)
    state_bytes = msgpack.packb(state, use_bin_type=True)
    numbers = pages.astype("<u4").tobytes()
    data = np.frombuffer(ram_view, dtype=np.uint8).reshape(-1, PAGE_SIZE)[pages].tobytes()
    digest = hashlib.blake2b(digest_size=32)
    for part in (state_bytes, numbers, data):
        digest.update(part)
    header = msgpack.packb(
        {
            "ram_size": len(ram_view),
            "page_size": PAGE_SIZE,
            "pages_stored": len(pages),
            "state_length": len(state_bytes),
            "digest": digest.hexdigest(),
        }
    )
    target = Path(path)
    tmp = target.with_name(target.name + ".tmp")
    with open(tmp, "wb") as f:
        f.write(_PREFIX.pack(MAGIC, FORMAT_VERSION, len(header)))
        f.write(header)
        f.write(state_bytes)
        f.write(numbers)
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, target)
    return target.stat().st_size


def read_snapshot(path: str | os.PathLike[str]) -> Snapshot:
    """Read and fully validate a snapshot; raises SnapshotError with a one-line reason."""
    try:
        blob = Path(path).read_bytes()
    except OSError as e:
        raise SnapshotError(f"cannot read snapshot {path}: {e.strerror}") from None
    if len(blob) < _PREFIX.size:
        raise SnapshotError(f"{path}: not a Ferry snapshot (file too short)")
    magic, version, header_len = _PREFIX.unpack_from(blob)
    if magic != MAGIC:
        raise SnapshotError(f"{path}: not a Ferry snapshot (bad magic)")
    if version != FORMAT_VERSION:
        raise SnapshotError(
            f"{path}: snapshot format {version} is not supported"
            f" (this Ferry reads {FORMAT_VERSION})"
        )
    if header_len > _MAX_HEADER or _PREFIX.size + header_len > len(blob):
        raise SnapshotError(f"{path}: truncated or corrupted snapshot header")
    try:
        header = msgpack.unpackb(blob[_PREFIX.size : _PREFIX.size + header_len])
        ram_size = int(header["ram_size"])
        page_size = int(header["page_size"])
        stored = int(header["pages_stored"])
        state_len = int(header["state_length"])
        want_digest = str(header["digest"])
    except (ValueError, KeyError, TypeError, msgpack.UnpackException):
        raise SnapshotError(f"{path}: corrupted snapshot header") from None
    if page_size != PAGE_SIZE or ram_size <= 0 or ram_size % PAGE_SIZE:
        raise SnapshotError(f"{path}: unsupported page size {page_size} or RAM size {ram_size}")
    if not 0 <= stored <= ram_size // PAGE_SIZE or state_len < 0:
        raise SnapshotError(f"{path}: corrupted snapshot header (impossible sizes)")
    body = memoryview(blob)[_PREFIX.size + header_len :]
    expected = state_len + stored * (4 + PAGE_SIZE)
    if len(body) != expected:
        raise SnapshotError(
            f"{path}: snapshot is truncated or has trailing data"
            f" ({len(body)} body bytes, expected {expected})"
        )
    if hashlib.blake2b(body, digest_size=32).hexdigest() != want_digest:
        raise SnapshotError(f"{path}: snapshot contents do not match their digest (corrupted)")
    try:
        state = msgpack.unpackb(body[:state_len], strict_map_key=False)
    except (ValueError, msgpack.UnpackException):
        raise SnapshotError(f"{path}: corrupted device state") from None
    if not isinstance(state, dict):
        raise SnapshotError(f"{path}: corrupted device state")
    numbers = np.frombuffer(body[state_len : state_len + 4 * stored], dtype="<u4")
    ordered = stored < 2 or bool((np.diff(numbers.astype(np.int64)) > 0).all())
    if stored and (int(numbers[-1]) >= ram_size // PAGE_SIZE or not ordered):
        raise SnapshotError(f"{path}: corrupted page table (page numbers out of order or range)")
    return Snapshot(state, ram_size, numbers.astype(np.int64), body[state_len + 4 * stored :])
