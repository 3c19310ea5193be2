"""Node health and coordinator restarts, with real processes killed for real."""

from __future__ import annotations

import contextlib
import signal
import threading
from collections.abc import Iterator

import grpc
import pytest
from coordcluster import CoordCluster, wait_for

from protos.ferry.v1 import coordinator_pb2, node_pb2, types_pb2

READY = coordinator_pb2.NODE_STATE_READY
DOWN = coordinator_pb2.NODE_STATE_DOWN


@pytest.fixture
def cl() -> Iterator[CoordCluster]:
    c = CoordCluster("--on-node-down", "restart", heartbeat_timeout=1.5)
    try:
        yield c
    finally:
        c.close()


def test_killed_node_goes_down_its_vm_restarts_elsewhere_and_the_stale_copy_is_stopped(
    cl: CoordCluster,
) -> None:
    a = cl.agent("na")
    cl.agent("nb", memory="64M")
    vm = cl.create("svc", node="na")
    assert vm.generation == 1
    worker = a.worker_pids()["svc"]
    chunks: list[bytes] = []

    def follow() -> None:
        with contextlib.suppress(grpc.RpcError):
            chunks.extend(cl.console("svc", follow=True))

    threading.Thread(target=follow, daemon=True).start()
    wait_for(lambda: b"tick 1" in b"".join(chunks))
    a.signal(signal.SIGKILL)  # the agent dies; its worker keeps the guest running
    cl.wait_node("na", DOWN)
    events = wait_for(lambda: [e for e in cl.events() if e.kind == "vm-unknown"])
    assert events[0].vm == "svc" and "na is down" in events[0].message
    moved = cl.wait_vm("svc", lambda v: v.node == "nb" and v.state == types_pb2.VM_STATE_RUNNING)
    assert moved.generation == 2
    # The console follower went on to the restarted VM, whose console starts over.
    assert wait_for(lambda: b"".join(chunks).count(b"tick 0 ") == 2)
    # The old copy still runs on na: when na comes back, the generation decides.
    assert a.worker_pids() == {"svc": worker}
    a.start()
    cl.wait_node("na", READY)
    gone = wait_for(
        lambda: (
            "svc"
            not in {v.spec.name for v in a.stub.ListVMs(node_pb2.ListVMsRequest(), timeout=10).vms}
        )
    )
    assert gone
    assert wait_for(lambda: a.worker_pids() == {})
    # The event follows the node's answer to DestroyVM.
    stale = wait_for(lambda: [e for e in cl.events() if e.kind == "vm-stale-stopped"])
    assert stale and stale[0].node == "na" and "generation 2" in stale[0].message
    assert cl.vm("svc").node == "nb"


def test_a_down_node_is_never_chosen_and_its_vms_are_unknown_until_it_returns() -> None:
    c = CoordCluster(heartbeat_timeout=1.5)  # policy "keep": wait for the node
    try:
        a = c.agent("na")
        c.create("keep", node="na")
        a.signal(signal.SIGKILL)
        c.wait_node("na", DOWN)
        vm = c.wait_vm("keep", lambda v: v.state == types_pb2.VM_STATE_UNKNOWN)
        assert vm.node == "na" and "down" in vm.failure
        with pytest.raises(Exception) as e:
            c.create("new")
        assert "na: down" in str(e.value)
        a.start()  # the agent adopts the worker that kept running
        c.wait_node("na", READY)
        back = c.wait_vm("keep", lambda v: v.state == types_pb2.VM_STATE_RUNNING)
        assert back.node == "na" and back.generation == 1
    finally:
        c.close()


def test_coordinator_restart_keeps_state_and_reconciles_desired_state() -> None:
    c = CoordCluster(heartbeat_timeout=1.5)
    try:
        a = c.agent("na")
        c.create("run")
        c.create("off")
        c.stub.StopVM(node_pb2.StopVMRequest(name="off", force=True), timeout=60)
        before = {
            v.spec.name: v for v in c.stub.ListVMs(coordinator_pb2.ListClusterVMsRequest()).vms
        }
        ops_before = [
            o.id for o in c.stub.ListOperations(coordinator_pb2.ListOperationsRequest()).operations
        ]
        c.coordinator.stop(signal.SIGKILL)
        # While the coordinator is away someone starts "off" behind its back.
        a.stub.StartVM(node_pb2.VMRef(name="off"), timeout=60)
        c.coordinator.start()
        after = {
            v.spec.name: v for v in c.stub.ListVMs(coordinator_pb2.ListClusterVMsRequest()).vms
        }
        assert set(after) == set(before)
        assert after["run"].node == before["run"].node
        assert after["off"].desired_state == types_pb2.VM_STATE_STOPPED
        ops_after = [
            o.id for o in c.stub.ListOperations(coordinator_pb2.ListOperationsRequest()).operations
        ]
        assert ops_after == ops_before
        c.wait_node("na", READY)
        # Desired stopped, observed running: the coordinator stops it on the node.
        assert a.wait_state("off", types_pb2.VM_STATE_STOPPED).state == types_pb2.VM_STATE_STOPPED
        assert c.wait_vm("run", lambda v: v.state == types_pb2.VM_STATE_RUNNING)
    finally:
        c.close()
