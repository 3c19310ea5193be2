"""`make demo`: a three-node Ferry cluster on this machine, live migration and a drain.

Every step is the ``ferry`` command a user would type (printed before it runs), against a
local cluster in a temporary directory. The ticker VM's console is followed through the
coordinator the whole time, so you can see it keep counting while the VM moves. A Linux VM
is live-migrated too, while its ``/init`` rewrites and checks a working set; it is created
first because booting Linux on a Python machine takes tens of seconds, which the other
steps overlap. At the end the cluster is shut down and the demo checks that nothing it
started still runs.
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

from coordinator.views import downtime_phases
from deploy import localcluster
from protos.ferry.v1 import coordinator_pb2, coordinator_pb2_grpc, node_pb2

REPO = Path(__file__).resolve().parent.parent
GUESTS = REPO / "guests" / "build"
LINUX_IMAGE = GUESTS / "linux" / "Image"
# Run forever (ticks=0) over a 2 MiB working set: the VM is still busy when it moves.
LINUX_APPEND = "console=ttyS0 earlycon -- ticks=0 wss=2"
# Generous: Linux boots in 20-60 s here, sharing two cores with the other VMs.
LINUX_BOOT_TIMEOUT = 300.0


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
    """Follows one VM's console through the coordinator, printing lines as they come.

    ``quiet`` stops the printing, not the following: the lines are still collected, so
    the demo can check the whole console for gaps and repeats whenever it looks.
    """

    def __init__(self, address: str, name: str, *, quiet: bool = False) -> None:
        self.channel = grpc.insecure_channel(address)
        self.stub = coordinator_pb2_grpc.CoordinatorStub(self.channel)
        self.name = name
        self.prefix = f"{name:>10} | "
        self.lines: list[str] = []
        self.notices: list[str] = []
        self.quiet = threading.Event()
        if quiet:
            self.quiet.set()
        # Held while a line is added and maybe printed, so `show_from` neither misses a
        # line nor prints one twice.
        self.lock = threading.Lock()
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
                    if not self.quiet.is_set():
                        print(f"{self.prefix}[ferry: {chunk.notice}]", flush=True)
                partial += chunk.data.decode("utf-8", "replace").replace("\r", "")
                *complete, partial = partial.split("\n")
                for line in complete:
                    with self.lock:
                        self.lines.append(line)
                        if not self.quiet.is_set():
                            print(f"{self.prefix}{line}", flush=True)

    def show_from(self, first: int) -> None:
        """Print the lines collected from index ``first`` on, then print new ones live."""
        with self.lock:
            for line in self.lines[first:]:
                print(f"{self.prefix}{line}", flush=True)
            self.quiet.clear()

    def wait_lines(self, count: int, timeout: float = 60.0) -> None:
        deadline = time.monotonic() + timeout
        while len(self.lines) < count:
            if time.monotonic() > deadline:
                raise DemoError(f"the {self.name} console stopped at {len(self.lines)} lines")
            time.sleep(0.05)

    def ticks(self) -> list[str]:
        """The numbers of the ``tick N ...`` lines so far, as printed."""
        return [ln.split()[1] for ln in list(self.lines) if ln.startswith("tick ")]

    def wait_ticks(self, count: int, timeout: float = 60.0) -> None:
        deadline = time.monotonic() + timeout
        while len(self.ticks()) < count:
            if any("CORRUPT" in ln for ln in self.lines):
                raise DemoError(f"{self.name} found its memory corrupted: {self.lines[-1]}")
            if time.monotonic() > deadline:
                raise DemoError(f"{self.name} printed {len(self.ticks())} ticks, not {count}")
            time.sleep(0.05)

    def check_ticks(self) -> list[str]:
        """The ticks so far, after checking that none was skipped or repeated."""
        ticks = self.ticks()
        if ticks != [str(i) for i in range(len(ticks))]:
            raise DemoError(f"the {self.name} console skipped or repeated a tick")
        if any("CORRUPT" in ln for ln in self.lines):
            raise DemoError(f"{self.name} found its memory corrupted")
        return ticks

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
                    downtime_phases(m) if live else item.message,
                )
            )
    return rows


def print_table(headers: tuple[str, ...], rows: list[tuple[str, ...]]) -> None:
    widths = [max(len(str(r[i])) for r in [headers, *rows]) for i in range(len(headers))]
    for row in [headers, *rows]:
        print("  ".join(str(c).ljust(w) for c, w in zip(row, widths, strict=True)).rstrip())


def vms(address: str) -> dict[str, dict[str, Any]]:
    return {v["name"]: v for v in json.loads(ferry(address, "vm", "ls", "--json", show=False))}


def migrate_linux(address: str, linux: ConsoleFollower) -> None:
    """Live-migrate the Linux VM while /init dirties and checks its working set."""
    say("Wait for Linux's /init to tick (its console, followed through the coordinator)")
    linux.wait_ticks(3, timeout=LINUX_BOOT_TIMEOUT)
    # What Linux printed so far, from the kernel handing over to /init; then live.
    linux.show_from(next((i for i, ln in enumerate(linux.lines) if "Run /init" in ln), 0))

    say("Live-migrate the Linux VM while its workload runs")
    source = vms(address)["linux"]["node"]
    last_tick = linux.ticks()[-1]
    ferry(address, "vm", "migrate", "linux")
    linux.wait_ticks(len(linux.ticks()) + 3)
    linux.quiet.set()
    after = vms(address)["linux"]["node"]
    if after == source:
        raise DemoError("the Linux VM did not move")
    ticks = linux.check_ticks()
    print(
        f"Linux moved {source} -> {after}; /init went on past tick {last_tick} with its "
        f"working set intact and its console without a gap or a repeat ({len(ticks)} ticks "
        "so far)"
    )


def run(root: Path) -> None:
    started = time.monotonic()
    say("Start a 3-node cluster (ferry cluster up --nodes 3)")
    info = localcluster.up(root, 3, vcpus=4, memory="512M", heartbeat_timeout=3.0)
    address = info["coordinator"]
    print(f"coordinator {address}; nodes {', '.join(info['nodes'])}; logs in {info['logs']}")

    say("Boot a Linux VM first: it boots while the next steps run")
    if not LINUX_IMAGE.exists():
        raise DemoError(f"{LINUX_IMAGE.relative_to(REPO)} is missing (make guests-linux)")
    ferry(
        address,
        "vm",
        "create",
        "linux",
        "--kernel",
        str(LINUX_IMAGE),
        "--bios",
        "default",
        "--memory",
        "64M",
        "--append",
        LINUX_APPEND,
    )
    linux = ConsoleFollower(address, "linux", quiet=True).start()

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

    migrate_linux(address, linux)

    say("Drain the node that runs dirtier-1")
    target = vms(address)["dirtier-1"]["node"]
    ferry(address, "node", "drain", target)
    ferry(address, "node", "ls")
    ferry(address, "vm", "ls")
    console.stop()
    linux.check_ticks()
    linux.stop()

    say("What moved")
    print_table(
        ("VM", "MOVE", "BY", "DOWNTIME-MS", "TOTAL-MS", "SENT", "DOWNTIME PHASES / NOTE"),
        migration_rows(address),
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
