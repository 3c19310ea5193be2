"""The devicetree describes the board as built, the way QEMU virt's does."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import fdt
import pytest

from vmcore.devicetree import build_devicetree, dtb_address


def tree(memory: int = 128 << 20, bootargs: str = "console=ttyS0") -> fdt.FDT:
    return fdt.parse_dtb(build_devicetree(0x8000_0000, memory, bootargs))


def test_memory_node_matches_ram_size() -> None:
    t = tree(memory=256 << 20)
    assert list(t.get_property("reg", "/memory@80000000").data) == [0, 0x8000_0000, 0, 256 << 20]


def test_chosen_carries_bootargs_and_stdout_path() -> None:
    t = tree(bootargs="earlycon quiet")
    assert t.get_property("bootargs", "/chosen").value == "earlycon quiet"
    assert t.get_property("stdout-path", "/chosen").value == "/soc/serial@10000000"


def test_cpu_describes_the_hart_truthfully() -> None:
    t = tree()
    assert t.get_property("timebase-frequency", "/cpus").value == 10_000_000
    cpu = "/cpus/cpu@0"
    assert t.get_property("riscv,isa", cpu).value == "rv64imac_zicsr_zifencei"
    assert t.get_property("mmu-type", cpu).value == "riscv,sv39"
    assert t.get_property("compatible", f"{cpu}/interrupt-controller").value == "riscv,cpu-intc"


def test_interrupt_wiring_uses_the_cpu_intc_phandle() -> None:
    t = tree()
    intc = t.get_property("phandle", "/cpus/cpu@0/interrupt-controller").value
    plic = "/soc/plic@c000000"
    assert list(t.get_property("interrupts-extended", plic).data) == [intc, 11, intc, 9]
    clint = "/soc/clint@2000000"
    assert list(t.get_property("interrupts-extended", clint).data) == [intc, 3, intc, 7]
    uart = "/soc/serial@10000000"
    assert t.get_property("interrupt-parent", uart).value == t.get_property("phandle", plic).value
    assert t.get_property("interrupts", uart).value == 10
    assert t.get_property("compatible", uart).value == "ns16550a"


def test_poweroff_and_reboot_point_at_the_test_device() -> None:
    t = tree()
    test = t.get_property("phandle", "/soc/test@100000").value
    assert list(t.get_property("compatible", "/soc/test@100000").data) == [
        "sifive,test1",
        "sifive,test0",
        "syscon",
    ]
    assert t.get_property("regmap", "/poweroff").value == test
    assert t.get_property("value", "/poweroff").value == 0x5555
    assert t.get_property("value", "/reboot").value == 0x7777


def test_dtb_placed_at_end_of_ram_2mib_aligned() -> None:
    assert dtb_address(0x8000_0000, 128 << 20, 2000) == 0x87E0_0000
    assert dtb_address(0x8000_0000, 4 << 30, 2000) == 0xBFE0_0000  # capped below 3 GiB


@pytest.mark.skipif(shutil.which("dtc") is None, reason="dtc not installed")
def test_dtc_accepts_the_blob(tmp_path: Path) -> None:
    path = tmp_path / "ferry.dtb"
    path.write_bytes(build_devicetree(0x8000_0000, 64 << 20, ""))
    out = subprocess.run(
        ["dtc", "-I", "dtb", "-O", "dts", str(path)], capture_output=True, text=True, check=True
    ).stdout
    assert "serial@10000000" in out and "plic@c000000" in out


def test_no_append_means_no_bootargs_and_junk_is_refused() -> None:
    assert tree(bootargs="").get_property("bootargs", "/chosen") is None
    with pytest.raises(ValueError, match="printable ASCII"):
        build_devicetree(0x8000_0000, 64 << 20, "bad\x01arg")


# Where Ferry's tree says something else than QEMU's on purpose: the board's name, and the
# hart and PLIC Ferry actually has (RV64IMAC with Sv39; 95 interrupt sources).
INTENDED_DIFFERENCES = {
    ("/", "model"),
    ("/cpus/cpu@0", "riscv,isa"),
    ("/cpus/cpu@0", "mmu-type"),
    ("/soc/plic@c000000", "riscv,ndev"),
}


@pytest.mark.skipif(shutil.which("qemu-system-riscv64") is None, reason="QEMU not installed")
def test_every_node_and_property_matches_qemu_virt(tmp_path: Path) -> None:
    dumped = tmp_path / "qemu.dtb"
    kernel = tmp_path / "Image"  # QEMU takes -append only with a kernel
    kernel.write_bytes(b"\x6f\x00\x00\x00")
    subprocess.run(
        [
            "qemu-system-riscv64",
            "-machine",
            f"virt,dumpdtb={dumped}",
            "-m",
            "256M",
            "-bios",
            "none",
            "-kernel",
            str(kernel),
            "-append",
            "console=ttyS0",
            "-nographic",
        ],
        capture_output=True,
        check=True,
        timeout=60,
    )
    qemu = fdt.parse_dtb(dumped.read_bytes())
    ferry = tree(memory=256 << 20, bootargs="console=ttyS0")
    compared = 0
    for path, _, props in ferry.walk():
        assert qemu.exist_node(path), f"QEMU has no {path}"
        for prop in props:
            if (path, prop.name) in INTENDED_DIFFERENCES:
                continue
            assert qemu.get_node(path).get_property(prop.name) == prop, f"{path} {prop.name}"
            compared += 1
    assert compared > 40
