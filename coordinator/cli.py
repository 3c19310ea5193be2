"""ferry: the command-line client of a Ferry cluster.

Every command is one or two calls to the coordinator's API. Output is a table for humans
or, with ``--json``, the stable shapes of :mod:`coordinator.views` (see docs/cli.md). A
refused request prints one line (the coordinator's own message) and exits 1; a usage error
exits 2. ``ferry cluster`` runs the local-cluster launcher (``deploy.localcluster``) as a
separate program, since the coordinator package never imports deployment code.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import subprocess
import sys
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, TextIO

import grpc

from coordinator import views
from protos.ferry.v1 import coordinator_pb2, coordinator_pb2_grpc, node_pb2, types_pb2

DEFAULT_ADDRESS = "127.0.0.1:7400"
DEFAULT_CLUSTER_DIR = ".ferry-cluster"
DETACH = b"\x1d"  # Ctrl-]
RPC_TIMEOUT = 120.0
_SIZE = re.compile(r"^\s*(\d+)\s*([KMGT]?)(?:I?B)?\s*$", re.IGNORECASE)
_UNITS = {"": 1 << 20, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}


class UsageError(Exception):
    """A command line that cannot work; one line, exit status 2."""


# -- arguments ---------------------------------------------------------------------------


def parse_size(text: str) -> int:
    m = _SIZE.match(text)
    if m is None:
        raise argparse.ArgumentTypeError(f"invalid size {text!r} (expected e.g. 64M, 1G)")
    return int(m.group(1)) * _UNITS[m.group(2).upper()]


def parse_pair(text: str) -> tuple[str, str]:
    key, sep, value = text.partition("=")
    if not sep or not key:
        raise argparse.ArgumentTypeError(f"{text!r}: expected KEY=VALUE")
    return key, value


def coordinator_address(explicit: str | None) -> str:
    """--coordinator, else $FERRY_COORDINATOR, else the local cluster's, else the default."""
    if explicit:
        return explicit
    env = os.environ.get("FERRY_COORDINATOR")
    if env:
        return env
    cluster_dir = Path(os.environ.get("FERRY_CLUSTER_DIR", DEFAULT_CLUSTER_DIR))
    with contextlib.suppress(OSError, ValueError, KeyError):
        return str(json.loads((cluster_dir / "cluster.json").read_text())["coordinator"])
    return DEFAULT_ADDRESS


# -- the client --------------------------------------------------------------------------


class Client:
    def __init__(self, address: str) -> None:
        self.address = address
        self.channel = grpc.insecure_channel(address)
        self.stub = coordinator_pb2_grpc.CoordinatorStub(self.channel)

    def close(self) -> None:
        self.channel.close()


def _out(args: argparse.Namespace, data: Any, human: Callable[[], str]) -> None:
    if args.json:
        print(json.dumps(data, indent=2, sort_keys=False))
    else:
        text = human()
        if text:
            print(text)


def _options(args: argparse.Namespace) -> types_pb2.MigrationOptions:
    options = types_pb2.MigrationOptions(
        max_downtime_ms=args.max_downtime_ms or 0,
        max_bandwidth=args.max_bandwidth or 0,
        timeout_s=args.timeout or 0.0,
        compression=args.compression or "",
    )
    if args.no_auto_converge:
        options.auto_converge = False
    return options


# -- nodes -------------------------------------------------------------------------------


def node_ls(c: Client, args: argparse.Namespace) -> int:
    nodes = list(c.stub.ListNodes(coordinator_pb2.ListNodesRequest(), timeout=RPC_TIMEOUT).nodes)
    _out(args, [views.node_json(n) for n in nodes], lambda: views.nodes_table(nodes))
    return 0


def node_show(c: Client, args: argparse.Namespace) -> int:
    node = c.stub.GetNode(coordinator_pb2.NodeRef(name=args.name), timeout=RPC_TIMEOUT)
    vms = list(
        c.stub.ListVMs(
            coordinator_pb2.ListClusterVMsRequest(node=args.name), timeout=RPC_TIMEOUT
        ).vms
    )
    data = {**views.node_json(node), "vms": [views.vm_json(v) for v in vms]}
    _out(args, data, lambda: views.node_detail(node, vms))
    return 0


def node_cordon(c: Client, args: argparse.Namespace) -> int:
    node = c.stub.CordonNode(coordinator_pb2.NodeRef(name=args.name), timeout=RPC_TIMEOUT)
    _out(args, views.node_json(node), lambda: f"node {node.name} cordoned")
    return 0


def node_uncordon(c: Client, args: argparse.Namespace) -> int:
    node = c.stub.UncordonNode(coordinator_pb2.NodeRef(name=args.name), timeout=RPC_TIMEOUT)
    _out(args, views.node_json(node), lambda: f"node {node.name} uncordoned")
    return 0


def node_drain(c: Client, args: argparse.Namespace) -> int:
    op = c.stub.DrainNode(
        coordinator_pb2.DrainNodeRequest(
            name=args.name, max_parallel=args.max_parallel or 0, options=_options(args)
        ),
        timeout=RPC_TIMEOUT,
    )
    return _finish_op(c, args, op)


# -- VMs ---------------------------------------------------------------------------------


def vm_create(c: Client, args: argparse.Namespace) -> int:
    kernel = args.kernel
    if not os.path.isabs(kernel) and os.path.exists(kernel):
        # A local cluster's nodes share this file system: make the path mean the same there.
        kernel = os.path.abspath(kernel)
    spec = types_pb2.VMSpec(
        name=args.name,
        memory_bytes=args.memory,
        vcpus=args.vcpus,
        kernel=kernel,
        bios=args.bios or "",
        append=args.append or "",
        deterministic=args.deterministic,
        labels=dict(args.label),
    )
    reply = c.stub.CreateVM(
        coordinator_pb2.PlaceVMRequest(
            spec=spec,
            no_start=args.no_start,
            node=args.node or "",
            node_selector=dict(args.selector),
            anti_affinity_group=args.anti_affinity or "",
        ),
        timeout=RPC_TIMEOUT,
    )
    vm = reply.vm
    _out(
        args,
        views.vm_json(vm),
        lambda: f"VM {vm.spec.name} created on {vm.node}: {views.vm_state(vm.state)}",
    )
    return 0


def vm_ls(c: Client, args: argparse.Namespace) -> int:
    vms = list(
        c.stub.ListVMs(
            coordinator_pb2.ListClusterVMsRequest(node=args.node or ""), timeout=RPC_TIMEOUT
        ).vms
    )
    _out(args, [views.vm_json(v) for v in vms], lambda: views.vms_table(vms))
    return 0


def vm_show(c: Client, args: argparse.Namespace) -> int:
    vm = c.stub.GetVM(node_pb2.VMRef(name=args.name), timeout=RPC_TIMEOUT)
    _out(args, views.vm_json(vm), lambda: views.vm_detail(vm))
    return 0


def vm_start(c: Client, args: argparse.Namespace) -> int:
    vm = c.stub.StartVM(node_pb2.VMRef(name=args.name), timeout=RPC_TIMEOUT).vm
    _out(args, views.vm_json(vm), lambda: f"VM {vm.spec.name}: {views.vm_state(vm.state)}")
    return 0


def vm_stop(c: Client, args: argparse.Namespace) -> int:
    request = node_pb2.StopVMRequest(
        name=args.name, timeout_seconds=args.timeout or 0.0, force=args.force
    )
    vm = c.stub.StopVM(request, timeout=RPC_TIMEOUT).vm
    _out(args, views.vm_json(vm), lambda: f"VM {vm.spec.name}: {views.vm_state(vm.state)}")
    return 0


def vm_rm(c: Client, args: argparse.Namespace) -> int:
    reply = c.stub.DeleteVM(node_pb2.VMRef(name=args.name), timeout=RPC_TIMEOUT)
    _out(
        args,
        {"name": args.name, "deleted": True, "operation": reply.operation},
        lambda: f"VM {args.name} deleted",
    )
    return 0


def vm_migrate(c: Client, args: argparse.Namespace) -> int:
    op = c.stub.MigrateVM(
        coordinator_pb2.MigrateVMRequest(
            name=args.name, node=args.to or "", options=_options(args)
        ),
        timeout=RPC_TIMEOUT,
    )
    return _finish_op(c, args, op)


def vm_console(c: Client, args: argparse.Namespace) -> int:
    interactive = not args.follow and not args.dump
    return attach_console(
        c, args.name, offset=args.offset, follow=not args.dump, interactive=interactive
    )


def attach_console(
    c: Client, name: str, *, offset: int, follow: bool, interactive: bool, out: TextIO | None = None
) -> int:
    """Stream a VM's console to stdout (following it across migrations).

    Interactive mode puts a terminal into raw mode and sends keystrokes to the guest until
    Ctrl-] (as telnet and ``virsh console`` use); the terminal is restored on any exit.
    """
    stdout = (out or sys.stdout).buffer if hasattr(out or sys.stdout, "buffer") else None
    stop = threading.Event()
    inputs: list[bytes] = []
    have_input = threading.Condition()

    def requests() -> Iterator[node_pb2.ConsoleRequest]:
        yield node_pb2.ConsoleRequest(
            open=node_pb2.ConsoleOpen(name=name, offset=offset, follow=follow)
        )
        while not stop.is_set():
            with have_input:
                have_input.wait_for(lambda: bool(inputs) or stop.is_set(), timeout=0.5)
                pending, inputs[:] = list(inputs), []
            for data in pending:
                yield node_pb2.ConsoleRequest(input=data)

    call = c.stub.Console(requests())
    restore: Callable[[], None] = lambda: None  # noqa: E731
    if interactive:
        restore = _start_keyboard(call, stop, inputs, have_input)
    final = types_pb2.VM_STATE_UNSPECIFIED
    try:
        for chunk in call:
            if chunk.notice:
                sys.stderr.write(f"\r\n[ferry: {chunk.notice}]\r\n")
                sys.stderr.flush()
            if chunk.data:
                if stdout is not None:
                    stdout.write(chunk.data)
                    stdout.flush()
                else:
                    (out or sys.stdout).write(chunk.data.decode("utf-8", "replace"))
            if chunk.vm_state:
                final = chunk.vm_state
    except grpc.RpcError as e:
        if e.code() != grpc.StatusCode.CANCELLED:
            raise
    finally:
        stop.set()
        with have_input:
            have_input.notify_all()
        restore()
    if interactive:
        sys.stderr.write("\r\n[ferry: detached]\r\n")
    elif follow and final:
        sys.stderr.write(f"[ferry: VM {name} is {views.vm_state(final)}]\n")
    return 0


def _start_keyboard(
    call: Any, stop: threading.Event, inputs: list[bytes], have_input: threading.Condition
) -> Callable[[], None]:
    """Read stdin in a thread (raw mode on a terminal); Ctrl-] or EOF detaches."""
    fd = sys.stdin.fileno()
    restore: Callable[[], None] = lambda: None  # noqa: E731
    if os.isatty(fd):
        import termios
        import tty

        saved = termios.tcgetattr(fd)
        tty.setraw(fd)

        def restore() -> None:
            termios.tcsetattr(fd, termios.TCSADRAIN, saved)

        sys.stderr.write("[ferry: attached; Ctrl-] detaches]\r\n")

    def read() -> None:
        while not stop.is_set():
            try:
                data = os.read(fd, 1024)
            except OSError:
                data = b""
            if not data or DETACH in data:
                before = data.split(DETACH, 1)[0]
                if before:
                    with have_input:
                        inputs.append(before)
                        have_input.notify_all()
                stop.set()
                call.cancel()
                return
            with have_input:
                inputs.append(data)
                have_input.notify_all()

    threading.Thread(target=read, name="console-keyboard", daemon=True).start()
    return restore


# -- operations and events ---------------------------------------------------------------


def _progress_line(op: coordinator_pb2.Operation) -> str:
    width = 24
    filled = int(op.progress * width)
    bar = "#" * filled + "-" * (width - filled)
    detail = ""
    running = [i for i in op.items if i.state == coordinator_pb2.OPERATION_STATE_RUNNING]
    if len(op.items) == 1:
        detail = op.items[0].message
    elif op.items:
        done = sum(1 for i in op.items if i.state != coordinator_pb2.OPERATION_STATE_RUNNING)
        detail = f"{done}/{len(op.items)} VMs done"
        if running:
            detail += "; " + ", ".join(f"{i.vm}: {i.message}" for i in running[:3])
    return f"{op.kind} {op.target} [{bar}] {op.progress * 100:3.0f}% {detail}"


def watch_op(
    c: Client, op_id: str, show: Callable[[coordinator_pb2.Operation], None]
) -> coordinator_pb2.Operation:
    last = None
    for op in c.stub.WatchOperation(coordinator_pb2.OperationRef(id=op_id)):
        show(op)
        last = op
    if last is None:
        last = c.stub.GetOperation(coordinator_pb2.OperationRef(id=op_id), timeout=RPC_TIMEOUT)
    return last


def _finish_op(c: Client, args: argparse.Namespace, op: coordinator_pb2.Operation) -> int:
    """Follow an operation to its end with a live progress line (unless --no-wait)."""
    if getattr(args, "no_wait", False):
        _out(args, views.op_json(op), lambda: f"{op.kind} {op.target}: operation {op.id}")
        return 0
    tty = sys.stderr.isatty() and not args.json
    last_line = [""]

    def show(current: coordinator_pb2.Operation) -> None:
        if args.json:
            return
        line = _progress_line(current)
        if line == last_line[0]:
            return
        last_line[0] = line
        if tty:
            sys.stderr.write("\r\x1b[K" + line[: os.get_terminal_size(2).columns - 1])
        else:
            sys.stderr.write(line + "\n")
        sys.stderr.flush()

    final = watch_op(c, op.id, show)
    if tty:
        sys.stderr.write("\n")
    _out(args, views.op_json(final), lambda: views.op_detail(final))
    if final.state == coordinator_pb2.OPERATION_STATE_FAILED:
        if not args.json:
            print(f"ferry: {final.kind} {final.target} failed: {final.error}", file=sys.stderr)
        return 1
    return 0


def op_ls(c: Client, args: argparse.Namespace) -> int:
    ops = list(
        c.stub.ListOperations(
            coordinator_pb2.ListOperationsRequest(limit=args.limit, target=args.target or ""),
            timeout=RPC_TIMEOUT,
        ).operations
    )
    _out(args, [views.op_json(o) for o in ops], lambda: views.ops_table(ops))
    return 0


def op_show(c: Client, args: argparse.Namespace) -> int:
    op = c.stub.GetOperation(coordinator_pb2.OperationRef(id=args.id), timeout=RPC_TIMEOUT)
    _out(args, views.op_json(op), lambda: views.op_detail(op))
    return 0


def op_watch(c: Client, args: argparse.Namespace) -> int:
    op = c.stub.GetOperation(coordinator_pb2.OperationRef(id=args.id), timeout=RPC_TIMEOUT)
    return _finish_op(c, args, op)


def events(c: Client, args: argparse.Namespace) -> int:
    request = coordinator_pb2.WatchEventsRequest(after=args.after, no_follow=not args.follow)
    try:
        for event in c.stub.WatchEvents(request):
            if args.json:
                print(json.dumps(views.event_json(event)), flush=True)
            else:
                print(views.event_line(event), flush=True)
    except KeyboardInterrupt:
        pass
    return 0


# -- the local cluster -------------------------------------------------------------------


def cluster(args: argparse.Namespace) -> int:
    command = [sys.executable, "-m", "deploy.localcluster", args.cluster_command]
    command += ["--dir", str(args.dir)]
    if args.cluster_command == "up":
        command += ["--nodes", str(args.nodes), "--vcpus", str(args.vcpus)]
        command += [
            "--memory",
            args.node_memory,
            "--heartbeat-timeout",
            str(args.heartbeat_timeout),
        ]
    if args.json:
        command.append("--json")
    return subprocess.call(command)


# -- the parser --------------------------------------------------------------------------


def _common() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument(
        "--json", action="store_true", default=argparse.SUPPRESS, help="machine-readable output"
    )
    common.add_argument(
        "--coordinator",
        metavar="ADDR",
        default=argparse.SUPPRESS,
        help="coordinator HOST:PORT (default: $FERRY_COORDINATOR, the local cluster's, "
        f"or {DEFAULT_ADDRESS})",
    )
    return common


def _migration_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--max-downtime-ms", type=int, help="downtime allowed at switchover (300)")
    p.add_argument("--max-bandwidth", type=int, metavar="BYTES_PER_S", help="0: unlimited")
    p.add_argument("--timeout", type=float, metavar="S", help="give up after S seconds")
    p.add_argument(
        "--no-auto-converge",
        action="store_true",
        help="never throttle the vCPU; a guest that outruns the link fails to converge",
    )
    p.add_argument(
        "--compression",
        # The values MigrationOptions.compression takes (protos/ferry/v1/types.proto).
        choices=("auto", "none", "zstd", "lz4"),
        help="page compression: auto (default) uses a codec only where it beats the link",
    )
    p.add_argument("--no-wait", action="store_true", help="print the operation and return")


def build_parser() -> argparse.ArgumentParser:
    common = _common()
    parser = argparse.ArgumentParser(
        prog="ferry",
        description="Manage a Ferry cluster: nodes, VMs, live migration, operations, events.",
        parents=[common],
        epilog="Every command accepts --json; see docs/cli.md for the output shapes.",
    )
    top = parser.add_subparsers(dest="group", metavar="COMMAND", required=True)

    def group(name: str, help_text: str) -> argparse._SubParsersAction:
        p = top.add_parser(name, help=help_text, description=help_text, parents=[common])
        return p.add_subparsers(dest="command", metavar="SUBCOMMAND", required=True)

    def cmd(
        sub: argparse._SubParsersAction,
        name: str,
        fn: Callable[[Client, argparse.Namespace], int],
        help_text: str,
    ) -> argparse.ArgumentParser:
        p: argparse.ArgumentParser = sub.add_parser(
            name, help=help_text, description=help_text, parents=[common]
        )
        p.set_defaults(fn=fn)
        return p

    nodes = group("node", "nodes: list, inspect, cordon, drain")
    cmd(nodes, "ls", node_ls, "list nodes with status, capacity and usage")
    cmd(nodes, "show", node_show, "one node and its VMs").add_argument("name", help="node name")
    cmd(nodes, "cordon", node_cordon, "place no new VMs on a node").add_argument(
        "name", help="node name"
    )
    cmd(nodes, "uncordon", node_uncordon, "let a node take VMs again").add_argument(
        "name", help="node name"
    )
    p = cmd(nodes, "drain", node_drain, "live-migrate every VM off a node, then mark it drained")
    p.add_argument("name", help="node name")
    p.add_argument("--max-parallel", type=int, metavar="K", help="migrations at once (2)")
    _migration_options(p)

    vms = group("vm", "VMs: create, list, start, stop, remove, migrate, console")
    p = cmd(vms, "create", vm_create, "create a VM where the scheduler (or --node) says")
    p.add_argument("name", help="VM name: 1-63 of a-z, 0-9 and '-'")
    p.add_argument("--kernel", required=True, help="kernel or bare-metal ELF (path on the node)")
    p.add_argument("--memory", type=parse_size, default=parse_size("64M"), help="RAM (64M)")
    p.add_argument("--vcpus", type=int, default=1, help="vCPUs (1)")
    p.add_argument("--append", help="kernel command line")
    p.add_argument("--bios", help='"none" (default), "default" or a firmware path')
    p.add_argument("--deterministic", action="store_true", help="time from instruction count")
    p.add_argument("--node", help="place on this node (filters still apply)")
    p.add_argument(
        "--selector",
        type=parse_pair,
        action="append",
        default=[],
        metavar="K=V",
        help="required node label (repeatable)",
    )
    p.add_argument("--anti-affinity", metavar="GROUP", help="never share a node with GROUP")
    p.add_argument(
        "--label",
        type=parse_pair,
        action="append",
        default=[],
        metavar="K=V",
        help="VM label (repeatable)",
    )
    p.add_argument("--no-start", action="store_true", help="create without starting")
    cmd(vms, "ls", vm_ls, "list VMs").add_argument("--node", help="only VMs on this node")
    cmd(vms, "show", vm_show, "one VM in detail").add_argument("name", help="VM name")
    cmd(vms, "start", vm_start, "start a created or stopped VM").add_argument(
        "name", help="VM name"
    )
    p = cmd(vms, "stop", vm_stop, "stop a VM (graceful, then forced)")
    p.add_argument("name", help="VM name")
    p.add_argument("--force", action="store_true", help="skip the grace period")
    p.add_argument("--timeout", type=float, metavar="S", help="grace period (10)")
    cmd(vms, "rm", vm_rm, "stop and delete a VM").add_argument("name", help="VM name")
    p = cmd(vms, "migrate", vm_migrate, "live-migrate a running VM")
    p.add_argument("name", help="VM name")
    p.add_argument("--to", metavar="NODE", help="destination (default: the scheduler's pick)")
    _migration_options(p)
    p = cmd(
        vms,
        "console",
        vm_console,
        "attach to a VM's console (Ctrl-] detaches); follows the VM across migrations",
    )
    p.add_argument("name", help="VM name")
    mode = p.add_mutually_exclusive_group()
    mode.add_argument("--follow", action="store_true", help="read-only: print output as it comes")
    mode.add_argument("--dump", action="store_true", help="print the output so far and exit")
    p.add_argument(
        "--offset", type=int, default=0, help="start at this byte (negative: from the end)"
    )

    ops = group("op", "operations: list, show, watch")
    p = cmd(ops, "ls", op_ls, "recent operations, newest first")
    p.add_argument("--limit", type=int, default=20, help="how many (20)")
    p.add_argument("--target", help="only operations on this VM or node")
    cmd(ops, "show", op_show, "one operation with per-VM progress").add_argument(
        "id", help="operation id (op-...)"
    )
    cmd(ops, "watch", op_watch, "follow an operation to its end").add_argument(
        "id", help="operation id (op-...)"
    )

    p = top.add_parser(
        "events", help="cluster events", description="cluster events", parents=[common]
    )
    p.set_defaults(fn=events)
    p.add_argument("--after", type=int, default=0, help="only events after this sequence number")
    p.add_argument("-f", "--follow", action="store_true", help="keep streaming new events")

    clusters = group("cluster", "a local cluster on this machine: up, down, status")
    for name, help_text in (
        ("up", "start a coordinator and N agents in the background"),
        ("down", "stop the processes `cluster up` started"),
        ("status", "show the local cluster's processes"),
    ):
        p = clusters.add_parser(name, help=help_text, description=help_text, parents=[common])
        p.set_defaults(fn=None, cluster_command=name)
        p.add_argument(
            "--dir",
            type=Path,
            default=Path(DEFAULT_CLUSTER_DIR),
            help=f"state, logs and pid files ({DEFAULT_CLUSTER_DIR})",
        )
        if name == "up":
            p.add_argument("--nodes", type=int, default=3, help="agents to start (3)")
            p.add_argument("--vcpus", type=int, default=4, help="vCPUs each node offers (4)")
            p.add_argument("--node-memory", default="1G", help="guest memory each node offers (1G)")
            p.add_argument("--heartbeat-timeout", type=float, default=5.0, help="seconds (5)")
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    args.json = getattr(args, "json", False)
    if args.group == "cluster":
        return cluster(args)
    address = coordinator_address(getattr(args, "coordinator", None))
    client = Client(address)
    try:
        return int(args.fn(client, args))
    except grpc.RpcError as e:
        code = e.code()
        if code == grpc.StatusCode.UNAVAILABLE:
            message = f"cannot reach the coordinator at {address} ({e.details()})"
        else:
            message = e.details() or code.name
        print(f"ferry: {message}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:
        return 0
    finally:
        client.close()


if __name__ == "__main__":
    raise SystemExit(main())
