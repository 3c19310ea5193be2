"""Snapshots of a running ferry-vm, taken on request and restored in a fresh process."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
DIRTIER = ROOT / "guests" / "build" / "dirtier.elf"
ARGS = ["--append", "wss=2 rate=5 ticks=8", "--deterministic", "-m", "16M"]


def ferry_vm(*args: str, timeout: float = 120) -> subprocess.CompletedProcess[bytes]:
    return subprocess.run(
        [sys.executable, "-m", "vmcore.cli", *args],
        stdin=subprocess.DEVNULL, capture_output=True, cwd=ROOT, timeout=timeout,
    )


def read_until(proc: subprocess.Popen[bytes], marker: bytes, limit_s: float = 120) -> bytes:
    assert proc.stdout is not None
    seen = b""
    deadline = time.monotonic() + limit_s
    while marker not in seen:
        assert time.monotonic() < deadline, f"no {marker!r} in {seen!r}"
        byte = proc.stdout.read(1)
        assert byte, f"ferry-vm ended before {marker!r}: {seen!r}"
        seen += byte
    return seen


def test_dirtier_snapshot_mid_run_continues_with_the_right_sums(tmp_path: Path) -> None:
    whole = ferry_vm("run", "--kernel", str(DIRTIER), *ARGS)
    assert whole.returncode == 0, whole.stderr
    assert whole.stdout.count(b"tick ") == 8

    snap = tmp_path / "dirtier.snap"
    proc = subprocess.Popen(
        [sys.executable, "-m", "vmcore.cli", "run", "--kernel", str(DIRTIER), *ARGS,
         "--save-on-exit", str(snap)],
        stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, cwd=ROOT,
    )
    assert proc.stdout is not None
    try:
        # Asked early: the request's own interpreter start-up must land before tick 7 ends
        # the run, with CPU to spare on a loaded machine.
        first = read_until(proc, b"tick 1 ")
        asked = ferry_vm("snapshot", str(proc.pid), "--stop")
        assert asked.returncode == 0, asked.stderr
        assert asked.stdout.strip() == str(snap).encode()
        first += proc.stdout.read()  # through the same buffer read_until used
        proc.wait(timeout=60)
    finally:
        proc.kill()
    assert proc.returncode != 0  # stopped by the request, not finished
    assert b"tick 7" not in first

    restored = ferry_vm("restore", str(snap))
    assert restored.returncode == 0, restored.stderr
    assert b"CORRUPT" not in restored.stdout
    assert first + restored.stdout == whole.stdout, (first, restored.stdout)


def test_snapshot_request_needs_a_ferry_vm_that_can_write_one(tmp_path: Path) -> None:
    sleeper = subprocess.Popen(["sleep", "30"])
    try:
        refused = ferry_vm("snapshot", str(sleeper.pid))
    finally:
        sleeper.kill()
    assert refused.returncode == 2
    assert refused.stderr.decode().startswith("ferry-vm: error: process")
    assert "is not a ferry-vm" in refused.stderr.decode()

    proc = subprocess.Popen(
        [sys.executable, "-m", "vmcore.cli", "run", "--kernel", str(DIRTIER), *ARGS],
        stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, cwd=ROOT,
    )
    try:
        read_until(proc, b"tick 0 ")
        refused = ferry_vm("snapshot", str(proc.pid))
    finally:
        proc.kill()
        proc.communicate()
    assert refused.returncode == 2
    assert "without --save-on-exit" in refused.stderr.decode()


@pytest.mark.parametrize("pid", ["999999999"])
def test_snapshot_of_a_missing_process_is_a_clear_error(pid: str) -> None:
    refused = ferry_vm("snapshot", pid)
    assert refused.returncode == 2
    assert refused.stderr.decode() == f"ferry-vm: error: no process with pid {pid}\n"
