"""The source side of a live migration runs in a migration process beside the worker.

These use real agents, workers and migration processes: the guest keeps running while it
migrates, the migration process dying at its worst moment never costs the VM, and no
migration process outlives its worker.
"""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path

import pytest
from cluster import (
    DIRTIER,
    Cluster,
    NodeProcess,
    assert_keeps_running_on,
    prepare,
    start_dirtier,
    start_migration,
    ticks,
    wait_migration,
    wait_ticks,
)

from node.migration_control import _PARTIAL, CHUNK, ControlError, _Assembler, decode, encode, field
from protos.ferry.v1 import node_pb2, types_pb2


def migration_processes(worker_pid: int) -> list[int]:
    """The migration processes serving ``worker_pid`` (from their command lines)."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            args = (entry / "cmdline").read_bytes().split(b"\0")
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        if stat.rsplit(")", 1)[1].split()[0] == "Z":
            continue  # exited, waiting to be reaped: no longer a process that does anything
        if b"node.migration_process" in args and str(worker_pid).encode() in args:
            found.append(int(entry.name))
    return found


def wait_for(predicate: object, timeout: float = 30.0) -> bool:
    """Poll ``predicate`` until it holds (a generous bound, not a timing assertion)."""
    deadline = time.monotonic() + timeout
    while not predicate():  # type: ignore[operator]
        if time.monotonic() > deadline:
            return False
        time.sleep(0.05)
    return True


def start_slow_migration(cluster: Cluster) -> tuple[NodeProcess, NodeProcess]:
    """A dirtier migrating from node-a to node-b, capped at 2 MB/s: round 0 of its 8 MiB
    working set takes seconds (and it never converges), time to act in the middle."""
    source, destination = cluster.node("node-a"), cluster.node("node-b")
    start_dirtier(source, append="wss=8 rate=20")
    prepared = prepare(destination, source.get("vm").spec, incoming_timeout=3.0)
    slow = types_pb2.MigrationOptions(max_bandwidth=2_000_000, compression="none")
    start_migration(source, "vm", prepared, slow)
    return source, destination


def test_the_migration_process_killed_mid_copy_leaves_the_vm_running(
    cluster: Cluster,
) -> None:
    source = cluster.node("node-a", env={"FERRY_FAULT": "src:kill-helper:round0"})
    destination = cluster.node("node-b")
    start_dirtier(source)
    prepared = prepare(destination, source.get("vm").spec, incoming_timeout=3.0)
    start_migration(source, "vm", prepared)
    final = wait_migration(source, "vm")
    assert final.status == types_pb2.MIGRATION_STATE_FAILED
    assert final.error.startswith("migration process died: exit code -9"), final.error
    assert_keeps_running_on(source, "vm", destination)
    # The failure is kept for the agent too, and the next migration gets a fresh process.
    assert source.stub.GetMigration(node_pb2.VMRef(name="vm")).error == final.error
    worker = source.worker_pids()["vm"]
    assert wait_for(lambda: len(migration_processes(worker)) == 1)
    dst = destination.wait_state("vm", types_pb2.VM_STATE_FAILED, timeout=30)
    assert dst.state == types_pb2.VM_STATE_FAILED


def test_the_guest_keeps_running_while_it_migrates(cluster: Cluster) -> None:
    source, destination = start_slow_migration(cluster)
    ref = node_pb2.VMRef(name="vm")
    assert wait_for(
        lambda: source.stub.GetMigration(ref).status == types_pb2.MIGRATION_STATE_ACTIVE
    )
    before = len(ticks(source.console("vm", follow=False)[0]))
    out = wait_ticks(source, "vm", before + 3)
    # The ticks came while the migration was still copying: the guest did not wait for it.
    assert source.stub.GetMigration(ref).status == types_pb2.MIGRATION_STATE_ACTIVE
    assert len(ticks(out)) >= before + 3
    assert source.stub.GetMigration(ref).transferred > 0
    # At 2 MB/s it would never converge: a cancel, answered at once, ends it.
    cancelled = source.stub.CancelMigration(ref, timeout=10)
    assert cancelled.status == types_pb2.MIGRATION_STATE_CANCELLED
    assert_keeps_running_on(source, "vm", destination)


def test_a_migration_process_waits_beside_its_worker_and_dies_with_it(
    cluster: Cluster,
) -> None:
    node = cluster.node("node-a")
    node.create("vm", DIRTIER, memory=32 << 20, append="wss=4 rate=20")
    worker = node.worker_pids()["vm"]
    assert wait_for(lambda: len(migration_processes(worker)) == 1)
    (helper,) = migration_processes(worker)
    os.kill(worker, signal.SIGKILL)
    assert wait_for(lambda: not migration_processes(worker))
    assert not Path(f"/proc/{helper}").exists() or helper not in migration_processes(worker)


def test_a_worker_killed_mid_migration_takes_its_migration_process_and_the_copy_with_it(
    cluster: Cluster,
) -> None:
    source, destination = start_slow_migration(cluster)
    ref = node_pb2.VMRef(name="vm")
    assert wait_for(lambda: source.stub.GetMigration(ref).transferred > 0)
    worker = source.worker_pids()["vm"]
    assert migration_processes(worker)
    os.kill(worker, signal.SIGKILL)
    # The migration process cuts its stream and ends; the destination throws its copy away.
    assert wait_for(lambda: not migration_processes(worker))
    info = source.wait_state("vm", types_pb2.VM_STATE_FAILED)
    assert info.state == types_pb2.VM_STATE_FAILED
    dst = destination.wait_state("vm", types_pb2.VM_STATE_FAILED, timeout=30)
    assert dst.state == types_pb2.VM_STATE_FAILED
    # Cut, not left to go silent until the destination's idle timeout.
    assert "connection to the source lost" in dst.failure, dst.failure


def test_a_stopped_vm_takes_its_idle_migration_process_with_it(cluster: Cluster) -> None:
    node = cluster.node("node-a")
    node.create("vm", DIRTIER, memory=32 << 20, append="wss=4 rate=20")
    worker = node.worker_pids()["vm"]
    assert wait_for(lambda: len(migration_processes(worker)) == 1)
    node.stub.StopVM(node_pb2.StopVMRequest(name="vm", force=True), timeout=30)
    assert wait_for(lambda: not migration_processes(worker))


# -- the control channel --------------------------------------------------------------------


def reassemble(packets: list[bytes]) -> dict[str, object] | None:
    assembler = _Assembler()
    messages = [assembler.add(packet) for packet in packets]
    assert all(m is _PARTIAL for m in messages[:-1])
    return messages[-1]


def test_a_message_larger_than_a_packet_arrives_whole() -> None:
    state = bytes(range(256)) * (3 * CHUNK // 256 + 7)
    packets = encode("reply", to="save", state=state)
    assert len(packets) > 3 and all(len(p) <= CHUNK + 1 for p in packets)
    message = reassemble(packets)
    assert message == {"op": "reply", "to": "save", "state": state}


@pytest.mark.parametrize("data", [b"\xc1", b"\x93\x01\x02\x03", b"\x81\xa2op\x05"])
def test_a_control_message_that_is_not_a_map_with_an_op_is_refused(data: bytes) -> None:
    with pytest.raises(ControlError):
        decode(data)


def test_fields_of_the_wrong_type_are_refused_with_their_name() -> None:
    message = {"op": "throttle", "percent": "20", "paused_at": 3, "flag": True}
    with pytest.raises(ControlError, match="percent"):
        field(message, "percent", int)
    with pytest.raises(ControlError, match="flag"):
        field(message, "flag", int)
    assert field(message, "paused_at", float) == 3.0


def _stats_with_rounds(rounds: object) -> dict[str, object]:
    from node.migration_endpoint import _initial_stats

    return {**_initial_stats(1 << 20), "rounds": rounds}


def test_the_processs_rounds_are_checked_before_the_api_reports_them() -> None:
    from node.migration import REPORTED_ROUNDS, RoundStats
    from node.migration.wire import status_to_pb
    from node.migration_endpoint import _checked_stats

    good = RoundStats(0, 256, 3, 1 << 20, 0.004, 2.5e8, 17, 4250.0, 0.3, 0, 300.0).as_stats()
    status = status_to_pb(_checked_stats(_stats_with_rounds([good])))
    assert status.rounds[0].pages == 256 and status.rounds[0].mbps == 2000.0
    for bad, why in (
        ("rounds", "rounds is not a list"),
        (["x"], "a round is not a map"),
        ([{**good, "pages": -1}], "round pages -1 is out of range"),
        ([{**good, "bytes": 1 << 64}], "round bytes .* out of range"),
        ([{**good, "number": 1 << 32}], "round number .* out of range"),
        ([{**good, "switchover": 1}], "switchover is not a bool"),
        ([{k: v for k, v in good.items() if k != "mbps"}], "mbps is not a float"),
        ([good] * (REPORTED_ROUNDS + 1), "more than"),
    ):
        with pytest.raises(ControlError, match=why):
            _checked_stats(_stats_with_rounds(bad))
    for key, value in (("transferred", -1), ("cpu-throttle-percentage", 101)):
        with pytest.raises(ControlError, match=f"{key} {value} is out of range"):
            _checked_stats({**_stats_with_rounds([]), key: value})
