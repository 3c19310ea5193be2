"""`make demo`: a three-node Ferry cluster on this machine, live migration and a drain.

Every step is the ``ferry`` command a user would type (printed before it runs), against a
local cluster in a temporary directory. The ticker VM's console is followed through the
coordinator the whole time, so you can see it keep counting while the VM moves. At the end
the cluster is shut down and the demo checks that nothing it started still runs.
"""

from __future__ import annotations

import contextlib
import json
import os
import shlex
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import grpc

from deploy import localcluster
from protos.ferry.v1 import coordinator_pb2, coordinator_pb2_grpc, node_pb2

REPO = Path(__file__).resolve().parent.parent
GUESTS = REPO / "guests" / "build"
TICKER_PREFIX = "    ticker | "


class DemoError(Exception):
    """A step failed; the message says which and why."""


def say(text: str) -> None:
    print(f"\n\033[1m== {text}\033[0m", flush=True)


def ferry(address: str, *args: str, check: bool = True, show: bool = True) -> str:
    """Run one ``ferry`` command as a user would, show it and its output."""
    shown = "ferry " + " ".join(shlex.quote(a) for a in args)
    if show:
        print(f"$ {shown}", flush=True)
    result = subprocess.run(
        [sys.executable, "-m", "coordinator.cli", "--coordinator", address, *args],
        cwd=REPO,
        stdout=subprocess.PIPE,
        text=True,
    )
    if result.stdout and show:
        print(result.stdout.rstrip(), flush=True)
    if check and result.returncode != 0:
        raise DemoError(f"`{shown}` failed (exit {result.returncode})")
    return result.stdout


class ConsoleFollower:
    """Follows one VM's console through the coordinator, printing lines as they come."""

    def __init__(self, address: str, name: str) -> None:
        self.channel = grpc.insecure_channel(address)
        self.stub = coordinator_pb2_grpc.CoordinatorStub(self.channel)
        self.name = name
        self.lines: list[str] = []
        self.notices: list[str] = []
        self.quiet = threading.Event()
        self.call: Any = None
        self.thread = threading.Thread(target=self._run, daemon=True)

    def start(self) -> ConsoleFollower:
        self.thread.start()
        return self

    def _run(self) -> None:
        def requests() -> Any:
            yield node_pb2.ConsoleRequest(
                open=node_pb2.ConsoleOpen(name=self.name, offset=0, follow=True)
            )

        partial = ""
        with contextlib.suppress(grpc.RpcError):
            self.call = self.stub.Console(requests())
            for chunk in self.call:
                if chunk.notice:
                    self.notices.append(chunk.notice)
                    print(f"{TICKER_PREFIX}[ferry: {chunk.notice}]", flush=True)
                partial += chunk.data.decode("utf-8", "replace").replace("\r", "")
                *complete, partial = partial.split("\n")
                for line in complete:
                    self.lines.append(line)
                    if not self.quiet.is_set():
                        print(f"{TICKER_PREFIX}{line}", flush=True)

    def wait_lines(self, count: int, timeout: float = 60.0) -> None:
        deadline = time.monotonic() + timeout
        while len(self.lines) < count:
            if time.monotonic() > deadline:
                raise DemoError(f"the ticker's console stopped at {len(self.lines)} lines")
            time.sleep(0.05)

    def stop(self) -> None:
        if self.call is not None:
            self.call.cancel()
        self.thread.join(timeout=10)
        self.channel.close()


def human(n: int) -> str:
    for unit, shift in (("GiB", 30), ("MiB", 20), ("KiB", 10)):
        if n >= 1 << shift:
            return f"{n / (1 << shift):.1f} {unit}"
    return f"{n} B"


def migration_rows(address: str) -> list[tuple[str, ...]]:
    with grpc.insecure_channel(address) as channel:
        stub = coordinator_pb2_grpc.CoordinatorStub(channel)
        ops = stub.ListOperations(coordinator_pb2.ListOperationsRequest(limit=100)).operations
    rows: list[tuple[str, ...]] = []
    for op in reversed(ops):
        if op.kind not in ("migrate-vm", "drain-node"):
            continue
        for item in op.items:
            m = item.migration
            live = item.HasField("migration") and m.status
            rows.append(
                (
                    item.vm,
                    f"{item.source} -> {item.destination}",
                    op.kind,
                    f"{m.downtime_ms:.1f}" if live else "-",
                    f"{m.total_time_ms:.0f}" if live else "-",
                    human(m.transferred) if live else "-",
                    item.message if not live else "",
                )
            )
    return rows


def print_table(headers: tuple[str, ...], rows: list[tuple[str, ...]]) -> None:
    widths = [max(len(str(r[i])) for r in [headers, *rows]) for i in range(len(headers))]
    for row in [headers, *rows]:
        print("  ".join(str(c).ljust(w) for c, w in zip(row, widths, strict=True)).rstrip())


def vms(address: str) -> dict[str, dict[str, Any]]:
    return {v["name"]: v for v in json.loads(ferry(address, "vm", "ls", "--json", show=False))}


def run(root: Path) -> None:
    started = time.monotonic()
    say("Start a 3-node cluster (ferry cluster up --nodes 3)")
    info = localcluster.up(root, 3, vcpus=4, memory="512M", heartbeat_timeout=3.0)
    address = info["coordinator"]
    print(f"coordinator {address}; nodes {', '.join(info['nodes'])}; logs in {info['logs']}")

    say("Create two dirtier VMs and one ticker")
    dirtier = str(GUESTS / "dirtier.elf")
    ticker = str(GUESTS / "ticker.elf")
    for name in ("dirtier-1", "dirtier-2"):
        ferry(
            address,
            "vm",
            "create",
            name,
            "--kernel",
            dirtier,
            "--memory",
            "64M",
            "--append",
            "wss=8 rate=200",
            "--anti-affinity",
            "dirtiers",
        )
    ferry(address, "vm", "create", "ticker", "--kernel", ticker, "--memory", "16M")

    say("The cluster")
    ferry(address, "node", "ls")
    ferry(address, "vm", "ls")

    say("Follow the ticker's console through the coordinator")
    console = ConsoleFollower(address, "ticker").start()
    console.wait_lines(3)

    say("Live-migrate the ticker while its console keeps printing")
    source = vms(address)["ticker"]["node"]
    before = len(console.lines)
    last_tick = [ln.split()[1] for ln in console.lines if ln.startswith("tick ")][-1]
    ferry(address, "vm", "migrate", "ticker")
    console.wait_lines(before + 3)
    after = vms(address)["ticker"]["node"]
    if after == source:
        raise DemoError("the ticker did not move")
    ticks = [ln.split()[1] for ln in console.lines if ln.startswith("tick ")]
    if ticks != [str(i) for i in range(len(ticks))]:
        raise DemoError("the ticker's console skipped or repeated lines across the move")
    print(
        f"the ticker moved {source} -> {after}; its console went on past tick {last_tick} "
        f"without a gap or a repeat ({len(ticks)} ticks so far)"
    )
    console.quiet.set()

    say("Drain the node that runs dirtier-1")
    target = vms(address)["dirtier-1"]["node"]
    ferry(address, "node", "drain", target)
    ferry(address, "node", "ls")
    ferry(address, "vm", "ls")
    console.stop()

    say("What moved")
    print_table(
        ("VM", "MOVE", "BY", "DOWNTIME-MS", "TOTAL-MS", "SENT", "NOTE"), migration_rows(address)
    )
    say("Recent cluster events")
    subprocess.run(
        [sys.executable, "-m", "coordinator.cli", "--coordinator", address, "events"],
        cwd=REPO,
        check=False,
    )
    print(f"\ndemo steps took {time.monotonic() - started:.1f} s")


def main() -> int:
    root = Path(tempfile.mkdtemp(prefix="ferry-demo-", dir="/tmp"))
    status = 0
    try:
        run(root)
    except DemoError as e:
        print(f"\ndemo failed: {e}", file=sys.stderr)
        status = 1
    except localcluster.ClusterError as e:
        print(f"\ndemo failed: the local cluster did not start: {e}", file=sys.stderr)
        status = 1
    except grpc.RpcError as e:
        print(f"\ndemo failed: {e.details()}", file=sys.stderr)
        status = 1
    except KeyboardInterrupt:
        status = 130
    except BaseException:
        status = 1
        raise
    finally:
        # Stop everything before printing anything: the output may be a closed pipe.
        stopped = localcluster.down(root)
        running = localcluster.leftovers(root)
        clean = not running
        if not clean:
            status = status or 1
        if status == 0 or os.environ.get("FERRY_DEMO_KEEP") != "1":
            shutil.rmtree(root, ignore_errors=True)
        with contextlib.suppress(OSError):
            say("Shut the cluster down (ferry cluster down)")
            print("stopped: " + ", ".join(stopped))
            if clean:
                print("nothing left running")
            else:
                print(f"demo: processes still running: {running}")
            if root.exists():
                print(f"logs kept in {root}")
    return status


if __name__ == "__main__":
    raise SystemExit(main())
