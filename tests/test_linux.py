"""The committed Linux guest boots on Ferry and its /init prints what it prints on QEMU.

The image (``guests/build/linux/Image``, built by ``make guests-linux``) is Linux 6.1 with a
built-in initramfs whose ``/init`` (``guests/linux/init.c``) proves userspace works, runs a
few ticks of the dirtying workload and powers off. Its lines are a pure function of its
arguments, so QEMU ``virt`` under the same OpenSBI is the oracle: Ferry must print the same
``/init`` lines and exit 0 at power-off. The kernel's own log legitimately differs (timings,
the devices QEMU has and Ferry does not) and is not compared, only required to be there.

The tick sums are also predicted here from the workload's definition, so a wrong sum is
caught even if both machines were wrong the same way, and so other tests (a migrated Linux
VM) can check ticks without running QEMU: see ``expected_tick_sums``.
"""

from __future__ import annotations

import hashlib
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest
from qemu import OPENSBI_FW_JUMP, QEMU, TIMEOUT_STATUS, GuestRun, qemu_available

from vmcore.board import MachineConfig
from vmcore.vm import VM, VMState

ROOT = Path(__file__).resolve().parent.parent
LINUX_BUILD = ROOT / "guests" / "build" / "linux"
IMAGE = LINUX_BUILD / "Image"

# Few ticks and the smallest working set: the boot is most of the run.
TICKS, WSS, RATE = 3, 1, 64
APPEND = f"console=ttyS0 earlycon -- ticks={TICKS} wss={WSS} rate={RATE}"
FERRY_TIMEOUT = 240.0
QEMU_TIMEOUT = 60.0

INIT_LINE = re.compile(r"^(init: .*|tick \d+ sum=0x[0-9a-f]{16})$")
TICK = re.compile(r"^tick (\d+) sum=0x([0-9a-f]{16})$", re.MULTILINE)

pytestmark = pytest.mark.skipif(
    not IMAGE.exists(), reason="guests/build/linux/Image not built (make guests-linux)"
)

M64 = (1 << 64) - 1


def _header(page: int, version: int) -> int:
    """init.c's header(): the word 0 of a page at a version (a bijection of both)."""
    x = (((page << 32) ^ version ^ 0x11A1F00D) * 0xBF58476D1CE4E5B9) & M64
    return x ^ (x >> 29)


def expected_tick_sums(ticks: int, wss_mib: int = WSS, rate: int = RATE) -> list[int]:
    """The sums /init prints for ticks 0..ticks-1 with these arguments.

    Tick N first rewrites ``rate`` pages (the k-th write goes to page
    ``((k * φ64 mod 2^64) >> 32) * pages >> 32``), then sums every page's header word.
    """
    pages = wss_mib * 256
    version = [0] * pages
    total = sum(_header(p, 0) for p in range(pages)) & M64
    sums = []
    writes = 0
    for _ in range(ticks):
        for k in range(writes, writes + rate):
            p = ((((k * 0x9E3779B97F4A7C15) & M64) >> 32) * pages) >> 32
            total = (total - _header(p, version[p]) + _header(p, version[p] + 1)) & M64
            version[p] += 1
        writes += rate
        sums.append(total)
    return sums


def init_lines(output: str) -> list[str]:
    """What /init printed, in order, without the firmware's and the kernel's lines."""
    return [line for line in output.splitlines() if INIT_LINE.match(line)]


def _text(raw: bytes | None) -> str:
    return (raw or b"").decode("utf-8", errors="replace").replace("\r\n", "\n")


def run_ferry_linux(append: str = APPEND, timeout: float = FERRY_TIMEOUT) -> GuestRun:
    """Boots the image exactly as the issue tells a user to: ferry-vm, Debian's OpenSBI."""
    cmd = [
        sys.executable, "-m", "vmcore.cli", "run",
        "--bios", "default", "--kernel", str(IMAGE), "-m", "128M",
        "--append", append, "--timeout", str(timeout),
    ]  # fmt: skip
    done = subprocess.run(
        cmd, stdin=subprocess.DEVNULL, capture_output=True, cwd=ROOT, timeout=timeout + 60
    )
    return GuestRun(done.returncode, _text(done.stdout) + _text(done.stderr))


def run_qemu_linux(append: str = APPEND, timeout: float = QEMU_TIMEOUT) -> GuestRun:
    """The same image on QEMU virt, with the extensions Ferry lacks switched off."""
    cmd = [
        QEMU, "-machine", "virt", "-cpu", "rv64,f=false,d=false,v=false", "-m", "128M",
        "-nographic", "-bios", str(OPENSBI_FW_JUMP), "-kernel", str(IMAGE), "-append", append,
    ]  # fmt: skip
    try:
        done = subprocess.run(cmd, stdin=subprocess.DEVNULL, capture_output=True, timeout=timeout)
    except subprocess.TimeoutExpired as exc:
        return GuestRun(TIMEOUT_STATUS, _text(exc.stdout if isinstance(exc.stdout, bytes) else b""))
    return GuestRun(done.returncode, _text(done.stdout) + _text(done.stderr))


@pytest.fixture(scope="module")
def ferry_run() -> GuestRun:
    return run_ferry_linux()


@pytest.fixture(scope="module")
def qemu_run() -> GuestRun:
    if not qemu_available():
        pytest.skip("qemu-system-riscv64 not installed")
    if not OPENSBI_FW_JUMP.exists():
        pytest.skip("Debian's OpenSBI (opensbi package) not installed")
    return run_qemu_linux()


def test_committed_image_matches_its_checksum() -> None:
    recorded = {}
    for entry in (LINUX_BUILD / "SHA256SUMS").read_text().splitlines():
        digest, name = entry.split()
        recorded[name] = digest
    assert recorded["Image"] == hashlib.sha256(IMAGE.read_bytes()).hexdigest()


def test_qemu_runs_the_workload_as_predicted(qemu_run: GuestRun) -> None:
    # The oracle itself must be right before Ferry is compared with it.
    assert qemu_run.status == 0, qemu_run.output
    got = [(int(n), int(s, 16)) for n, s in TICK.findall(qemu_run.output)]
    assert got == list(enumerate(expected_tick_sums(TICKS)))


def test_ferry_boots_linux_and_powers_off(ferry_run: GuestRun) -> None:
    out = ferry_run.output
    assert ferry_run.status == 0, out[-3000:]
    assert "OpenSBI" in out, "no OpenSBI banner"
    assert "Linux version 6.1" in out, "no kernel log"
    assert "init: pid 1" in out
    assert "init: powering off" in out
    assert "reboot: Power down" in out, out[-2000:]
    got = [(int(n), int(s, 16)) for n, s in TICK.findall(out)]
    assert got == list(enumerate(expected_tick_sums(TICKS)))


def test_init_output_on_ferry_matches_qemu(ferry_run: GuestRun, qemu_run: GuestRun) -> None:
    expected = init_lines(qemu_run.output)
    assert expected[-1] == "init: powering off", qemu_run.output
    assert init_lines(ferry_run.output) == expected, ferry_run.output[-3000:]


def _run_until(vm: VM, console: bytearray, marker: bytes, limit_s: float = 300.0) -> None:
    """Runs ``vm`` as ferry-vm would until ``marker`` is on its console (a hang fails)."""
    deadline = time.monotonic() + limit_s
    while marker not in console:
        assert time.monotonic() < deadline, f"no {marker!r}: {console[-2000:].decode()}"
        result = vm.run_slice(200_000)
        assert vm.state is VMState.RUNNING, console[-2000:].decode()
        if result.reason == "idle" and result.idle_seconds is not None:
            time.sleep(min(result.idle_seconds, 0.1))


def test_linux_snapshot_restores_mid_workload(tmp_path: Path) -> None:
    """A running kernel and /init survive save and restore: the path migration takes too.

    The restored VM must carry on from the tick after the last one printed, with the sums
    the workload predicts, and with its guest clock exactly where it was saved (the kernel
    must see no time jump).
    """
    console = bytearray()
    config = MachineConfig(
        kernel=str(IMAGE), memory=128 << 20, bios="default",
        append="console=ttyS0 earlycon -- ticks=0 wss=1",
    )  # fmt: skip
    vm = VM(config, console.extend)
    vm.start()
    _run_until(vm, console, b"tick 1 ")
    vm.pause()
    saved_clock = vm.stats()["guest_seconds"]
    snapshot = tmp_path / "linux.snap"
    vm.snapshot(snapshot)
    before = [int(n) for n, _ in TICK.findall(_text(bytes(console)))]

    restored_console = bytearray()
    restored = VM.restore_snapshot(snapshot, restored_console.extend)
    assert restored.stats()["guest_seconds"] == saved_clock
    restored.resume()
    last = before[-1]
    _run_until(restored, restored_console, f"tick {last + 3} ".encode())

    after = [(int(n), int(s, 16)) for n, s in TICK.findall(_text(bytes(restored_console)))]
    assert [n for n, _ in after][:3] == [last + 1, last + 2, last + 3]
    expected = expected_tick_sums(after[-1][0] + 1)
    assert all(expected[n] == s for n, s in after)
    assert b"CORRUPT" not in restored_console
