"""The committed generated code matches the ``.proto`` sources, and it imports as a package."""

from __future__ import annotations

from pathlib import Path

from protos import generate


def test_committed_generated_code_is_up_to_date(tmp_path: Path) -> None:
    fresh = generate.generate(tmp_path)
    committed_dir = generate.REPO_ROOT / generate.PROTO_DIR
    committed = sorted(
        p.name for p in committed_dir.iterdir() if p.name.endswith(generate.GENERATED_SUFFIXES)
    )
    assert [p.name for p in fresh] == committed, "run `make protos`: generated files differ"
    stale = [p.name for p in fresh if p.read_bytes() != (committed_dir / p.name).read_bytes()]
    tools = (_generator_version(fresh[0]), _generator_version(committed_dir / fresh[0].name))
    assert not stale, (
        f"run `make protos`: stale generated code {stale}"
        + ("" if tools[0] == tools[1] else f" (protoc here {tools[0]}, committed {tools[1]})")
    )


def _generator_version(pb2: Path) -> str:
    for line in pb2.read_text().splitlines():
        if line.startswith("# Protobuf Python Version:"):
            return line.split(":", 1)[1].strip()
    return "unknown"


def test_generation_is_deterministic(tmp_path: Path) -> None:
    first = generate.generate(tmp_path / "a")
    second = generate.generate(tmp_path / "b")
    assert [p.read_bytes() for p in first] == [p.read_bytes() for p in second]


def test_generated_modules_import_as_a_package() -> None:
    from protos.ferry.v1 import (
        coordinator_pb2_grpc,
        migration_pb2,
        node_pb2,
        node_pb2_grpc,
        types_pb2,
    )

    spec = types_pb2.VMSpec(name="web-1", memory_bytes=64 << 20)
    request = node_pb2.CreateVMRequest(spec=spec, start=True)
    assert node_pb2.CreateVMRequest.FromString(request.SerializeToString()) == request
    assert node_pb2.DESCRIPTOR.services_by_name["NodeAgent"].full_name == "ferry.v1.NodeAgent"
    assert hasattr(node_pb2_grpc, "NodeAgentStub")
    assert hasattr(coordinator_pb2_grpc, "CoordinatorStub")
    pages = migration_pb2.Pages(seq=1, page_numbers=[1, 2, 3])
    assert list(migration_pb2.Pages.FromString(pages.SerializeToString()).page_numbers) == [
        1,
        2,
        3,
    ]


def test_node_agent_defines_every_rpc_of_the_api() -> None:
    from protos.ferry.v1 import node_pb2

    methods = set(node_pb2.DESCRIPTOR.services_by_name["NodeAgent"].methods_by_name)
    assert methods == {
        "CreateVM",
        "StartVM",
        "StopVM",
        "PauseVM",
        "ResumeVM",
        "DestroyVM",
        "GetVM",
        "ListVMs",
        "Console",
        "Snapshot",
        "Restore",
        "NodeInfo",
        "PrepareIncoming",
        "StartMigration",
        "CancelMigration",
        "GetMigration",
        "WatchMigration",
    }
