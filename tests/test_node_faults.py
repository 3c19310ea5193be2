"""Worker deaths and agent restarts: one VM's fate never touches the agent or other VMs."""

from __future__ import annotations

import os
import signal
import time
from collections.abc import Iterator

import pytest
from cluster import GUESTS, Cluster, NodeProcess

from protos.ferry.v1 import node_pb2, types_pb2

S = types_pb2


@pytest.fixture
def cluster() -> Iterator[Cluster]:
    c = Cluster()
    yield c
    c.close()


def _progresses(node: NodeProcess, name: str) -> bool:
    """Whether the VM retires instructions (polled with a generous bound, not timed)."""
    before = node.get(name).instret
    for _ in range(600):
        time.sleep(0.05)
        if node.get(name).instret > before:
            return True
    return False


def _wait_output(node: NodeProcess, name: str, text: bytes) -> None:
    for _ in range(1200):
        if text in node.console(name, follow=False)[0]:
            return
        time.sleep(0.05)
    raise AssertionError(f"{text!r} never appeared on {name}'s console")


def test_worker_killed_fails_only_its_vm(cluster: Cluster) -> None:
    node = cluster.node()
    node.create("victim", GUESTS / "ticker.elf")
    node.create("bystander", GUESTS / "ticker.elf")
    _wait_output(node, "victim", b"tick 1 ")
    pid = node.worker_pids()["victim"]

    os.kill(pid, signal.SIGKILL)
    failed = node.wait_state("victim", S.VM_STATE_FAILED)
    assert failed.state == S.VM_STATE_FAILED
    assert failed.failure == "worker killed by SIGKILL"
    assert failed.worker_pid == 0
    # The last console output is kept and still readable.
    out, messages = node.console("victim", 0, follow=True)
    assert out.startswith(b"tick 0 sum=0xe220a8397b1dcdaf\r\ntick 1 ")
    assert messages[-1].vm_state == S.VM_STATE_FAILED

    # The agent and the other VM carry on; the failed VM's resources are released.
    assert node.get("bystander").state == S.VM_STATE_RUNNING
    assert _progresses(node, "bystander")
    info = node.stub.NodeInfo(node_pb2.NodeInfoRequest())
    assert info.used.vcpus == 1
    assert {vm.spec.name: vm.state for vm in info.vms} == {
        "bystander": S.VM_STATE_RUNNING,
        "victim": S.VM_STATE_FAILED,
    }

    # A failed VM can be booted again.
    assert node.stub.StartVM(node_pb2.VMRef(name="victim")).state == S.VM_STATE_RUNNING
    assert _progresses(node, "victim")


@pytest.mark.parametrize("how", [signal.SIGKILL, signal.SIGTERM])
def test_agent_restart_adopts_running_workers_and_never_doubles_a_vm(
    cluster: Cluster, how: int
) -> None:
    node = cluster.node(vcpus=4)
    node.create("runner", GUESTS / "ticker.elf")
    node.create("sleeper", GUESTS / "ticker.elf")
    node.stub.PauseVM(node_pb2.VMRef(name="sleeper"))
    node.create("lost", GUESTS / "ticker.elf")
    node.create("done", GUESTS / "hello.elf")
    node.wait_state("done", S.VM_STATE_STOPPED)
    node.create("counted", GUESTS / "ticker.elf", append="ticks=10")
    _wait_output(node, "runner", b"tick 1 ")
    workers = node.worker_pids()
    assert {"runner", "sleeper", "lost"} <= set(workers)

    node.signal(how)
    # While no agent runs, one worker dies: nobody can see how.
    os.kill(workers["lost"], signal.SIGKILL)
    cluster.restart(node, sig=how)

    vms = {vm.spec.name: vm for vm in node.stub.ListVMs(node_pb2.ListVMsRequest()).vms}
    assert vms["runner"].state == S.VM_STATE_RUNNING
    assert vms["runner"].worker_pid == workers["runner"]
    assert vms["sleeper"].state == S.VM_STATE_PAUSED
    assert vms["sleeper"].worker_pid == workers["sleeper"]
    assert vms["done"].state == S.VM_STATE_STOPPED and vms["done"].exit_code == 0
    assert vms["lost"].state == S.VM_STATE_FAILED
    assert "agent was down" in vms["lost"].failure

    # A console followed across the restart has every byte, once, whether the guest ended
    # before or after the restart.
    out, messages = node.console("counted", 0, follow=True)
    lines = out.decode().splitlines()
    assert [line.split()[:2] for line in lines[:-1]] == [["tick", str(i)] for i in range(10)]
    assert lines[-1] == "ticker: done after 10 ticks"
    assert messages[-1].vm_state == S.VM_STATE_STOPPED

    # Starting an adopted VM does not start a second copy.
    node.stub.StartVM(node_pb2.VMRef(name="runner"))
    node.stub.StartVM(node_pb2.VMRef(name="sleeper"))
    assert node.worker_pids() == {"runner": workers["runner"], "sleeper": workers["sleeper"]}
    assert _progresses(node, "sleeper")
    out, _ = node.console("runner", follow=False)
    assert out.startswith(b"tick 0 sum=0xe220a8397b1dcdaf\r\n")

    # An adopted worker's death is still noticed.
    os.kill(workers["runner"], signal.SIGKILL)
    failed = node.wait_state("runner", S.VM_STATE_FAILED)
    assert failed.state == S.VM_STATE_FAILED and "worker" in failed.failure
    used = node.stub.NodeInfo(node_pb2.NodeInfoRequest()).used
    assert (used.vcpus, used.memory_bytes) == (1, 16 << 20)  # the sleeper


def test_two_agents_cannot_share_a_data_dir(cluster: Cluster) -> None:
    node = cluster.node()
    twin = NodeProcess("twin", node.data_dir, node.args)
    with pytest.raises(RuntimeError, match="in use by another ferry-node"):
        twin.start()
