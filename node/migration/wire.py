"""Mapping between the protocol's dataclasses and ``protos/ferry/v1/migration.proto``.

This is the only module of the package that knows protobuf exists; the state machines
never see a protobuf object. The mapping is one to one and checks nothing beyond what
protobuf itself guarantees (types): validation is the receiving state machine's job, so
that a batch that arrived over gRPC and one built in a test meet the same checks. An enum
value this node does not know maps to a name the state machines reject or report.

Two forms of the mapping exist. :func:`source_to_pb` and friends build protobuf objects.
:func:`encode_source` / :func:`decode_source` go straight between a dataclass and the
serialised bytes, and are what the migration stream should use (:func:`migrate_call`,
:func:`migration_handler`): a page batch is ~1 MiB of payload, and building it as a
protobuf object copies that megabyte twice more (into ``bytes``, then into the message's
arena) before serialisation copies it a third time; parsing does the same in reverse. On
this class of machine a 1 MiB copy costs ~0.3 ms, about as much as the whole gRPC stream
spends per batch. So a batch is written as its few header bytes followed by its payload in
one copy, and read back with its payload as a view of the received bytes (no copy at all).
A sender given :func:`build_pages` goes one better for batches of pages scattered over RAM:
it joins the runs of RAM straight behind the header, instead of gathering the pages into a
payload that serialising would then copy again.
The bytes are protobuf's wire format for ``SourceMessage`` (page numbers as fixed-width
varints, which protobuf reads as the same numbers): a peer using the generated stubs
interoperates, and anything the fast reader does not recognise as a plain batch (other
messages, unusual but valid encodings, garbage) goes through protobuf's own parser, so both
readers accept and reject exactly the same inputs.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import Any

import grpc
import numpy as np
from google.protobuf.message import DecodeError

from node.migration.messages import (
    Abort,
    Ack,
    Complete,
    DestinationMessage,
    DeviceState,
    Encoding,
    Error,
    Hello,
    Pages,
    Refusal,
    RefusalReason,
    Resumed,
    SourceMessage,
)
from node.migration.sender import MigrationOptions
from protos.ferry.v1 import migration_pb2 as pb
from protos.ferry.v1 import types_pb2

_ENCODING_TO_PB: dict[str, pb.Encoding.ValueType] = {
    Encoding.RAW.value: pb.ENCODING_RAW,
    Encoding.ZSTD.value: pb.ENCODING_ZSTD,
    Encoding.LZ4.value: pb.ENCODING_LZ4,
}
_ENCODING_FROM_PB = {v: k for k, v in _ENCODING_TO_PB.items()}

_REFUSAL_TO_PB = {
    RefusalReason.BAD_TOKEN: pb.REFUSAL_REASON_BAD_TOKEN,
    RefusalReason.PROTOCOL_VERSION: pb.REFUSAL_REASON_PROTOCOL_VERSION,
    RefusalReason.PAGE_SIZE: pb.REFUSAL_REASON_PAGE_SIZE,
    RefusalReason.RAM_SIZE: pb.REFUSAL_REASON_RAM_SIZE,
    RefusalReason.CONFIG: pb.REFUSAL_REASON_CONFIG,
    RefusalReason.UNSPECIFIED: pb.REFUSAL_REASON_UNSPECIFIED,
}
_REFUSAL_FROM_PB = {v: k for k, v in _REFUSAL_TO_PB.items()}


# query-migrate status → the API's MigrationState. "outcome-unknown" (the source sent its
# last message and never heard whether the destination resumed) is the API's UNKNOWN: the
# coordinator must ask the destination before it may restart or free either copy.
_STATE_TO_PB = {
    "setup": types_pb2.MIGRATION_STATE_SETUP,
    "active": types_pb2.MIGRATION_STATE_ACTIVE,
    "device": types_pb2.MIGRATION_STATE_DEVICE,
    "cancelling": types_pb2.MIGRATION_STATE_CANCELLING,
    "completed": types_pb2.MIGRATION_STATE_COMPLETED,
    "cancelled": types_pb2.MIGRATION_STATE_CANCELLED,
    "failed": types_pb2.MIGRATION_STATE_FAILED,
    "outcome-unknown": types_pb2.MIGRATION_STATE_UNKNOWN,
}


MIGRATION_ENDED = {
    types_pb2.MIGRATION_STATE_NONE,
    types_pb2.MIGRATION_STATE_COMPLETED,
    types_pb2.MIGRATION_STATE_FAILED,
    types_pb2.MIGRATION_STATE_CANCELLED,
    types_pb2.MIGRATION_STATE_UNKNOWN,
}
"""The API's states in which a watcher stops following a migration (NONE: there is none)."""


def changes_until_ended(
    statuses: Iterable[types_pb2.MigrationStatus], last: bytes = b""
) -> Iterator[types_pb2.MigrationStatus]:
    """What a migration watcher is sent: each status that differs from the one before (a
    quiet phase sends nothing), up to and including the first that ends the migration.
    ``last`` is the serialised status the watcher already has, if any."""
    for status in statuses:
        encoded = status.SerializeToString(deterministic=True)
        if encoded != last:
            last = encoded
            yield status
        if status.status in MIGRATION_ENDED:
            return


def options_from_pb(options: types_pb2.MigrationOptions) -> MigrationOptions:
    """The API's per-migration options, with proto3's zero values meaning "default".

    Raises ValueError with a one-line message for an option a user got wrong.
    """
    defaults = MigrationOptions()
    result = MigrationOptions(
        max_downtime_ms=float(options.max_downtime_ms or defaults.max_downtime_ms),
        max_downtime_max_ms=max(defaults.max_downtime_max_ms, float(options.max_downtime_ms or 0)),
        max_bandwidth=float(options.max_bandwidth),
        timeout_s=float(options.timeout_s),
        auto_converge=(
            options.auto_converge if options.HasField("auto_converge") else defaults.auto_converge
        ),
        compression=options.compression or defaults.compression,
    )
    result.check()
    return result


def status_to_pb(
    stats: dict[str, Any], *, vm: str = "", error: str = "", destination: str = ""
) -> types_pb2.MigrationStatus:
    """A sender's :meth:`~node.migration.sender.MigrationSender.stats` as the API reports it."""
    return types_pb2.MigrationStatus(
        vm=vm,
        status=_STATE_TO_PB.get(stats["status"], types_pb2.MIGRATION_STATE_UNSPECIFIED),
        setup_time_ms=stats["setup-time"],
        total_time_ms=stats["total-time"],
        downtime_ms=stats["downtime"],
        expected_downtime_ms=stats["expected-downtime"],
        transferred=stats["transferred"],
        remaining=stats["remaining"],
        total=stats["total"],
        duplicate=stats["duplicate"],
        normal=stats["normal"],
        compressed_bytes=stats["compressed-bytes"],
        dirty_pages_rate=stats["dirty-pages-rate"],
        mbps=stats["mbps"],
        dirty_sync_count=stats["dirty-sync-count"],
        cpu_throttle_percentage=stats["cpu-throttle-percentage"],
        error=error,
        destination=destination,
        rounds=[types_pb2.MigrationRound(**r) for r in stats.get("rounds", ())],
    )


class WireError(ValueError):
    """A protobuf message that carries none of the protocol's messages."""


def source_to_pb(message: SourceMessage) -> pb.SourceMessage:
    """A source → destination dataclass as the protobuf the stream carries."""
    if isinstance(message, Pages):
        return pb.SourceMessage(
            pages=pb.Pages(
                seq=message.seq,
                round=message.round,
                # Unknown names cannot be built by our sender; UNSPECIFIED if one ever is.
                encoding=_ENCODING_TO_PB.get(message.encoding, pb.ENCODING_UNSPECIFIED),
                page_numbers=np.asarray(message.page_numbers).tolist(),
                zero_pages=np.asarray(message.zero_pages).tolist(),
                payload=bytes(message.payload),
            )
        )
    if isinstance(message, Hello):
        return pb.SourceMessage(
            hello=pb.Hello(
                protocol_version=message.protocol_version,
                ferry_version=message.ferry_version,
                board_config=message.board_config,
                config_hash=message.config_hash,
                ram_size=message.ram_size,
                page_size=message.page_size,
                token=message.token,
                vm_name=message.vm_name,
            )
        )
    if isinstance(message, DeviceState):
        return pb.SourceMessage(device_state=pb.DeviceState(state=message.state))
    if isinstance(message, Complete):
        return pb.SourceMessage(complete=pb.Complete(memory_digest=message.digest))
    return pb.SourceMessage(abort=pb.Abort(reason=message.reason))


def source_from_pb(message: pb.SourceMessage) -> SourceMessage:
    """The dataclass for a protobuf from the source; raises :class:`WireError` if empty."""
    kind = message.WhichOneof("kind")
    if kind == "pages":
        p = message.pages
        return Pages(
            seq=p.seq,
            round=p.round,
            encoding=_ENCODING_FROM_PB.get(p.encoding, f"encoding #{p.encoding}"),
            page_numbers=np.array(p.page_numbers, dtype=np.uint32),
            zero_pages=np.array(p.zero_pages, dtype=np.uint32),
            payload=p.payload,
        )
    if kind == "hello":
        h = message.hello
        return Hello(
            protocol_version=h.protocol_version,
            ferry_version=h.ferry_version,
            config_hash=h.config_hash,
            ram_size=h.ram_size,
            page_size=h.page_size,
            token=h.token,
            board_config=h.board_config,
            vm_name=h.vm_name,
        )
    if kind == "device_state":
        return DeviceState(state=message.device_state.state)
    if kind == "complete":
        return Complete(digest=message.complete.memory_digest)
    if kind == "abort":
        return Abort(reason=message.abort.reason)
    raise WireError("empty message from the source")


def destination_to_pb(message: DestinationMessage) -> pb.DestinationMessage:
    """A destination → source dataclass as the protobuf the stream carries."""
    if isinstance(message, Ack):
        return pb.DestinationMessage(ack=pb.Ack(acked_seq=message.acked_seq, credit=message.credit))
    if isinstance(message, Refusal):
        return pb.DestinationMessage(
            refusal=pb.Refusal(reason=_REFUSAL_TO_PB[message.reason], detail=message.detail)
        )
    if isinstance(message, Resumed):
        return pb.DestinationMessage(resumed=pb.Resumed(resumed_at=message.resumed_at))
    return pb.DestinationMessage(error=pb.Error(reason=message.reason))


def destination_from_pb(message: pb.DestinationMessage) -> DestinationMessage:
    """The dataclass for a protobuf from the destination; raises :class:`WireError` if empty."""
    kind = message.WhichOneof("kind")
    if kind == "ack":
        return Ack(acked_seq=message.ack.acked_seq, credit=message.ack.credit)
    if kind == "refusal":
        reason = _REFUSAL_FROM_PB.get(message.refusal.reason, RefusalReason.UNSPECIFIED)
        return Refusal(reason=reason, detail=message.refusal.detail)
    if kind == "resumed":
        return Resumed(resumed_at=message.resumed.resumed_at)
    if kind == "error":
        return Error(reason=message.error.reason)
    raise WireError("empty message from the destination")


# --------------------------------------------------------------- serialised form

MIGRATE_METHOD = "/ferry.v1.Migration/Migrate"
_SERVICE = "ferry.v1.Migration"

# Tags (field number << 3 | wire type) of SourceMessage.pages and of Pages' fields.
_TAG_PAGES = 0x12
_TAG_SEQ, _TAG_ROUND, _TAG_ENCODING = 0x08, 0x10, 0x18
_TAG_NUMBERS, _TAG_ZEROS, _TAG_PAYLOAD = 0x22, 0x2A, 0x32
_U32 = 1 << 32
_U64 = 1 << 64
_VARINT_SHIFTS = np.arange(0, 35, 7, dtype=np.uint64)


def _varint(value: int) -> bytes:
    out = bytearray()
    while value > 0x7F:
        out.append((value & 0x7F) | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)


def _packed_uint32(values: np.ndarray) -> bytes:
    """Page numbers as a packed repeated uint32 field body, without a loop.

    Every number takes as many varint bytes as the largest one (smaller ones carry
    continuation bytes of zeros). Protobuf reads such padded varints as the same numbers,
    and fixed-width rows are a handful of numpy operations to write and to read back; a
    batch's page numbers are close together, so the padding is a few bytes at most.
    """
    v = np.asarray(values)
    if v.size == 0:
        return b""
    if v.ndim != 1 or v.dtype.kind not in "iu":
        raise ValueError("page numbers must be a 1-D array of integers")
    largest = int(v.max())
    if largest >= _U32 or (v.dtype.kind == "i" and int(v.min()) < 0):
        raise ValueError("page numbers must fit in uint32")
    width = max(1, -(-largest.bit_length() // 7))
    groups = ((v.astype(np.uint64)[:, None] >> _VARINT_SHIFTS[:width]) & 0x7F).astype(np.uint8)
    groups[:, :-1] |= 0x80
    return groups.tobytes()


def _pages_head(
    seq: int,
    round_: int,
    encoding: str,
    page_numbers: np.ndarray,
    zero_pages: np.ndarray,
    payload_size: int,
) -> bytes:
    """Everything a serialised batch holds before its payload, which is the last field."""
    if not (0 <= seq < _U64) or not (0 <= round_ < _U32):
        raise ValueError(f"batch seq {seq} or round {round_} out of range")
    head = bytearray()
    # proto3 leaves zero values out, as protobuf's own serialiser does.
    if seq:
        head += bytes((_TAG_SEQ,)) + _varint(seq)
    if round_:
        head += bytes((_TAG_ROUND,)) + _varint(round_)
    code = _ENCODING_TO_PB.get(encoding, pb.ENCODING_UNSPECIFIED)
    if code:
        head += bytes((_TAG_ENCODING,)) + _varint(code)
    for tag, numbers in ((_TAG_NUMBERS, page_numbers), (_TAG_ZEROS, zero_pages)):
        packed = _packed_uint32(numbers)
        if packed:
            head += bytes((tag,)) + _varint(len(packed)) + packed
    if payload_size:
        head += bytes((_TAG_PAYLOAD,)) + _varint(payload_size)
    return bytes((_TAG_PAGES,)) + _varint(len(head) + payload_size) + head


def _encode_pages(batch: Pages) -> bytes:
    if batch.serialised is not None:
        return batch.serialised
    payload = memoryview(batch.payload).cast("B")
    head = _pages_head(
        batch.seq, batch.round, batch.encoding, batch.page_numbers, batch.zero_pages, len(payload)
    )
    # The one copy of the payload on the sending side.
    return b"".join((head, payload))


def build_pages(
    seq: int,
    round: int,
    page_numbers: np.ndarray,
    zero_pages: np.ndarray,
    parts: Sequence[memoryview],
) -> Pages:
    """A raw batch serialised as it is built (a :class:`~node.migration.messages.BuildBatch`).

    The payload goes from ``parts`` (runs of guest RAM) straight into the message's bytes,
    behind a header computed first, since its length is known from the page count. gRPC
    takes a message only as ``bytes``, which cannot be written after they are made, so
    joining the header and the parts is the one way to build them in one copy; gathering
    the pages first and serialising them after costs a second megabyte copied per batch.
    The batch's payload is a view of those bytes, for the sender to hash.
    """
    size = sum(map(len, parts))
    head = _pages_head(seq, round, Encoding.RAW, page_numbers, zero_pages, size)
    data = b"".join((head, *parts))
    batch = Pages(seq, round, Encoding.RAW, page_numbers, zero_pages, memoryview(data)[len(head) :])
    # A cache of the batch's own serialised form, made from its fields just above; the
    # frozen dataclass keeps it out of __init__ (see Pages.serialised).
    object.__setattr__(batch, "serialised", data)
    return batch


def encode_source(message: SourceMessage) -> bytes:
    """A source → destination message serialised as ``SourceMessage`` (one payload copy, or
    none for a batch :func:`build_pages` made)."""
    if isinstance(message, Pages):
        return _encode_pages(message)
    return source_to_pb(message).SerializeToString()


def _read_varint(data: bytes, pos: int, end: int) -> tuple[int, int]:
    """(value, next position); (-1, pos) when the varint is truncated or over 10 bytes."""
    value = shift = 0
    for i in range(pos, min(end, pos + 10)):
        byte = data[i]
        value |= (byte & 0x7F) << shift
        if byte < 0x80:
            return value, i + 1
        shift += 7
    return -1, pos


def _unpack_uint32(body: memoryview) -> np.ndarray | None:
    """A packed uint32 field body as an array; None if any varint is unusual or too big."""
    b = np.frombuffer(body, dtype=np.uint8)
    if b.size == 0:
        return np.zeros(0, dtype=np.uint32)
    if b[-1] & 0x80:
        return None
    width = int(np.argmax(b < 0x80)) + 1
    if width <= 5 and b.size % width == 0:
        rows = b.reshape(-1, width)
        # Fixed-width varints, as _packed_uint32 writes them: one row per number.
        if bool((rows[:, :-1] >= 0x80).all()) and bool((rows[:, -1] < 0x80).all()):
            values = (rows[:, 0] & 0x7F).astype(np.uint64)
            for k in range(1, width):
                values |= (rows[:, k] & 0x7F).astype(np.uint64) << _VARINT_SHIFTS[k]
            if width == 5 and int(values.max()) >= _U32:
                return None
            return values.astype(np.uint32)
    ends = np.flatnonzero(b < 0x80)
    starts = np.concatenate(([0], ends[:-1] + 1))
    lengths = ends - starts + 1
    if int(lengths.max()) > 5:
        return None
    position = np.arange(b.size) - np.repeat(starts, lengths)
    parts = (b & 0x7F).astype(np.uint64) << (position.astype(np.uint64) * np.uint64(7))
    values = np.add.reduceat(parts, starts)
    if int(values.max()) >= _U32:
        return None
    return values.astype(np.uint32)


def _decode_pages(data: bytes) -> Pages | None:
    """A plain serialised batch read without copying its payload; None for anything else.

    "Plain" is every batch :func:`encode_source` or protobuf writes: one ``pages`` field
    spanning the message, each field of ``Pages`` once, page numbers packed, values in
    range. Everything else (repeated or unknown fields, unpacked lists, overlong varints)
    is left to protobuf, whose rules for such inputs (merging, truncation) are its own.
    """
    size = len(data)
    if size < 2 or data[0] != _TAG_PAGES:
        return None
    length, pos = _read_varint(data, 1, size)
    if length < 0 or pos + length != size:
        return None
    view = memoryview(data)
    seen: set[int] = set()
    seq = round_ = encoding = 0
    numbers = zeros = np.zeros(0, dtype=np.uint32)
    payload: memoryview | bytes = b""
    while pos < size:
        tag, pos = _read_varint(data, pos, size)
        if tag in seen:
            return None
        seen.add(tag)
        if tag in (_TAG_SEQ, _TAG_ROUND, _TAG_ENCODING):
            value, pos = _read_varint(data, pos, size)
            if value < 0:
                return None
            if tag == _TAG_SEQ:
                seq = value
            elif tag == _TAG_ROUND:
                if value >= _U32:
                    return None
                round_ = value
            else:
                if value >= 1 << 31:
                    return None
                encoding = value
        elif tag in (_TAG_NUMBERS, _TAG_ZEROS, _TAG_PAYLOAD):
            count, pos = _read_varint(data, pos, size)
            if count < 0 or pos + count > size:
                return None
            body = view[pos : pos + count]
            pos += count
            if tag == _TAG_PAYLOAD:
                payload = body
                continue
            unpacked = _unpack_uint32(body)
            if unpacked is None:
                return None
            if tag == _TAG_NUMBERS:
                numbers = unpacked
            else:
                zeros = unpacked
        else:
            return None
    return Pages(
        seq=seq,
        round=round_,
        encoding=_ENCODING_FROM_PB.get(pb.Encoding.ValueType(encoding), f"encoding #{encoding}"),
        page_numbers=numbers,
        zero_pages=zeros,
        payload=payload,
    )


def decode_source(data: bytes) -> SourceMessage:
    """A serialised ``SourceMessage`` as its dataclass; a batch's payload is a view of
    ``data``. Raises :class:`WireError` for bytes that are not a message of the protocol."""
    batch = _decode_pages(data)
    if batch is not None:
        return batch
    try:
        message = pb.SourceMessage.FromString(data)
    except DecodeError as exc:
        raise WireError(f"malformed message from the source: {exc}") from None
    return source_from_pb(message)


def encode_destination(message: DestinationMessage) -> bytes:
    """A destination → source message serialised as ``DestinationMessage``."""
    return destination_to_pb(message).SerializeToString()


def decode_destination(data: bytes) -> DestinationMessage:
    """A serialised ``DestinationMessage`` as its dataclass; raises :class:`WireError`."""
    try:
        message = pb.DestinationMessage.FromString(data)
    except DecodeError as exc:
        raise WireError(f"malformed message from the destination: {exc}") from None
    return destination_from_pb(message)


def _already_encoded(data: bytes) -> bytes:
    return data


def migrate_call(channel: grpc.Channel, *, encoded: bool = False) -> grpc.StreamStreamMultiCallable:
    """The client end of ``Migration.Migrate`` carrying dataclasses, serialised by
    :func:`encode_source` in gRPC's request thread (off the caller's loop).

    With ``encoded`` the caller passes the bytes :func:`encode_source` made. That is for a
    caller whose batches are views of guest RAM that the guest may write again before gRPC's
    thread gets round to them: it encodes each batch as it is sent, and gRPC only writes."""
    return channel.stream_stream(
        MIGRATE_METHOD,
        request_serializer=_already_encoded if encoded else encode_source,
        response_deserializer=decode_destination,
    )


MigrateHandler = Callable[
    [Iterator[SourceMessage], grpc.ServicerContext], Iterator[DestinationMessage]
]


def migration_handler(migrate: MigrateHandler) -> grpc.GenericRpcHandler:
    """A ``Migration`` service whose ``Migrate`` takes and yields dataclasses; register it
    with ``server.add_generic_rpc_handlers((migration_handler(fn),))``. A message that
    does not decode ends the stream with an error status, as gRPC does for any."""
    return grpc.method_handlers_generic_handler(
        _SERVICE,
        {
            "Migrate": grpc.stream_stream_rpc_method_handler(
                migrate,
                request_deserializer=decode_source,
                response_serializer=encode_destination,
            )
        },
    )
