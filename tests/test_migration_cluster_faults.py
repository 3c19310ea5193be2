"""Live migration never loses a VM: faults at every phase, in real worker processes.

Each test starts a source and a destination agent, one of them with ``FERRY_FAULT`` set
(see :mod:`node.faults`: test-only), so that its worker dies, stalls, cuts the stream or
damages a page at one named moment of the migration. Afterwards exactly one copy of the VM
runs and its dirtier goes on ticking with correct sums, or, when the source itself died,
no copy runs and the VM is reported failed.
"""

from __future__ import annotations

import time

import pytest
from cluster import (
    Cluster,
    NodeProcess,
    assert_keeps_running_on,
    migrate,
    start_dirtier,
    start_migration,
    state,
    ticks,
    wait_migration,
    wait_ticks,
)

from protos.ferry.v1 import node_pb2, types_pb2

FAILED = types_pb2.MIGRATION_STATE_FAILED
# A tiny downtime budget makes the migration iterate, so there is a round 1 to fail in.
ITERATE = types_pb2.MigrationOptions(max_downtime_ms=1, compression="none")
# The destination gives up on a silent source this fast (a stalled peer costs seconds).
INCOMING_TIMEOUT = 3.0


def pair(cluster: Cluster, fault: str) -> tuple[NodeProcess, NodeProcess]:
    side = fault.split(":")[0]
    source = cluster.node("node-a", env={"FERRY_FAULT": fault} if side == "src" else None)
    destination = cluster.node("node-b", env={"FERRY_FAULT": fault} if side == "dst" else None)
    start_dirtier(source)
    return source, destination


def assert_discarded(node: NodeProcess, name: str = "vm") -> None:
    """The destination's incoming copy is gone: failed (or never there), no capacity held."""
    info = node.wait_state(name, types_pb2.VM_STATE_FAILED, timeout=30)
    deadline = time.monotonic() + 30
    while info.worker_pid and time.monotonic() < deadline:
        time.sleep(0.05)  # the worker has failed its VM and is on its way out
        info = node.get(name)
    assert info.state == types_pb2.VM_STATE_FAILED
    assert info.worker_pid == 0
    assert node.stub.NodeInfo(node_pb2.NodeInfoRequest()).used.memory_bytes == 0


@pytest.mark.parametrize(
    "fault",
    [
        "dst:kill:hello",
        "dst:kill:round0",
        "dst:kill:round1",
        "dst:drop:round1",
        "dst:stall:round0",
        "dst:corrupt:round0",
        "src:drop:round0",
        "src:drop:round1",
        "src:drop:switchover",
    ],
)
def test_a_fault_before_the_final_message_leaves_the_vm_running_on_the_source(
    cluster: Cluster, fault: str
) -> None:
    source, destination = pair(cluster, fault)
    final = migrate(source, destination, "vm", ITERATE, incoming_timeout=INCOMING_TIMEOUT)
    assert final.status == FAILED, types_pb2.MigrationState.Name(final.status)
    assert final.error
    if fault == "dst:corrupt:round0":
        assert "memory digest mismatch" in final.error
    assert_keeps_running_on(source, "vm", destination)
    if fault.startswith("dst:kill"):
        assert "killed" in destination.get("vm").failure
    assert_discarded(destination)


@pytest.mark.parametrize("point", ["round0", "round1", "switchover"])
def test_when_the_source_worker_dies_no_copy_runs_and_the_vm_is_reported_failed(
    cluster: Cluster, point: str
) -> None:
    source, destination = pair(cluster, f"src:kill:{point}")
    migrate(source, destination, "vm", ITERATE, incoming_timeout=INCOMING_TIMEOUT)
    info = source.wait_state("vm", types_pb2.VM_STATE_FAILED)
    assert info.state == types_pb2.VM_STATE_FAILED and "SIGKILL" in info.failure
    assert_discarded(destination)


def test_a_destination_dying_after_resumed_leaves_the_source_migrated(
    cluster: Cluster,
) -> None:
    source, destination = pair(cluster, "dst:kill:resumed")
    final = migrate(source, destination, "vm", ITERATE)
    assert final.status == types_pb2.MIGRATION_STATE_COMPLETED
    # The guest had moved; the node that held it then crashed. The source never takes it back.
    assert source.get("vm").state == types_pb2.VM_STATE_MIGRATED
    info = destination.wait_state("vm", types_pb2.VM_STATE_FAILED)
    assert "killed" in info.failure


@pytest.mark.parametrize(
    "fault", ["src:drop:complete", "dst:stall:complete", "dst:kill:switchover", "dst:kill:complete"]
)
def test_a_stream_lost_after_the_final_message_is_reported_unknown_and_resolvable(
    cluster: Cluster, fault: str
) -> None:
    source, destination = pair(cluster, fault)
    final = migrate(source, destination, "vm", ITERATE, incoming_timeout=INCOMING_TIMEOUT)
    assert final.status == types_pb2.MIGRATION_STATE_UNKNOWN, final.error
    # The final message had left (a destination that dies on the device state dies after
    # the source sent Complete behind it): the source cannot know whether the guest resumed
    # there, so it keeps its copy paused.
    assert source.get("vm").state == types_pb2.VM_STATE_PAUSED
    paused = len(ticks(source.console("vm", follow=False)[0]))
    # Resolving as the coordinator does: the destination says it does not run the guest...
    dst = destination.wait_state("vm", types_pb2.VM_STATE_FAILED, timeout=30)
    assert dst.state == types_pb2.VM_STATE_FAILED
    assert state(destination, "vm") != types_pb2.VM_STATE_RUNNING
    # ... so the source's copy resumes, and the guest carries on where it was.
    source.stub.ResumeVM(node_pb2.VMRef(name="vm"))
    out = wait_ticks(source, "vm", paused + 3)
    assert len(ticks(out)) >= paused + 3
    assert_keeps_running_on(source, "vm", destination)


def test_cancel_while_the_destination_stalls_answers_at_once_and_keeps_the_vm(
    cluster: Cluster,
) -> None:
    source, destination = pair(cluster, "dst:stall:hello")
    prepared = destination.stub.PrepareIncoming(
        node_pb2.PrepareIncomingRequest(spec=source.get("vm").spec, timeout_s=INCOMING_TIMEOUT),
        timeout=60,
    )
    ref = node_pb2.VMRef(name="vm")
    started = start_migration(source, "vm", prepared)
    assert started.status == types_pb2.MIGRATION_STATE_SETUP
    # The destination never answers the Hello; the cancel must not wait for it.
    cancelled = source.stub.CancelMigration(ref, timeout=10)
    assert cancelled.status == types_pb2.MIGRATION_STATE_CANCELLED
    assert source.stub.CancelMigration(ref, timeout=10).status == cancelled.status
    assert_keeps_running_on(source, "vm", destination)
    assert_discarded(destination)


def test_cancel_after_the_final_message_waits_for_the_destination_verdict(
    cluster: Cluster,
) -> None:
    source, destination = pair(cluster, "dst:stall:complete")
    prepared = destination.stub.PrepareIncoming(
        node_pb2.PrepareIncomingRequest(spec=source.get("vm").spec, timeout_s=INCOMING_TIMEOUT),
        timeout=60,
    )
    ref = node_pb2.VMRef(name="vm")
    start_migration(source, "vm", prepared)
    deadline = time.monotonic() + 60
    while source.stub.GetMigration(ref).status != types_pb2.MIGRATION_STATE_DEVICE:
        assert time.monotonic() < deadline
        time.sleep(0.01)
    answer = source.stub.CancelMigration(ref, timeout=10)
    if answer.status == types_pb2.MIGRATION_STATE_CANCELLED:
        # The cancel landed in the last moments before Complete left: it simply wins.
        assert_keeps_running_on(source, "vm", destination)
        return
    # Complete has left: the destination might be resuming the guest, so the cancel cannot
    # simply win. It answers at once, and the source stays paused until a verdict.
    assert answer.status == types_pb2.MIGRATION_STATE_CANCELLING
    final = wait_migration(source, "vm")
    # The stalled destination never answers; its incoming VM is discarded on its idle
    # timeout, which breaks the stream: the outcome is unknown to the source.
    assert final.status == types_pb2.MIGRATION_STATE_UNKNOWN, final.error
    assert source.get("vm").state == types_pb2.VM_STATE_PAUSED
    assert_discarded(destination)
    source.stub.ResumeVM(ref)
    assert_keeps_running_on(source, "vm", destination)
