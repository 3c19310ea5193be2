"""A real ferry-coordinator plus real agents on 127.0.0.1, for cluster tests.

Builds on :mod:`cluster` (agents and their workers). The coordinator listens on a fixed
free port so that agents find it again after it restarts on the same state file.
"""

from __future__ import annotations

import contextlib
import json
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TypeVar

import grpc
from cluster import GUESTS, REPO, Cluster, NodeProcess, free_port
from grpc_health.v1 import health_pb2, health_pb2_grpc

from protos.ferry.v1 import coordinator_pb2, coordinator_pb2_grpc, node_pb2, types_pb2

T = TypeVar("T")
STARTUP_TIMEOUT = 60.0


def wait_for(predicate: Callable[[], T], timeout: float = 60.0, interval: float = 0.05) -> T:
    """Poll until ``predicate()`` is truthy and return it (a generous bound, never timing)."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value or time.monotonic() > deadline:
            return value
        time.sleep(interval)


class CoordinatorProcess:
    def __init__(self, root: Path, args: list[str]) -> None:
        self.root = root
        self.args = args
        self.state = root / "coordinator.db"
        self.log_path = root / "coordinator.log"
        self.address = f"127.0.0.1:{free_port()}"
        self.process: subprocess.Popen[bytes] | None = None
        self._channel: grpc.Channel | None = None
        self.stub: coordinator_pb2_grpc.CoordinatorStub

    def start(self) -> CoordinatorProcess:
        first_start = self.process is None
        command = [
            sys.executable,
            "-m",
            "coordinator.server",
            "--listen",
            self.address,
            "--state",
            str(self.state),
            *self.args,
        ]
        with open(self.log_path, "ab") as log:
            self.process = subprocess.Popen(
                command, stdout=log, stderr=subprocess.STDOUT, cwd=REPO, start_new_session=True
            )
        self._channel = grpc.insecure_channel(self.address)
        self.stub = coordinator_pb2_grpc.CoordinatorStub(self._channel)
        health = health_pb2_grpc.HealthStub(self._channel)
        deadline = time.monotonic() + STARTUP_TIMEOUT
        while True:
            if self.process.poll() is not None:
                if first_start and "cannot listen" in self.log_tail(1):
                    # Another process took the free port between our check and its bind.
                    self.address = f"127.0.0.1:{free_port()}"
                    return self.start()
                raise RuntimeError(f"ferry-coordinator exited: {self.log_tail()}")
            try:
                reply = health.Check(health_pb2.HealthCheckRequest(), timeout=2)
                if reply.status == health_pb2.HealthCheckResponse.SERVING:
                    return self
            except grpc.RpcError:
                if time.monotonic() > deadline:
                    raise RuntimeError(f"coordinator did not come up: {self.log_tail()}") from None
            time.sleep(0.05)

    def stop(self, sig: int = signal.SIGTERM) -> int:
        assert self.process is not None
        if self.process.poll() is None:
            self.process.send_signal(sig)
        status = self.process.wait(timeout=30)
        if self._channel is not None:
            self._channel.close()
            self._channel = None
        return status

    def log_tail(self, lines: int = 30) -> str:
        try:
            return "\n".join(self.log_path.read_text().splitlines()[-lines:])
        except OSError:
            return "(no log)"


class CoordCluster(Cluster):
    """A coordinator and agents registered with it, all torn down by ``close()``."""

    def __init__(self, *coordinator_args: str, heartbeat_timeout: float = 2.0) -> None:
        super().__init__()
        args = ["--heartbeat-timeout", str(heartbeat_timeout), *coordinator_args]
        self.coordinator = CoordinatorProcess(self.root, args).start()

    @property
    def stub(self) -> coordinator_pb2_grpc.CoordinatorStub:
        return self.coordinator.stub

    def agent(self, name: str, *labels: str, memory: str = "256M", vcpus: int = 4) -> NodeProcess:
        """Start an agent that registers with the coordinator; wait until it is ready."""
        extra = ["--coordinator", self.coordinator.address]
        for label in labels:
            extra += ["--label", label]
        node = self.node(name, *extra, vcpus=vcpus, memory=memory)
        self.wait_node(name, coordinator_pb2.NODE_STATE_READY)
        return node

    def wait_node(
        self, name: str, state: coordinator_pb2.NodeState.ValueType, timeout: float = 60.0
    ) -> coordinator_pb2.Node:
        def check() -> coordinator_pb2.Node | None:
            with contextlib.suppress(grpc.RpcError):
                node = self.stub.GetNode(coordinator_pb2.NodeRef(name=name), timeout=5)
                if node.state == state:
                    return node
            return None

        node = wait_for(check, timeout)
        assert node is not None, f"node {name} never became {state}: {self.coordinator.log_tail()}"
        return node

    def create(
        self,
        name: str,
        kernel: str = "ticker.elf",
        *,
        memory: int = 16 << 20,
        append: str = "",
        **placement: object,
    ) -> coordinator_pb2.VM:
        spec = types_pb2.VMSpec(
            name=name, memory_bytes=memory, kernel=str(GUESTS / kernel), append=append
        )
        request = coordinator_pb2.PlaceVMRequest(spec=spec, **placement)  # type: ignore[arg-type]
        return self.stub.CreateVM(request, timeout=60).vm

    def vm(self, name: str) -> coordinator_pb2.VM:
        return self.stub.GetVM(node_pb2.VMRef(name=name), timeout=10)

    def wait_vm(
        self, name: str, predicate: Callable[[coordinator_pb2.VM], bool], timeout: float = 60.0
    ) -> coordinator_pb2.VM:
        def check() -> coordinator_pb2.VM | None:
            vm = self.vm(name)
            return vm if predicate(vm) else None

        vm = wait_for(check, timeout)
        assert vm is not None, f"VM {name} never got there: {self.vm(name)}"
        return vm

    def events(self) -> list[coordinator_pb2.Event]:
        return list(
            self.stub.WatchEvents(coordinator_pb2.WatchEventsRequest(no_follow=True), timeout=10)
        )

    def console(self, name: str, *, follow: bool = False, offset: int = 0) -> Iterator[bytes]:
        def requests() -> Iterator[node_pb2.ConsoleRequest]:
            yield node_pb2.ConsoleRequest(
                open=node_pb2.ConsoleOpen(name=name, offset=offset, follow=follow)
            )

        for chunk in self.stub.Console(requests(), timeout=120):
            yield chunk.data

    def close(self) -> None:
        with contextlib.suppress(Exception):
            self.coordinator.stop(signal.SIGKILL)
        super().close()


def migration_available(stub: coordinator_pb2_grpc.CoordinatorStub, node: NodeProcess) -> bool:
    """Whether the agents implement live migration yet (the RPCs exist from the start)."""
    try:
        node.stub.GetMigration(node_pb2.VMRef(name="no-such-vm"), timeout=10)
    except grpc.RpcError as e:
        return e.code() != grpc.StatusCode.UNIMPLEMENTED
    return True


def read_json(path: Path) -> object:
    return json.loads(path.read_text())
