"""Requests ferry-node refuses, with the gRPC status and one-line message a user relies on."""

from __future__ import annotations

import contextlib
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest
import trio
from cluster import GUESTS, Cluster, NodeProcess
from elfgen import EM_X86_64, make_elf

from node.errors import AgentError
from node.vmdir import VMDir
from node.worker_client import WorkerClient
from protos.ferry.v1 import node_pb2, types_pb2


@pytest.fixture(scope="module")
def node() -> Iterator[NodeProcess]:
    c = Cluster()
    try:
        yield c.node("errors", vcpus=2, memory="64M")
    finally:
        c.close()


def _refused(call: Callable[..., Any], *args: Any) -> grpc.RpcError:
    with pytest.raises(grpc.RpcError) as e:
        call(*args, timeout=30)
    details = e.value.details() or ""
    assert details and "\n" not in details and "Traceback" not in details, details
    return e.value


def _spec(name: str = "ok", **fields: Any) -> types_pb2.VMSpec:
    values: dict[str, Any] = {"memory_bytes": 16 << 20, "kernel": str(GUESTS / "hello.elf")}
    values.update(fields)
    return types_pb2.VMSpec(name=name, **values)


def _create(node: NodeProcess, spec: types_pb2.VMSpec) -> grpc.RpcError:
    return _refused(node.stub.CreateVM, node_pb2.CreateVMRequest(spec=spec))


@pytest.mark.parametrize(
    ("spec", "fragment"),
    [
        (_spec("Bad_Name"), "not a valid VM name"),
        (_spec(""), "not a valid VM name"),
        (_spec("x" * 64), "not a valid VM name"),
        (_spec(memory_bytes=0), "memory_bytes is required"),
        (_spec(memory_bytes=(16 << 20) + 1), "multiple of 4 KiB"),
        (_spec(memory_bytes=1 << 41), "outside"),
        (_spec(vcpus=4), "vcpus"),
        (_spec(kernel=""), "spec.kernel is required"),
        (_spec(kernel="guests/build/hello.elf"), "absolute path"),
        (_spec(kernel="/nonexistent/image.elf"), "no such file"),
        (_spec(bios="/nonexistent/fw.bin"), "no such file"),
        (_spec(append="a\x00b"), "non-printable"),
    ],
)
def test_invalid_specs_are_refused_before_anything_runs(
    node: NodeProcess, spec: types_pb2.VMSpec, fragment: str
) -> None:
    error = _create(node, spec)
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert fragment in (error.details() or "")
    assert node.worker_pids() == {}


def test_bad_image_is_invalid_argument_with_the_loaders_message(
    node: NodeProcess, tmp_path: Path
) -> None:
    image = tmp_path / "x86.elf"
    image.write_bytes(make_elf([(0x8000_0000, b"\x90" * 16, 16)], machine=EM_X86_64))
    error = _create(node, _spec("wrong-arch", kernel=str(image)))
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert str(image) in (error.details() or "") or "RISC-V" in (error.details() or "")
    # Nothing is left behind: the name is free and no worker runs.
    assert not (node.data_dir / "vms" / "wrong-arch").exists()
    assert node.worker_pids() == {}
    _refused(node.stub.GetVM, node_pb2.VMRef(name="wrong-arch"))


def test_unknown_vm_is_not_found_for_every_rpc(node: NodeProcess) -> None:
    ref = node_pb2.VMRef(name="ghost")
    for call, request in [
        (node.stub.GetVM, ref),
        (node.stub.StartVM, ref),
        (node.stub.PauseVM, ref),
        (node.stub.ResumeVM, ref),
        (node.stub.DestroyVM, ref),
        (node.stub.StopVM, node_pb2.StopVMRequest(name="ghost")),
        (node.stub.Snapshot, node_pb2.SnapshotRequest(name="ghost")),
    ]:
        assert _refused(call, request).code() == grpc.StatusCode.NOT_FOUND
    with pytest.raises(grpc.RpcError) as e:
        node.console("ghost")
    assert e.value.code() == grpc.StatusCode.NOT_FOUND


def test_duplicate_names_and_capacity_are_refused(node: NodeProcess) -> None:
    # The node offers 2 vCPUs and 64 MiB; created (not started) VMs hold their share.
    node.create("cap-a", memory=32 << 20, start=False)
    try:
        error = _create(node, _spec("cap-a"))
        assert error.code() == grpc.StatusCode.ALREADY_EXISTS

        error = _create(node, _spec("cap-big", memory_bytes=48 << 20))
        assert error.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert "memory" in (error.details() or "")

        node.create("cap-b", memory=16 << 20, start=False)
        error = _create(node, _spec("cap-c", memory_bytes=4 << 20))
        assert error.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert "vCPUs" in (error.details() or "")

        info = node.stub.NodeInfo(node_pb2.NodeInfoRequest())
        assert (info.used.vcpus, info.used.memory_bytes) == (2, 48 << 20)
        assert (info.capacity.vcpus, info.capacity.memory_bytes) == (2, 64 << 20)

        # Freeing a VM frees its share.
        node.stub.DestroyVM(node_pb2.VMRef(name="cap-b"))
        node.create("cap-c", memory=4 << 20, start=False)
    finally:
        for name in ("cap-a", "cap-b", "cap-c"):
            with contextlib.suppress(grpc.RpcError):
                node.stub.DestroyVM(node_pb2.VMRef(name=name))


def test_other_refusals(node: NodeProcess) -> None:
    node.create("idle", GUESTS / "ticker.elf", start=False)
    try:
        ref = node_pb2.VMRef(name="idle")
        error = _refused(node.stub.ResumeVM, ref)
        assert error.code() == grpc.StatusCode.FAILED_PRECONDITION
        assert "created" in (error.details() or "")
        error = _refused(node.stub.Snapshot, node_pb2.SnapshotRequest(name="idle", path="rel"))
        assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
        error = _refused(node.stub.StopVM, node_pb2.StopVMRequest(name="idle", timeout_seconds=-1))
        assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
        error = _refused(
            node.stub.Restore, node_pb2.RestoreRequest(name="r", path="/nonexistent.snap")
        )
        assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
        error = _refused(node.stub.PrepareIncoming, node_pb2.PrepareIncomingRequest())
        assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
        error = _refused(node.stub.StartMigration, node_pb2.StartMigrationRequest(name="idle"))
        assert error.code() == grpc.StatusCode.FAILED_PRECONDITION
        assert "only a running VM" in (error.details() or "")
        error = _refused(node.stub.GetMigration, node_pb2.VMRef(name="ghost"))
        assert error.code() == grpc.StatusCode.NOT_FOUND
        # A VM that never migrated has no migration to report or cancel.
        for call in (node.stub.GetMigration, node.stub.CancelMigration):
            assert call(ref).status == types_pb2.MIGRATION_STATE_NONE
    finally:
        node.stub.DestroyVM(node_pb2.VMRef(name="idle"))


def test_a_bad_snapshot_file_is_invalid_argument(node: NodeProcess, tmp_path: Path) -> None:
    junk = tmp_path / "junk.snap"
    junk.write_bytes(b"not a snapshot" * 100)
    error = _refused(node.stub.Restore, node_pb2.RestoreRequest(name="junk", path=str(junk)))
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert not (node.data_dir / "vms" / "junk").exists()


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--name", "Node_1"], "ferry-node: --name 'Node_1': use 1-63 of a-z"),
        (["--listen", "nowhere"], "ferry-node: --listen 'nowhere': expected HOST:PORT"),
        (["--memory", "12Q"], "ferry-node: invalid size '12Q'"),
        (["--listen", "in-use"], "ferry-node: cannot listen on 127.0.0.1:"),
    ],
)
def test_ferry_node_command_line_errors_are_one_line(
    node: NodeProcess, tmp_path: Path, args: list[str], message: str
) -> None:
    defaults = {"--name": "n", "--listen": "127.0.0.1:0", "--data-dir": str(tmp_path / "d")}
    given = dict(zip(args[::2], args[1::2], strict=True))
    if given.get("--listen") == "in-use":
        given["--listen"] = node.address
    argv = [a for k, v in {**defaults, **given}.items() for a in (k, v)]
    result = subprocess.run(
        [sys.executable, "-m", "node.agent", *argv], capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 2
    assert result.stderr.splitlines()[-1].startswith(message)
    assert "Traceback" not in result.stderr


def test_a_call_to_a_worker_that_just_ended_is_unavailable_not_internal(tmp_path: Path) -> None:
    """The agent closes a worker's channel when its process ends; a GetVM racing that must
    still answer (from the final status), so the closed channel must read as a gone worker."""
    client = WorkerClient(VMDir(tmp_path, "gone"))
    client.close()
    with pytest.raises(AgentError) as e:
        trio.run(client.status)
    assert e.value.code == grpc.StatusCode.UNAVAILABLE
    assert e.value.message == "the worker of VM 'gone' has ended"
