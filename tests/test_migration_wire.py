"""The protobuf mapping loses nothing, and a whole migration survives serialisation."""

from __future__ import annotations

import numpy as np
import pytest
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
from protos.ferry.v1 import migration_pb2 as pb
from protos.ferry.v1 import types_pb2


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
