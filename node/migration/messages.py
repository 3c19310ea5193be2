"""The messages of the migration stream, as plain dataclasses.

These are the protocol's vocabulary, independent of any transport: the state machines in
:mod:`node.migration.sender` and :mod:`node.migration.receiver` consume and produce them, and
a thin adapter maps them one to one onto ``protos/ferry/v1/migration.proto``. Keeping them
free of protobuf lets every phase and fault be driven in a unit test without sockets.

Source → destination: :class:`Hello`, :class:`Pages`, :class:`DeviceState`,
:class:`Complete`, :class:`Abort`. Destination → source: :class:`Ack` (flow-control credit),
:class:`Refusal` (answer to a Hello that must not proceed), :class:`Resumed`, :class:`Error`.

Fields arriving from the wire are untrusted: nothing here validates them; the receiving state
machine does, before any of them touches RAM.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Protocol

import numpy as np

# 2: the memory digest hashes page contents unseeded and mixes the page number in after
# (node.migration.digest), and Acks may cover several batches (a batch listing no page asks
# for one). A version-1 peer would compute other digests, or wait forever for its Acks.
PROTOCOL_VERSION = 2


class Encoding(StrEnum):
    """How the data pages of one batch are packed into its payload."""

    RAW = "raw"
    ZSTD = "zstd"
    LZ4 = "lz4"


class RefusalReason(StrEnum):
    """Why a destination refused a Hello; typed so the source can report it precisely."""

    BAD_TOKEN = "bad-token"
    PROTOCOL_VERSION = "protocol-version"
    PAGE_SIZE = "page-size"
    RAM_SIZE = "ram-size"
    CONFIG = "config"
    # A reason this node does not know (a newer peer); still a refusal.
    UNSPECIFIED = "unspecified"


@dataclass(frozen=True)
class Hello:
    """The first message: the source proves it may migrate here and that the VMs match."""

    protocol_version: int
    ferry_version: str
    config_hash: str
    ram_size: int
    page_size: int
    token: bytes
    # The source VM's config (msgpack of VMConfig.to_dict()), for the destination's logs
    # and diagnostics; compatibility is decided by config_hash.
    board_config: bytes = b""
    vm_name: str = ""


def _no_pages() -> np.ndarray:
    return np.zeros(0, dtype=np.uint32)


@dataclass(frozen=True)
class Pages:
    """One batch of pages (about 1 MiB of payload).

    ``page_numbers`` lists the pages whose contents are in ``payload``, in payload order;
    ``zero_pages`` lists pages that became all-zero since the destination last received
    them and carry no payload. ``seq`` numbers the batches of the whole migration from 1 so
    that acknowledgements can name what they acknowledge. A batch that lists no page at all
    asks the destination to acknowledge it (and everything before it) at once.
    """

    seq: int
    round: int
    encoding: str
    page_numbers: np.ndarray = field(default_factory=_no_pages)
    zero_pages: np.ndarray = field(default_factory=_no_pages)
    # bytes, or a memoryview (saves copying 1 MiB): of guest RAM when the sender built the
    # batch (serialise it when sending it), of the received message after wire.decode_source,
    # or of ``serialised`` below.
    payload: bytes | memoryview = b""
    # The batch already serialised as the stream carries it, with ``payload`` a view of its
    # tail, when the sender built it with wire.build_pages: the payload was then copied once,
    # straight from RAM into the message, and encode_source sends these bytes as they are.
    # Not an init field, so a copy made with dataclasses.replace (a test tampering with a
    # batch) has none and is serialised afresh from its own fields.
    serialised: bytes | None = field(default=None, init=False, repr=False, compare=False)


class BuildBatch(Protocol):
    """Makes a raw batch whose payload is ``parts`` (runs of guest RAM) joined in order.

    The sender knows no wire format, so by default it gathers a batch's pages into a payload
    that the serialiser then copies into the message. A driver that serialises batches
    passes :func:`node.migration.wire.build_pages` instead, which joins the runs straight
    into the serialised message: one copy of the payload on its way from RAM to the socket.
    """

    def __call__(
        self,
        seq: int,
        round: int,
        page_numbers: np.ndarray,
        zero_pages: np.ndarray,
        parts: Sequence[memoryview],
    ) -> Pages: ...


@dataclass(frozen=True)
class DeviceState:
    """Every component's ``save()`` dict, msgpack-encoded; sent while the VM is paused."""

    state: bytes


@dataclass(frozen=True)
class Complete:
    """End of the stream: the digest of all guest RAM as the source sent it."""

    digest: int


@dataclass(frozen=True)
class Abort:
    """The source gives up (cancel or local failure); the destination discards its VM."""

    reason: str


@dataclass(frozen=True)
class Ack:
    """Batches up to ``acked_seq`` are applied; the source may send ``credit`` more.

    The answer to an accepted Hello is an Ack with ``acked_seq`` 0 and the initial window.
    Later Acks may cover several batches at once (and then grant as many credits).
    """

    acked_seq: int
    credit: int


@dataclass(frozen=True)
class Refusal:
    """The destination will not take this VM; nothing was changed on either side."""

    reason: RefusalReason
    detail: str


@dataclass(frozen=True)
class Resumed:
    """The destination's guest runs. ``resumed_at`` is the destination's clock, in seconds."""

    resumed_at: float


@dataclass(frozen=True)
class Error:
    """The destination hit invalid input or a local failure and discarded its VM."""

    reason: str


SourceMessage = Hello | Pages | DeviceState | Complete | Abort
DestinationMessage = Ack | Refusal | Resumed | Error
Message = SourceMessage | DestinationMessage
