"""Live migration, sans-I/O: the protocol as pure state machines, the I/O elsewhere.

In the manner of h11 and wsproto, nothing in this package opens a socket, starts a thread
or sleeps. :class:`MigrationSender` (source) and :class:`MigrationReceiver` (destination)
take the peer's messages (:mod:`.messages`) and the passing of time, and return actions
(:mod:`.actions`) for their driver, the VMM worker, to carry out in order: send this
message, pause or resume the vCPU, throttle it, discard the VM, report the outcome. The
worker owns the gRPC stream and maps messages onto ``protos/ferry/v1/migration.proto``;
that mapping is the only place protobuf appears. Because of this split every phase and
every fault can be driven in a unit test, in memory, without processes or sockets.

The modules, one concept each:

* :mod:`.messages` — the wire vocabulary (Hello, Pages, DeviceState, Complete, Abort / Ack,
  Refusal, Resumed, Error) as dataclasses.
* :mod:`.encoding` — page batches: raw, zstd or lz4 chosen per batch only when it wins,
  zero-page markers, and strict bounded decoding of untrusted batches.
* :mod:`.digest` — the incremental memory digest both ends keep, so that verifying RAM
  at switchover costs only the last round's pages.
* :mod:`.sender` — pre-copy rounds, flow control, pacing, the convergence policy
  (throttle, then a larger downtime budget, then cancel), switchover, statistics.
* :mod:`.receiver` — Hello checks before any RAM moves, validated page application,
  digest and device-state verification, resume.
* :mod:`.residency` — which pages of anonymous guest RAM were never backed, so round 0
  need not fault them in to find zeros (a hint the driver passes to the sender).
* :mod:`.actions` — what the state machines ask of their driver.
* :mod:`.wire` — the one-to-one mapping onto the protobuf messages (import it explicitly:
  the core itself does not depend on protobuf).
"""

from node.migration.actions import (
    Action,
    Cancelled,
    Completed,
    DiscardVM,
    Failed,
    GuestRunning,
    OutcomeUnknown,
    PauseVM,
    ResumeVM,
    SendMessage,
    SetThrottle,
)
from node.migration.digest import MemoryDigest, ram_digest
from node.migration.encoding import (
    BATCH_PAGES,
    BatchError,
    CompressionPolicy,
    DecodedBatch,
    decode_batch,
)
from node.migration.messages import (
    PROTOCOL_VERSION,
    Abort,
    Ack,
    Complete,
    DeviceState,
    Encoding,
    Error,
    Hello,
    Message,
    Pages,
    Refusal,
    RefusalReason,
    Resumed,
)
from node.migration.receiver import MigrationReceiver, ReceiverPhase
from node.migration.sender import (
    REPORTED_ROUNDS,
    MigrationOptions,
    MigrationSender,
    Phase,
    RoundStats,
)

__all__ = [
    "BATCH_PAGES",
    "PROTOCOL_VERSION",
    "REPORTED_ROUNDS",
    "Abort",
    "Ack",
    "Action",
    "BatchError",
    "Cancelled",
    "Complete",
    "Completed",
    "CompressionPolicy",
    "DecodedBatch",
    "DeviceState",
    "DiscardVM",
    "Encoding",
    "Error",
    "Failed",
    "GuestRunning",
    "Hello",
    "MemoryDigest",
    "Message",
    "MigrationOptions",
    "MigrationReceiver",
    "MigrationSender",
    "OutcomeUnknown",
    "Pages",
    "PauseVM",
    "Phase",
    "ReceiverPhase",
    "Refusal",
    "RefusalReason",
    "ResumeVM",
    "Resumed",
    "RoundStats",
    "SendMessage",
    "SetThrottle",
    "decode_batch",
    "ram_digest",
]
