"""A minimal machine for driving the Hart directly: RAM, an exit register, the assembler.

Test programs are assembled with the Debian cross toolchain at test time (``make deps``
installs it); without it the CPU tests skip. A program ends with ``EXIT reg``, which stores
``reg`` to the exit device; the device records it and stops the hart.
"""

from __future__ import annotations

import functools
import hashlib
import shutil
import subprocess
import tempfile
from pathlib import Path

import pytest

from vmcore.bus import Bus
from vmcore.cpu import Hart
from vmcore.memory import GuestRAM

RAM_BASE = 0x8000_0000
EXIT_ADDR = 0x10_0000
HAVE_AS = shutil.which("riscv64-unknown-elf-as") is not None
needs_as = pytest.mark.skipif(not HAVE_AS, reason="riscv64-unknown-elf-as not installed")

PRELUDE = f"""
.option norelax
.macro EXIT reg
    li t6, {EXIT_ADDR}
    sw \\reg, 0(t6)
99: j 99b
.endm
.globl _start
.text
_start:
"""

_ABI_NAMES = ("zero ra sp gp tp t0 t1 t2 s0 s1 a0 a1 a2 a3 a4 a5 a6 a7 s2 s3 s4 s5 s6 s7 s8 s9 "
              "s10 s11 t3 t4 t5 t6")
REG = {name: i for i, name in enumerate(_ABI_NAMES.split(" "))}


@functools.lru_cache(maxsize=256)
def assemble(src: str, base: int = RAM_BASE, prelude: bool = True) -> bytes:
    """Assemble and link ``src`` at ``base``; return the flat binary image."""
    if not HAVE_AS:
        pytest.skip("riscv64-unknown-elf-as not installed")
    text = (PRELUDE if prelude else "") + src + "\n"
    with tempfile.TemporaryDirectory() as tmp:
        t = Path(tmp)
        (t / "p.S").write_text(text)
        tag = hashlib.sha1(text.encode()).hexdigest()[:8]
        subprocess.run(["riscv64-unknown-elf-as", "-march=rv64imac_zicsr_zifencei",
                        "-o", t / "p.o", t / "p.S"], check=True, capture_output=True)
        subprocess.run(["riscv64-unknown-elf-ld", "--no-relax", f"-Ttext={base:#x}",
                        "-o", t / f"{tag}.elf", t / "p.o"], check=True, capture_output=True)
        subprocess.run(["riscv64-unknown-elf-objcopy", "-O", "binary", t / f"{tag}.elf",
                        t / "p.bin"], check=True, capture_output=True)
        return (t / "p.bin").read_bytes()


# Which engine Machine's hart uses: 0 = the reference closures only, 1 = every block
# compiled before its first run (vmcore.cpu.compile). The `engine` fixture runs each CPU
# test under both.
HOT_THRESHOLD = {"value": 0}


ENGINES = [0, 1]
ENGINE_IDS = ["closures", "compiled"]


def use_engine(hot_threshold: int) -> int:
    HOT_THRESHOLD["value"] = hot_threshold
    return hot_threshold


class ExitDevice:
    def __init__(self) -> None:
        self.value: int | None = None
        self.hart: Hart | None = None

    def read(self, offset: int, size: int) -> int:
        return 0

    def write(self, offset: int, size: int, value: int) -> None:
        self.value = value
        if self.hart is not None:
            self.hart.request_exit()


class Machine:
    """RAM + exit device + hart; ``time`` is what the ``time`` CSR reads."""

    def __init__(self, image: bytes, ram_size: int = 2 << 20) -> None:
        self.ram = GuestRAM(ram_size)
        self.bus = Bus()
        self.exit = ExitDevice()
        self.bus.attach(EXIT_ADDR, 0x1000, self.exit, "exit")
        self.time = 0
        self.hart = Hart(self.ram, self.bus, time_source=lambda: self.time)
        self.hart.hot_threshold = HOT_THRESHOLD["value"]
        self.exit.hart = self.hart
        self.ram.write(RAM_BASE, image)
        self.hart.reset(RAM_BASE)
        self.traps: list[str] = []

    def run(self, budget: int = 2_000_000) -> int:
        """Run until the program exits; return the exit value."""
        spent = 0
        while self.exit.value is None and spent < budget:
            n = self.hart.run(min(10_000, budget - spent))
            spent += max(n, 1)
            assert not self.hart.waiting, "program stopped in WFI"
        assert self.exit.value is not None, f"program did not exit, pc={self.hart.pc:#x}"
        return self.exit.value

    def reg(self, name: str) -> int:
        return self.hart.x[REG[name]]


def run(src: str, **kw: int) -> Machine:
    m = Machine(assemble(src), **kw)
    m.run()
    return m


@needs_as
def test_program_exit_value_and_registers() -> None:
    m = run("li a0, 42\nli a1, -1\nEXIT a0")
    assert m.exit.value == 42
    assert m.reg("a1") == (1 << 64) - 1
    assert m.reg("zero") == 0
