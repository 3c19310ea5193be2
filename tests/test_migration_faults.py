"""Faults and cancels in every phase: the VM is never lost and never runs twice.

Before ``Complete`` is sent, every failure or cancel must leave the source VM running,
unchanged, and the destination's copy discarded. After it, the source must not resume on
its own: only the destination's answer (or the coordinator) settles who runs the guest.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
from test_migration_harness import FakeGuest, Loopback

from node.migration import (
    Abort,
    Ack,
    Cancelled,
    Complete,
    Completed,
    Error,
    Failed,
    Hello,
    Message,
    MigrationOptions,
    OutcomeUnknown,
    Pages,
    ResumeVM,
    SendMessage,
)

PHASES_BEFORE_COMPLETE = ["hello-sent", "round-0", "iterating", "switchover"]


def busy_loopback(**kwargs: object) -> Loopback:
    """A guest that needs a few rounds, with a window of one batch so every phase lasts."""
    guest = FakeGuest(2048, filled=1500, pages_per_slice=40, working_set=400, seed=7)
    return Loopback(guest, window=1, options=MigrationOptions(max_downtime_ms=3), **kwargs)  # type: ignore[arg-type]


def run_until_phase(lb: Loopback, phase: str) -> None:
    lb.run(until=lambda lb: lb.sender.phase == phase)


def assert_source_runs_on(lb: Loopback, ending: type) -> None:
    end = lb.outcome.source_end
    assert isinstance(end, ending), end
    assert not lb.guest.paused
    assert lb.guest.throttle == 0
    assert not lb.guest.log.enabled
    assert not lb.outcome.destination_running
    assert lb.outcome.restored == []


def test_busy_loopback_passes_through_every_phase() -> None:
    lb = busy_loopback()
    seen: set[str] = set()

    def note_phase(lb: Loopback) -> bool:
        seen.add(str(lb.sender.phase))
        return False

    lb.run(until=note_phase)
    assert {*PHASES_BEFORE_COMPLETE, "completed"} <= seen
    assert isinstance(lb.outcome.source_end, Completed)


# ---------------------------------------------------------------- refusals


def _with_hello(**changes: object):  # type: ignore[no-untyped-def]
    def tamper(msg: Message) -> Message:
        return dataclasses.replace(msg, **changes) if isinstance(msg, Hello) else msg  # type: ignore[arg-type]

    return tamper


@pytest.mark.parametrize(
    ("setup", "tamper", "reason"),
    [
        ({"dest_token": b"another-token"}, None, "bad-token"),
        ({"token": b""}, None, "bad-token"),
        ({"dest_config": "cfg-other"}, None, "config"),
        ({"dest_pages": 4096}, None, "ram-size"),
        ({}, _with_hello(protocol_version=99), "protocol-version"),
        ({}, _with_hello(page_size=65536), "page-size"),
    ],
)
def test_destination_refuses_a_mismatched_hello_before_any_ram_moves(
    setup: dict[str, object], tamper: object, reason: str
) -> None:
    guest = FakeGuest(1024, pages_per_slice=10)
    lb = Loopback(guest, **setup)  # type: ignore[arg-type]
    lb.run(tamper=tamper)  # type: ignore[arg-type]
    end = lb.outcome.source_end
    assert isinstance(end, Failed)
    assert f"destination refused the migration ({reason})" in end.reason
    assert lb.receiver.phase == "refused" and lb.outcome.destination_discarded
    assert not any(lb.dest_ram)
    assert not any(isinstance(m, Pages) for m in lb.outcome.sent)
    # The source VM was never paused nor even logged: it ran on untouched.
    assert guest.log.enable_calls == 0 and guest.pause_count == 0


# ---------------------------------------------------------------- corruption


def test_a_page_corrupted_in_flight_fails_the_digest_and_the_source_resumes() -> None:
    guest = FakeGuest(512, filled=300)
    before = bytes(guest.ram)
    lb = Loopback(guest, options=MigrationOptions(compression="none"))
    corrupted: list[int] = []

    def flip_one_byte(msg: Message) -> Message:
        if isinstance(msg, Pages) and len(msg.page_numbers) and not corrupted:
            payload = bytearray(msg.payload)
            payload[5000] ^= 0x01
            corrupted.append(msg.seq)
            return dataclasses.replace(msg, payload=bytes(payload))
        return msg

    lb.run(tamper=flip_one_byte)
    assert corrupted
    assert_source_runs_on(lb, Failed)
    end = lb.outcome.source_end
    assert isinstance(end, Failed) and "memory digest mismatch" in end.reason
    assert lb.guest.pause_count == 1 and lb.guest.resume_count == 1
    assert bytes(guest.ram) == before
    assert lb.outcome.destination_discarded


def test_a_destination_that_cannot_restore_the_state_fails_and_the_source_resumes() -> None:
    def broken_restore(state: dict[str, object]) -> None:
        raise RuntimeError("hart state schema 9 is newer than this node")

    lb = Loopback(FakeGuest(256, pages_per_slice=4), restore=broken_restore)
    lb.run()
    assert_source_runs_on(lb, Failed)
    end = lb.outcome.source_end
    assert isinstance(end, Failed) and "schema 9" in end.reason


def test_a_source_that_cannot_save_device_state_aborts_and_resumes() -> None:
    lb = Loopback(FakeGuest(256))

    def broken_save() -> dict[str, object]:
        raise ValueError("virtio queue in an impossible state")

    lb.sender._save_device_state = broken_save  # the one seam the harness has no option for
    lb.run()
    assert_source_runs_on(lb, Failed)
    assert lb.receiver.phase == "aborted"
    assert any(isinstance(m, Abort) for m in lb.outcome.sent)


# ---------------------------------------------------------------- lost connection


@pytest.mark.parametrize("phase", PHASES_BEFORE_COMPLETE)
def test_connection_lost_before_complete_keeps_the_vm_on_the_source(phase: str) -> None:
    lb = busy_loopback()
    run_until_phase(lb, phase)
    lb.drop_connection()
    assert_source_runs_on(lb, Failed)
    end = lb.outcome.source_end
    assert isinstance(end, Failed) and "connection to the destination lost" in end.reason
    assert lb.receiver.phase == "failed" and lb.outcome.destination_discarded
    assert lb.guest.resume_count == lb.guest.pause_count


def test_connection_lost_after_complete_leaves_the_outcome_to_the_coordinator() -> None:
    lb = busy_loopback()
    run_until_phase(lb, "switchover")
    lb.destination_stalled = True
    run_until_phase(lb, "wait-resumed")
    lb.drop_connection()
    end = lb.outcome.source_end
    assert isinstance(end, OutcomeUnknown) and "after the final message" in end.reason
    # The source stays paused: resuming it could make two running copies.
    assert lb.guest.paused and lb.guest.resume_count == 0
    assert lb.sender.stats()["status"] == "outcome-unknown"


def test_lost_resumed_message_is_an_unknown_outcome_not_a_resume() -> None:
    restored: list[dict[str, object]] = []

    def restore_then_lose_the_link(state: dict[str, object]) -> None:
        restored.append(state)
        lb.connected = False  # the Resumed answer never leaves the destination

    lb = busy_loopback(restore=restore_then_lose_the_link)
    lb.run()
    lb.drop_connection()
    assert isinstance(lb.outcome.source_end, OutcomeUnknown)
    assert restored and lb.outcome.destination_running and lb.guest.paused
    # Exactly one copy runs: the destination's.
    assert lb.guest.resume_count == 0


# ---------------------------------------------------------------- cancel


def test_cancel_before_start_sends_nothing() -> None:
    lb = busy_loopback()
    assert lb.sender.cancel() == [Cancelled("cancelled by request")]
    assert lb.sender.start() == []
    assert lb.outcome.sent == []
    stats = lb.sender.stats()
    assert stats["status"] == "cancelled" and stats["total-time"] == 0 == stats["transferred"]


@pytest.mark.parametrize("phase", PHASES_BEFORE_COMPLETE)
def test_cancel_in_each_phase_keeps_the_vm_on_the_source(phase: str) -> None:
    lb = busy_loopback()
    run_until_phase(lb, phase)
    lb.source_do(lb.sender.cancel("operator changed their mind"))
    lb.run()
    assert_source_runs_on(lb, Cancelled)
    assert lb.sender.stats()["status"] == "cancelled"
    assert isinstance(lb.outcome.sent[-1], Abort)
    assert lb.receiver.phase == "aborted" and lb.outcome.destination_discarded
    # Idempotent: a second cancel asks for nothing.
    assert lb.sender.cancel() == []


def test_cancel_after_complete_loses_the_race_to_a_destination_that_resumed() -> None:
    lb = busy_loopback()
    run_until_phase(lb, "switchover")
    lb.destination_stalled = True
    run_until_phase(lb, "wait-resumed")
    lb.source_do(lb.sender.cancel())
    assert lb.sender.stats()["status"] == "cancelling"
    assert lb.sender.cancel() == []
    lb.destination_stalled = False
    lb.run()
    # The destination had everything and resumed before it read the Abort.
    assert isinstance(lb.outcome.source_end, Completed)
    assert lb.outcome.destination_running and lb.guest.resume_count == 0


def test_cancel_after_complete_resumes_the_source_if_the_destination_discarded() -> None:
    lb = busy_loopback()
    run_until_phase(lb, "switchover")
    lb.destination_stalled = True
    run_until_phase(lb, "wait-resumed")
    lb.source_do(lb.sender.cancel())

    def corrupt_digest(msg: Message) -> Message:
        return Complete(msg.digest ^ 1) if isinstance(msg, Complete) else msg

    lb.destination_stalled = False
    lb.run(tamper=corrupt_digest)
    assert_source_runs_on(lb, Cancelled)
    assert lb.guest.resume_count == 1


# ---------------------------------------------------------------- stalls, timeouts, nonsense


def test_stalled_destination_times_out_and_the_source_runs_on() -> None:
    guest = FakeGuest(2048, filled=1500, pages_per_slice=5)
    lb = Loopback(guest, options=MigrationOptions(timeout_s=5))
    lb.run(until=lambda lb: lb.sender.phase == "round-0")
    lb.destination_stalled = True
    lb.run()
    assert_source_runs_on(lb, Failed)
    end = lb.outcome.source_end
    assert isinstance(end, Failed) and end.reason == "migration timed out after 5 s"


def test_silent_destination_after_complete_is_an_unknown_outcome() -> None:
    lb = busy_loopback()
    run_until_phase(lb, "switchover")
    lb.destination_stalled = True
    lb.run()
    end = lb.outcome.source_end
    assert isinstance(end, OutcomeUnknown) and "no answer" in end.reason
    assert lb.guest.paused


@pytest.mark.parametrize(
    "reply",
    [Ack(acked_seq=10**6, credit=1), Ack(acked_seq=0, credit=10**9)],
)
def test_nonsense_from_the_destination_fails_cleanly(reply: Ack) -> None:
    lb = busy_loopback()
    run_until_phase(lb, "iterating")
    lb.source_do(lb.sender.receive(reply))
    assert_source_runs_on(lb, Failed)
    end = lb.outcome.source_end
    assert isinstance(end, Failed) and "protocol error" in end.reason


def test_destination_error_mid_stream_stops_the_migration() -> None:
    lb = busy_loopback()
    run_until_phase(lb, "round-0")
    lb.source_do(lb.sender.receive(Error("disk full")))
    assert_source_runs_on(lb, Failed)
    assert lb.outcome.source_end == Failed("destination failed: disk full")
    # No Abort needed: the destination already gave up.
    assert not any(
        isinstance(a, SendMessage) and isinstance(a.message, Abort) for a in lb.outcome.source
    )


def test_source_resume_happens_only_after_a_pause() -> None:
    for phase in PHASES_BEFORE_COMPLETE:
        lb = busy_loopback()
        run_until_phase(lb, phase)
        lb.source_do(lb.sender.cancel())
        resumes = [a for a in lb.outcome.source if isinstance(a, ResumeVM)]
        assert len(resumes) == (1 if phase == "switchover" else 0), phase


def test_guest_writes_after_a_failed_migration_are_not_logged() -> None:
    lb = busy_loopback()
    run_until_phase(lb, "iterating")
    lb.drop_connection()
    lb.guest.write(np.array([1, 2, 3]))
    assert not lb.guest.log.bitmap.any()


def test_nonsense_field_types_from_the_destination_fail_cleanly() -> None:
    lb = busy_loopback()
    run_until_phase(lb, "round-0")
    lb.source_do(lb.sender.receive(Ack(acked_seq="1", credit=1)))  # type: ignore[arg-type]
    end = lb.outcome.source_end
    assert isinstance(end, Failed) and "invalid Ack" in end.reason
    assert_source_runs_on(lb, Failed)
