"""Differential tests: every guest image prints the same thing on Ferry as on QEMU ``virt``.

QEMU is the oracle (DESIGN §3). Each image in ``guests/build`` (and ``guests/build/isa``)
runs through ``ferry-vm run`` exactly as a user would start it, and through
``qemu-system-riscv64 -machine virt -bios none -nographic -kernel``; exit status and
console must match. Guests get short runs (a few ticks, a couple of benchmark rounds).
Only what legitimately differs is normalised: cpubench's ``minstret`` reading, which QEMU's
TCG does not count exactly, and OpenSBI's banner, which names the platform and describes
QEMU's extra hardware.
"""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest
from qemu import GUESTS_BUILD, OPENSBI_FW_JUMP, qemu_available, run_qemu

ROOT = Path(__file__).resolve().parent.parent
TIMEOUT = 120.0

# Boot arguments that keep each guest's run short; guests not listed run with none.
ARGS = {
    "ticker": "ticks=3",
    "dirtier": "wss=1 rate=0 ticks=3",
    "cpubench": "n=2",
}
S_MODE_PAYLOADS = {"sbi-hello"}

pytestmark = pytest.mark.skipif(not qemu_available(), reason="qemu-system-riscv64 not installed")


def images() -> list[str]:
    names = sorted(p.stem for p in GUESTS_BUILD.glob("*.elf"))
    names += sorted(f"isa/{p.stem}" for p in (GUESTS_BUILD / "isa").glob("*.elf"))
    return [n for n in names if n not in S_MODE_PAYLOADS]


def run_ferry(image: Path, append: str | None, bios: str = "none") -> tuple[int, str]:
    cmd = [sys.executable, "-m", "vmcore.cli", "run", "--kernel", str(image), "--bios", bios]
    cmd += ["--timeout", str(TIMEOUT)]
    if append is not None:
        cmd += ["--append", append]
    done = subprocess.run(
        cmd, stdin=subprocess.DEVNULL, capture_output=True, cwd=ROOT, timeout=TIMEOUT + 30
    )
    text = (done.stdout + done.stderr).decode("utf-8", errors="replace").replace("\r\n", "\n")
    return done.returncode, text


def normalise(output: str) -> str:
    return re.sub(r"instret=\d+", "instret=N", output)


@pytest.mark.parametrize("name", images())
def test_guest_matches_qemu(name: str) -> None:
    image = GUESTS_BUILD / f"{name}.elf"
    append = ARGS.get(name)
    expected = run_qemu(image, append=append, timeout=TIMEOUT)
    status, output = run_ferry(image, append)
    assert expected.status == 0, f"{name} fails on QEMU itself: {expected.output}"
    assert normalise(output) == normalise(expected.output)
    assert status == expected.status


def payload_lines(output: str) -> list[str]:
    """The console after OpenSBI's banner (whose last lines all start "Boot HART")."""
    lines = output.splitlines()
    last_banner = max(
        (i for i, line in enumerate(lines) if line.startswith("Boot HART")), default=-1
    )
    return lines[last_banner + 1 :]


@pytest.mark.skipif(not OPENSBI_FW_JUMP.exists(), reason="Debian's OpenSBI not installed")
@pytest.mark.skipif(not (GUESTS_BUILD / "sbi-hello.elf").exists(), reason="no sbi-hello image")
def test_sbi_hello_under_opensbi_matches_qemu() -> None:
    image = GUESTS_BUILD / "sbi-hello.elf"
    expected = run_qemu(image, bios=OPENSBI_FW_JUMP, timeout=TIMEOUT)
    status, output = run_ferry(image, None, bios="default")
    for banner in ("OpenSBI v", "Platform Name", "Domain0", "Boot HART"):
        assert banner in output
    assert payload_lines(output) == payload_lines(expected.output)
    assert payload_lines(output), "sbi-hello printed nothing after the banner"
    assert status == expected.status == 0
