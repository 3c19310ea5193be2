"""Starting VMM worker processes, finding them again, and noticing when they end.

A worker is started in its own session so that it outlives the agent: restarting or
upgrading the agent must not kill guests. The agent watches its own children through
``wait()`` (which gives their exit status), and workers it adopted after a restart through
a pidfd (which only says *that* they ended). Either way the end is seen at once, not at the
next poll.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import signal
import subprocess
import sys
from pathlib import Path

import trio

from node.vmdir import VMDir


def signal_name(number: int) -> str:
    """``SIGKILL`` for 9: how a user knows a signal, whatever its number on this host."""
    try:
        return signal.Signals(number).name
    except ValueError:
        return f"signal {number}"


def describe_exit(returncode: int | None) -> str:
    """Why a worker ended, in words a user reads in ``VMInfo.failure``."""
    if returncode is None:
        return "worker process died (exit status unknown: adopted after an agent restart)"
    if returncode < 0:
        return f"worker killed by {signal_name(-returncode)}"
    return f"worker exited with status {returncode}"


async def spawn_worker(
    vm_dir: VMDir,
    console_buffer: int,
    *,
    start: bool,
    restore: str | None = None,
    incoming: bool = False,
) -> trio.Process:
    """Start ``python -m node.worker`` for one VM, its output going to the VM's worker.log."""
    command = [
        sys.executable,
        "-m",
        "node.worker",
        "--data-dir",
        str(vm_dir.data_dir),
        "--name",
        vm_dir.name,
        "--console-buffer",
        str(console_buffer),
    ]
    if start:
        command.append("--start")
    if restore:
        command += ["--restore", restore]
    if incoming:
        command.append("--incoming")
    with open(vm_dir.worker_log, "ab") as log:
        return await trio.lowlevel.open_process(
            command,
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=log,
            start_new_session=True,
        )


def worker_is_alive(vm_dir: VMDir) -> bool:
    """Whether a worker holds this VM's lock: the one test that cannot be fooled by a
    stale pid file or a recycled pid."""
    try:
        fd = os.open(vm_dir.lock_file, os.O_RDWR)
    except FileNotFoundError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return True
    else:
        fcntl.flock(fd, fcntl.LOCK_UN)
        return False
    finally:
        os.close(fd)


def cmdline_matches(pid: int, vm_dir: VMDir) -> bool:
    """Whether ``pid`` is the worker of this VM (and not some process that reused the pid)."""
    try:
        args = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    except OSError:
        return False
    return b"node.worker" in args and vm_dir.name.encode() in args


async def wait_pid(pid: int) -> None:
    """Return when a process that is not our child ends."""
    try:
        fd = os.pidfd_open(pid)
    except ProcessLookupError:
        return
    try:
        await trio.lowlevel.wait_readable(fd)
    finally:
        os.close(fd)


def kill(pid: int) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGKILL)
