"""Moving VMs between real nodes: live migration, drain, and consoles that follow the VM."""

from __future__ import annotations

import contextlib
import threading

import grpc
import pytest
from coordcluster import CoordCluster, migration_available, wait_for

from protos.ferry.v1 import coordinator_pb2, node_pb2, types_pb2

SUCCEEDED = coordinator_pb2.OPERATION_STATE_SUCCEEDED
FAILED = coordinator_pb2.OPERATION_STATE_FAILED
RUNNING = types_pb2.VM_STATE_RUNNING


def finish(cl: CoordCluster, op: coordinator_pb2.Operation) -> coordinator_pb2.Operation:
    updates = list(cl.stub.WatchOperation(coordinator_pb2.OperationRef(id=op.id), timeout=300))
    return updates[-1]


def test_a_vm_that_cannot_be_placed_fails_the_drain_and_stays_put(cl: CoordCluster) -> None:
    a = cl.agent("na", "zone=a")
    cl.agent("nb", "zone=b")
    cl.create("pinned", node_selector={"zone": "a"})
    op = cl.stub.DrainNode(coordinator_pb2.DrainNodeRequest(name="na"), timeout=30)
    assert op.kind == "drain-node" and [i.vm for i in op.items] == ["pinned"]
    final = finish(cl, op)
    assert final.state == FAILED
    assert "pinned: cannot be placed" in final.error
    assert "nb: label zone=a required, node has zone=b" in final.error
    vm = cl.vm("pinned")
    assert vm.node == "na" and vm.state == RUNNING and vm.generation == 1
    assert a.get("pinned").state == RUNNING
    node = cl.stub.GetNode(coordinator_pb2.NodeRef(name="na"))
    assert node.cordoned and not node.draining and not node.drained
    # A second drain while none runs is allowed; uncordon returns the node to service.
    cl.stub.UncordonNode(coordinator_pb2.NodeRef(name="na"))
    assert not cl.stub.GetNode(coordinator_pb2.NodeRef(name="na")).cordoned


def test_drain_refuses_a_down_or_unknown_node(cl: CoordCluster) -> None:
    with pytest.raises(grpc.RpcError) as e:
        cl.stub.DrainNode(coordinator_pb2.DrainNodeRequest(name="ghost"))
    assert e.value.code() == grpc.StatusCode.NOT_FOUND


def _console_collector(cl: CoordCluster, name: str) -> tuple[list[bytes], threading.Thread]:
    chunks: list[bytes] = []

    def run() -> None:
        with contextlib.suppress(grpc.RpcError):  # the cluster goes away at teardown
            for data in cl.console(name, follow=True):
                chunks.append(data)

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    return chunks, thread


def _ticks(data: bytes) -> list[int]:
    return [int(line.split()[1]) for line in data.splitlines() if line.startswith(b"tick ")]


def test_migrate_moves_a_running_vm_and_its_console_follows(cl: CoordCluster) -> None:
    a = cl.agent("na")
    cl.agent("nb")
    if not migration_available(cl.stub, a):
        pytest.skip("the agents do not implement live migration yet")
    cl.create("mover", node="na")
    chunks, thread = _console_collector(cl, "mover")
    wait_for(lambda: len(_ticks(b"".join(chunks))) >= 2)
    op = cl.stub.MigrateVM(coordinator_pb2.MigrateVMRequest(name="mover"), timeout=30)
    final = finish(cl, op)
    assert final.state == SUCCEEDED, final.error
    item = final.items[0]
    assert (item.source, item.destination) == ("na", "nb")
    assert item.migration.status == types_pb2.MIGRATION_STATE_COMPLETED
    assert item.migration.transferred > 0
    vm = cl.vm("mover")
    assert vm.node == "nb" and vm.generation == 2
    before = len(_ticks(b"".join(chunks)))
    assert wait_for(lambda: len(_ticks(b"".join(chunks))) > before + 2)
    ticks = _ticks(b"".join(chunks))
    # The console went on across the move: every line once, none lost, none repeated.
    assert ticks == list(range(len(ticks)))
    cl.stub.DeleteVM(node_pb2.VMRef(name="mover"), timeout=60)
    thread.join(timeout=30)


def test_drain_empties_a_node_k_at_a_time_with_consoles_continuing(cl: CoordCluster) -> None:
    a = cl.agent("na")
    cl.agent("nb")
    cl.agent("nc")
    if not migration_available(cl.stub, a):
        pytest.skip("the agents do not implement live migration yet")
    names = ["d-1", "d-2", "d-3"]
    for name in names:
        cl.create(name, node="na")
    cl.create("idle", node="na", no_start=True)
    consoles = {n: _console_collector(cl, n)[0] for n in names}
    for n in names:
        wait_for(lambda n=n: _ticks(b"".join(consoles[n])))  # type: ignore[misc]
    op = cl.stub.DrainNode(coordinator_pb2.DrainNodeRequest(name="na", max_parallel=2))
    final = finish(cl, op)
    assert final.state == SUCCEEDED, final.error
    assert sorted(i.vm for i in final.items) == [*names, "idle"]
    assert all(i.state == SUCCEEDED and i.destination in ("nb", "nc") for i in final.items)
    node = cl.stub.GetNode(coordinator_pb2.NodeRef(name="na"))
    assert node.drained and node.vm_count == 0
    assert a.stub.ListVMs(node_pb2.ListVMsRequest()).vms == []
    for n in names:
        ticks = _ticks(b"".join(consoles[n]))
        assert ticks == list(range(len(ticks))), n
        count = len(ticks)
        assert wait_for(lambda n=n, count=count: len(_ticks(b"".join(consoles[n]))) > count)  # type: ignore[misc]
    assert cl.vm("idle").node in ("nb", "nc")
    # At most K=2 live migrations were in flight at any point of the event history.
    in_flight: set[str] = set()
    most = 0
    for event in cl.events():
        if event.operation != op.id:
            continue
        if event.kind == "vm-migrating":
            in_flight.add(event.vm)
        elif event.kind in ("vm-migrated", "vm-migration-failed"):
            in_flight.discard(event.vm)
        most = max(most, len(in_flight))
    assert 1 <= most <= 2
