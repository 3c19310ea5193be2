"""Real Ferry processes on 127.0.0.1 for multi-process tests, torn down without leftovers.

Agents listen on port 0 (the kernel picks a free port, so parallel runs never collide) and
report the address they got in ``DATA/agent.json``. Teardown ends exactly the processes a
test started: each agent by its pid, each VMM worker by the pid file it wrote in the data
directory (checked against ``/proc/PID/cmdline`` so a recycled pid is never hit).
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from pathlib import Path

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from protos.ferry.v1 import node_pb2, node_pb2_grpc, types_pb2

REPO = Path(__file__).resolve().parent.parent
GUESTS = REPO / "guests" / "build"
STARTUP_TIMEOUT = 60.0
DIRTIER = GUESTS / "dirtier.elf"
MEMORY = 32 << 20
TICK = re.compile(rb"^tick (\d+) sum=0x[0-9a-f]{16}\r?$", re.MULTILINE)
RUNNING = types_pb2.VM_STATE_RUNNING


class NodeProcess:
    """One ``ferry-node`` process and a client for it."""

    def __init__(
        self, name: str, data_dir: Path, args: list[str], env: dict[str, str] | None = None
    ) -> None:
        self.name = name
        self.data_dir = data_dir
        self.args = args
        # Extra environment for the agent and so for its workers (e.g. FERRY_FAULT).
        self.env = env or {}
        self.log_path = data_dir.parent / f"{name}-agent.log"
        self.process: subprocess.Popen[bytes] | None = None
        self.address = ""
        self._channel: grpc.Channel | None = None
        self.stub: node_pb2_grpc.NodeAgentStub

    def start(self) -> NodeProcess:
        """Start the agent and return once it serves (health SERVING)."""
        info = self.data_dir / "agent.json"
        with contextlib.suppress(FileNotFoundError):
            info.unlink()
        command = [
            sys.executable,
            "-m",
            "node.agent",
            "--name",
            self.name,
            "--listen",
            "127.0.0.1:0",
            "--data-dir",
            str(self.data_dir),
            *self.args,
        ]
        with open(self.log_path, "ab") as log:
            self.process = subprocess.Popen(
                command,
                stdout=log,
                stderr=subprocess.STDOUT,
                cwd=REPO,
                start_new_session=True,
                env={**os.environ, **self.env},
            )
        deadline = time.monotonic() + STARTUP_TIMEOUT
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"ferry-node {self.name} exited: {self.log_tail()}")
            with contextlib.suppress(OSError, ValueError):
                written = json.loads(info.read_text())
                if written["pid"] == self.process.pid:
                    self.address = written["address"]
                    break
            time.sleep(0.02)
        else:
            raise RuntimeError(f"ferry-node {self.name} did not come up: {self.log_tail()}")
        self._channel = grpc.insecure_channel(self.address)
        self.stub = node_pb2_grpc.NodeAgentStub(self._channel)
        health = health_pb2_grpc.HealthStub(self._channel)
        reply = health.Check(health_pb2.HealthCheckRequest(), timeout=10, wait_for_ready=True)
        assert reply.status == health_pb2.HealthCheckResponse.SERVING
        return self

    def log_tail(self, lines: int = 20) -> str:
        try:
            return "\n".join(self.log_path.read_text().splitlines()[-lines:])
        except OSError:
            return "(no log)"

    def signal(self, sig: int) -> int:
        """Send ``sig`` to the agent and wait for it to exit; returns its exit status."""
        assert self.process is not None
        if self.process.poll() is None:
            self.process.send_signal(sig)
        status = self.process.wait(timeout=30)
        if self._channel is not None:
            self._channel.close()
            self._channel = None
        return status

    def worker_pids(self) -> dict[str, int]:
        """Running workers by VM name, from their pid files."""
        pids = {}
        for pid_file in self.data_dir.glob("vms/*/worker.pid"):
            with contextlib.suppress(OSError, ValueError):
                pid = int(pid_file.read_text())
                if _is_worker(pid):
                    pids[pid_file.parent.name] = pid
        return pids

    # -- conveniences over the stub --------------------------------------------------

    def create(
        self,
        name: str,
        kernel: str | Path = GUESTS / "hello.elf",
        *,
        memory: int = 16 << 20,
        append: str = "",
        start: bool = True,
        deterministic: bool = False,
    ) -> types_pb2.VMInfo:
        spec = types_pb2.VMSpec(
            name=name,
            memory_bytes=memory,
            kernel=str(kernel),
            append=append,
            deterministic=deterministic,
        )
        return self.stub.CreateVM(node_pb2.CreateVMRequest(spec=spec, start=start), timeout=60)

    def get(self, name: str) -> types_pb2.VMInfo:
        return self.stub.GetVM(node_pb2.VMRef(name=name), timeout=10)

    def console(
        self,
        name: str,
        offset: int = 0,
        *,
        follow: bool = True,
        inputs: Sequence[bytes] = (),
    ) -> tuple[bytes, list[node_pb2.ConsoleOutput]]:
        """Read a VM's console (to its end when following): (bytes, messages)."""

        def requests() -> Iterator[node_pb2.ConsoleRequest]:
            yield node_pb2.ConsoleRequest(
                open=node_pb2.ConsoleOpen(name=name, offset=offset, follow=follow)
            )
            for data in inputs:
                yield node_pb2.ConsoleRequest(input=data)

        messages = list(self.stub.Console(requests(), timeout=60))
        return b"".join(m.data for m in messages), messages

    def wait_state(
        self, name: str, state: types_pb2.VMState.ValueType, timeout: float = 60.0
    ) -> types_pb2.VMInfo:
        """Poll until the VM reaches ``state`` (a generous bound, not a timing assertion)."""
        deadline = time.monotonic() + timeout
        while True:
            info = self.get(name)
            if info.state == state or time.monotonic() > deadline:
                return info
            time.sleep(0.05)


def prepare(
    destination: NodeProcess, spec: types_pb2.VMSpec, incoming_timeout: float = 0.0
) -> node_pb2.PrepareIncomingResponse:
    """Start the destination's incoming worker for ``spec``. A guest that runs a fixed
    number of ticks should be prepared for before it starts: the worker takes a second or
    more to come up on a loaded machine, and the guest must not finish before it moves."""
    prepared: node_pb2.PrepareIncomingResponse = destination.stub.PrepareIncoming(
        node_pb2.PrepareIncomingRequest(spec=spec, timeout_s=incoming_timeout), timeout=60
    )
    return prepared


def migrate(
    source: NodeProcess,
    destination: NodeProcess,
    name: str,
    options: types_pb2.MigrationOptions | None = None,
    *,
    token: bytes = b"",
    incoming_timeout: float = 0.0,
    prepared: node_pb2.PrepareIncomingResponse | None = None,
) -> types_pb2.MigrationStatus:
    """Live-migrate ``name`` node to node as the coordinator does (PrepareIncoming on the
    destination unless ``prepared`` says it was done, StartMigration on the source) and
    return the source's final status."""
    if prepared is None:
        prepared = prepare(destination, source.get(name).spec, incoming_timeout)
    start_migration(source, name, prepared, options, token=token)
    return wait_migration(source, name)


def start_migration(
    source: NodeProcess,
    name: str,
    prepared: node_pb2.PrepareIncomingResponse,
    options: types_pb2.MigrationOptions | None = None,
    *,
    token: bytes = b"",
) -> types_pb2.MigrationStatus:
    """StartMigration of ``name`` to the prepared destination; returns at once, with the
    status the source answers (the migration runs on)."""
    started: types_pb2.MigrationStatus = source.stub.StartMigration(
        node_pb2.StartMigrationRequest(
            name=name,
            destination_endpoint=prepared.endpoint,
            token=token or prepared.token,
            options=options or types_pb2.MigrationOptions(),
        ),
        timeout=30,
    )
    return started


MIGRATION_ENDED = {
    types_pb2.MIGRATION_STATE_COMPLETED,
    types_pb2.MIGRATION_STATE_FAILED,
    types_pb2.MIGRATION_STATE_CANCELLED,
    types_pb2.MIGRATION_STATE_UNKNOWN,
}


def wait_migration(
    node: NodeProcess, name: str, timeout: float = 120.0
) -> types_pb2.MigrationStatus:
    """Follow the migration (WatchMigration) until it ends; its final status."""
    last = types_pb2.MigrationStatus()
    for status in node.stub.WatchMigration(node_pb2.VMRef(name=name), timeout=timeout):
        last = status
    if last.status not in MIGRATION_ENDED:
        last = node.stub.GetMigration(node_pb2.VMRef(name=name), timeout=10)
    return last


# -- the dirtier, the live-migration workload ------------------------------------------------
# It rewrites its working set all the time and checks its own memory every tick, printing
# CORRUPT (and failing) on a lost or stale page; its ticks are numbered, so a gap or a
# repeat shows in the console.


def ticks(out: bytes) -> list[int]:
    """The dirtier's tick numbers, checked to be 0, 1, 2, ... with no corruption."""
    assert b"CORRUPT" not in out, out.decode(errors="replace")
    numbers = [int(n) for n in TICK.findall(out)]
    assert numbers == list(range(len(numbers))), numbers
    return numbers


def wait_ticks(node: NodeProcess, name: str, count: int, timeout: float = 60.0) -> bytes:
    """The console once the dirtier has printed ``count`` ticks (a bound, not a timing test)."""
    deadline = time.monotonic() + timeout
    while True:
        out, _ = node.console(name, follow=False)
        if len(ticks(out)) >= count or time.monotonic() > deadline:
            return out
        time.sleep(0.05)


def state(node: NodeProcess, name: str) -> types_pb2.VMState.ValueType:
    try:
        return node.get(name).state
    except grpc.RpcError as e:
        assert e.code() == grpc.StatusCode.NOT_FOUND
        return types_pb2.VM_STATE_UNSPECIFIED


def start_dirtier(node: NodeProcess, name: str = "vm", append: str = "wss=4 rate=20") -> None:
    node.create(name, DIRTIER, memory=MEMORY, append=append)
    wait_ticks(node, name, 2)


def assert_keeps_running_on(node: NodeProcess, name: str, *others: NodeProcess) -> None:
    """The VM runs on ``node`` only, and its dirtier goes on ticking with correct sums."""
    info = node.wait_state(name, RUNNING, timeout=30)
    assert info.state == RUNNING, types_pb2.VMState.Name(info.state)
    for other in others:
        assert state(other, name) != RUNNING
    before = len(ticks(node.console(name, follow=False)[0]))
    out = wait_ticks(node, name, before + 3)
    assert len(ticks(out)) >= before + 3


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def _is_worker(pid: int) -> bool:
    try:
        return b"node.worker" in Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return False


def _kill(pid: int) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGKILL)


class Cluster:
    """Processes started by one test, under one short temporary directory."""

    def __init__(self) -> None:
        # Short: worker sockets live under it, and unix socket paths max out at 107 bytes.
        self.root = Path(tempfile.mkdtemp(prefix="ferry-t-", dir="/tmp"))
        self.nodes: list[NodeProcess] = []

    def node(
        self,
        name: str = "node-a",
        *extra: str,
        vcpus: int = 2,
        memory: str = "1G",
        env: dict[str, str] | None = None,
    ) -> NodeProcess:
        """Start a new agent (its data dir under the cluster's root)."""
        data_dir = self.root / name
        args = ["--vcpus", str(vcpus), "--memory", memory, *extra]
        node = NodeProcess(name, data_dir, args, env).start()
        self.nodes.append(node)
        return node

    def restart(self, node: NodeProcess, sig: int = signal.SIGKILL) -> NodeProcess:
        """Stop an agent (SIGKILL by default: a crash) and start it on the same data dir."""
        node.signal(sig)
        return node.start()

    def close(self) -> None:
        for node in self.nodes:
            if node.process is not None and node.process.poll() is None:
                node.signal(signal.SIGKILL)
        for node in self.nodes:
            for pid in node.worker_pids().values():
                _kill(pid)
        shutil.rmtree(self.root, ignore_errors=True)
