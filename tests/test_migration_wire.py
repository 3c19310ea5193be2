"""The protobuf mapping loses nothing, and a whole migration survives serialisation."""

from __future__ import annotations

import dataclasses
import itertools
from collections.abc import Iterator
from concurrent import futures

import grpc
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from test_migration_harness import FakeGuest, Loopback

from node.migration import (
    Abort,
    Ack,
    Complete,
    Completed,
    DeviceState,
    Error,
    Failed,
    Hello,
    MigrationOptions,
    Pages,
    Refusal,
    RefusalReason,
    Resumed,
    wire,
)
from node.migration.messages import DestinationMessage, Message, SourceMessage
from protos.ferry.v1 import migration_pb2 as pb
from protos.ferry.v1 import migration_pb2_grpc, types_pb2


def through_source_wire(message: Hello | Pages | DeviceState | Complete | Abort) -> object:
    data = wire.source_to_pb(message).SerializeToString()
    return wire.source_from_pb(pb.SourceMessage.FromString(data))


def through_destination_wire(message: Ack | Refusal | Resumed | Error) -> object:
    data = wire.destination_to_pb(message).SerializeToString()
    return wire.destination_from_pb(pb.DestinationMessage.FromString(data))


@pytest.mark.parametrize(
    "message",
    [
        Hello(1, "0.1.0", "abc", 1 << 30, 4096, b"\x00tok", b"\x81\xa1a\x01", "web-1"),
        DeviceState(b"\x80"),
        Complete(2**64 - 1),
        Abort("operator cancel"),
    ],
)
def test_source_messages_round_trip(message: Hello | DeviceState | Complete | Abort) -> None:
    assert through_source_wire(message) == message


@pytest.mark.parametrize("encoding", ["raw", "zstd", "lz4"])
def test_pages_round_trip(encoding: str) -> None:
    batch = Pages(
        seq=2**40,
        round=7,
        encoding=encoding,
        page_numbers=np.array([0, 5, 2**32 - 1], dtype=np.uint32),
        zero_pages=np.array([9], dtype=np.uint32),
        payload=b"xyz",
    )
    back = through_source_wire(batch)
    assert isinstance(back, Pages)
    assert (back.seq, back.round, back.encoding, back.payload) == (2**40, 7, encoding, b"xyz")
    assert back.page_numbers.tolist() == [0, 5, 2**32 - 1]
    assert back.zero_pages.tolist() == [9]


def test_unknown_encoding_from_the_wire_reaches_the_receiver_as_unknown() -> None:
    msg = pb.SourceMessage(pages=pb.Pages(seq=1, encoding=pb.Encoding.ValueType(42)))
    back = wire.source_from_pb(msg)
    assert isinstance(back, Pages) and back.encoding == "encoding #42"


@pytest.mark.parametrize(
    "message",
    [
        Ack(2**50, 4),
        Refusal(RefusalReason.CONFIG, "differs"),
        Resumed(12345.678),
        Error("memory digest mismatch"),
    ],
)
def test_destination_messages_round_trip(message: Ack | Refusal | Resumed | Error) -> None:
    assert through_destination_wire(message) == message


def test_empty_messages_are_wire_errors() -> None:
    with pytest.raises(wire.WireError):
        wire.source_from_pb(pb.SourceMessage())
    with pytest.raises(wire.WireError):
        wire.destination_from_pb(pb.DestinationMessage())


@pytest.mark.parametrize("compression", ["none", "zstd", "lz4"])
def test_a_migration_through_protobuf_arrives_intact(compression: str) -> None:
    guest = FakeGuest(1024, filled=600, pages_per_slice=30, working_set=200, zero_fraction=0.2)
    lb = Loopback(guest, via_protobuf=True, options=MigrationOptions(compression=compression))
    lb.run()
    assert isinstance(lb.outcome.source_end, Completed)
    assert bytes(guest.ram) == bytes(lb.dest_ram)


def test_a_refusal_through_protobuf_keeps_its_reason() -> None:
    lb = Loopback(FakeGuest(64), via_protobuf=True, dest_config="other")
    lb.run()
    end = lb.outcome.source_end
    assert isinstance(end, Failed) and "(config)" in end.reason


def test_api_options_map_zero_values_to_the_defaults() -> None:
    opts = wire.options_from_pb(types_pb2.MigrationOptions())
    assert opts == MigrationOptions()
    opts = wire.options_from_pb(
        types_pb2.MigrationOptions(
            max_downtime_ms=50,
            max_bandwidth=10**8,
            timeout_s=30,
            auto_converge=False,
            compression="lz4",
        )
    )
    assert (opts.max_downtime_ms, opts.max_bandwidth, opts.timeout_s) == (50, 1e8, 30)
    assert (opts.auto_converge, opts.compression) == (False, "lz4")
    # A budget above the default ceiling lifts the ceiling with it.
    lifted = wire.options_from_pb(types_pb2.MigrationOptions(max_downtime_ms=5000))
    assert lifted.max_downtime_max_ms == 5000


def test_api_options_reject_a_bad_compression() -> None:
    with pytest.raises(ValueError, match="unknown compression 'gzip'"):
        wire.options_from_pb(types_pb2.MigrationOptions(compression="gzip"))


def test_sender_stats_map_onto_the_api_status() -> None:
    lb = Loopback(FakeGuest(256, pages_per_slice=4))
    lb.run()
    stats = lb.sender.stats()
    status = wire.status_to_pb(stats, vm="web-1", destination="10.0.0.2:7000")
    assert status.status == types_pb2.MIGRATION_STATE_COMPLETED
    assert (status.vm, status.destination) == ("web-1", "10.0.0.2:7000")
    assert status.transferred == stats["transferred"] and status.normal == stats["normal"]
    assert status.downtime_ms == pytest.approx(stats["downtime"])
    assert status.dirty_sync_count == stats["dirty-sync-count"]
    assert [r.number for r in status.rounds] == [r["number"] for r in stats["rounds"]]
    assert status.rounds[0].bytes == stats["rounds"][0]["bytes"] > 0
    assert status.rounds[-1].switchover and not status.rounds[0].switchover


# ------------------------------------------------- the serialised form (encode/decode)


def same_batch(a: object, b: object) -> bool:
    assert isinstance(a, Pages) and isinstance(b, Pages)
    return (
        (a.seq, a.round, a.encoding) == (b.seq, b.round, b.encoding)
        and np.asarray(a.page_numbers).tolist() == np.asarray(b.page_numbers).tolist()
        and np.asarray(a.zero_pages).tolist() == np.asarray(b.zero_pages).tolist()
        and bytes(a.payload) == bytes(b.payload)
    )


page_lists = st.lists(st.integers(0, 2**32 - 1), max_size=40).map(
    lambda v: np.array(v, dtype=np.uint32)
)
batches = st.builds(
    Pages,
    seq=st.integers(0, 2**64 - 1),
    round=st.integers(0, 2**32 - 1),
    encoding=st.sampled_from(["raw", "zstd", "lz4"]),
    page_numbers=page_lists,
    zero_pages=page_lists,
    payload=st.binary(max_size=300),
)


@given(batches)
@settings(max_examples=200, deadline=None)
def test_encoded_batches_are_what_protobuf_reads(batch: Pages) -> None:
    data = wire.encode_source(batch)
    assert pb.SourceMessage.FromString(data) == wire.source_to_pb(batch)
    assert same_batch(wire.decode_source(data), batch)
    # And the fast reader reads protobuf's own serialisation.
    assert same_batch(wire.decode_source(wire.source_to_pb(batch).SerializeToString()), batch)


def protobuf_reading(data: bytes) -> object:
    """What the generated code makes of ``data``: a message, or the exception class."""
    try:
        return wire.source_from_pb(pb.SourceMessage.FromString(data))
    except Exception as exc:
        return type(exc)


def fast_reading(data: bytes) -> object:
    try:
        return wire.decode_source(data)
    except wire.WireError:
        return "rejected"


def agree(data: bytes) -> None:
    expected, got = protobuf_reading(data), fast_reading(data)
    if isinstance(expected, type):
        assert got == "rejected", (data, got)
    elif isinstance(expected, Pages):
        assert same_batch(got, expected), data
    else:
        assert got == expected


@given(batches, st.data())
@settings(max_examples=300, deadline=None)
def test_damaged_bytes_are_read_exactly_as_protobuf_reads_them(
    batch: Pages, data: st.DataObject
) -> None:
    encoded = bytearray(wire.encode_source(batch))
    for _ in range(data.draw(st.integers(1, 3))):
        kind = data.draw(st.sampled_from(["flip", "cut", "insert"]))
        at = data.draw(st.integers(0, max(0, len(encoded) - 1)))
        if kind == "flip" and encoded:
            encoded[at] ^= data.draw(st.integers(1, 255))
        elif kind == "cut":
            del encoded[at:]
        else:
            encoded[at:at] = data.draw(st.binary(min_size=1, max_size=6))
    agree(bytes(encoded))


@pytest.mark.parametrize(
    "data",
    [
        # The same batch field twice: protobuf merges the two.
        wire.source_to_pb(Pages(1, 0, "raw", np.array([1], np.uint32))).SerializeToString()
        + wire.source_to_pb(Pages(2, 3, "raw", np.array([7], np.uint32))).SerializeToString(),
        # Page numbers not packed (allowed by protobuf for repeated scalars).
        bytes([0x12, 0x06, 0x08, 0x01, 0x20, 0x05, 0x20, 0x09]),
        # An overlong (10-byte) varint for the round, truncated to 32 bits by protobuf.
        bytes([0x12, 0x0B, 0x10]) + bytes([0xFF] * 9) + bytes([0x01]),
        # A field this version does not know.
        bytes([0x12, 0x04, 0x08, 0x01, 0x78, 0x05]),
        # Not a batch at all.
        wire.source_to_pb(Abort("bye")).SerializeToString(),
        b"",
    ],
    ids=["merged", "unpacked", "overlong-varint", "unknown-field", "abort", "empty"],
)
def test_unusual_but_valid_encodings_read_as_protobuf_reads_them(data: bytes) -> None:
    agree(data)


def test_a_decoded_batch_payload_is_a_view_of_the_received_bytes() -> None:
    payload = bytes(range(256)) * 64
    data = wire.encode_source(Pages(1, 0, "raw", np.arange(4, dtype=np.uint32), payload=payload))
    batch = wire.decode_source(data)
    assert isinstance(batch, Pages) and isinstance(batch.payload, memoryview)
    assert batch.payload.obj is data and bytes(batch.payload) == payload


@given(batches.filter(lambda b: b.encoding == "raw"), st.data())
@settings(max_examples=200, deadline=None)
def test_a_batch_built_in_one_copy_is_the_batch_encode_source_writes(
    batch: Pages, data: st.DataObject
) -> None:
    payload = bytes(batch.payload)
    cuts = sorted(data.draw(st.lists(st.integers(0, len(payload)), max_size=5)))
    edges = [0, *cuts, len(payload)]
    parts = [memoryview(payload)[a:b] for a, b in itertools.pairwise(edges)]
    built = wire.build_pages(batch.seq, batch.round, batch.page_numbers, batch.zero_pages, parts)
    assert built.serialised == wire.encode_source(batch)
    assert wire.encode_source(built) is built.serialised
    assert isinstance(built.payload, memoryview) and built.payload.obj is built.serialised
    assert same_batch(built, batch)
    assert pb.SourceMessage.FromString(built.serialised) == wire.source_to_pb(batch)


def test_a_changed_copy_of_a_built_batch_is_serialised_afresh() -> None:
    numbers, zeros = np.array([7], np.uint32), np.array([], np.uint32)
    built = wire.build_pages(4, 1, numbers, zeros, [memoryview(b"a" * 8)])
    changed = dataclasses.replace(built, payload=b"b" * 8)
    assert changed.serialised is None
    back = wire.decode_source(wire.encode_source(changed))
    assert isinstance(back, Pages) and bytes(back.payload) == b"b" * 8


class SerialisedLoopback(Loopback):
    """A Loopback whose messages cross as the bytes encode_source/decode_source make."""

    def _over_wire(self, message: Message) -> Message:
        if isinstance(message, Hello | Pages | DeviceState | Complete | Abort):
            return wire.decode_source(wire.encode_source(message))
        return wire.decode_destination(wire.encode_destination(message))


@pytest.mark.parametrize("built", [False, True], ids=["joined", "built"])
@pytest.mark.parametrize("compression", ["none", "lz4"])
def test_a_migration_through_the_serialised_form_arrives_intact(
    compression: str, built: bool
) -> None:
    guest = FakeGuest(1024, filled=600, pages_per_slice=30, working_set=200, zero_fraction=0.2)
    lb = SerialisedLoopback(guest, options=MigrationOptions(compression=compression))
    if built:
        # As the migration process runs it: batches serialised as the sender builds them.
        lb.sender._build_batch = wire.build_pages
    lb.run()
    assert isinstance(lb.outcome.source_end, Completed)
    assert bytes(guest.ram) == bytes(lb.dest_ram)


def test_destination_bytes_that_are_not_a_message_are_a_wire_error() -> None:
    with pytest.raises(wire.WireError):
        wire.decode_destination(b"\x0a\xff")


def test_generated_stubs_interoperate_with_the_serialised_form() -> None:
    """A peer built on the generated protobuf stubs talks to migration_handler's server."""
    got: list[object] = []

    def migrate(
        requests: Iterator[SourceMessage], context: grpc.ServicerContext
    ) -> Iterator[DestinationMessage]:
        for message in requests:
            got.append(message)
            yield Ack(acked_seq=len(got), credit=1)

    server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
    server.add_generic_rpc_handlers((wire.migration_handler(migrate),))
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    try:
        batch = Pages(3, 1, "lz4", np.array([5, 300], np.uint32), np.array([7], np.uint32), b"ab")
        with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
            stub = migration_pb2_grpc.MigrationStub(channel)
            replies = list(stub.Migrate(iter([wire.source_to_pb(batch)]), timeout=30))
            assert [wire.destination_from_pb(r) for r in replies] == [Ack(1, 1)]
            acks = list(wire.migrate_call(channel)(iter([batch, Complete(9)]), timeout=30))
            assert acks == [Ack(2, 1), Ack(3, 1)]
    finally:
        server.stop(None)
    assert same_batch(got[0], batch) and same_batch(got[1], batch) and got[2] == Complete(9)


@pytest.mark.parametrize(
    "numbers",
    [np.array([3, -1], np.int64), np.array([2**32], np.uint64), np.array([1, 2**32], np.int64)],
    ids=["negative", "too-big-unsigned", "too-big-signed"],
)
def test_page_numbers_outside_uint32_are_not_encoded(numbers: np.ndarray) -> None:
    """A bug upstream must not wrap a page number silently into another page."""
    with pytest.raises(ValueError, match="fit in uint32"):
        wire.encode_source(Pages(1, 0, "raw", numbers, payload=bytes(4096 * len(numbers))))


def test_padded_page_numbers_read_as_protobuf_reads_them() -> None:
    """Small and large numbers in one batch share the widest varint width."""
    numbers = np.array([0, 1, 127, 128, 300, 2**21, 2**32 - 1], np.uint32)
    data = wire.encode_source(Pages(1, 0, "raw", numbers, payload=b""))
    assert list(pb.SourceMessage.FromString(data).pages.page_numbers) == numbers.tolist()
    decoded = wire.decode_source(data)
    assert isinstance(decoded, Pages) and decoded.page_numbers.tolist() == numbers.tolist()
