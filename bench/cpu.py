"""Guest CPU speed: ``cpubench`` on Ferry and on QEMU TCG, same image, and their ratio.

Ferry's figure is retired instructions per wall second of the run loop (the machine is
built, then timed from the first to the last instruction), median of five runs. QEMU's
``minstret`` is not an instruction count under TCG without ``-icount``, so its workload is
counted once with ``-icount shift=0`` and divided by the wall time of plain TCG runs. QEMU
is given many more rounds than Ferry, so its process start-up does not dominate its time.

Prints figures only; never passes or fails on speed.
"""

from __future__ import annotations

import argparse
import re
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from vmcore.board import Machine, MachineConfig  # noqa: E402

IMAGE = ROOT / "guests" / "build" / "cpubench.elf"
INSTRET = re.compile(rb"instret=(\d+)")
REPEATS = 5


def ferry_run(rounds: int) -> tuple[int, float, bytes]:
    """One cpubench run on Ferry: (retired instructions, wall seconds, console output)."""
    out = bytearray()
    machine = Machine(MachineConfig(kernel=str(IMAGE), append=f"n={rounds}"), console=out.extend)
    retired = 0
    start = time.perf_counter()
    while True:
        result = machine.run_slice(1_000_000)
        retired += result.retired
        if result.reason in ("poweroff", "fail"):
            break
    wall = time.perf_counter() - start
    if result.reason != "poweroff":
        raise SystemExit(f"cpubench failed on Ferry: {bytes(out).decode(errors='replace')}")
    return retired, wall, bytes(out)


def qemu_cmd(rounds: int, icount: bool) -> list[str]:
    cmd = ["qemu-system-riscv64", "-machine", "virt", "-nographic", "-bios", "none"]
    if icount:
        cmd += ["-icount", "shift=0"]
    return [*cmd, "-kernel", str(IMAGE), "-append", f"n={rounds}"]


def qemu_run(rounds: int, icount: bool) -> tuple[float, bytes]:
    start = time.perf_counter()
    done = subprocess.run(
        qemu_cmd(rounds, icount), stdin=subprocess.DEVNULL, capture_output=True, timeout=300
    )
    wall = time.perf_counter() - start
    if done.returncode != 0:
        raise SystemExit(f"cpubench failed on QEMU: {done.stdout.decode(errors='replace')}")
    return wall, done.stdout


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=20, help="cpubench rounds on Ferry")
    parser.add_argument("--qemu-rounds", type=int, default=2000, help="cpubench rounds on QEMU")
    args = parser.parse_args()

    runs = [ferry_run(args.rounds) for _ in range(REPEATS)]
    retired = runs[0][0]
    ferry_mips = statistics.median(n / wall for n, wall, _ in runs) / 1e6
    print(f"cpubench n={args.rounds}: {retired} instructions retired on Ferry")
    print(f"Ferry: {ferry_mips:.2f} MIPS (median of {REPEATS})")

    if shutil.which("qemu-system-riscv64") is None:
        print("QEMU: not installed, no ratio")
        return
    _, counted = qemu_run(args.qemu_rounds, icount=True)
    match = INSTRET.search(counted)
    if match is None:
        raise SystemExit("cpubench on QEMU printed no instret")
    qemu_insns = int(match.group(1))
    walls = [qemu_run(args.qemu_rounds, icount=False)[0] for _ in range(REPEATS)]
    qemu_mips = qemu_insns / statistics.median(walls) / 1e6
    print(f"cpubench n={args.qemu_rounds}: {qemu_insns} instructions (QEMU -icount shift=0)")
    print(f"QEMU TCG: {qemu_mips:.1f} MIPS (median of {REPEATS}, wall time incl. start-up)")
    print(f"ratio QEMU/Ferry: {qemu_mips / ferry_mips:.0f}x")


if __name__ == "__main__":
    main()
