"""The coordinator's API against real agents and workers: placement, errors, operations."""

from __future__ import annotations

from collections.abc import Iterator

import grpc
import pytest
from coordcluster import CoordCluster, wait_for

from protos.ferry.v1 import coordinator_pb2, node_pb2, types_pb2

MiB = 1 << 20
RUNNING = types_pb2.VM_STATE_RUNNING


@pytest.fixture(scope="module")
def cl() -> Iterator[CoordCluster]:
    c = CoordCluster()
    try:
        c.agent("na", "zone=a", memory="256M")
        c.agent("nb", "zone=b", memory="256M")
        yield c
    finally:
        c.close()


def code_of(call: object) -> grpc.StatusCode:
    with pytest.raises(grpc.RpcError) as e:
        call()  # type: ignore[operator]
    return e.value.code()


def test_nodes_register_with_capacity_and_labels(cl: CoordCluster) -> None:
    nodes = {n.name: n for n in cl.stub.ListNodes(coordinator_pb2.ListNodesRequest()).nodes}
    assert set(nodes) == {"na", "nb"}
    assert nodes["na"].capacity.memory_bytes == 256 * MiB
    assert dict(nodes["nb"].labels) == {"zone": "b"}
    assert all(n.state == coordinator_pb2.NODE_STATE_READY for n in nodes.values())


def test_placement_honours_selector_anti_affinity_and_capacity(cl: CoordCluster) -> None:
    vm = cl.create("sel", node_selector={"zone": "b"})
    assert vm.node == "nb" and vm.state == RUNNING
    # Anti-affinity: two VMs of one group land on different nodes.
    first = cl.create("aa-1", anti_affinity_group="grp")
    second = cl.create("aa-2", anti_affinity_group="grp")
    assert {first.node, second.node} == {"na", "nb"}
    with pytest.raises(grpc.RpcError) as e:
        cl.create("aa-3", anti_affinity_group="grp")
    assert e.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert "na: already runs a VM of anti-affinity group grp" in (e.value.details() or "")
    # Capacity: the coordinator counts what it placed (256 MiB nodes, 16 MiB used here).
    big = cl.create("big", memory=200 * MiB, no_start=True)
    with pytest.raises(grpc.RpcError) as e:
        cl.create("big-2", memory=200 * MiB, node=big.node)
    assert e.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert f"{big.node}: needs 200 MiB" in (e.value.details() or "")
    for name in ("sel", "aa-1", "aa-2", "big"):
        cl.stub.DeleteVM(node_pb2.VMRef(name=name), timeout=60)


def test_spread_puts_vms_on_the_emptier_node(cl: CoordCluster) -> None:
    # Earlier tests' VMs hold memory until each node's next heartbeat says they are gone;
    # "emptier" is only defined once both nodes are empty again.
    def empty() -> bool:
        nodes = cl.stub.ListNodes(coordinator_pb2.ListNodesRequest()).nodes
        return all(n.used.memory_bytes == 0 for n in nodes)

    assert wait_for(empty, 30)
    a = cl.create("sp-1", memory=64 * MiB)
    b = cl.create("sp-2", memory=16 * MiB)
    assert a.node != b.node
    for name in ("sp-1", "sp-2"):
        cl.stub.DeleteVM(node_pb2.VMRef(name=name), timeout=60)


def test_bad_requests_get_the_right_status_codes(cl: CoordCluster) -> None:
    s = cl.stub
    assert code_of(lambda: s.GetVM(node_pb2.VMRef(name="nope"))) == grpc.StatusCode.NOT_FOUND
    assert code_of(lambda: s.GetNode(coordinator_pb2.NodeRef(name="nope"))) == (
        grpc.StatusCode.NOT_FOUND
    )
    assert code_of(lambda: s.GetOperation(coordinator_pb2.OperationRef(id="op-x"))) == (
        grpc.StatusCode.NOT_FOUND
    )
    assert code_of(lambda: cl.create("on-nowhere", node="nope")) == grpc.StatusCode.NOT_FOUND
    assert code_of(lambda: cl.create("Bad_Name")) == grpc.StatusCode.INVALID_ARGUMENT
    assert code_of(lambda: cl.create("odd", memory=MiB + 1)) == grpc.StatusCode.INVALID_ARGUMENT
    # The node validates what only it can check (the kernel file) and its code comes through.
    assert code_of(lambda: cl.create("nokernel", "missing.elf")) == (
        grpc.StatusCode.INVALID_ARGUMENT
    )
    assert code_of(lambda: cl.create("huge", memory=4096 * MiB)) == (
        grpc.StatusCode.RESOURCE_EXHAUSTED
    )
    cl.create("dup", no_start=True)
    assert code_of(lambda: cl.create("dup")) == grpc.StatusCode.ALREADY_EXISTS
    # Only a running VM can be live-migrated.
    migrate = coordinator_pb2.MigrateVMRequest(name="dup")
    assert code_of(lambda: s.MigrateVM(migrate)) == grpc.StatusCode.FAILED_PRECONDITION
    s.DeleteVM(node_pb2.VMRef(name="dup"), timeout=60)
    assert code_of(lambda: s.DeleteVM(node_pb2.VMRef(name="dup"))) == grpc.StatusCode.NOT_FOUND
    # A failed create leaves nothing behind.
    assert "nokernel" not in {
        v.spec.name for v in s.ListVMs(coordinator_pb2.ListClusterVMsRequest()).vms
    }


def test_cordon_keeps_new_vms_off_a_node(cl: CoordCluster) -> None:
    node = cl.stub.CordonNode(coordinator_pb2.NodeRef(name="na"))
    assert node.cordoned
    try:
        assert cl.create("c-1").node == "nb"
        assert cl.create("c-2").node == "nb"
        with pytest.raises(grpc.RpcError) as e:
            cl.create("c-3", node="na")
        assert e.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert "na: cordoned" in (e.value.details() or "")
    finally:
        cl.stub.UncordonNode(coordinator_pb2.NodeRef(name="na"))
    assert cl.create("c-3").node == "na"
    for name in ("c-1", "c-2", "c-3"):
        cl.stub.DeleteVM(node_pb2.VMRef(name=name), timeout=60)


def test_stop_start_and_operations_are_recorded(cl: CoordCluster) -> None:
    vm = cl.create("life")
    stopped = cl.stub.StopVM(node_pb2.StopVMRequest(name="life", force=True), timeout=60)
    assert stopped.vm.state == types_pb2.VM_STATE_STOPPED
    assert stopped.vm.desired_state == types_pb2.VM_STATE_STOPPED
    started = cl.stub.StartVM(node_pb2.VMRef(name="life"), timeout=60)
    assert started.vm.state == RUNNING and started.vm.node == vm.node
    ops = cl.stub.ListOperations(coordinator_pb2.ListOperationsRequest(target="life")).operations
    assert [o.kind for o in ops] == ["start-vm", "stop-vm", "create-vm"]
    assert all(o.state == coordinator_pb2.OPERATION_STATE_SUCCEEDED for o in ops)
    watched = list(cl.stub.WatchOperation(coordinator_pb2.OperationRef(id=started.operation)))
    assert watched[-1].state == coordinator_pb2.OPERATION_STATE_SUCCEEDED
    kinds = [(e.kind, e.vm) for e in cl.events()]
    assert ("vm-placed", "life") in kinds and ("vm-stopped", "life") in kinds
    cl.stub.DeleteVM(node_pb2.VMRef(name="life"), timeout=60)
    assert ("vm-deleted", "life") in [(e.kind, e.vm) for e in cl.events()]


def test_console_is_proxied_from_the_vms_node(cl: CoordCluster) -> None:
    cl.create("con")
    out = wait_for(lambda: b"tick 2" in (data := b"".join(cl.console("con"))) and data)
    assert out and out.startswith(b"tick 0")
    # A later offset returns the rest of the same stream.
    tail = b"".join(cl.console("con", offset=7))
    assert tail.startswith(out[7:20])
    cl.stub.DeleteVM(node_pb2.VMRef(name="con"), timeout=60)
    assert code_of(lambda: list(cl.console("con"))) == grpc.StatusCode.NOT_FOUND


def test_observed_state_follows_the_node(cl: CoordCluster) -> None:
    # A guest that powers off by itself: the coordinator learns it from heartbeats.
    cl.create("short", "hello.elf")
    vm = cl.wait_vm("short", lambda v: v.state == types_pb2.VM_STATE_STOPPED)
    assert vm.exit_code == 0 and vm.desired_state == RUNNING
    cl.stub.DeleteVM(node_pb2.VMRef(name="short"), timeout=60)


def test_watch_events_streams_new_events_after_a_sequence_number(cl: CoordCluster) -> None:
    last = cl.events()[-1].seq
    stream = cl.stub.WatchEvents(coordinator_pb2.WatchEventsRequest(after=last), timeout=120)
    cl.create("ev")
    seen = []
    for event in stream:
        seen.append(event)
        if event.kind == "vm-started":
            break
    stream.cancel()
    assert [e.seq for e in seen] == list(range(last + 1, last + 1 + len(seen)))
    assert [(e.kind, e.vm) for e in seen][:2] == [("vm-placed", "ev"), ("vm-started", "ev")]
    cl.stub.DeleteVM(node_pb2.VMRef(name="ev"), timeout=60)
