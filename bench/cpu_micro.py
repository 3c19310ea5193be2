"""Guest MIPS of the decode-once hart on a tight integer loop (CRC32 + insertion sort).

Prints the median of 5 runs. Needs the RISC-V cross assembler (``make deps``). Run with
``--dirty-log`` to measure the same workload with dirty logging on and fetched every
slice, which is what a migration round does to the guest.
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from vmcore.bus import Bus
from vmcore.cpu import Hart
from vmcore.memory import GuestRAM

RAM_BASE = 0x8000_0000
EXIT_ADDR = 0x10_0000

SOURCE = r"""
.globl _start
_start:
    li s0, %(rounds)d
    la sp, stack_top
outer:
    # CRC32 (bitwise, reflected) over 256 bytes of `data`
    la a0, data
    li a1, 256
    li a2, -1
    li a5, 0xEDB88320
crc_byte:
    lbu t0, 0(a0)
    xor a2, a2, t0
    li t1, 8
crc_bit:
    andi t2, a2, 1
    srliw a2, a2, 1
    beqz t2, 1f
    xor a2, a2, a5
1:  addi t1, t1, -1
    bnez t1, crc_bit
    addi a0, a0, 1
    addi a1, a1, -1
    bnez a1, crc_byte
    # store the crc back into the data so the next round sorts different numbers
    la a0, data
    sw a2, 0(a0)
    # insertion sort of 32 words
    la a0, words
    li a1, 32
    li t0, 1
sort_outer:
    slli t1, t0, 3
    add t1, a0, t1
    ld t2, 0(t1)
    mv t3, t0
sort_inner:
    beqz t3, sort_place
    ld t4, -8(t1)
    ble t4, t2, sort_place
    sd t4, 0(t1)
    addi t1, t1, -8
    addi t3, t3, -1
    j sort_inner
sort_place:
    sd t2, 0(t1)
    addi t0, t0, 1
    blt t0, a1, sort_outer
    # scramble the words with the crc for the next round
    li t0, 0
scramble:
    slli t1, t0, 3
    add t1, a0, t1
    mul t2, a2, t0
    xor t2, t2, s0
    sd t2, 0(t1)
    addi t0, t0, 1
    blt t0, a1, scramble
    addi s0, s0, -1
    bnez s0, outer
    li t0, %(exit)d
    sw a2, 0(t0)
2:  j 2b
.data
.align 3
data: .fill 256, 1, 0x5a
words: .fill 32, 8, 7
.fill 1024, 1, 0
stack_top:
"""


class ExitDevice:
    """Records the value the guest writes and stops the hart."""

    def __init__(self) -> None:
        self.value: int | None = None
        self.hart: Hart | None = None

    def read(self, offset: int, size: int) -> int:
        return 0

    def write(self, offset: int, size: int, value: int) -> None:
        self.value = value
        if self.hart is not None:
            self.hart.request_exit()


def build(rounds: int) -> bytes:
    with tempfile.TemporaryDirectory() as tmp:
        t = Path(tmp)
        (t / "b.S").write_text(SOURCE % {"rounds": rounds, "exit": EXIT_ADDR})
        subprocess.run(["riscv64-unknown-elf-as", "-march=rv64imac_zicsr_zifencei",
                        "-o", t / "b.o", t / "b.S"], check=True)
        subprocess.run(["riscv64-unknown-elf-ld", "--no-relax", f"-Ttext={RAM_BASE:#x}",
                        "-o", t / "b.elf", t / "b.o"], check=True)
        subprocess.run(["riscv64-unknown-elf-objcopy", "-O", "binary", t / "b.elf",
                        t / "b.bin"], check=True)
        return (t / "b.bin").read_bytes()


def run_once(image: bytes, dirty_log: bool) -> tuple[int, float, float]:
    ram = GuestRAM(4 << 20)
    bus = Bus()
    dev = ExitDevice()
    bus.attach(EXIT_ADDR, 0x1000, dev, "exit")
    hart = Hart(ram, bus, time_source=lambda: 0)
    dev.hart = hart
    ram.write(RAM_BASE, image)
    hart.reset(RAM_BASE)
    if dirty_log:
        ram.dirty_log.enable()
    total = 0
    t0 = time.perf_counter()
    c0 = time.process_time()
    while dev.value is None:
        total += hart.run(100_000)
        if dirty_log:
            ram.dirty_log.fetch_and_reset()
    return total, time.perf_counter() - t0, time.process_time() - c0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--rounds", type=int, default=60)
    ap.add_argument("--dirty-log", action="store_true")
    args = ap.parse_args()
    if shutil.which("riscv64-unknown-elf-as") is None:
        print("cpu_micro: riscv64-unknown-elf-as not found (run `make deps`)")
        return
    image = build(args.rounds)
    mips = []
    cpu_mips = []
    for _ in range(5):
        n, wall, cpu = run_once(image, args.dirty_log)
        mips.append(n / wall / 1e6)
        cpu_mips.append(n / cpu / 1e6)
    note = " with dirty log" if args.dirty_log else ""
    # Per CPU second too: on a shared 2-core machine wall time mostly measures the neighbours.
    print(f"cpu_micro: {n} instructions, guest MIPS median of 5: {statistics.median(mips):.2f} "
          f"(min {min(mips):.2f}, max {max(mips):.2f}); per CPU second "
          f"{statistics.median(cpu_mips):.2f}{note}")


if __name__ == "__main__":
    main()
