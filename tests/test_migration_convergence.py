"""The convergence policy: stall → throttle → larger downtime budget → cancel, by rule.

The guest here dirties its working set faster than the link drains it, so the remaining
bytes stop falling after a couple of rounds. Time is the harness's fake clock, so every
ladder below is exact and the same on every machine.
"""

from __future__ import annotations

import pytest
from test_migration_harness import FakeGuest, Loopback

from node.migration import REPORTED_ROUNDS, Cancelled, Completed, MigrationOptions, Pages

LADDER = [20, 30, 40, 50, 60, 70, 80, 90, 99]


def hot_guest(obeys_throttle: bool) -> FakeGuest:
    # ~360 pages dirty per round against a 100 MB/s link: ~15 ms of predicted downtime.
    return FakeGuest(
        4096, filled=2048, pages_per_slice=400, working_set=2048, obeys_throttle=obeys_throttle
    )


def migrate(guest: FakeGuest, **options: object) -> Loopback:
    lb = Loopback(guest, options=MigrationOptions(max_downtime_ms=10, **options))  # type: ignore[arg-type]
    lb.run(max_steps=100000)
    return lb


def test_a_guest_that_outruns_every_step_is_cancelled_with_the_reason() -> None:
    lb = migrate(hot_guest(obeys_throttle=False), max_downtime_max_ms=12)
    # Throttle 20 % then +10 % per unproductive round up to 99 %, lifted at the end.
    assert lb.outcome.throttles() == [*LADDER, 0]
    budgets = [r.downtime_budget_ms for r in lb.sender.rounds]
    raised = sorted(set(budgets))
    assert raised == [10, 10.5, 11, 11.5, 12]
    assert budgets == sorted(budgets)
    end = lb.outcome.source_end
    assert isinstance(end, Cancelled)
    assert end.reason.startswith("migration did not converge: ")
    assert "throttled 99%" in end.reason and "downtime budget of 12 ms" in end.reason
    assert not lb.guest.paused and lb.guest.pause_count == 0
    assert lb.receiver.phase == "aborted"
    assert lb.sender.stats()["cpu-throttle-percentage"] == 0


def test_escalation_waits_for_a_stall_of_stall_rounds() -> None:
    lb = migrate(hot_guest(obeys_throttle=False), max_downtime_max_ms=12, stall_rounds=3)
    rounds = lb.sender.rounds
    first_throttled = next(r.number for r in rounds if r.throttle_percent)
    # Round 0 and 1 make progress; rounds 2, 3, 4 do not; the throttle starts after round 4.
    assert [r.dirty_pages < rounds[0].dirty_pages * 0.9 for r in rounds[1:3]] == [True, True]
    assert first_throttled == 5


def test_throttling_a_guest_that_slows_down_lets_it_converge() -> None:
    lb = migrate(hot_guest(obeys_throttle=True))
    assert isinstance(lb.outcome.source_end, Completed)
    throttles = lb.outcome.throttles()
    assert throttles and throttles == LADDER[: len(throttles)] and throttles[-1] < 99
    assert bytes(lb.guest.ram) == bytes(lb.dest_ram)


def test_a_raised_downtime_budget_lets_a_hot_guest_switch_over() -> None:
    lb = migrate(hot_guest(obeys_throttle=False), max_downtime_max_ms=40)
    assert isinstance(lb.outcome.source_end, Completed)
    assert lb.outcome.throttles() == LADDER
    assert bytes(lb.guest.ram) == bytes(lb.dest_ram)


def test_without_auto_converge_the_budget_is_raised_then_the_migration_cancelled() -> None:
    lb = migrate(hot_guest(obeys_throttle=False), max_downtime_max_ms=12, auto_converge=False)
    assert lb.outcome.throttles() == []
    end = lb.outcome.source_end
    assert isinstance(end, Cancelled) and "throttled 0%" in end.reason


def test_the_policy_is_deterministic() -> None:
    runs = [migrate(hot_guest(obeys_throttle=False), max_downtime_max_ms=12) for _ in range(2)]
    assert runs[0].sender.rounds == runs[1].sender.rounds
    assert runs[0].outcome.source_end == runs[1].outcome.source_end


def test_max_bandwidth_paces_the_stream() -> None:
    guest = FakeGuest(4096, filled=2048)
    lb = Loopback(guest, link_bandwidth=1e9, options=MigrationOptions(max_bandwidth=10e6))
    held_back: list[float] = []

    def note_pacing(lb: Loopback) -> bool:
        if lb.sender.ready_at is not None:
            held_back.append(lb.sender.ready_at)
        return False

    lb.run(until=note_pacing)
    assert held_back
    assert isinstance(lb.outcome.source_end, Completed)
    round0 = lb.sender.rounds[0]
    # The first batch may go at once (a burst of one batch); the rest follow the rate.
    one_batch = 256 * 4096 + 2048
    assert round0.duration_s >= (round0.bytes - one_batch) / 10e6
    # Unpaced, the same link would move it in 1/100 of the time.
    assert round0.duration_s > round0.bytes / 10e6 * 0.8


def test_every_round_reports_its_measurements() -> None:
    lb = migrate(hot_guest(obeys_throttle=True))
    sent = [m for m in lb.outcome.sent if isinstance(m, Pages)]
    assert sum(r.bytes for r in lb.sender.rounds) <= lb.sender.stats()["transferred"]
    for r in lb.sender.rounds:
        assert r.duration_s > 0 and r.bandwidth > 0
        assert r.dirty_rate == pytest.approx(r.dirty_pages / r.duration_s)
    assert {m.round for m in sent} == {r.number for r in lb.sender.rounds} | {
        lb.sender.rounds[-1].number + 1
    }


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"compression": "gzip"}, "unknown compression 'gzip'"),
        ({"max_downtime_ms": 0}, "max_downtime_ms must be positive"),
        ({"max_downtime_max_ms": 100}, "at least max_downtime_ms"),
        ({"max_bandwidth": -1}, "max_bandwidth"),
        ({"timeout_s": -5}, "timeout_s"),
    ],
)
def test_bad_options_are_one_line_errors(options: dict[str, object], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        MigrationOptions(**options).check()  # type: ignore[arg-type]


def test_a_long_migration_lists_round_0_and_its_latest_rounds() -> None:
    # Many budget steps make a ladder longer than the rounds a status lists.
    lb = migrate(hot_guest(obeys_throttle=False), max_downtime_max_ms=14, downtime_steps=100)
    assert isinstance(lb.outcome.source_end, Cancelled)
    assert len(lb.sender.rounds) > REPORTED_ROUNDS
    listed = [r["number"] for r in lb.sender.stats()["rounds"]]
    last = lb.sender.rounds[-1].number
    assert listed == [0, *range(last - REPORTED_ROUNDS + 2, last + 1)]
