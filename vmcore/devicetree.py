"""The flattened devicetree Ferry hands its first stage, describing the board as built.

It mirrors what QEMU ``virt`` generates (``-machine virt,dumpdtb=``) for the parts Ferry
has, with the same node names, phandle wiring and compatibles, because firmware and kernels
find devices only through it: OpenSBI reads the CLINT, PLIC, UART and the syscon
poweroff/reboot nodes; Linux reads ``/chosen``, the memory node, ``riscv,isa`` and the
interrupt wiring. Nodes for hardware Ferry does not have (PCI, flash, fw-cfg, RTC, PMU) are
left out rather than described falsely.

The blob is encoded by the ``fdt`` library; this module only decides the content.
"""

from __future__ import annotations

import string

import fdt

from vmcore.clock import TIMEBASE_HZ
from vmcore.devices.clint import CLINT_BASE, CLINT_SIZE
from vmcore.devices.finisher import (
    FINISHER_BASE,
    FINISHER_PASS,
    FINISHER_RESET,
    FINISHER_SIZE,
)
from vmcore.devices.plic import NUM_SOURCES, PLIC_BASE, PLIC_SIZE
from vmcore.devices.uart import UART_BASE, UART_CLOCK_HZ, UART_IRQ, UART_SIZE

RISCV_ISA = "rv64imac_zicsr_zifencei"
MMU_TYPE = "riscv,sv39"

# Phandles, numbered as QEMU numbers them so decompiled trees can be compared side by side.
PHANDLE_CPU0 = 1
PHANDLE_CPU0_INTC = 2
PHANDLE_PLIC = 3
PHANDLE_TEST = 4

_IRQ_M_SOFT, _IRQ_M_TIMER, _IRQ_S_EXT, _IRQ_M_EXT = 3, 7, 9, 11


def _reg(base: int, size: int) -> fdt.PropWords:
    """A ``reg`` in the 2-cell address, 2-cell size layout of ``/`` and ``/soc``."""
    return fdt.PropWords("reg", base >> 32, base & 0xFFFF_FFFF, size >> 32, size & 0xFFFF_FFFF)


def _node(name: str, *items: object) -> fdt.Node:
    node = fdt.Node(name)
    for item in items:
        node.append(item)
    return node


def build_devicetree(ram_base: int, ram_size: int, bootargs: str = "") -> bytes:
    """The DTB for a one-hart Ferry board with ``ram_size`` bytes of RAM at ``ram_base``.

    Raises ValueError for a command line that cannot be a devicetree string.
    """
    if any(c not in string.printable for c in bootargs) or "\0" in bootargs:
        raise ValueError("kernel command line must be printable ASCII")
    tree = fdt.FDT()
    root = tree.root
    for item in (
        fdt.PropWords("#address-cells", 2),
        fdt.PropWords("#size-cells", 2),
        fdt.PropStrings("compatible", "riscv-virtio"),
        fdt.PropStrings("model", "riscv-virtio,ferry"),
    ):
        root.append(item)

    chosen = _node("chosen", fdt.PropStrings("stdout-path", f"/soc/serial@{UART_BASE:x}"))
    if bootargs:  # as QEMU: no -append, no bootargs property (an empty one is invalid)
        chosen.append(fdt.PropStrings("bootargs", bootargs))
    root.append(chosen)
    # OpenSBI's syscon reset driver and Linux's syscon-poweroff find the finisher here.
    root.append(
        _node(
            "poweroff",
            fdt.PropWords("value", FINISHER_PASS),
            fdt.PropWords("offset", 0),
            fdt.PropWords("regmap", PHANDLE_TEST),
            fdt.PropStrings("compatible", "syscon-poweroff"),
        )
    )
    root.append(
        _node(
            "reboot",
            fdt.PropWords("value", FINISHER_RESET),
            fdt.PropWords("offset", 0),
            fdt.PropWords("regmap", PHANDLE_TEST),
            fdt.PropStrings("compatible", "syscon-reboot"),
        )
    )
    root.append(
        _node(
            f"memory@{ram_base:x}",
            fdt.PropStrings("device_type", "memory"),
            _reg(ram_base, ram_size),
        )
    )

    intc = _node(
        "interrupt-controller",
        fdt.PropWords("#interrupt-cells", 1),
        fdt.Property("interrupt-controller"),
        fdt.PropStrings("compatible", "riscv,cpu-intc"),
        fdt.PropWords("phandle", PHANDLE_CPU0_INTC),
    )
    cpu0 = _node(
        "cpu@0",
        fdt.PropWords("phandle", PHANDLE_CPU0),
        fdt.PropStrings("device_type", "cpu"),
        fdt.PropWords("reg", 0),
        fdt.PropStrings("status", "okay"),
        fdt.PropStrings("compatible", "riscv"),
        fdt.PropStrings("riscv,isa", RISCV_ISA),
        fdt.PropStrings("mmu-type", MMU_TYPE),
        intc,
    )
    core0 = _node("core0", fdt.PropWords("cpu", PHANDLE_CPU0))
    cpu_map = _node("cpu-map", _node("cluster0", core0))
    root.append(
        _node(
            "cpus",
            fdt.PropWords("#address-cells", 1),
            fdt.PropWords("#size-cells", 0),
            fdt.PropWords("timebase-frequency", TIMEBASE_HZ),
            cpu0,
            cpu_map,
        )
    )

    soc = _node(
        "soc",
        fdt.PropWords("#address-cells", 2),
        fdt.PropWords("#size-cells", 2),
        fdt.PropStrings("compatible", "simple-bus"),
        fdt.Property("ranges"),
    )
    soc.append(
        _node(
            f"serial@{UART_BASE:x}",
            fdt.PropWords("interrupts", UART_IRQ),
            fdt.PropWords("interrupt-parent", PHANDLE_PLIC),
            fdt.PropWords("clock-frequency", UART_CLOCK_HZ),
            _reg(UART_BASE, UART_SIZE),
            fdt.PropStrings("compatible", "ns16550a"),
        )
    )
    soc.append(
        _node(
            f"test@{FINISHER_BASE:x}",
            fdt.PropWords("phandle", PHANDLE_TEST),
            _reg(FINISHER_BASE, FINISHER_SIZE),
            fdt.PropStrings("compatible", "sifive,test1", "sifive,test0", "syscon"),
        )
    )
    soc.append(
        _node(
            f"plic@{PLIC_BASE:x}",
            fdt.PropWords("phandle", PHANDLE_PLIC),
            fdt.PropWords("riscv,ndev", NUM_SOURCES - 1),
            _reg(PLIC_BASE, PLIC_SIZE),
            fdt.PropWords(
                "interrupts-extended",
                PHANDLE_CPU0_INTC,
                _IRQ_M_EXT,
                PHANDLE_CPU0_INTC,
                _IRQ_S_EXT,
            ),
            fdt.Property("interrupt-controller"),
            fdt.PropStrings("compatible", "sifive,plic-1.0.0", "riscv,plic0"),
            fdt.PropWords("#address-cells", 0),
            fdt.PropWords("#interrupt-cells", 1),
        )
    )
    soc.append(
        _node(
            f"clint@{CLINT_BASE:x}",
            fdt.PropWords(
                "interrupts-extended",
                PHANDLE_CPU0_INTC,
                _IRQ_M_SOFT,
                PHANDLE_CPU0_INTC,
                _IRQ_M_TIMER,
            ),
            _reg(CLINT_BASE, CLINT_SIZE),
            fdt.PropStrings("compatible", "sifive,clint0", "riscv,clint0"),
        )
    )
    root.append(soc)
    blob: bytes = tree.to_dtb(version=17)
    return blob


def dtb_address(ram_base: int, ram_size: int, dtb_size: int) -> int:
    """Where the DTB goes: QEMU's rule, the end of RAM (capped below 3 GiB) minus the blob,
    rounded down to 2 MiB, so it stays clear of a kernel loaded low and of its early heap."""
    two_mib = 2 << 20
    end = ram_base + ram_size
    if ram_base < 3 << 30:
        end = min(end, 3 << 30)
    return (end - dtb_size) & ~(two_mib - 1)
