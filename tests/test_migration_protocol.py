"""Sender and receiver back to back: a migrated guest's RAM and state arrive intact."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from test_migration_harness import PAGE, FakeGuest, Loopback

import node.migration.sender as sender_module
from node.migration import (
    Completed,
    DeviceState,
    MigrationOptions,
    Pages,
    PauseVM,
    ResumeVM,
    ram_digest,
)

QUERY_MIGRATE_KEYS = {
    "status",
    "setup-time",
    "total-time",
    "downtime",
    "expected-downtime",
    "transferred",
    "remaining",
    "total",
    "duplicate",
    "normal",
    "compressed-bytes",
    "dirty-pages-rate",
    "mbps",
    "dirty-sync-count",
    "cpu-throttle-percentage",
    "rounds",
}


def assert_migrated(lb: Loopback) -> Completed:
    """Run the migration to its end and check it moved the VM whole."""
    lb.run()
    end = lb.outcome.source_end
    assert isinstance(end, Completed), end
    assert bytes(lb.guest.ram) == bytes(lb.dest_ram)
    assert lb.outcome.restored == [lb.device_state]
    assert lb.outcome.destination_running
    # The source paused once and never ran again.
    assert lb.guest.pause_count == 1 and lb.guest.resume_count == 0
    return end


def test_idle_guest_migrates_in_one_round_and_sends_no_zero_pages() -> None:
    guest = FakeGuest(1024, filled=100)
    lb = Loopback(guest)
    end = assert_migrated(lb)
    sent = [m for m in lb.outcome.sent if isinstance(m, Pages)]
    assert sum(len(m.page_numbers) for m in sent) == 100
    assert all(len(m.page_numbers) <= 256 for m in sent)
    assert [r.number for r in lb.sender.rounds] == [0]
    stats = end.stats
    assert set(stats) == QUERY_MIGRATE_KEYS
    assert stats["status"] == "completed"
    assert stats["normal"] == 100
    assert stats["duplicate"] == 1024 - 100
    assert stats["total"] == 1024 * PAGE
    assert stats["remaining"] == 0
    assert stats["transferred"] >= 100 * PAGE
    assert stats["mbps"] > 0
    assert stats["downtime"] >= 0
    assert end.resumed_at >= end.paused_at


def test_a_page_is_zero_only_if_every_byte_is_zero() -> None:
    """Round 0 judges most pages by their first word: a page that starts with zeros but
    has data further on must still be sent, a zero page must not."""
    guest = FakeGuest(64, filled=0)
    guest.pages[3, -1] = 1  # only the very last byte
    guest.pages[5, 8] = 1  # the second word
    guest.pages[7, 0] = 1  # only the first byte
    lb = Loopback(guest)
    end = assert_migrated(lb)
    sent = {int(n) for m in lb.outcome.sent if isinstance(m, Pages) for n in m.page_numbers}
    assert sent == {3, 5, 7}
    assert end.stats["duplicate"] == 64 - 3


def test_rounds_end_when_the_destination_acknowledges_a_few_batches_at_a_time() -> None:
    """A 16-batch window is answered every 4th batch: each round still ends (the sender
    asks for the last Acks with a batch that lists no page) and the VM moves whole."""
    guest = FakeGuest(4096, pages_per_slice=64, working_set=700, seed=5)
    lb = Loopback(guest, window=16, options=MigrationOptions(max_downtime_ms=2))
    assert_migrated(lb)
    assert len(lb.sender.rounds) >= 2
    batches = [m for m in lb.outcome.sent if isinstance(m, Pages)]
    asks = [m for m in batches if not len(m.page_numbers) and not len(m.zero_pages)]
    # At most one such batch per round, never more than the rounds that waited for one.
    assert 1 <= len(asks) <= len(lb.sender.rounds)
    assert len({m.round for m in asks}) == len(asks)
    assert ram_digest(memoryview(lb.dest_ram)) == lb.receiver.digest.value


def test_device_state_is_saved_only_after_the_pause_and_sent_before_complete() -> None:
    lb = Loopback(FakeGuest(256, pages_per_slice=4), device_state={"uart": b"\x01", "n": 3})
    lb.run()
    actions = lb.outcome.source
    pause = next(i for i, a in enumerate(actions) if isinstance(a, PauseVM))
    kinds = [type(m).__name__ for m in lb.outcome.sent]
    assert kinds[-2:] == ["DeviceState", "Complete"]
    assert kinds.index("DeviceState") > sum(1 for a in actions[:pause] if hasattr(a, "message"))
    assert lb.outcome.restored == [{"uart": b"\x01", "n": 3}]
    assert isinstance(lb.outcome.sent[-2], DeviceState)


def test_busy_guest_iterates_until_the_dirty_set_fits_the_downtime_budget() -> None:
    # 100 MB/s link, ~1000 pages dirtied per round 0 (~40 ms): several rounds, then switch.
    guest = FakeGuest(4096, pages_per_slice=64, working_set=512, seed=3)
    lb = Loopback(guest, options=MigrationOptions(max_downtime_ms=2))
    end = assert_migrated(lb)
    rounds = lb.sender.rounds
    assert len(rounds) >= 2
    assert rounds[-1].expected_downtime_ms <= 2
    assert all(r.expected_downtime_ms > 2 for r in rounds[:-1])
    assert end.stats["dirty-sync-count"] == len(rounds) + 1  # + the final fetch while paused
    assert end.stats["dirty-pages-rate"] > 0
    assert ram_digest(memoryview(lb.dest_ram)) == lb.receiver.digest.value


def test_pages_that_became_zero_are_sent_as_markers() -> None:
    guest = FakeGuest(512, filled=512, pages_per_slice=16, zero_fraction=1.0, working_set=64)
    lb = Loopback(guest, options=MigrationOptions(max_downtime_ms=0.1))
    assert_migrated(lb)
    later = [m for m in lb.outcome.sent if isinstance(m, Pages) and m.round > 0]
    assert sum(len(m.zero_pages) for m in later) > 0
    assert all(len(m.page_numbers) == 0 for m in later)


def test_compressed_migration_arrives_intact_and_smaller() -> None:
    for mode in ("zstd", "lz4"):
        guest = FakeGuest(512, filled=0, pages_per_slice=8, working_set=128)
        words = guest.pages.view(np.uint64)
        words[:200] = guest.rng.integers(0, 8, size=(200, PAGE // 8), dtype=np.uint64)
        lb = Loopback(guest, options=MigrationOptions(compression=mode))
        end = assert_migrated(lb)
        assert 0 < end.stats["compressed-bytes"] < 200 * PAGE / 2
        assert end.stats["transferred"] < 200 * PAGE / 2 + 200 * PAGE * 0.2
        assert any(isinstance(m, Pages) and m.encoding == mode for m in lb.outcome.sent)


def test_stats_are_readable_during_the_migration() -> None:
    lb = Loopback(FakeGuest(2048, filled=2048))
    seen: list[dict[str, object]] = []

    def sample(lb: Loopback) -> bool:
        seen.append(lb.sender.stats())
        return False

    lb.run(until=sample)
    statuses = [s["status"] for s in seen]
    assert statuses[0] == "setup"
    assert "active" in statuses and "device" in statuses
    remaining = [int(s["remaining"]) for s in seen if s["status"] == "active"]  # type: ignore[call-overload]
    assert remaining[0] > remaining[-1]
    assert all(set(s) == QUERY_MIGRATE_KEYS for s in seen)


def test_stats_list_every_round_and_the_switchover() -> None:
    guest = FakeGuest(2048, filled=1024, pages_per_slice=16, working_set=256)
    lb = Loopback(guest)
    end = assert_migrated(lb)
    rounds = end.stats["rounds"]
    assert [r["number"] for r in rounds] == list(range(len(rounds)))
    assert [r["switchover"] for r in rounds] == [False] * (len(rounds) - 1) + [True]
    # A dirty-log fetch ends each round; the switchover's is the one made while paused.
    assert len(rounds) == end.stats["dirty-sync-count"] >= 2
    assert rounds[0]["pages"] >= 1024 and rounds[0]["bytes"] >= 1024 * PAGE
    assert sum(r["bytes"] for r in rounds) <= end.stats["transferred"]
    # Each pre-copy round's dirtied pages are the next round's work (zero markers included).
    for before, after in itertools.pairwise(rounds[:-1]):
        assert after["pages"] == before["dirty_pages"]
    assert rounds[-1]["dirty_pages"] == 0
    assert all(r["duration_ms"] >= 0 and r["mbps"] >= 0 for r in rounds)


def test_stopped_guest_is_not_resumed_by_a_completed_migration() -> None:
    lb = Loopback(FakeGuest(128))
    lb.run()
    assert not any(isinstance(a, ResumeVM) for a in lb.outcome.source)
    assert not lb.guest.log.enabled


@settings(max_examples=25, deadline=None)
@given(
    pages=st.sampled_from([64, 300, 1024]),
    filled=st.floats(0, 1),
    per_slice=st.integers(0, 200),
    working=st.floats(0.05, 1),
    zero_fraction=st.floats(0, 0.5),
    bandwidth=st.sampled_from([5e6, 50e6, 1e9]),
    compression=st.sampled_from(["none", "auto", "zstd", "lz4"]),
    seed=st.integers(0, 2**32 - 1),
    via_protobuf=st.booleans(),
)
def test_destination_ram_equals_source_ram_for_any_dirtying_schedule(
    pages: int,
    filled: float,
    per_slice: int,
    working: float,
    zero_fraction: float,
    bandwidth: float,
    compression: str,
    seed: int,
    via_protobuf: bool,
) -> None:
    guest = FakeGuest(
        pages,
        seed=seed,
        filled=int(pages * filled),
        pages_per_slice=per_slice,
        working_set=max(1, int(pages * working)),
        zero_fraction=zero_fraction,
    )
    lb = Loopback(
        guest,
        link_bandwidth=bandwidth,
        options=MigrationOptions(max_downtime_ms=5, compression=compression),
        via_protobuf=via_protobuf,
    )
    outcome = lb.run(max_steps=50000)
    end = outcome.source_end
    if isinstance(end, Completed):
        assert bytes(guest.ram) == bytes(lb.dest_ram)
        assert lb.receiver.digest.value == ram_digest(memoryview(guest.ram))
    else:
        # The policy may give up on a guest that outruns the link; the source then runs on.
        assert lb.sender.phase == "cancelled", end
        assert not guest.paused
        assert outcome.destination_discarded


def test_scanning_zero_ram_yields_to_the_guest_between_chunks(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(sender_module, "_SCAN_CHUNK", 8)
    monkeypatch.setattr(sender_module, "_SCAN_CHUNKS_PER_POLL", 2)
    guest = FakeGuest(256, filled=0)
    guest.pages[255] = 1
    lb = Loopback(guest)
    lb.start()
    lb.source_do(lb.sender.receive(lb.receiver.receive(lb.to_dest.popleft())[0].message))  # type: ignore[union-attr]
    yields = 0
    while not lb.outcome.sent or not isinstance(lb.outcome.sent[-1], Pages):
        actions = lb.sender.poll()
        if not actions:
            # Nothing to send yet, but the sender asks to be polled again right away.
            assert lb.sender.ready_at == lb.clock.now
            yields += 1
        lb.source_do(actions)
    assert yields == 256 // (8 * 2) - 1
    lb.run()
    assert_migrated(lb)


class StepTimer:
    """A compressor stopwatch: every reading is 0.5 ms after the previous one."""

    def __init__(self) -> None:
        self.t = 0.0

    def __call__(self) -> float:
        self.t += 0.0005
        return self.t


@pytest.mark.parametrize(
    ("transport_seconds", "compressed"),
    [(None, True), (1e-6, False), (1.0, True)],
    ids=["loop-throughput-slow", "reported-link-fast", "reported-link-slow"],
)
def test_auto_compression_follows_the_link_the_driver_reports(
    transport_seconds: float | None, compressed: bool
) -> None:
    # Enough batches that some are encoded after the first acknowledgements come back.
    guest = FakeGuest(4096, filled=0)
    words = guest.pages.view(np.uint64)
    words[:2600] = guest.rng.integers(0, 8, size=(2600, PAGE // 8), dtype=np.uint64)
    lb = Loopback(
        guest,
        link_bandwidth=5e6,
        compression_timer=StepTimer(),
        transport_seconds=transport_seconds,
    )
    end = assert_migrated(lb)
    assert (end.stats["compressed-bytes"] > 0) is compressed


def test_auto_compression_stops_once_a_slow_link_turns_fast() -> None:
    # A busy moment makes the link look slow, so "auto" compresses; its periodic raw probes
    # then find the link fast again, and the rest goes raw (a compressed window alone
    # could never show that, since compressing is what makes fewer bytes cross).
    guest = FakeGuest(12288, filled=0)
    words = guest.pages.view(np.uint64)
    words[:] = guest.rng.integers(0, 8, size=words.shape, dtype=np.uint64)
    lb = Loopback(guest, link_bandwidth=5e6, compression_timer=StepTimer())
    lb.run(until=lambda lb: lb.sender.stats()["compressed-bytes"] > 0)
    assert lb.sender.stats()["compressed-bytes"] > 0
    lb.link_bandwidth = 10e9
    end = assert_migrated(lb)
    assert isinstance(end, Completed)
    batches = [m for m in lb.outcome.sent if isinstance(m, Pages) and len(m.page_numbers)]
    assert [m.encoding for m in batches[-8:]] == ["raw"] * 8
