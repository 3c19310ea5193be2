"""A VM's console output: a ring buffer for followers, backed by a complete on-disk log.

Offsets are positions in everything the VM ever printed (across reboots, since the log
file is appended to, and across live migrations), so a client that reconnects with the
offset it reached sees no gap and no repeated byte. Recent output is served from memory;
older offsets from the log.

A VM that arrived by live migration brings only its recent output (see
:mod:`node.migration_endpoint`): its log file then starts at a non-zero absolute offset,
the *base*, recorded in ``console.base`` beside the log. Offsets before the base are no
longer kept; a read from one starts at the base.
"""

from __future__ import annotations

import os
from pathlib import Path

import trio

READ_CHUNK = 64 << 10


class ConsoleLog:
    """UART output of one VM. ``write`` is cheap (the guest calls it per byte); ``flush``
    makes the pending bytes visible to readers and durable in the log file."""

    def __init__(self, log_path: Path, ring_size: int) -> None:
        self._path = log_path
        self._fd = os.open(log_path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
        self._base = log_base(log_path)
        self._ring = bytearray()
        self._ring_size = max(ring_size, 1)
        self._ring_start = self._base + os.fstat(self._fd).st_size
        self._pending = bytearray()
        self._changed = trio.Event()
        self.closed = False

    @property
    def total(self) -> int:
        """Offset one past the last flushed byte."""
        return self._ring_start + len(self._ring)

    def write(self, data: bytes) -> None:
        self._pending += data

    def flush(self) -> None:
        if not self._pending:
            return
        data = bytes(self._pending)
        self._pending.clear()
        os.write(self._fd, data)
        self._ring += data
        excess = len(self._ring) - self._ring_size
        if excess > 0:
            del self._ring[:excess]
            self._ring_start += excess
        self._wake()

    def history(self, limit: int) -> tuple[int, bytes]:
        """The last ``limit`` bytes of output (or all of it): (absolute start, data)."""
        start = max(self.total - limit, self._base)
        data = bytearray()
        while start + len(data) < self.total:
            _, chunk = self.read(start + len(data), self.total - start - len(data))
            if not chunk:
                break
            data += chunk
        return start, bytes(data)

    def adopt(self, start: int, data: bytes) -> None:
        """Continue another console (a migrated VM's): ``data`` was its output from absolute
        offset ``start`` on, and the next byte printed here follows it."""
        self.flush()
        os.ftruncate(self._fd, 0)
        base_file = _base_file(self._path)
        if start:
            base_file.write_text(f"{start}\n")
        else:
            base_file.unlink(missing_ok=True)
        os.write(self._fd, data)
        self._base = start
        self._ring = bytearray(data[-self._ring_size :])
        self._ring_start = start + len(data) - len(self._ring)
        self._wake()

    def close(self) -> None:
        """No more output will come: followers get what is left and then the end."""
        self.flush()
        os.close(self._fd)
        self.closed = True
        self._wake()

    def _wake(self) -> None:
        self._changed.set()
        self._changed = trio.Event()

    def resolve(self, offset: int) -> int:
        """A request's offset as an absolute one (negative counts back from the end)."""
        if offset < 0:
            return max(self.total + offset, 0)
        return offset

    def read(self, offset: int, limit: int = READ_CHUNK) -> tuple[int, bytes]:
        """Up to ``limit`` bytes at ``offset`` (from memory or the log): (start, data)."""
        if offset >= self.total:
            return offset, b""
        if offset >= self._ring_start:
            start = offset - self._ring_start
            return offset, bytes(self._ring[start : start + limit])
        offset = max(offset, self._base)
        size = min(limit, self._ring_start - offset)
        return offset, read_log(self._path, offset - self._base, size)

    async def wait_read(self, offset: int, timeout: float) -> tuple[int, bytes, bool]:
        """Like ``read``, but waits up to ``timeout`` for output at ``offset``.

        Returns (start, data, ended): ``ended`` once the console is closed and everything
        up to its end has been read.
        """
        if offset >= self.total and not self.closed:
            with trio.move_on_after(timeout):
                await self._changed.wait()
        start, data = self.read(offset)
        return start, data, self.closed and start + len(data) >= self.total


def _base_file(log_path: Path) -> Path:
    return log_path.parent / "console.base"


def log_base(log_path: Path) -> int:
    """Absolute offset of the log file's first byte (non-zero after a migration)."""
    try:
        return int(_base_file(log_path).read_text())
    except (OSError, ValueError):
        return 0


def log_end(log_path: Path) -> int:
    """Absolute offset one past the log's last byte: the VM's console byte count."""
    try:
        size = log_path.stat().st_size
    except OSError:
        size = 0
    return log_base(log_path) + size


def read_console(log_path: Path, offset: int, limit: int = READ_CHUNK) -> tuple[int, bytes]:
    """Bytes of a console log at absolute ``offset``: (start, data); ``start`` is past
    ``offset`` when the bytes there are no longer kept."""
    base = log_base(log_path)
    offset = max(offset, base)
    return offset, read_log(log_path, offset - base, limit)


def read_log(path: Path, offset: int, limit: int = READ_CHUNK) -> bytes:
    """Bytes of a console log file at file position ``offset`` (b"" past its end or if it
    is missing)."""
    try:
        with open(path, "rb") as f:
            f.seek(offset)
            return f.read(limit)
    except OSError:
        return b""
