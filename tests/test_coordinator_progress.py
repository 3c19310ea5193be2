"""What an operation shows of a migration: the share of RAM left to send while it runs, and
its rounds."""

from __future__ import annotations

from coordinator.migrate import migration_progress
from coordinator.views import migration_json, migration_rounds
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
    assert early == 0.25 and message == "active, round 0: 8 MiB sent, 768 MiB to go"
    later, _ = migration_progress(status(ACTIVE, 16 * MiB, 1 * MiB))
    assert later is not None and 0.25 < later <= 0.99


def test_a_migration_that_does_not_converge_stays_where_it_is() -> None:
    # Round after round the same 8 MiB are dirty again: more is sent, none gets closer.
    shown = {
        migration_progress(status(ACTIVE, sent * MiB, 8 * MiB, 64 * MiB))[0]
        for sent in (64, 80, 96)
    }
    assert shown == {1 - 8 / 64}
    # The message says which round it is and how hard the policy is holding the guest back.
    stuck = status(ACTIVE, 96 * MiB, 8 * MiB, 64 * MiB)
    stuck.rounds.add(number=0)
    stuck.rounds.add(number=1)
    stuck.cpu_throttle_percentage = 30
    assert migration_progress(stuck)[1] == (
        "active, round 2: 96 MiB sent, 8 MiB to go, vCPU throttled 30%"
    )


def test_progress_is_kept_outside_the_phases_that_move_memory() -> None:
    for state in (types_pb2.MIGRATION_STATE_SETUP, types_pb2.MIGRATION_STATE_COMPLETED):
        progress, message = migration_progress(status(state, 16 * MiB, 0))
        assert progress is None and message.endswith("16 MiB sent")
    assert migration_progress(status(types_pb2.MIGRATION_STATE_DEVICE, 16 * MiB, 0))[0] == 0.99


def test_the_rounds_table_shows_each_rounds_rate_and_the_policys_state() -> None:
    m = status(types_pb2.MIGRATION_STATE_COMPLETED, 130 * MiB, 0)
    assert migration_rounds(m) == ""
    m.rounds.add(number=0, pages=32768, bytes=128 * MiB, duration_ms=200.0, dirty_pages=500)
    m.rounds[0].expected_downtime_ms, m.rounds[0].downtime_budget_ms = 3.3, 300.0
    m.rounds.add(number=1, pages=500, bytes=2 * MiB, duration_ms=2.0, switchover=True)
    lines = migration_rounds(m).splitlines()
    assert lines[0].split() == [
        "ROUND", "PAGES", "SENT", "MS", "MB/S", "DIRTIED", "EXPECT-DOWN-MS", "THROTTLE",
        "BUDGET-MS",
    ]  # fmt: skip
    assert lines[1].split() == ["0", "32768", "128M", "200.0", "671", "500", "3.3", "0%", "300"]
    assert lines[2].split()[:6] == ["switchover", "500", "2M", "2.0", "1049", "-"]
    assert [r["number"] for r in migration_json(m)["rounds"]] == [0, 1]
    assert migration_json(m)["rounds"][1]["switchover"] is True
