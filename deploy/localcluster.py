"""A whole Ferry cluster on this machine: one coordinator and N agents on 127.0.0.1.

``ferry cluster up`` runs this module. Everything it starts is a background process in its
own session, with its log under ``DIR/logs`` and its pid under ``DIR/pids``; the
coordinator's address goes to ``DIR/cluster.json``, which the ``ferry`` CLI reads when no
address is given. ``down`` ends exactly these processes (and the VM workers their agents
started, which outlive agents on purpose): every pid is checked against
``/proc/PID/cmdline`` first, so a recycled pid is never hit.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from protos.ferry.v1 import coordinator_pb2, coordinator_pb2_grpc

REPO = Path(__file__).resolve().parent.parent
DEFAULT_DIR = Path(".ferry-cluster")
READY_TIMEOUT = 120.0
STOP_TIMEOUT = 10.0


class ClusterError(Exception):
    """Something a user can fix (a cluster already up, a port taken); one line."""


@dataclass
class Layout:
    """Where one local cluster keeps its files."""

    root: Path

    @property
    def info(self) -> Path:
        return self.root / "cluster.json"

    @property
    def logs(self) -> Path:
        return self.root / "logs"

    @property
    def pids(self) -> Path:
        return self.root / "pids"

    @property
    def state(self) -> Path:
        return self.root / "coordinator.db"

    def node_dir(self, name: str) -> Path:
        return self.root / "nodes" / name


def _cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
    except OSError:
        return ""


def _ours(pid: int, module: str, root: Path) -> bool:
    """Whether ``pid`` is still the process we started (module and directory match)."""
    line = _cmdline(pid)
    return module in line and str(root) in line


def _spawn(layout: Layout, name: str, module: str, args: list[str]) -> subprocess.Popen[bytes]:
    layout.logs.mkdir(parents=True, exist_ok=True)
    layout.pids.mkdir(parents=True, exist_ok=True)
    with open(layout.logs / f"{name}.log", "ab") as log:
        process = subprocess.Popen(
            [sys.executable, "-m", module, *args],
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            cwd=REPO,
            start_new_session=True,
        )
    (layout.pids / f"{name}.pid").write_text(f"{process.pid} {module}\n")
    return process


def _read_pids(layout: Layout) -> dict[str, tuple[int, str]]:
    pids = {}
    for path in sorted(layout.pids.glob("*.pid")):
        with contextlib.suppress(OSError, ValueError):
            pid, module = path.read_text().split()
            pids[path.stem] = (int(pid), module)
    return pids


def _last_line(path: Path) -> str:
    try:
        lines = path.read_text(errors="replace").strip().splitlines()
    except OSError:
        return "no output"
    return lines[-1] if lines else "no output"


def _wait_ready(layout: Layout, address: str, agents: dict[str, subprocess.Popen[bytes]]) -> None:
    deadline = time.monotonic() + READY_TIMEOUT
    with grpc.insecure_channel(address) as channel:
        health = health_pb2_grpc.HealthStub(channel)
        health.Check(health_pb2.HealthCheckRequest(), timeout=30, wait_for_ready=True)
        stub = coordinator_pb2_grpc.CoordinatorStub(channel)
        while True:
            reply = stub.ListNodes(coordinator_pb2.ListNodesRequest(), timeout=10)
            ready = {n.name for n in reply.nodes if n.state == coordinator_pb2.NODE_STATE_READY}
            if set(agents) <= ready:
                return
            for name, process in agents.items():
                if process.poll() is not None:
                    last = _last_line(layout.logs / f"{name}.log")
                    raise ClusterError(f"agent {name} exited: {last}")
            if time.monotonic() > deadline:
                missing = ", ".join(sorted(set(agents) - ready))
                raise ClusterError(f"nodes did not register in time: {missing}")
            time.sleep(0.1)


def up(
    root: Path,
    nodes: int = 3,
    *,
    vcpus: int = 4,
    memory: str = "1G",
    heartbeat_timeout: float = 5.0,
    extra_coordinator_args: list[str] | None = None,
) -> dict[str, Any]:
    """Start the cluster and return what ``cluster.json`` holds."""
    layout = Layout(root.resolve())
    if any(_ours(pid, module, layout.root) for pid, module in _read_pids(layout).values()):
        raise ClusterError(
            f"a local cluster already runs in {layout.root}; run `ferry cluster down` first"
        )
    if nodes < 1:
        raise ClusterError("--nodes must be at least 1")
    layout.root.mkdir(parents=True, exist_ok=True)
    with contextlib.suppress(FileNotFoundError):
        layout.info.unlink()
    for stale in layout.pids.glob("*.pid"):
        stale.unlink()
    coordinator = _spawn(
        layout,
        "coordinator",
        "coordinator.server",
        [
            "--listen",
            "127.0.0.1:0",
            "--state",
            str(layout.state),
            "--ready-file",
            str(layout.root / "coordinator.json"),
            "--heartbeat-timeout",
            str(heartbeat_timeout),
            *(extra_coordinator_args or []),
        ],
    )
    names = [f"node-{i + 1}" for i in range(nodes)]
    address = ""
    agents: dict[str, subprocess.Popen[bytes]] = {}
    try:
        address = _wait_for_address(layout, coordinator)
        for name in names:
            agents[name] = _spawn(
                layout,
                name,
                "node.agent",
                [
                    "--name",
                    name,
                    "--listen",
                    "127.0.0.1:0",
                    "--data-dir",
                    str(layout.node_dir(name)),
                    "--coordinator",
                    address,
                    "--vcpus",
                    str(vcpus),
                    "--memory",
                    memory,
                ],
            )
        _wait_ready(layout, address, agents)
    except BaseException:
        # These processes may not have exec'd yet, so their cmdline cannot be checked:
        # end them by the handles we hold, then whatever else down() finds.
        for process in [coordinator, *agents.values()]:
            if process.poll() is None:
                process.kill()
                process.wait()
        down(layout.root)
        raise
    info: dict[str, Any] = {
        "coordinator": address,
        "dir": str(layout.root),
        "nodes": names,
        "logs": str(layout.logs),
    }
    layout.info.write_text(json.dumps(info, indent=2) + "\n")
    return info


def _wait_for_address(layout: Layout, process: subprocess.Popen[bytes]) -> str:
    deadline = time.monotonic() + READY_TIMEOUT
    while time.monotonic() < deadline:
        with contextlib.suppress(OSError, ValueError, KeyError):
            data = json.loads((layout.root / "coordinator.json").read_text())
            if data["pid"] == process.pid:
                return str(data["address"])
        if process.poll() is not None:
            last = _last_line(layout.logs / "coordinator.log")
            raise ClusterError(f"the coordinator exited: {last}")
        time.sleep(0.05)
    raise ClusterError(f"the coordinator did not come up; see {layout.logs}")


def _workers(layout: Layout) -> list[int]:
    pids = []
    for pid_file in layout.root.glob("nodes/*/vms/*/worker.pid"):
        with contextlib.suppress(OSError, ValueError):
            pid = int(pid_file.read_text().split()[0])
            if _ours(pid, "node.worker", layout.root):
                pids.append(pid)
    return pids


def _stop(pids: list[int], check: list[tuple[int, str]], root: Path) -> None:
    for pid in pids:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + STOP_TIMEOUT
    alive = list(check)
    while alive and time.monotonic() < deadline:
        alive = [(pid, module) for pid, module in alive if _ours(pid, module, root)]
        time.sleep(0.05)
    for pid, module in alive:
        if _ours(pid, module, root):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)


def down(root: Path) -> list[str]:
    """Stop the cluster's agents, their VM workers and the coordinator; the names stopped."""
    layout = Layout(root.resolve())
    pids = _read_pids(layout)
    stopped = []
    agents = [(pid, m) for name, (pid, m) in pids.items() if _ours(pid, m, layout.root)]
    stopped = [name for name, (pid, m) in pids.items() if _ours(pid, m, layout.root)]
    # Agents first (so none restarts a worker), then workers, which outlive agents on
    # purpose, then the coordinator.
    nodes = [(pid, m) for pid, m in agents if m == "node.agent"]
    _stop([pid for pid, _ in nodes], nodes, layout.root)
    workers = [(pid, "node.worker") for pid in _workers(layout)]
    _stop([pid for pid, _ in workers], workers, layout.root)
    rest = [(pid, m) for pid, m in agents if m != "node.agent"]
    _stop([pid for pid, _ in rest], rest, layout.root)
    for path in layout.pids.glob("*.pid"):
        path.unlink()
    with contextlib.suppress(FileNotFoundError):
        layout.info.unlink()
    if workers:
        stopped.append(f"{len(workers)} VM workers")
    return stopped


def leftovers(root: Path) -> list[int]:
    """Pids of any process still running with the cluster's directory on its command line."""
    marker = str(root.resolve())
    found = []
    for proc in Path("/proc").iterdir():
        if proc.name.isdigit() and int(proc.name) != os.getpid():
            line = _cmdline(int(proc.name))
            if marker in line and not _zombie(int(proc.name)):
                found.append(int(proc.name))
    return found


def _zombie(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] == "Z"
    except (OSError, IndexError):
        return True


def status(root: Path) -> dict[str, Any]:
    layout = Layout(root.resolve())
    processes = {
        name: {"pid": pid, "running": _ours(pid, module, layout.root)}
        for name, (pid, module) in _read_pids(layout).items()
    }
    info: dict[str, Any] = {}
    with contextlib.suppress(OSError, ValueError):
        info = json.loads(layout.info.read_text())
    return {
        "dir": str(layout.root),
        "coordinator": info.get("coordinator", ""),
        "processes": processes,
        "workers": len(_workers(layout)),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="ferry cluster", description="A local Ferry cluster on 127.0.0.1."
    )
    parser.add_argument("command", choices=("up", "down", "status"))
    parser.add_argument("--dir", type=Path, default=DEFAULT_DIR)
    parser.add_argument("--nodes", type=int, default=3)
    parser.add_argument("--vcpus", type=int, default=4)
    parser.add_argument("--memory", default="1G")
    parser.add_argument("--heartbeat-timeout", type=float, default=5.0)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args(argv)
    try:
        if args.command == "up":
            info = up(
                args.dir,
                args.nodes,
                vcpus=args.vcpus,
                memory=args.memory,
                heartbeat_timeout=args.heartbeat_timeout,
            )
            if args.json:
                print(json.dumps(info, indent=2))
            else:
                default = Path(args.dir).resolve() == DEFAULT_DIR.resolve()
                print(
                    f"Ferry cluster up: coordinator {info['coordinator']}, nodes "
                    f"{', '.join(info['nodes'])}"
                )
                print(f"logs: {info['logs']}")
                if not default:
                    print(f"export FERRY_COORDINATOR={info['coordinator']}")
                print("try:  ferry node ls")
                print("      ferry vm create hello --kernel guests/build/ticker.elf --memory 16M")
                print("      ferry vm console hello --follow")
                print(f"stop: ferry cluster down{'' if default else f' --dir {args.dir}'}")
        elif args.command == "down":
            stopped = down(args.dir)
            if args.json:
                print(json.dumps({"stopped": stopped}))
            else:
                print("stopped: " + (", ".join(stopped) if stopped else "nothing was running"))
        else:
            report = status(args.dir)
            if args.json:
                print(json.dumps(report, indent=2))
            else:
                print(f"dir:         {report['dir']}")
                print(f"coordinator: {report['coordinator'] or '-'}")
                for name, p in report["processes"].items():
                    print(f"  {name:<12} pid {p['pid']:<8} {'running' if p['running'] else 'gone'}")
                print(f"VM workers:  {report['workers']}")
    except ClusterError as e:
        print(f"ferry cluster: {e}", file=sys.stderr)
        return 1
    except grpc.RpcError as e:
        print(f"ferry cluster: the coordinator did not answer: {e.details()}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
