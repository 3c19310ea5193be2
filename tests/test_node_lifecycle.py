"""A VM's lifecycle through a real ferry-node and real worker processes."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
from cluster import GUESTS, Cluster, NodeProcess
from elfgen import finisher_guest

from protos.ferry.v1 import node_pb2, types_pb2

S = types_pb2


@pytest.fixture
def cluster() -> Iterator[Cluster]:
    c = Cluster()
    yield c
    c.close()


def _wait_console(node: NodeProcess, name: str, text: bytes, offset: int = 0) -> bytes:
    """Poll the console from ``offset`` (non-following reads) until ``text`` shows up."""
    out = b""
    for _ in range(1200):
        out, _ = node.console(name, offset, follow=False)
        if text in out:
            return out
        time.sleep(0.05)
    raise AssertionError(f"{text!r} never appeared on {name}'s console: {out!r}")


def test_create_start_pause_resume_stop_restart_destroy(cluster: Cluster) -> None:
    node = cluster.node()
    ref = node_pb2.VMRef(name="tick")
    info = node.create("tick", GUESTS / "ticker.elf", start=False)
    assert info.state == S.VM_STATE_CREATED
    assert info.worker_pid in node.worker_pids().values()
    assert node.get("tick").instret == 0

    assert node.stub.StartVM(ref).state == S.VM_STATE_RUNNING
    _wait_console(node, "tick", b"tick 1 ")

    paused = node.stub.PauseVM(ref)
    assert paused.state == S.VM_STATE_PAUSED
    assert node.get("tick").instret == paused.instret, "a paused VM must not run"

    assert node.stub.ResumeVM(ref).state == S.VM_STATE_RUNNING
    _wait_console(node, "tick", b"tick 3 ")
    assert node.get("tick").instret > paused.instret

    stopped = node.stub.StopVM(node_pb2.StopVMRequest(name="tick", timeout_seconds=1))
    assert stopped.state == S.VM_STATE_STOPPED
    assert stopped.worker_pid == 0 and "tick" not in node.worker_pids()
    with pytest.raises(grpc.RpcError) as e:
        node.stub.PauseVM(ref)
    assert e.value.code() == grpc.StatusCode.FAILED_PRECONDITION

    # A stopped VM boots again from its image; its console log continues after the
    # first boot's output.
    first_boot = stopped.console_bytes
    assert first_boot > 0
    assert node.stub.StartVM(ref).state == S.VM_STATE_RUNNING
    out = _wait_console(node, "tick", b"tick 1 ", offset=first_boot)
    assert out.startswith(b"tick 0 sum=0xe220a8397b1dcdaf\r\n")

    node.stub.DestroyVM(ref)
    with pytest.raises(grpc.RpcError) as e:
        node.get("tick")
    assert e.value.code() == grpc.StatusCode.NOT_FOUND
    assert not (node.data_dir / "vms" / "tick").exists()
    assert node.worker_pids() == {}


def test_guest_poweroff_and_failure_end_the_vm_stopped_with_its_exit_code(
    cluster: Cluster, tmp_path: Path
) -> None:
    node = cluster.node()
    node.create("hello", GUESTS / "hello.elf")
    failing = tmp_path / "fail.elf"
    failing.write_bytes(finisher_guest((7 << 16) | 0x3333))
    node.create("failing", failing)

    hello = node.wait_state("hello", S.VM_STATE_STOPPED)
    assert hello.state == S.VM_STATE_STOPPED
    assert hello.HasField("exit_code") and hello.exit_code == 0
    assert hello.failure == ""
    out, _ = node.console("hello")
    assert b"Hello from a Ferry guest!" in out

    failed = node.wait_state("failing", S.VM_STATE_STOPPED)
    assert failed.state == S.VM_STATE_STOPPED and failed.exit_code == 7

    listed = node.stub.ListVMs(node_pb2.ListVMsRequest())
    assert [vm.spec.name for vm in listed.vms] == ["failing", "hello"]
    usage = node.stub.NodeInfo(node_pb2.NodeInfoRequest())
    assert usage.used.vcpus == 0 and usage.used.memory_bytes == 0


def test_snapshot_and_restore_as_a_new_vm(cluster: Cluster) -> None:
    node = cluster.node()
    node.create("src", GUESTS / "ticker.elf", append="ticks=10")
    # Ten ticks (1 s of guest time) leave a generous margin for the pause after tick 1.
    _wait_console(node, "src", b"tick 1 ")
    node.stub.PauseVM(node_pb2.VMRef(name="src"))
    path = str(cluster.root / "src.snap")
    snap = node.stub.Snapshot(node_pb2.SnapshotRequest(name="src", path=path))
    assert snap.path == path and snap.size_bytes > 0
    src_out, _ = node.console("src", follow=False)

    restored = node.stub.Restore(node_pb2.RestoreRequest(name="copy", path=path, start=True))
    assert restored.spec.memory_bytes == 16 << 20
    assert restored.spec.append == "ticks=10"
    node.wait_state("copy", S.VM_STATE_STOPPED)
    copy_out, _ = node.console("copy")
    # The copy continues exactly where the snapshot was taken (even mid-line).
    lines = (src_out + copy_out).decode().splitlines()
    assert [line.split()[:2] for line in lines[:-1]] == [["tick", str(i)] for i in range(10)]
    assert lines[-1] == "ticker: done after 10 ticks"
    assert lines[0] == "tick 0 sum=0xe220a8397b1dcdaf"
