"""ferry-node registers with its coordinator and heartbeats, and copes with it being away."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor

import grpc
import pytest
from cluster import GUESTS, Cluster, free_port

from protos.ferry.v1 import coordinator_pb2, coordinator_pb2_grpc, node_pb2, types_pb2


class RecordingCoordinator(coordinator_pb2_grpc.CoordinatorServicer):
    """The node-facing half of a coordinator, remembering what agents told it."""

    def __init__(self) -> None:
        self.registrations: list[coordinator_pb2.RegisterNodeRequest] = []
        self.heartbeats: list[coordinator_pb2.HeartbeatRequest] = []
        self.changed = threading.Condition()

    def RegisterNode(
        self, request: coordinator_pb2.RegisterNodeRequest, context: grpc.ServicerContext
    ) -> coordinator_pb2.RegisterNodeResponse:
        with self.changed:
            self.registrations.append(request)
            self.changed.notify_all()
        return coordinator_pb2.RegisterNodeResponse(heartbeat_interval_seconds=0.1)

    def Heartbeat(
        self, request: coordinator_pb2.HeartbeatRequest, context: grpc.ServicerContext
    ) -> coordinator_pb2.HeartbeatResponse:
        with self.changed:
            self.heartbeats.append(request)
            self.changed.notify_all()
        return coordinator_pb2.HeartbeatResponse(heartbeat_interval_seconds=0.1)

    def wait_for(self, predicate: Callable[[], bool], timeout: float = 60.0) -> bool:
        with self.changed:
            return self.changed.wait_for(predicate, timeout)


@pytest.fixture
def cluster() -> Iterator[Cluster]:
    c = Cluster()
    yield c
    c.close()


def test_registers_when_the_coordinator_appears_and_heartbeats_vm_states(
    cluster: Cluster,
) -> None:
    port = free_port()
    node = cluster.node("reg", "--coordinator", f"127.0.0.1:{port}", vcpus=2, memory="128M")
    node.create("hb", GUESTS / "ticker.elf", start=False)
    # No coordinator yet: the node serves anyway, and says so once in its log.
    for _ in range(600):
        if "unreachable" in node.log_tail():
            break
        time.sleep(0.05)
    assert node.log_tail(100).count("unreachable") == 1
    assert node.get("hb").state == types_pb2.VM_STATE_CREATED

    coordinator = RecordingCoordinator()
    server = grpc.server(ThreadPoolExecutor(max_workers=4))
    coordinator_pb2_grpc.add_CoordinatorServicer_to_server(coordinator, server)
    assert server.add_insecure_port(f"127.0.0.1:{port}") == port
    server.start()
    try:
        assert coordinator.wait_for(lambda: len(coordinator.heartbeats) >= 2)
        registered = coordinator.registrations[0].node
        assert registered.name == "reg"
        assert registered.address == node.address
        assert (registered.capacity.vcpus, registered.capacity.memory_bytes) == (2, 128 << 20)
        beat = coordinator.heartbeats[-1]
        assert beat.seq >= 2 and coordinator.heartbeats[0].seq == 1
        assert [(vm.spec.name, vm.state) for vm in beat.node.vms] == [
            ("hb", types_pb2.VM_STATE_CREATED)
        ]
        assert beat.node.used.vcpus == 1

        node.stub.StartVM(node_pb2.VMRef(name="hb"))
        assert coordinator.wait_for(
            lambda: coordinator.heartbeats[-1].node.vms[0].state == types_pb2.VM_STATE_RUNNING
        )
    finally:
        server.stop(0)
