"""Running guest images on QEMU, the reference machine Ferry is compared against.

Shared by the guest tests and the board's differential tests, so both start QEMU
the same way: the `virt` board, no graphics, stdin closed, a hard timeout so a
hung guest fails its test instead of hanging the suite.
"""

from __future__ import annotations

import shutil
import subprocess
from collections.abc import Sequence
from pathlib import Path
from typing import NamedTuple

QEMU = "qemu-system-riscv64"
OPENSBI_FW_JUMP = Path("/usr/lib/riscv64-linux-gnu/opensbi/generic/fw_jump.elf")
GUESTS_BUILD = Path(__file__).resolve().parent.parent / "guests" / "build"

# The status `timeout(1)` and ferry-vm report when a run is cut off.
TIMEOUT_STATUS = 124


class GuestRun(NamedTuple):
    """What a guest did: QEMU's exit status and its console, CRLF folded to LF.

    With the SiFive test finisher, QEMU exits 0 on pass and with the guest's
    fail code otherwise; TIMEOUT_STATUS means the guest never finished.
    """

    status: int
    output: str


def qemu_available() -> bool:
    return shutil.which(QEMU) is not None


def guest_image(name: str) -> Path:
    """The committed image for `name`, e.g. "hello" or "isa/rv64i"."""
    return GUESTS_BUILD / f"{name}.elf"


def isa_programs() -> list[str]:
    """The self-checking ISA programs ("rv64i", ...): each prints `PASS <name>` and passes."""
    return sorted(p.stem for p in (GUESTS_BUILD / "isa").glob("*.elf"))


def run_qemu(
    image: Path,
    append: str | None = None,
    bios: str | Path = "none",
    memory: str = "128M",
    timeout: float = 60.0,
    extra_args: Sequence[str] = (),
) -> GuestRun:
    """Boots `image` on QEMU's riscv64 `virt` board and waits for it to power off.

    `bios="none"` starts the image in M-mode at its ELF entry, as the guests in
    `guests/` expect; pass OPENSBI_FW_JUMP to run an S-mode payload under OpenSBI.
    """
    cmd = [
        QEMU,
        "-machine", "virt",
        "-nographic",
        "-m", memory,
        "-bios", str(bios),
        "-kernel", str(image),
    ]
    if append is not None:
        cmd += ["-append", append]
    cmd += list(extra_args)
    try:
        done = subprocess.run(
            cmd, stdin=subprocess.DEVNULL, capture_output=True, timeout=timeout, check=False
        )
    except subprocess.TimeoutExpired as exc:
        partial = exc.stdout if isinstance(exc.stdout, bytes) else b""
        return GuestRun(TIMEOUT_STATUS, _console_text(partial))
    return GuestRun(done.returncode, _console_text(done.stdout) + _console_text(done.stderr))


def _console_text(raw: bytes) -> str:
    return raw.decode("utf-8", errors="replace").replace("\r\n", "\n")
