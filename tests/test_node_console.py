"""VM consoles through ferry-node: offsets, several followers, input, output kept on disk."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from cluster import GUESTS, Cluster, NodeProcess
from elfgen import echo_guest

from protos.ferry.v1 import node_pb2, types_pb2

TICKS3 = (
    b"tick 0 sum=0xe220a8397b1dcdaf\r\n"
    b"tick 1 sum=0x4870e329627082a1\r\n"
    b"tick 2 sum=0xcf8c252637f72a52\r\n"
    b"ticker: done after 3 ticks\r\n"
)


@pytest.fixture(scope="module")
def node() -> Iterator[NodeProcess]:
    c = Cluster()
    try:
        # A console buffer smaller than one guest's output: older offsets come from disk.
        yield c.node("console", "--console-buffer", "40")
    finally:
        c.close()


def _assert_contiguous(messages: list[node_pb2.ConsoleOutput], start: int) -> None:
    offset = start
    for m in messages:
        assert m.offset == offset
        offset += len(m.data)


def test_follow_from_zero_gets_everything_then_the_final_state(node: NodeProcess) -> None:
    node.create("t3", GUESTS / "ticker.elf", append="ticks=3")
    out, messages = node.console("t3", 0, follow=True)
    assert out == TICKS3
    _assert_contiguous(messages, 0)
    assert messages[-1].vm_state == types_pb2.VM_STATE_STOPPED
    assert (node.data_dir / "vms" / "t3" / "console.log").read_bytes() == TICKS3


def test_offsets_forward_and_from_the_end(node: NodeProcess) -> None:
    node.create("t3-offsets", GUESTS / "ticker.elf", append="ticks=3")
    node.wait_state("t3-offsets", types_pb2.VM_STATE_STOPPED)
    for offset, expected in [(31, TICKS3[31:]), (-28, TICKS3[-28:]), (10_000, b"")]:
        out, _ = node.console("t3-offsets", offset, follow=False)
        assert out == expected
    assert node.get("t3-offsets").console_bytes == len(TICKS3)


def test_several_followers_see_the_same_bytes(node: NodeProcess) -> None:
    node.create("t3-multi", GUESTS / "ticker.elf", append="ticks=3", start=False)
    results: list[bytes] = []

    def follow(offset: int) -> None:
        out, _ = node.console("t3-multi", offset, follow=True)
        results.append(out)

    # More followers than a small handler pool: they must not starve the VM's commands.
    threads = [threading.Thread(target=follow, args=(0,)) for _ in range(12)]
    for t in threads:
        t.start()
    time.sleep(1.0)  # lets the followers attach (a shorter wait only makes the test weaker)
    assert node.get("t3-multi").state == types_pb2.VM_STATE_CREATED
    node.stub.StartVM(node_pb2.VMRef(name="t3-multi"), timeout=30)
    for t in threads:
        t.join(timeout=120)
    assert results == [TICKS3] * 12


def test_input_reaches_the_guest(node: NodeProcess, tmp_path: Path) -> None:
    image = tmp_path / "echo.elf"
    image.write_bytes(echo_guest())
    node.create("echo", image)
    out, messages = node.console("echo", 0, follow=True, inputs=[b"hello ", b"ferry", b"q"])
    assert out == b"hello ferryq"
    assert messages[-1].vm_state == types_pb2.VM_STATE_STOPPED
    info = node.get("echo")
    assert info.state == types_pb2.VM_STATE_STOPPED and info.exit_code == 0
