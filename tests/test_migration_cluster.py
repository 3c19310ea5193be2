"""Live migration between real ferry-node agents and their VMM worker processes.

The workload is the ``dirtier`` guest: it rewrites a working set of pages all the time and
checks its own memory every tick, printing ``CORRUPT`` and failing if a page was lost or
stale; its ticks are numbered, so a gap or a repeat in the console shows up at once. Every
test drives the nodes as the coordinator does (PrepareIncoming on the destination,
StartMigration on the source, WatchMigration to follow).
"""

from __future__ import annotations

import threading
import time

import grpc
import pytest
from cluster import (
    DIRTIER,
    MEMORY,
    Cluster,
    assert_keeps_running_on,
    migrate,
    prepare,
    start_dirtier,
    start_migration,
    state,
    ticks,
    wait_migration,
    wait_ticks,
)

from protos.ferry.v1 import node_pb2, types_pb2
from vmcore import ramfile

COMPLETED = types_pb2.MIGRATION_STATE_COMPLETED
RUNNING = types_pb2.VM_STATE_RUNNING


# -- continuity ---------------------------------------------------------------------------


def test_a_migrated_dirtier_keeps_its_ticks_sums_and_console(cluster: Cluster) -> None:
    a, b = cluster.node("node-a"), cluster.node("node-b")
    a.create("vm", DIRTIER, memory=64 << 20, append="wss=8 rate=20 ticks=25", start=False)
    prepared = prepare(b, a.get("vm").spec)  # before the guest's 2.5 s start to run out
    a.stub.StartVM(node_pb2.VMRef(name="vm"), timeout=60)
    wait_ticks(a, "vm", 3)
    final = migrate(a, b, "vm", prepared=prepared)
    assert final.status == COMPLETED, final.error
    assert final.total == 64 << 20 and final.transferred >= 8 << 20
    assert final.downtime_ms > 0 and final.dirty_sync_count >= 2
    assert final.normal > 0 and final.duplicate > 0 and final.destination
    assert 0 < final.downtime_ms <= final.total_time_ms
    # Where the downtime went: every phase, none negative, and together they span at least
    # the guest's real stop (both ends share this host's clock): the vCPU stopped on the
    # source, then resumed on the destination, then the source heard of it.
    phases = dict(final.downtime_phases_ms)
    assert set(phases) == {"pause", "final-round", "destination"}
    assert min(phases.values()) >= 0
    assert 0 < final.resumed_at - final.paused_at <= sum(phases.values()) / 1000
    # Round by round: round 0 carried the working set, every dirty-log fetch ended a
    # round, and the switchover (sent with the guest paused) came last.
    rounds = list(final.rounds)
    assert [r.number for r in rounds] == list(range(len(rounds)))
    assert len(rounds) == final.dirty_sync_count
    assert rounds[-1].switchover and not any(r.switchover for r in rounds[:-1])
    assert rounds[0].bytes >= 8 << 20 and sum(r.bytes for r in rounds) <= final.transferred
    # The source's copy never runs again and holds no capacity; the destination owns the VM.
    assert a.get("vm").state == types_pb2.VM_STATE_MIGRATED
    deadline = time.monotonic() + 30
    while (source := a.get("vm")).worker_pid and time.monotonic() < deadline:
        time.sleep(0.05)  # the worker lets its console followers drain, then exits
    assert source.state == types_pb2.VM_STATE_MIGRATED and source.worker_pid == 0
    assert a.stub.NodeInfo(node_pb2.NodeInfoRequest()).used.memory_bytes == 0
    assert a.stub.GetMigration(node_pb2.VMRef(name="vm")).status == COMPLETED
    # A console follower continues on the destination at the offset it reached on the
    # source: no gap, no repeated byte.
    seen, _ = a.console("vm", follow=False)
    assert len(seen) == source.console_bytes
    rest, _ = b.console("vm", offset=len(seen), follow=True)
    done = b.wait_state("vm", types_pb2.VM_STATE_STOPPED)
    assert done.exit_code == 0
    everything, _ = b.console("vm", follow=False)
    assert everything == seen + rest
    assert len(ticks(everything)) == 25 and b"dirtier: done" in everything


def test_a_migrated_deterministic_vm_prints_exactly_what_an_unmigrated_one_does(
    cluster: Cluster,
) -> None:
    a, b = cluster.node("node-a"), cluster.node("node-b")
    append = "wss=2 rate=20 ticks=12"
    a.create("mig", DIRTIER, memory=MEMORY, append=append, deterministic=True, start=False)
    # Prepared before the guest runs: it is done after a few CPU seconds, and the incoming
    # worker's start-up competes for the same cores.
    prepared = prepare(b, a.get("mig").spec)
    a.create("ref", DIRTIER, memory=MEMORY, append=append, deterministic=True)
    a.stub.StartVM(node_pb2.VMRef(name="mig"), timeout=60)
    wait_ticks(a, "mig", 3)
    final = migrate(a, b, "mig", prepared=prepared)
    assert final.status == COMPLETED, final.error
    assert b.wait_state("mig", types_pb2.VM_STATE_STOPPED).exit_code == 0
    assert a.wait_state("ref", types_pb2.VM_STATE_STOPPED).exit_code == 0
    migrated, _ = b.console("mig", follow=False)
    unmigrated, _ = a.console("ref", follow=False)
    assert migrated == unmigrated
    assert len(ticks(migrated)) == 12


def test_a_vm_goes_round_three_nodes_and_home(cluster: Cluster) -> None:
    a, b, c = cluster.node("node-a"), cluster.node("node-b"), cluster.node("node-c")
    start_dirtier(a)
    for source, destination in [(a, b), (b, c), (c, a)]:
        final = migrate(source, destination, "vm")
        assert final.status == COMPLETED, final.error
        assert source.get("vm").state == types_pb2.VM_STATE_MIGRATED
    # The copy that left node-a was replaced by the one that came back.
    assert_keeps_running_on(a, "vm", b, c)
    assert b.get("vm").state == types_pb2.VM_STATE_MIGRATED
    # The coordinator forgets a moved-away copy with DestroyVM.
    b.stub.DestroyVM(node_pb2.VMRef(name="vm"))
    assert state(b, "vm") == types_pb2.VM_STATE_UNSPECIFIED


def test_a_vm_can_move_straight_back_to_the_node_it_just_left(cluster: Cluster) -> None:
    a, b = cluster.node("node-a"), cluster.node("node-b")
    start_dirtier(a)
    # Someone follows the console on node-a: when the VM leaves, node-a's worker lets the
    # follower drain before it exits, so the copy that left is still there a moment.
    follower = threading.Thread(target=a.console, args=("vm",), daemon=True)
    follower.start()
    for source, destination in [(a, b), (b, a)]:
        # No pause between: the copy that just left may still be winding down its worker.
        final = migrate(source, destination, "vm")
        assert final.status == COMPLETED, final.error
    assert_keeps_running_on(a, "vm", b)
    follower.join(timeout=30)


def test_a_vm_moves_between_a_node_with_huge_page_ram_and_one_without(cluster: Cluster) -> None:
    try:
        ramfile.check_backing("huge")
    except ramfile.RAMBackingError as e:
        pytest.skip(str(e))
    a, b = cluster.node("node-a", "--ram-backing", "huge"), cluster.node("node-b")
    start_dirtier(a)
    assert huge_mapped_kib(a.get("vm").worker_pid) > 0
    for source, destination in [(a, b), (b, a)]:
        final = migrate(source, destination, "vm")
        assert final.status == COMPLETED, final.error
    # The dirtier checks every page of its working set each tick: a page lost or misplaced
    # on either kind of RAM would print CORRUPT, which fails the wait for its ticks.
    assert_keeps_running_on(a, "vm", b)
    assert huge_mapped_kib(a.get("vm").worker_pid) > 0


def huge_mapped_kib(pid: int) -> int:
    """How much of a process's shared file memory it maps in huge pages."""
    with open(f"/proc/{pid}/smaps_rollup") as f:
        return sum(int(line.split()[1]) for line in f if line.startswith("ShmemPmdMapped:"))


def test_a_watcher_follows_the_migration_step_by_step_and_then_its_saved_outcome(
    cluster: Cluster,
) -> None:
    a, b = cluster.node("node-a"), cluster.node("node-b")
    start_dirtier(a, append="wss=4 rate=0")
    prepared = prepare(b, a.get("vm").spec)
    ref = node_pb2.VMRef(name="vm")
    # 4 MB/s: round 0 of the 4 MiB working set takes about a second.
    start_migration(a, "vm", prepared, types_pb2.MigrationOptions(max_bandwidth=4_000_000))
    seen = list(a.stub.WatchMigration(ref, timeout=60))
    assert seen[-1].status == COMPLETED, seen[-1].error
    moving = [s.transferred for s in seen if s.status == types_pb2.MIGRATION_STATE_ACTIVE]
    assert len(set(moving)) >= 3, moving  # progress while it runs, not only the end
    assert [s.transferred for s in seen] == sorted(s.transferred for s in seen)
    # Once the copy that left has exited, a new watcher gets the saved final figures.
    deadline = time.monotonic() + 30
    while a.get("vm").worker_pid and time.monotonic() < deadline:
        time.sleep(0.05)
    after = list(a.stub.WatchMigration(ref, timeout=10))
    assert len(after) == 1 and after[0].status == COMPLETED
    assert after[0].transferred == seen[-1].transferred
    assert after[0].total_time_ms == pytest.approx(seen[-1].total_time_ms)


# -- refusals and cancel ----------------------------------------------------------------------


def test_a_bad_token_or_a_different_config_is_refused_and_the_vm_runs_on(
    cluster: Cluster,
) -> None:
    a, b = cluster.node("node-a"), cluster.node("node-b")
    start_dirtier(a)
    final = migrate(a, b, "vm", token=b"not-the-token")
    assert final.status == types_pb2.MIGRATION_STATE_FAILED
    assert "bad-token" in final.error
    assert_keeps_running_on(a, "vm", b)
    assert "token" in b.get("vm").failure  # the incoming VM was discarded

    spec = a.get("vm").spec
    spec.append += " ticks=7"
    prepared = b.stub.PrepareIncoming(node_pb2.PrepareIncomingRequest(spec=spec), timeout=60)
    start_migration(a, "vm", prepared)
    final = wait_migration(a, "vm")
    assert final.status == types_pb2.MIGRATION_STATE_FAILED and "config" in final.error
    assert_keeps_running_on(a, "vm", b)


def test_cancel_keeps_the_vm_on_the_source_and_is_idempotent(cluster: Cluster) -> None:
    a, b = cluster.node("node-a"), cluster.node("node-b")
    start_dirtier(a)
    prepared = b.stub.PrepareIncoming(
        node_pb2.PrepareIncomingRequest(spec=a.get("vm").spec), timeout=60
    )
    # 1 MB/s: round 0 of the working set takes seconds, so the cancel lands mid-round.
    slow = types_pb2.MigrationOptions(max_bandwidth=1_000_000)
    ref = node_pb2.VMRef(name="vm")
    start_migration(a, "vm", prepared, slow)
    deadline = time.monotonic() + 30
    while a.stub.GetMigration(ref).status != types_pb2.MIGRATION_STATE_ACTIVE:
        assert time.monotonic() < deadline
        time.sleep(0.02)
    assert a.get("vm").state == types_pb2.VM_STATE_MIGRATING
    # The migration owns the vCPU until it ends.
    for call in (a.stub.PauseVM, a.stub.ResumeVM):
        with pytest.raises(grpc.RpcError) as e:
            call(ref, timeout=10)
        assert e.value.code() == grpc.StatusCode.FAILED_PRECONDITION
        assert "cancel the migration first" in (e.value.details() or "")
    first = a.stub.CancelMigration(ref, timeout=10)
    assert first.status == types_pb2.MIGRATION_STATE_CANCELLED
    again = a.stub.CancelMigration(ref, timeout=10)
    assert again.status == types_pb2.MIGRATION_STATE_CANCELLED
    assert again.error == first.error == "cancelled by request"
    assert_keeps_running_on(a, "vm", b)
    b.wait_state("vm", types_pb2.VM_STATE_FAILED, timeout=30)
    assert "aborted by the source" in b.get("vm").failure
    assert b.stub.NodeInfo(node_pb2.NodeInfoRequest()).used.memory_bytes == 0


def test_migration_requests_a_user_gets_wrong_are_clear_errors(cluster: Cluster) -> None:
    a = cluster.node("node-a")
    a.create("idle", DIRTIER, memory=MEMORY, start=False)
    ref = node_pb2.VMRef(name="idle")
    assert a.stub.GetMigration(ref).status == types_pb2.MIGRATION_STATE_NONE
    assert a.stub.CancelMigration(ref).status == types_pb2.MIGRATION_STATE_NONE
    assert [s.status for s in a.stub.WatchMigration(ref, timeout=10)] == [
        types_pb2.MIGRATION_STATE_NONE
    ]
    cases = [
        (a.stub.PrepareIncoming, node_pb2.PrepareIncomingRequest(), "INVALID_ARGUMENT"),
        (
            a.stub.PrepareIncoming,
            node_pb2.PrepareIncomingRequest(spec=a.get("idle").spec),
            "ALREADY_EXISTS",
        ),
        (
            a.stub.StartMigration,
            node_pb2.StartMigrationRequest(name="idle", destination_endpoint="x:1", token=b"t"),
            "FAILED_PRECONDITION",
        ),
        (a.stub.StartMigration, node_pb2.StartMigrationRequest(name="nope"), "NOT_FOUND"),
        (a.stub.GetMigration, node_pb2.VMRef(name="nope"), "NOT_FOUND"),
    ]
    for call, request, code in cases:
        with pytest.raises(grpc.RpcError) as e:
            call(request, timeout=30)
        assert e.value.code().name == code, e.value.details()
        assert "\n" not in (e.value.details() or "")
    a.stub.StartVM(ref)
    bad = types_pb2.MigrationOptions(compression="gzip")
    with pytest.raises(grpc.RpcError) as e:
        a.stub.StartMigration(
            node_pb2.StartMigrationRequest(
                name="idle", destination_endpoint="127.0.0.1:1", token=b"t", options=bad
            )
        )
    assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "compression" in (e.value.details() or "")


def test_a_guest_that_outruns_the_link_is_throttled_and_still_moves_intact(
    cluster: Cluster,
) -> None:
    a, b = cluster.node("node-a"), cluster.node("node-b")
    start_dirtier(a, append="wss=4 rate=max")
    # A 1 ms budget cannot be met while the guest rewrites its pages flat out: the policy
    # must throttle the vCPU and then widen the budget, never iterate forever.
    final = migrate(a, b, "vm", types_pb2.MigrationOptions(max_downtime_ms=1))
    assert final.status == COMPLETED, final.error
    assert final.cpu_throttle_percentage > 0
    assert final.dirty_sync_count > 3
    assert_keeps_running_on(b, "vm", a)


def test_a_source_agent_restarted_mid_migration_reports_the_outcome(cluster: Cluster) -> None:
    a, b = cluster.node("node-a"), cluster.node("node-b")
    # A guest that dirties little, over a 2 MB/s link: seconds of round 0, then done.
    start_dirtier(a, append="wss=4 rate=0")
    prepared = b.stub.PrepareIncoming(
        node_pb2.PrepareIncomingRequest(spec=a.get("vm").spec), timeout=60
    )
    ref = node_pb2.VMRef(name="vm")
    start_migration(a, "vm", prepared, types_pb2.MigrationOptions(max_bandwidth=2_000_000))
    # The agent crashes while the workers stream; they carry on without it.
    a = cluster.restart(a)
    final = wait_migration(a, "vm")
    assert final.status == COMPLETED, final.error
    assert a.wait_state("vm", types_pb2.VM_STATE_MIGRATED).state == types_pb2.VM_STATE_MIGRATED
    assert a.stub.GetMigration(ref).status == COMPLETED
    assert_keeps_running_on(b, "vm", a)
