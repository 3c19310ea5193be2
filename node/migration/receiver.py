"""The destination side of a live migration: check, apply, verify, resume.

:class:`MigrationReceiver` is a pure state machine like the sender: it takes the source's
messages and returns actions (:mod:`node.migration.actions`)::

    AWAIT_HELLO ─Hello ok─► RECEIVING ─DeviceState─► HAVE_STATE ─Complete ok─► RESUMED
         │ Hello not ok          │ any invalid input, Abort, lost connection, idle timeout
         ▼                       ▼
      REFUSED                 FAILED / ABORTED   (the incoming VM is discarded)

The stream is untrusted until the Hello proves it holds the one-time token, and every
message after that is still validated as if hostile: the Hello is checked (token in constant
time, then protocol version, page size, RAM size, config hash) before any RAM moves; batches
must arrive in sequence and pass :func:`node.migration.encoding.decode_batch` before a byte
is written; device state is size-capped and must decode to a map; the memory digest must
match before the VM is restored. Any violation is answered with one ``Error`` carrying a
one-line reason, and the VM is discarded. No input makes :meth:`receive` raise.

``restore`` is the driver's callback that loads the device state into the new VM and starts
its vCPU; ``Resumed`` is sent only after it returns, so the source never lets go of a VM
that is not running here.
"""

from __future__ import annotations

import hmac
import time
from collections.abc import Callable
from enum import StrEnum
from typing import Any

import msgpack
import numpy as np

from node.migration.actions import Action, DiscardVM, GuestRunning, SendMessage
from node.migration.digest import MemoryDigest
from node.migration.encoding import PAGE_SIZE, BatchError, decode_batch
from node.migration.messages import (
    PROTOCOL_VERSION,
    Abort,
    Ack,
    Complete,
    DeviceState,
    Error,
    Hello,
    Pages,
    Refusal,
    RefusalReason,
    Resumed,
)

# Every component's save() dict together is a few KiB; 64 MiB is far beyond any honest VM.
MAX_DEVICE_STATE = 64 << 20
DEFAULT_WINDOW = 4


class ReceiverPhase(StrEnum):
    AWAIT_HELLO = "await-hello"
    RECEIVING = "receiving"
    HAVE_STATE = "have-state"
    RESUMED = "resumed"
    REFUSED = "refused"
    ABORTED = "aborted"
    FAILED = "failed"


_TERMINAL = {
    ReceiverPhase.RESUMED,
    ReceiverPhase.REFUSED,
    ReceiverPhase.ABORTED,
    ReceiverPhase.FAILED,
}


class _Invalid(Exception):
    """Input that ends the migration with an Error; the message is the reason."""


class MigrationReceiver:
    """One incoming migration into a zeroed RAM buffer. See the module docstring."""

    def __init__(
        self,
        ram: memoryview,
        *,
        token: bytes,
        config_hash: str,
        restore: Callable[[dict[str, Any]], None],
        window: int = DEFAULT_WINDOW,
        idle_timeout_s: float = 60.0,
        clock: Callable[[], float] = time.monotonic,
        page_size: int = PAGE_SIZE,
        write_run: Callable[[int, np.ndarray], None] | None = None,
    ) -> None:
        """``write_run(first, data)``, if given, writes validated pages in place of a store
        into ``ram``: ``data`` (rows of whole pages) to the pages from ``first`` on. An
        incoming worker passes :meth:`node.migration.residency.MemfdRAM.write_run`, which
        writes through guest RAM's file instead of faulting each page into the mapping."""
        if len(ram) == 0 or len(ram) % page_size:
            raise ValueError(f"RAM of {len(ram)} bytes is not a whole number of pages")
        if window < 1:
            raise ValueError("window must be at least 1 batch")
        if not token:
            # An empty expected token would admit a Hello that carries none.
            raise ValueError("an incoming migration needs a non-empty token")
        self._ram_size = len(ram)
        self._page_size = page_size
        self._page_count = len(ram) // page_size
        self._pages = np.frombuffer(ram, dtype=np.uint8).reshape(self._page_count, page_size)
        self._token = bytes(token)
        self._config_hash = config_hash
        self._restore = restore
        self._write_run = write_run
        self._window = window
        self._idle_timeout_s = idle_timeout_s
        self._clock = clock
        self.digest = MemoryDigest(self._page_count)
        self.phase = ReceiverPhase.AWAIT_HELLO
        self.reason = ""
        self._expected_seq = 1
        # Batches are acknowledged a few at a time (see _on_pages).
        self._ack_every = max(1, window // 4)
        self._unacked = 0
        self._round = 0
        self._state: dict[str, Any] | None = None
        self._last_input = clock()
        self.batches = 0
        self.pages_received = 0
        self.bytes_received = 0

    @property
    def finished(self) -> bool:
        return self.phase in _TERMINAL

    def receive(self, message: object) -> list[Action]:
        """Handle one message from the source. Never raises."""
        self._last_input = self._clock()
        if self.phase is ReceiverPhase.RESUMED:
            # The guest runs here; a late Abort (the source cancelled too late) changes
            # nothing, and the source learns the outcome from our Resumed.
            return []
        if self.finished:
            return []
        try:
            return self._dispatch(message)
        except _Invalid as exc:
            return self._fail(str(exc))
        except Exception as exc:
            # Hostile field types (a string where a number belongs, ...) end up here.
            return self._fail(f"invalid {type(message).__name__}: {type(exc).__name__}: {exc}")

    def tick(self, now: float | None = None) -> list[Action]:
        """Give up on a source that went silent before the guest resumed here."""
        if now is None:
            now = self._clock()
        if not self.finished and now - self._last_input >= self._idle_timeout_s:
            return self._fail(f"source silent for {self._idle_timeout_s:g} s")
        return []

    def connection_lost(self, detail: str = "") -> list[Action]:
        """The stream broke. Before the guest resumed here, the source still owns it."""
        if self.finished:
            return []
        self.phase = ReceiverPhase.FAILED
        self.reason = "connection to the source lost" + (f": {detail}" if detail else "")
        return [DiscardVM(self.reason)]

    # ------------------------------------------------------------------------ phases

    def _dispatch(self, message: object) -> list[Action]:
        if isinstance(message, Abort):
            self.phase = ReceiverPhase.ABORTED
            self.reason = f"aborted by the source: {message.reason}"
            return [SendMessage(Error(self.reason)), DiscardVM(self.reason)]
        if self.phase is ReceiverPhase.AWAIT_HELLO:
            if not isinstance(message, Hello):
                raise _Invalid(f"expected Hello, got {type(message).__name__}")
            return self._on_hello(message)
        if isinstance(message, Hello):
            raise _Invalid("second Hello on one migration stream")
        if isinstance(message, Pages):
            if self.phase is not ReceiverPhase.RECEIVING:
                raise _Invalid("Pages after the device state")
            return self._on_pages(message)
        if isinstance(message, DeviceState):
            if self.phase is not ReceiverPhase.RECEIVING:
                raise _Invalid("second DeviceState")
            return self._on_device_state(message)
        if isinstance(message, Complete):
            if self.phase is not ReceiverPhase.HAVE_STATE:
                raise _Invalid("Complete before the device state")
            return self._on_complete(message)
        raise _Invalid(f"unexpected {type(message).__name__} from the source")

    def _on_hello(self, hello: Hello) -> list[Action]:
        # The token first, so an unauthorised peer learns nothing about this VM.
        token = hello.token if isinstance(hello.token, bytes) else b""
        if not hmac.compare_digest(token, self._token):
            return self._refuse(RefusalReason.BAD_TOKEN, "the migration token is not valid")
        if hello.protocol_version != PROTOCOL_VERSION:
            return self._refuse(
                RefusalReason.PROTOCOL_VERSION,
                f"source speaks migration protocol {hello.protocol_version}, "
                f"this node {PROTOCOL_VERSION}",
            )
        if hello.page_size != self._page_size:
            return self._refuse(
                RefusalReason.PAGE_SIZE,
                f"source pages are {hello.page_size} bytes, here {self._page_size}",
            )
        if hello.ram_size != self._ram_size:
            return self._refuse(
                RefusalReason.RAM_SIZE,
                f"source VM has {hello.ram_size} bytes of RAM, the prepared VM {self._ram_size}",
            )
        if hello.config_hash != self._config_hash:
            return self._refuse(
                RefusalReason.CONFIG,
                f"source VM config {str(hello.config_hash)[:16]} differs from the prepared "
                f"VM's {self._config_hash[:16]}",
            )
        self.phase = ReceiverPhase.RECEIVING
        return [SendMessage(Ack(acked_seq=0, credit=self._window))]

    def _on_pages(self, batch: Pages) -> list[Action]:
        if batch.seq != self._expected_seq:
            raise _Invalid(f"batch {batch.seq} arrived, expected batch {self._expected_seq}")

        if not isinstance(batch.round, int) or batch.round < self._round:
            raise _Invalid(f"batch of round {batch.round} after round {self._round}")
        try:
            decoded = decode_batch(batch, self._page_count, self._page_size)
        except BatchError as exc:
            raise _Invalid(f"batch {batch.seq}: {exc}") from None
        if decoded.run_start >= 0:
            self._write(decoded.run_start, decoded.data)
        elif len(decoded.pages):
            pages = decoded.pages
            if self._write_run is None:
                self._pages[pages] = decoded.data
            else:
                # Sorted or not, a batch is a few runs of consecutive pages: one write each.
                breaks = np.flatnonzero(np.diff(pages.astype(np.int64)) != 1) + 1
                starts = np.concatenate(([0], breaks))
                ends = np.concatenate((breaks, [len(pages)]))
                for start, end in zip(starts.tolist(), ends.tolist(), strict=True):
                    self._write_run(int(pages[start]), decoded.data[start:end])
        if len(decoded.zero_pages):
            self._pages[decoded.zero_pages] = 0
            self.digest.update_zero(decoded.zero_pages)
        self.digest.update(decoded.pages, decoded.data)
        self._round = batch.round
        self._expected_seq += 1
        self.batches += 1
        self.pages_received += len(decoded.pages) + len(decoded.zero_pages)
        self.bytes_received += len(batch.payload)
        # One Ack per batch costs both ends a message and a few thread wake-ups per MiB;
        # one per quarter window keeps the source's pipe full all the same. A batch that
        # lists no page is the source asking for an answer now (it waits for the end of
        # a round), so it is acknowledged at once, with everything before it.
        self._unacked += 1
        if self._unacked < self._ack_every and (len(decoded.pages) or len(decoded.zero_pages)):
            return []
        credit, self._unacked = self._unacked, 0
        return [SendMessage(Ack(acked_seq=batch.seq, credit=credit))]

    def _write(self, first: int, data: np.ndarray) -> None:
        if self._write_run is not None:
            self._write_run(first, data)
        else:
            # A slice is one memcpy; fancy indexing is not.
            self._pages[first : first + len(data)] = data

    def stats(self) -> dict[str, Any]:
        """What the destination has taken in so far."""
        return {
            "status": self.phase.value,
            "batches": self.batches,
            "pages": self.pages_received,
            "payload-bytes": self.bytes_received,
            "reason": self.reason,
        }

    def _on_device_state(self, message: DeviceState) -> list[Action]:
        blob = message.state
        if not isinstance(blob, bytes | bytearray | memoryview):
            raise _Invalid("device state is not bytes")
        if len(blob) > MAX_DEVICE_STATE:
            raise _Invalid(
                f"device state of {len(blob)} bytes exceeds the {MAX_DEVICE_STATE} byte limit"
            )
        try:
            state = msgpack.unpackb(blob, raw=False, strict_map_key=False)
        except Exception as exc:
            raise _Invalid(f"device state is not valid msgpack: {exc}") from None
        if not isinstance(state, dict):
            raise _Invalid("device state is not a map")
        self._state = state
        self.phase = ReceiverPhase.HAVE_STATE
        return []

    def _on_complete(self, message: Complete) -> list[Action]:
        ours = self.digest.value
        if not isinstance(message.digest, int) or isinstance(message.digest, bool):
            raise _Invalid("memory digest is not an integer")
        if message.digest != ours:
            raise _Invalid(
                f"memory digest mismatch: source {message.digest:#018x}, destination {ours:#018x}"
            )
        assert self._state is not None
        try:
            self._restore(self._state)
        except Exception as exc:
            raise _Invalid(f"restoring the VM failed: {exc}") from None
        self.phase = ReceiverPhase.RESUMED
        return [SendMessage(Resumed(resumed_at=self._clock())), GuestRunning()]

    # ----------------------------------------------------------------------- endings

    def _refuse(self, reason: RefusalReason, detail: str) -> list[Action]:
        self.phase = ReceiverPhase.REFUSED
        self.reason = f"refused ({reason}): {detail}"
        return [SendMessage(Refusal(reason=reason, detail=detail)), DiscardVM(self.reason)]

    def _fail(self, reason: str) -> list[Action]:
        self.phase = ReceiverPhase.FAILED
        self.reason = reason
        return [SendMessage(Error(reason)), DiscardVM(reason)]
