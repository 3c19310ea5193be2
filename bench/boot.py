"""Linux boot time: Ferry against QEMU on the same image, in the same run.

Boots ``guests/build/linux/Image`` (``make guests-linux``) under Debian's OpenSBI on both
machines with the same command line and reports, median of 3 runs each:

* wall time to ``/init`` (its first line on the console) and to power-off,
* for Ferry, the guest instructions retired up to ``/init`` and its guest MIPS over that
  stretch (retired instructions per second of the run loop).

Ferry runs in this process, timed from building the VM (loading OpenSBI, the kernel and the
devicetree) so that only Python's own start-up is left out; QEMU runs as a process, timed
from spawning it, because that is how it is used. QEMU's start-up (~0.1 s) is therefore in
its figures. Prints figures only; never passes or fails on time.
"""

from __future__ import annotations

import argparse
import os
import select
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from vmcore.board import MachineConfig  # noqa: E402
from vmcore.vm import VM  # noqa: E402

IMAGE = ROOT / "guests" / "build" / "linux" / "Image"
OPENSBI_FW_JUMP = Path("/usr/lib/riscv64-linux-gnu/opensbi/generic/fw_jump.elf")
INIT_MARK = b"init: pid"
SLICE = 200_000
TIMEOUT = 600.0


@dataclass(frozen=True)
class Boot:
    """One boot: seconds to /init's first line and to power-off, and (Ferry) instructions."""

    to_init: float
    to_poweroff: float
    retired_to_init: int = 0
    mips_to_init: float = 0.0


def ferry_boot(append: str) -> Boot:
    console = bytearray()
    start = time.perf_counter()
    vm = VM(
        MachineConfig(kernel=str(IMAGE), memory=128 << 20, bios="default", append=append),
        console.extend,
    )
    vm.start()
    to_init = 0.0
    retired = 0
    retired_to_init = 0
    mips_to_init = 0.0
    deadline = start + TIMEOUT
    while True:
        result = vm.run_slice(SLICE)
        retired += result.retired
        if not to_init and INIT_MARK in console:
            # Read at the end of the slice that printed the line: at most SLICE late.
            to_init = time.perf_counter() - start
            retired_to_init = retired
            mips_to_init = float(vm.stats()["mips"])
        if result.reason == "poweroff":
            break
        if result.reason == "fail" or time.perf_counter() > deadline:
            tail = bytes(console[-2000:]).decode(errors="replace")
            why = result.reason
            raise SystemExit(f"boot.py: Linux did not power off on Ferry ({why}):\n{tail}")
        if result.reason == "idle" and result.idle_seconds is not None:
            time.sleep(max(0.0, result.idle_seconds))
    return Boot(to_init, time.perf_counter() - start, retired_to_init, mips_to_init)


def qemu_boot(append: str) -> Boot:
    cmd = [
        "qemu-system-riscv64", "-machine", "virt", "-cpu", "rv64,f=false,d=false,v=false",
        "-m", "128M", "-nographic", "-bios", str(OPENSBI_FW_JUMP), "-kernel", str(IMAGE),
        "-append", append,
    ]  # fmt: skip
    start = time.perf_counter()
    proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE)
    assert proc.stdout is not None
    fd = proc.stdout.fileno()
    seen = b""
    to_init = 0.0
    while True:
        ready, _, _ = select.select([fd], [], [], TIMEOUT)
        if not ready:
            proc.kill()
            raise SystemExit("boot.py: Linux did not power off on QEMU")
        chunk = os.read(fd, 65536)
        if not chunk:
            break
        if not to_init:
            seen += chunk
            if INIT_MARK in seen:
                to_init = time.perf_counter() - start
    status = proc.wait()
    end = time.perf_counter() - start
    if status != 0 or not to_init:
        raise SystemExit(f"boot.py: QEMU exited {status} without a clean /init run")
    return Boot(to_init, end)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=3, help="boots per machine (median)")
    parser.add_argument(
        "--init-args", default="ticks=1 wss=1", help="arguments for /init after `--`"
    )
    args = parser.parse_args()
    if not IMAGE.exists():
        raise SystemExit(f"boot.py: {IMAGE.relative_to(ROOT)} not built (make guests-linux)")
    append = f"console=ttyS0 earlycon -- {args.init_args}"
    print(f"Linux boot, {IMAGE.relative_to(ROOT)}, --append {append!r}, median of {args.runs}")

    qemu = [qemu_boot(append) for _ in range(args.runs)]
    ferry = [ferry_boot(append) for _ in range(args.runs)]

    def med(values: list[float]) -> float:
        return statistics.median(values)

    f_init, q_init = med([b.to_init for b in ferry]), med([b.to_init for b in qemu])
    f_off, q_off = med([b.to_poweroff for b in ferry]), med([b.to_poweroff for b in qemu])
    print(f"{'':24}{'Ferry':>10}{'QEMU':>10}{'ratio':>9}")
    print(f"{'to /init (s)':24}{f_init:10.2f}{q_init:10.3f}{f_init / q_init:8.0f}x")
    print(f"{'to power-off (s)':24}{f_off:10.2f}{q_off:10.3f}{f_off / q_off:8.0f}x")
    print(f"Ferry: {med([b.retired_to_init for b in ferry]) / 1e6:.1f}M instructions to /init, "
          f"{med([b.mips_to_init for b in ferry]):.2f} guest MIPS during boot")


if __name__ == "__main__":
    main()
