"""What an operation shows of a migration under way: the share of RAM left to send."""

from __future__ import annotations

from coordinator.migrate import migration_progress
from protos.ferry.v1 import types_pb2

MiB = 1 << 20
ACTIVE = types_pb2.MIGRATION_STATE_ACTIVE


def status(
    state: types_pb2.MigrationState.ValueType,
    transferred: int,
    remaining: int,
    total: int = 1024 * MiB,
) -> types_pb2.MigrationStatus:
    return types_pb2.MigrationStatus(
        status=state,
        transferred=transferred,
        remaining=remaining,
        total=total,
    )


def test_progress_follows_the_ram_left_to_send_not_the_bytes_sent() -> None:
    # A 1 GiB guest with 16 MiB in use: sending them is most of round 0's work, but the
    # scan of the untouched rest is what is left, and it goes fast.
    early, message = migration_progress(status(ACTIVE, 8 * MiB, 768 * MiB))
    assert early == 0.25 and message == "active: 8 MiB sent, 768 MiB to go"
    later, _ = migration_progress(status(ACTIVE, 16 * MiB, 1 * MiB))
    assert later is not None and 0.25 < later <= 0.99


def test_a_migration_that_does_not_converge_stays_where_it_is() -> None:
    # Round after round the same 8 MiB are dirty again: more is sent, none gets closer.
    shown = {
        migration_progress(status(ACTIVE, sent * MiB, 8 * MiB, 64 * MiB))[0]
        for sent in (64, 80, 96)
    }
    assert shown == {1 - 8 / 64}


def test_progress_is_kept_outside_the_phases_that_move_memory() -> None:
    for state in (types_pb2.MIGRATION_STATE_SETUP, types_pb2.MIGRATION_STATE_COMPLETED):
        progress, message = migration_progress(status(state, 16 * MiB, 0))
        assert progress is None and message.endswith("16 MiB sent")
    assert migration_progress(status(types_pb2.MIGRATION_STATE_DEVICE, 16 * MiB, 0))[0] == 0.99
