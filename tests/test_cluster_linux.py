"""A running Linux VM live-migrated between real nodes through the coordinator.

The guest is the committed Linux image (``guests/build/linux/Image``) under OpenSBI, whose
``/init`` rewrites a working set every 100 ms, verifies its own memory (printing ``CORRUPT``
and exiting on a lost or stale page) and prints ``tick N sum=0x...``. The sums are a pure
function of the arguments (``test_linux.expected_tick_sums``), so the ticks printed on the
destination can be checked exactly, not only counted.

Time is checked from the kernel's side: Linux's clocksource is the ``time`` CSR, which is
the VM's ``mtime``, and the worker reports that same value. Guest time may run only while
the VM runs, so between a sample taken on the source before the move and one taken on the
destination after it, guest time can advance by at most the host time between the two
requests (both workers read the host's one ``CLOCK_MONOTONIC``). A destination that let
the time the migration took leak into the guest clock breaks that bound; one that put the
clock back stops the guest's ``clock_nanosleep`` and so its ticks.
"""

from __future__ import annotations

import contextlib
import re
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field

import grpc
import pytest
from coordcluster import CoordCluster, migration_available, wait_for
from test_linux import IMAGE, expected_tick_sums

from node.vmdir import VMDir
from protos.ferry.v1 import (
    coordinator_pb2,
    node_pb2,
    types_pb2,
    worker_pb2,
    worker_pb2_grpc,
)

pytestmark = pytest.mark.skipif(
    not IMAGE.exists(), reason="guests/build/linux/Image not built (make guests-linux)"
)

WSS, RATE = 2, 64
APPEND = f"console=ttyS0 earlycon -- ticks=0 wss={WSS} rate={RATE}"
MEMORY = 64 << 20
# Generous bounds for a loaded 2-core machine: Linux boots in 20-40 s of host time here.
BOOT_TIMEOUT = 240.0
TICKS_TIMEOUT = 120.0
TICK = re.compile(rb"^tick (\d+) sum=0x([0-9a-f]{16})\r?$", re.MULTILINE)


@dataclass
class FollowedConsole:
    """Everything a ``ferry vm console --follow`` client received, as it arrived."""

    data: bytearray = field(default_factory=bytearray)
    notices: list[str] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def snapshot(self) -> bytes:
        with self.lock:
            return bytes(self.data)

    def ticks(self) -> list[tuple[int, int]]:
        return [(int(n), int(s, 16)) for n, s in TICK.findall(self.snapshot())]


def follow_console(cl: CoordCluster, name: str) -> tuple[FollowedConsole, threading.Thread]:
    followed = FollowedConsole()

    def requests() -> Iterator[node_pb2.ConsoleRequest]:
        yield node_pb2.ConsoleRequest(open=node_pb2.ConsoleOpen(name=name, offset=0, follow=True))

    def run() -> None:
        with contextlib.suppress(grpc.RpcError):  # the VM is deleted at the end
            for chunk in cl.stub.Console(requests(), timeout=600):
                with followed.lock:
                    followed.data += chunk.data
                    if chunk.notice:
                        followed.notices.append(chunk.notice)

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    return followed, thread


@dataclass(frozen=True)
class ClockSample:
    """The VM's guest time, read from its worker between two host monotonic readings."""

    host_before: float
    guest_seconds: float
    host_after: float


def sample_clock(cl: CoordCluster, node_name: str, vm: str) -> ClockSample:
    """Asks the worker itself, not the agent: the agent may answer from a cached status,
    and a stale sample would make the bound below fail for no fault of the VM."""
    node = next(n for n in cl.nodes if n.name == node_name)
    socket = VMDir(node.data_dir, vm).socket
    with grpc.insecure_channel(f"unix:{socket}") as channel:
        stub = worker_pb2_grpc.WorkerStub(channel)
        before = time.monotonic()
        status = stub.GetStatus(worker_pb2.WorkerStatusRequest(), timeout=30)
        after = time.monotonic()
    assert status.state == types_pb2.VM_STATE_RUNNING, status
    return ClockSample(before, status.guest_seconds, after)


def migrate_keeping_time(
    cl: CoordCluster, source: str, destination: str
) -> types_pb2.MigrationStatus:
    """Live-migrate the VM through the coordinator and check that its clock did not jump.

    Guest time must advance, and by no more than the host time between a sample on the
    source before the move and one on the destination after it: a jump by the time the
    migration took (beyond the guest's own frozen interval) would exceed that bound.
    """
    before = sample_clock(cl, source, "linux")
    request = coordinator_pb2.MigrateVMRequest(name="linux", node=destination)
    op = cl.stub.MigrateVM(request, timeout=30)
    final = list(cl.stub.WatchOperation(coordinator_pb2.OperationRef(id=op.id), timeout=300))[-1]
    assert final.state == coordinator_pb2.OPERATION_STATE_SUCCEEDED, final.error
    migration = final.items[0].migration
    assert migration.status == types_pb2.MIGRATION_STATE_COMPLETED
    assert cl.vm("linux").node == destination
    after = sample_clock(cl, destination, "linux")
    guest_elapsed = after.guest_seconds - before.guest_seconds
    host_elapsed = after.host_after - before.host_before
    assert 0 < guest_elapsed <= host_elapsed + 1e-3, (guest_elapsed, host_elapsed, migration)
    return migration


def test_a_linux_vm_migrates_mid_boot_and_while_it_works_with_ticks_console_and_clock_intact(
    cl: CoordCluster,
) -> None:
    a = cl.agent("na")
    cl.agent("nb")
    if not migration_available(cl.stub, a):
        pytest.skip("the agents do not implement live migration yet")
    spec = types_pb2.VMSpec(
        name="linux", memory_bytes=MEMORY, kernel=str(IMAGE), bios="default", append=APPEND
    )
    cl.stub.CreateVM(coordinator_pb2.PlaceVMRequest(spec=spec, node="na"), timeout=60)
    console, thread = follow_console(cl, "linux")

    # Once while the kernel boots (its timer runs, its console is the early console)...
    assert wait_for(lambda: b"sched_clock:" in console.snapshot(), BOOT_TIMEOUT)
    migrate_keeping_time(cl, "na", "nb")
    assert wait_for(lambda: len(console.ticks()) >= 3, BOOT_TIMEOUT), console.snapshot()[-2000:]
    # ...and once while /init rewrites its working set and sleeps between ticks.
    ticks_before = len(console.ticks())
    migrate_keeping_time(cl, "nb", "na")
    assert cl.vm("linux").generation == 3

    # The workload goes on on the destination: later ticks, in sequence, with the sums
    # its definition predicts, and no page found lost or stale by the guest itself.
    assert wait_for(lambda: len(console.ticks()) >= ticks_before + 5, TICKS_TIMEOUT)
    ticks = console.ticks()
    assert [n for n, _ in ticks] == list(range(len(ticks)))
    assert [s for _, s in ticks] == expected_tick_sums(len(ticks), WSS, RATE)
    assert b"CORRUPT" not in console.snapshot()
    assert cl.vm("linux").state == types_pb2.VM_STATE_RUNNING

    # The console followed through the coordinator crossed both moves without a gap or a
    # repeated byte: what it received is exactly the start of the VM's console.
    assert console.notices == [
        "VM linux moved from na to nb",
        "VM linux moved from nb to na",
    ], console.notices
    received = console.snapshot()
    dumped = b"".join(
        chunk.data
        for chunk in cl.stub.Console(
            iter([node_pb2.ConsoleRequest(open=node_pb2.ConsoleOpen(name="linux"))]),
            timeout=60,
        )
    )
    assert len(dumped) >= len(received) and dumped.startswith(received)
    assert b"Run /init as init process" in received and b"init: workload:" in received

    cl.stub.DeleteVM(node_pb2.VMRef(name="linux"), timeout=60)
    thread.join(timeout=30)
