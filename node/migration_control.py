"""The control channel between a VMM worker and its migration process.

A live migration's source side runs in a helper process (:mod:`node.migration_process`)
that maps the guest's RAM, but a few things only the worker can do: pause, resume or
throttle the vCPU, save the device state, and enable, disable or fetch the dirty log, which
must happen between two guest slices so that no store is lost. The helper asks for those
over a ``socketpair(AF_UNIX, SOCK_SEQPACKET)`` it inherits; it also pushes the migration's
statistics and its outcome, and the worker sends it the migration to run and cancels.

A message is a msgpack map with an ``op``. SEQPACKET keeps message boundaries and reports
the peer's death as end-of-file, but a packet must fit the socket's send buffer, so a
message travels as one or more packets of at most :data:`CHUNK` bytes: one flag byte (1 on
the last packet of a message, 0 before it) and a slice of the msgpack bytes. Neither side
trusts the other's bytes more than it must: :func:`decode` checks the map, the ``op`` and
the size, and each ``field`` accessor checks one field's type, so a malformed message is a
clear :class:`ControlError`, never a stray exception deep in a handler.
"""

from __future__ import annotations

import socket
import threading
from typing import Any, TypeVar

import msgpack
import trio

CHUNK = 64 * 1024
"""Payload bytes per packet: well inside the default Unix socket send buffer."""

MAX_MESSAGE = 128 << 20
"""The largest message either side accepts: a device state with its console history (the
receiver caps that at 64 MiB) and a dirty set of a large VM fit with room to spare."""

_LAST = b"\x01"
_MORE = b"\x00"

T = TypeVar("T")


class ControlError(Exception):
    """A control message that is not what the protocol allows; the message says why."""


def pair() -> tuple[socket.socket, socket.socket]:
    """A connected (worker end, helper end) pair; the helper end is inheritable."""
    worker_end, helper_end = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    helper_end.set_inheritable(True)
    return worker_end, helper_end


def encode(op: str, **fields: Any) -> list[bytes]:
    """The packets that carry one message."""
    data = msgpack.packb({"op": op, **fields}, use_bin_type=True)
    view = memoryview(data)
    packets = [_MORE + view[i : i + CHUNK] for i in range(0, len(view), CHUNK)]
    packets[-1] = _LAST + packets[-1][1:]
    return packets


def decode(data: bytes) -> dict[str, Any]:
    """A whole message's bytes as a map with a string ``op``; ControlError otherwise."""
    try:
        message = msgpack.unpackb(data, raw=False)
    except Exception as e:
        raise ControlError(f"control message does not decode: {type(e).__name__}") from None
    if not isinstance(message, dict) or not isinstance(message.get("op"), str):
        raise ControlError("control message is not a map with an op")
    return message


def field(message: dict[str, Any], name: str, kind: type[T]) -> T:
    """``message[name]``, which must be a ``kind`` (an int is accepted as a float)."""
    value = message.get(name)
    if kind is float and isinstance(value, int) and not isinstance(value, bool):
        value = float(value)
    if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
        op = message.get("op")
        raise ControlError(f"control message {op!r}: {name} is not a {kind.__name__}")
    return value


_PARTIAL: dict[str, Any] = {}
"""What :meth:`_Assembler.add` returns while a message still misses packets."""


class _Assembler:
    """Joins packets into messages, enforcing :data:`MAX_MESSAGE`."""

    def __init__(self) -> None:
        self._parts: list[bytes] = []
        self._size = 0

    def add(self, packet: bytes) -> dict[str, Any] | None:
        """The message this packet completes, :data:`_PARTIAL`, or None at end-of-file
        (an empty read: every packet sent here carries at least its flag byte)."""
        if not packet:
            return None
        self._size += len(packet) - 1
        if self._size > MAX_MESSAGE:
            raise ControlError(f"control message larger than {MAX_MESSAGE} bytes")
        self._parts.append(packet[1:])
        if packet[:1] != _LAST:
            return _PARTIAL
        data = b"".join(self._parts)
        self._parts, self._size = [], 0
        return decode(data)


class BlockingChannel:
    """One end of the channel for plain threads (the helper process).

    Sends may come from several threads (a lock keeps a message's packets together);
    receiving belongs to one thread.
    """

    def __init__(self, sock: socket.socket) -> None:
        self._sock = sock
        self._assembler = _Assembler()
        self._send_lock = threading.Lock()

    def send(self, op: str, **fields: Any) -> None:
        """Send one message; OSError when the peer is gone."""
        with self._send_lock:
            for packet in encode(op, **fields):
                self._sock.sendall(packet)

    def receive(self) -> dict[str, Any] | None:
        """The next message, or None at end-of-file (the peer closed or died)."""
        message: dict[str, Any] | None = _PARTIAL
        while message is _PARTIAL:
            try:
                message = self._assembler.add(self._sock.recv(CHUNK + 1))
            except (ConnectionResetError, BrokenPipeError):
                return None
        return message

    def close(self) -> None:
        self._sock.close()


class AsyncChannel:
    """One end of the channel in a trio loop (the worker)."""

    def __init__(self, sock: socket.socket) -> None:
        self._sock = trio.socket.from_stdlib_socket(sock)
        self._assembler = _Assembler()
        self._send_lock = trio.Lock()

    async def send(self, op: str, **fields: Any) -> None:
        """Send one message; OSError when the peer is gone."""
        async with self._send_lock:
            for packet in encode(op, **fields):
                await self._sock.send(packet)

    async def receive(self) -> dict[str, Any] | None:
        """The next message, or None at end-of-file (the peer closed or died)."""
        message: dict[str, Any] | None = _PARTIAL
        while message is _PARTIAL:
            try:
                message = self._assembler.add(await self._sock.recv(CHUNK + 1))
            except (ConnectionResetError, BrokenPipeError):
                return None
        return message

    def close(self) -> None:
        self._sock.close()

