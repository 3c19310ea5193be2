"""``ferry-vm``: run one VM in the foreground, like ``qemu-system-riscv64 -nographic``.

The guest's UART is the terminal: its output goes to stdout byte for byte, and stdin (a
terminal, or a pipe that has data) is fed to its receiver without ever blocking the guest.
The exit status is the guest's: 0 when it powers off through the test finisher, its fail
code when it reports failure, 124 when ``--timeout`` expires (as timeout(1) does), 2 for
anything wrong with the command line or the images, with one ``ferry-vm: error:`` line.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import select
import signal
import sys
import termios
import time
import traceback
import tty
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import NoReturn

from vmcore.board import DEFAULT_MEMORY, MachineConfig, describe_images
from vmcore.loader import LoaderError
from vmcore.sizes import parse_size
from vmcore.snapshot import SnapshotError
from vmcore.vm import VM, VMFailure

EXIT_TIMEOUT = 124
EXIT_USAGE = 2
EXIT_INTERRUPTED = 130
EXIT_EMULATOR_FAILURE = 70  # EX_SOFTWARE from sysexits.h
SLICE = 200_000
MAX_IDLE_WAIT = 0.25
"""Instructions between console polls: ~10-50 ms of guest work, so typing feels live."""


class _Parser(argparse.ArgumentParser):
    """argparse that reports a bad command line as a single ``ferry-vm: error:`` line."""

    def error(self, message: str) -> NoReturn:
        _fail(message)


def _fail(message: str) -> NoReturn:
    sys.stderr.write(f"ferry-vm: error: {message}\n")
    sys.stderr.flush()
    raise SystemExit(EXIT_USAGE)


def _size(text: str) -> int:
    try:
        return parse_size(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def _seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"invalid timeout {text!r} (seconds)") from None
    if not value > 0:
        raise argparse.ArgumentTypeError(f"timeout must be positive, got {text!r}")
    return value


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="ferry-vm",
        description="Run one RISC-V VM in the foreground on Ferry's virt-compatible board.",
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    run = commands.add_parser(
        "run",
        help="boot a kernel (and optional firmware) with the UART on this terminal",
        description=(
            "Boot a kernel on a QEMU-virt-compatible board. The guest's UART is connected "
            "to stdout/stdin; the exit status is the guest's (test finisher), 124 on timeout."
        ),
    )
    run.add_argument("--kernel", required=True, metavar="PATH", help="ELF or raw kernel image")
    run.add_argument(
        "--bios",
        default="none",
        metavar="none|default|PATH",
        help=(
            "firmware: 'none' boots the kernel directly in M-mode; 'default' loads Debian's "
            "OpenSBI fw_jump at 0x80000000 with the kernel at 0x80200000; or a firmware file"
        ),
    )
    run.add_argument(
        "-m",
        "--memory",
        type=_size,
        default=DEFAULT_MEMORY,
        metavar="SIZE",
        help="guest RAM, e.g. 64M, 1G, 128MiB (default 128M)",
    )
    run.add_argument("--append", default="", metavar="STR", help="kernel command line")
    run.add_argument(
        "--deterministic",
        action="store_true",
        help="derive guest time from retired instructions, so every run prints the same bytes",
    )
    _add_session_options(run)

    restore = commands.add_parser(
        "restore",
        help="continue a VM from a snapshot file",
        description=(
            "Continue a VM exactly where a snapshot left it (RAM, devices, guest time), with "
            "the UART on this terminal and the same exit statuses as 'run'."
        ),
    )
    restore.add_argument("snapshot", metavar="FILE", help="a snapshot written by ferry-vm")
    _add_session_options(restore)

    snapshot = commands.add_parser(
        "snapshot",
        help="make a running ferry-vm write its snapshot (and keep running, or stop)",
        description=(
            "Ask a running 'ferry-vm run/restore --save-on-exit FILE' process to pause its "
            "guest between slices, write FILE, and continue (or, with --stop, exit). Waits "
            "until the new snapshot is in place and prints its path."
        ),
    )
    snapshot.add_argument("pid", type=int, metavar="PID", help="process id of the ferry-vm")
    snapshot.add_argument(
        "--stop", action="store_true", help="stop the VM after writing the snapshot"
    )
    snapshot.add_argument(
        "--wait", type=_seconds, default=30.0, metavar="SEC",
        help="how long to wait for the snapshot to appear (default 30)",
    )
    return parser


def _add_session_options(command: argparse.ArgumentParser) -> None:
    """Options shared by every command that runs a guest in the foreground."""
    command.add_argument(
        "--timeout", type=_seconds, metavar="SEC", help="stop after SEC wall seconds, exit 124"
    )
    command.add_argument("--trace", action="store_true", help="log traps and MMIO to stderr")
    command.add_argument(
        "--save-on-exit",
        metavar="FILE",
        help=(
            "write a snapshot to FILE when the run ends (timeout, Ctrl-C, guest exit); "
            "SIGUSR1 also writes it and lets the guest continue"
        ),
    )


class _Console:
    """The host side of the UART: stdout for output, stdin (when it can supply) for input."""

    def __init__(self) -> None:
        self.out = sys.stdout.buffer
        self.in_fd: int | None = None
        try:
            fd = sys.stdin.fileno()
            os.fstat(fd)
            self.in_fd = fd
        except (OSError, ValueError, AttributeError):
            self.in_fd = None

    def write(self, data: bytes) -> None:
        try:
            self.out.write(data)
            self.out.flush()
        except BrokenPipeError:
            # Reader went away (e.g. piped into head): keep running the guest silently.
            self.out = open(os.devnull, "wb")  # noqa: SIM115

    def poll(self, timeout: float) -> bytes | None:
        """Input that is ready within ``timeout`` seconds; b"" if none; None at EOF."""
        if self.in_fd is None:
            if timeout > 0:
                time.sleep(timeout)
            return b""
        try:
            ready, _, _ = select.select([self.in_fd], [], [], timeout)
        except (OSError, ValueError):
            self.in_fd = None
            return b""
        if not ready:
            return b""
        data = os.read(self.in_fd, 4096)
        if not data:
            self.in_fd = None  # EOF: stop polling, the guest just sees no more input
            return None
        return data

    @contextlib.contextmanager
    def raw_input(self) -> Iterator[None]:
        """Character-at-a-time, unechoed terminal input (Ctrl-C still stops ferry-vm)."""
        if self.in_fd is None or not os.isatty(self.in_fd):
            yield
            return
        saved = termios.tcgetattr(self.in_fd)
        try:
            tty.setcbreak(self.in_fd, termios.TCSANOW)  # keep type-ahead
            yield
        finally:
            termios.tcsetattr(self.in_fd, termios.TCSADRAIN, saved)


def _trace_log(message: str) -> None:
    sys.stderr.write(f"[trace] {message}\n")


def run_vm(args: argparse.Namespace) -> int:
    config = MachineConfig(
        kernel=args.kernel,
        memory=args.memory,
        bios=args.bios,
        append=args.append,
        deterministic=args.deterministic,
    )
    console = _Console()
    try:
        vm = VM(config, console.write, trace=_trace_log if args.trace else None)
    except LoaderError as e:
        _fail(str(e))
    if args.trace:
        for line in describe_images(vm.machine).splitlines():
            _trace_log(line)
    vm.start()
    return _foreground(vm, console, args)


def restore_vm(args: argparse.Namespace) -> int:
    console = _Console()
    try:
        vm = VM.restore_snapshot(
            args.snapshot, console.write, trace=_trace_log if args.trace else None
        )
    except (SnapshotError, LoaderError) as e:
        _fail(str(e))
    except OSError as e:
        _fail(f"{args.snapshot}: {e.strerror or e}")
    vm.resume()
    return _foreground(vm, console, args)


class _Signals:
    """Signals noted for the run loop, which acts on them between slices, never mid-slice:
    a hart interrupted inside a slice is not in a state worth saving."""

    def __init__(self) -> None:
        self.snapshot = False
        self.stop: int | None = None

    def on_snapshot(self, signum: int, frame: object) -> None:
        self.snapshot = True

    def on_stop(self, signum: int, frame: object) -> None:
        self.stop = signum


def _foreground(vm: VM, console: _Console, args: argparse.Namespace) -> int:
    """Run ``vm`` with the console attached until it ends; returns the exit status."""
    save_path: str | None = args.save_on_exit
    request = _Signals()
    if save_path is not None:
        signal.signal(signal.SIGUSR1, request.on_snapshot)
        signal.signal(signal.SIGINT, request.on_stop)
        signal.signal(signal.SIGTERM, request.on_stop)
    deadline = None if args.timeout is None else time.monotonic() + args.timeout
    status = EXIT_INTERRUPTED
    try:
        with console.raw_input():
            status = _drive(vm, console, deadline, request, save_path)
    except KeyboardInterrupt:
        status = EXIT_INTERRUPTED
    except VMFailure as e:
        # A Ferry bug, not a guest or user error: say so in one line (the cause is chained
        # for --trace users) and keep the guest's exit statuses unambiguous.
        if args.trace:
            traceback.print_exception(e.__cause__ or e, file=sys.stderr)
        sys.stderr.write(f"ferry-vm: emulator failure: {e}\n")
        save_path = None  # a failed VM has no consistent state to save
        status = EXIT_EMULATOR_FAILURE
    finally:
        if save_path is not None:
            _save(vm, save_path)
    return status


def _drive(
    vm: VM,
    console: _Console,
    deadline: float | None,
    request: _Signals,
    save_path: str | None,
) -> int:
    while True:
        result = vm.run_slice(SLICE)
        if result.reason == "poweroff":
            return 0
        if result.reason == "fail":
            return ((result.exit_code or 0) & 0xFF) or 1
        now = time.monotonic()
        if deadline is not None and now >= deadline:
            return EXIT_TIMEOUT
        if request.stop is not None:
            return 128 + request.stop  # the shell's status for "killed by this signal"
        if request.snapshot and save_path is not None:
            request.snapshot = False
            _save(vm, save_path)  # pauses for the write and lets the guest continue
        wait = 0.0
        if result.reason == "idle":
            # Sleep until the guest's timer fires or input arrives, whichever is first.
            # Capped, because a signal does not cut select() short (PEP 475 retries it) and
            # a stop or snapshot request must not wait for a far-off timer.
            wait = MAX_IDLE_WAIT
            if result.idle_seconds is not None:
                wait = min(wait, max(0.001, result.idle_seconds))
            if deadline is not None:
                wait = min(wait, deadline - now)
        data = console.poll(max(0.0, wait))
        if data:
            vm.send_input(data)


def _save(vm: VM, path: str) -> None:
    """Write a snapshot; a running VM keeps running afterwards (``VM.snapshot`` pauses)."""
    try:
        size = vm.snapshot(path)
    except OSError as e:
        _fail(f"cannot write snapshot {path}: {e.strerror or e}")
    sys.stderr.write(f"ferry-vm: saved snapshot {path} ({size} bytes)\n")



def _snapshot_target(pid: int) -> str:
    """The ``--save-on-exit`` path of the ferry-vm with this pid (read from /proc), so the
    request goes only to a process that will answer it with a snapshot."""
    try:
        argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    except OSError:
        _fail(f"no process with pid {pid}")
    words = [w.decode(errors="replace") for w in argv if w]
    if not any(w.endswith("ferry-vm") or w == "vmcore.cli" for w in words):
        _fail(f"process {pid} is not a ferry-vm")
    for i, word in enumerate(words):
        if word == "--save-on-exit" and i + 1 < len(words):
            return words[i + 1]
        if word.startswith("--save-on-exit="):
            return word.split("=", 1)[1]
    _fail(f"ferry-vm {pid} was started without --save-on-exit FILE: it has nowhere to write")


def request_snapshot(args: argparse.Namespace) -> int:
    """Signal a running ferry-vm (SIGUSR1: write and continue; SIGTERM: write and stop)."""
    pid: int = args.pid
    path = _snapshot_target(pid)
    cwd = Path(f"/proc/{pid}/cwd")
    target = Path(path) if os.path.isabs(path) else cwd.resolve() / path
    before = target.stat().st_mtime_ns if target.exists() else None
    os.kill(pid, signal.SIGTERM if args.stop else signal.SIGUSR1)
    deadline = time.monotonic() + args.wait
    while time.monotonic() < deadline:
        if target.exists() and target.stat().st_mtime_ns != before:
            print(target)
            return 0
        time.sleep(0.05)
    _fail(f"ferry-vm {pid} wrote no snapshot to {target} within {args.wait:g} s")


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        if args.command == "run":
            return run_vm(args)
        if args.command == "restore":
            return restore_vm(args)
        if args.command == "snapshot":
            return request_snapshot(args)
    except KeyboardInterrupt:
        return EXIT_INTERRUPTED
    _fail(f"unknown command {args.command!r}")


if __name__ == "__main__":
    raise SystemExit(main())
