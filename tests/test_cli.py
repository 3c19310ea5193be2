"""The ferry CLI: help everywhere, --json shapes, one-line errors, and the local cluster."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from cluster import GUESTS, REPO, free_port
from coordcluster import CoordCluster

from coordinator import cli

VM_KEYS = {
    "name",
    "node",
    "state",
    "desired_state",
    "generation",
    "memory_bytes",
    "vcpus",
    "kernel",
    "bios",
    "append",
    "labels",
    "node_selector",
    "anti_affinity_group",
    "failure",
    "exit_code",
    "mips",
    "guest_seconds",
    "console_bytes",
    "created_at",
    "operation",
}
NODE_KEYS = {
    "name",
    "address",
    "status",
    "ready",
    "cordoned",
    "draining",
    "drained",
    "capacity",
    "used",
    "labels",
    "vm_count",
    "last_heartbeat",
    "ferry_version",
}


@pytest.fixture(scope="module")
def cl() -> Iterator[CoordCluster]:
    c = CoordCluster()
    try:
        c.agent("na", "zone=a")
        yield c
    finally:
        c.close()


def ferry(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "coordinator.cli", *args],
        capture_output=True,
        text=True,
        cwd=REPO,
        env={**os.environ, **(env or {})},
        timeout=120,
    )


COMMANDS = [
    [],
    ["node"],
    ["node", "ls"],
    ["node", "show"],
    ["node", "cordon"],
    ["node", "uncordon"],
    ["node", "drain"],
    ["vm"],
    ["vm", "create"],
    ["vm", "ls"],
    ["vm", "show"],
    ["vm", "start"],
    ["vm", "stop"],
    ["vm", "rm"],
    ["vm", "migrate"],
    ["vm", "console"],
    ["op"],
    ["op", "ls"],
    ["op", "show"],
    ["op", "watch"],
    ["events"],
    ["cluster"],
    ["cluster", "up"],
    ["cluster", "down"],
    ["cluster", "status"],
]


@pytest.mark.parametrize("command", COMMANDS, ids=lambda c: " ".join(c) or "ferry")
def test_every_command_has_help(command: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as e:
        cli.main([*command, "--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    assert out.startswith("usage: ferry")
    assert "--json" in out


@pytest.mark.parametrize("command", [["vm", "migrate", "x"], ["node", "drain", "n"]])
def test_migration_options_on_the_command_line_become_the_api_options(command: list[str]) -> None:
    args = cli.build_parser().parse_args(command)
    defaults = cli._options(args)
    # Unset: the node's defaults (auto-converge on, compression auto, 300 ms).
    assert not defaults.HasField("auto_converge") and defaults.compression == ""
    assert defaults.max_downtime_ms == 0 and defaults.max_bandwidth == 0
    args = cli.build_parser().parse_args(
        [*command, "--no-auto-converge", "--compression", "lz4", "--max-downtime-ms", "50",
         "--max-bandwidth", "1000000", "--timeout", "9"]
    )  # fmt: skip
    options = cli._options(args)
    assert options.HasField("auto_converge") and not options.auto_converge
    assert (options.compression, options.max_downtime_ms) == ("lz4", 50)
    assert (options.max_bandwidth, options.timeout_s) == (1_000_000, 9.0)


def test_json_output_is_the_documented_shape(
    cl: CoordCluster, capsys: pytest.CaptureFixture[str]
) -> None:
    addr = ["--coordinator", cl.coordinator.address]
    kernel = str(GUESTS / "ticker.elf")
    assert (
        cli.main(
            [
                "vm",
                "create",
                "j1",
                "--kernel",
                kernel,
                "--memory",
                "16M",
                "--selector",
                "zone=a",
                "--label",
                "app=t",
                "--json",
                *addr,
            ]
        )
        == 0
    )
    created = json.loads(capsys.readouterr().out)
    assert set(created) == VM_KEYS
    assert created["node"] == "na" and created["state"] == "running"
    assert created["node_selector"] == {"zone": "a"} and created["labels"] == {"app": "t"}
    assert cli.main(["vm", "ls", "--json", *addr]) == 0
    listed = json.loads(capsys.readouterr().out)
    assert [v["name"] for v in listed] == ["j1"] and set(listed[0]) == VM_KEYS
    assert cli.main(["node", "ls", "--json", *addr]) == 0
    nodes = json.loads(capsys.readouterr().out)
    assert set(nodes[0]) == NODE_KEYS and nodes[0]["status"] == "ready"
    assert nodes[0]["used"]["memory_bytes"] == 16 << 20
    assert cli.main(["op", "ls", "--json", *addr]) == 0
    ops = json.loads(capsys.readouterr().out)
    assert ops[0]["kind"] == "create-vm" and ops[0]["state"] == "succeeded"
    assert cli.main(["op", "show", ops[0]["id"], "--json", *addr]) == 0
    assert json.loads(capsys.readouterr().out)["target"] == "j1"
    assert cli.main(["events", "--json", *addr]) == 0
    kinds = [json.loads(line)["kind"] for line in capsys.readouterr().out.splitlines()]
    assert "node-up" in kinds and "vm-placed" in kinds
    assert cli.main(["vm", "rm", "j1", "--json", *addr]) == 0
    assert json.loads(capsys.readouterr().out)["deleted"] is True


def test_tables_for_humans(cl: CoordCluster, capsys: pytest.CaptureFixture[str]) -> None:
    addr = ["--coordinator", cl.coordinator.address]
    assert cli.main(["node", "ls", *addr]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].split() == [
        "NAME",
        "STATUS",
        "ADDRESS",
        "VCPUS",
        "MEMORY",
        "VMS",
        "LABELS",
        "SEEN",
    ]
    assert lines[1].split()[:2] == ["na", "ready"]


def test_errors_are_one_line_with_a_nonzero_status(cl: CoordCluster) -> None:
    result = ferry("vm", "show", "nope", env={"FERRY_COORDINATOR": cl.coordinator.address})
    assert result.returncode == 1
    assert result.stderr == "ferry: no VM named 'nope'\n"
    result = ferry(
        "vm",
        "create",
        "huge",
        "--kernel",
        str(GUESTS / "ticker.elf"),
        "--memory",
        "64G",
        "--coordinator",
        cl.coordinator.address,
    )
    assert result.returncode == 1
    assert result.stderr.startswith("ferry: no node can take the VM (na: needs 65536 MiB")
    assert result.stderr.count("\n") == 1
    port = free_port()
    result = ferry("node", "ls", "--coordinator", f"127.0.0.1:{port}")
    assert result.returncode == 1
    assert result.stderr.startswith(f"ferry: cannot reach the coordinator at 127.0.0.1:{port}")
    result = ferry("vm", "create", "x", "--memory", "lots", "--kernel", "k")
    assert result.returncode == 2 and "invalid size 'lots'" in result.stderr


def test_console_dump_prints_the_guest_output(cl: CoordCluster) -> None:
    cl.create("cd")
    addr = ["--coordinator", cl.coordinator.address]
    try:
        out = ""
        for _ in range(100):
            result = ferry("vm", "console", "cd", "--dump", *addr)
            out = result.stdout
            if "tick 1" in out:
                break
        assert result.returncode == 0 and out.startswith("tick 0")
    finally:
        cl.stub.DeleteVM(cli.node_pb2.VMRef(name="cd"), timeout=60)


def test_cluster_up_status_down_leaves_nothing_running(tmp_path: Path) -> None:
    root = Path("/tmp") / f"ferry-cli-{os.getpid()}"
    try:
        up = ferry("cluster", "up", "--nodes", "2", "--dir", str(root), "--json")
        assert up.returncode == 0, up.stderr
        info = json.loads(up.stdout)
        assert info["nodes"] == ["node-1", "node-2"]
        nodes = ferry("node", "ls", "--json", env={"FERRY_COORDINATOR": info["coordinator"]})
        assert [n["status"] for n in json.loads(nodes.stdout)] == ["ready", "ready"]
        again = ferry("cluster", "up", "--dir", str(root))
        assert again.returncode == 1 and "already runs" in again.stderr
        status = json.loads(ferry("cluster", "status", "--dir", str(root), "--json").stdout)
        pids = [p["pid"] for p in status["processes"].values()]
        assert len(pids) == 3 and all(p["running"] for p in status["processes"].values())
        down = ferry("cluster", "down", "--dir", str(root))
        assert down.returncode == 0 and "coordinator" in down.stdout
        assert all(not Path(f"/proc/{pid}").exists() or _zombie(pid) for pid in pids)
    finally:
        ferry("cluster", "down", "--dir", str(root))
        subprocess.run(["rm", "-rf", str(root)], check=False)


def _zombie(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().split()[2] == "Z"
    except OSError:
        return True


def test_interactive_console_sends_keys_and_detaches_on_ctrl_bracket(cl: CoordCluster) -> None:
    cl.create("ia")
    try:
        result = subprocess.run(
            [
                sys.executable,
                "-m",
                "coordinator.cli",
                "--coordinator",
                cl.coordinator.address,
                "vm",
                "console",
                "ia",
            ],
            input=b"hello\x1d",
            capture_output=True,
            cwd=REPO,
            timeout=120,
        )
        assert result.returncode == 0
        assert b"[ferry: detached]" in result.stderr
    finally:
        cl.stub.DeleteVM(cli.node_pb2.VMRef(name="ia"), timeout=60)


def test_migrate_prints_the_finished_operation(cl: CoordCluster) -> None:
    from coordcluster import migration_available

    if not migration_available(cl.stub, cl.nodes[0]):
        pytest.skip("the agents do not implement live migration yet")
    cl.agent("nb", "zone=b")
    cl.create("mj", node="na")
    result = ferry(
        "vm", "migrate", "mj", "--to", "nb", "--json", "--coordinator", cl.coordinator.address
    )
    assert result.returncode == 0, result.stderr
    op = json.loads(result.stdout)
    assert op["kind"] == "migrate-vm" and op["state"] == "succeeded"
    item = op["items"][0]
    assert (item["source"], item["destination"]) == ("na", "nb")
    assert item["migration"]["status"] == "completed"
    assert item["migration"]["transferred"] > 0
    # Where the downtime went reaches the user through the coordinator.
    phases = item["migration"]["downtime_phases_ms"]
    assert set(phases) == {"pause", "final-round", "destination"}
    assert all(ms >= 0 for ms in phases.values())
    # So do its rounds, round 0 first and the switchover last.
    rounds = item["migration"]["rounds"]
    assert rounds[0]["number"] == 0 and rounds[0]["bytes"] > 0 and rounds[-1]["switchover"]
    # Every per-migration option reaches the node: forced zstd compresses what it can
    # shrink (the guest's code, at least); "none" never compresses.
    for compression, compressed in (("zstd", True), ("none", False)):
        back = ferry(
            "vm", "migrate", "mj", "--to", "na" if item["destination"] == "nb" else "nb",
            "--compression", compression, "--no-auto-converge", "--max-downtime-ms", "250",
            "--json", "--coordinator", cl.coordinator.address,
        )  # fmt: skip
        assert back.returncode == 0, back.stderr
        item = json.loads(back.stdout)["items"][0]
        assert item["migration"]["status"] == "completed"
        assert (item["migration"].get("compressed_bytes", 0) > 0) == compressed, json.dumps(item)
    wrong = ferry("vm", "migrate", "mj", "--compression", "gzip", "--coordinator", "x:1")
    assert wrong.returncode == 2 and "invalid choice: 'gzip'" in wrong.stderr
    again = ferry("vm", "migrate", "mj", "--to", "nb", "--coordinator", cl.coordinator.address)
    assert again.returncode == 1 and again.stderr == "ferry: VM mj already runs on nb\n"
    cl.stub.DeleteVM(cli.node_pb2.VMRef(name="mj"), timeout=60)
