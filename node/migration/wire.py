"""Mapping between the protocol's dataclasses and ``protos/ferry/v1/migration.proto``.

This is the only module of the package that knows protobuf exists; the state machines
never see a protobuf object. The mapping is one to one and checks nothing beyond what
protobuf itself guarantees (types): validation is the receiving state machine's job, so
that a batch that arrived over gRPC and one built in a test meet the same checks. An enum
value this node does not know maps to a name the state machines reject or report.
"""

from __future__ import annotations

from typing import Any

import numpy as np

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


# query-migrate status → the API's MigrationState. "outcome-unknown" has no state of its
# own in types.proto: it is reported as failed, with the reason saying the source is paused.
_STATE_TO_PB = {
    "setup": types_pb2.MIGRATION_STATE_SETUP,
    "active": types_pb2.MIGRATION_STATE_ACTIVE,
    "device": types_pb2.MIGRATION_STATE_DEVICE,
    "cancelling": types_pb2.MIGRATION_STATE_CANCELLING,
    "completed": types_pb2.MIGRATION_STATE_COMPLETED,
    "cancelled": types_pb2.MIGRATION_STATE_CANCELLED,
    "failed": types_pb2.MIGRATION_STATE_FAILED,
    "outcome-unknown": types_pb2.MIGRATION_STATE_FAILED,
}


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
