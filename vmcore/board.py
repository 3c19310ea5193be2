"""The Ferry board: QEMU ``virt``'s memory map and boot protocol around one RV64 hart.

``Machine`` builds RAM, the MMIO bus, the devices and the hart, loads firmware/kernel and
the devicetree, and runs the guest in bounded slices. The slice is the unit every host loop
works in (``ferry-vm``'s foreground loop, the VMM worker's trio loop): it returns after a
budget of instructions, when the hart idles in WFI, or when the guest asks the test
finisher to power off, fail or reset.

Nothing here runs per instruction. The timer line is re-evaluated between ``hart.run``
chunks, and in deterministic mode a chunk never runs past the timer deadline, so a timer
interrupt lands on exactly the same instruction in every run.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Any

from vmcore.bus import Bus
from vmcore.clock import TIMEBASE_HZ, GuestClock
from vmcore.cpu import Hart
from vmcore.devices.bootrom import BOOTROM_BASE, BOOTROM_SIZE, BootRom
from vmcore.devices.clint import CLINT_BASE, CLINT_SIZE, Clint
from vmcore.devices.finisher import FINISHER_BASE, FINISHER_SIZE, FinisherEvent, TestFinisher
from vmcore.devices.plic import PLIC_BASE, PLIC_SIZE, Plic
from vmcore.devices.state import check_version
from vmcore.devices.uart import UART_BASE, UART_IRQ, UART_SIZE, Uart16550
from vmcore.devicetree import build_devicetree, dtb_address
from vmcore.loader import Image, LoaderError, Segment, check_placement, load_into, parse_image
from vmcore.memory import GuestRAM
from vmcore.sizes import format_size

RAM_BASE = 0x8000_0000
KERNEL_ADDR_WITH_FIRMWARE = 0x8020_0000
"""Where fw_jump expects the next stage (Debian's generic OpenSBI: FW_JUMP_ADDR)."""

DEFAULT_BIOS = "/usr/lib/riscv64-linux-gnu/opensbi/generic/fw_jump.elf"
DEFAULT_MEMORY = 128 << 20
MIN_MEMORY = 4 << 20

CHUNK = 20_000
"""Instructions per ``hart.run`` call: long enough that the between-chunk checks cost
nothing measurable, short enough (~1-2 ms of wall time) that timers and console input are
noticed promptly."""

_STATE_VERSION = 1

Console = Callable[[bytes], None]
TraceLog = Callable[[str], None]


@dataclass(frozen=True)
class MachineConfig:
    """What defines a VM's hardware and boot; two VMs with equal configs are interchangeable."""

    kernel: str | None
    memory: int = DEFAULT_MEMORY
    bios: str = "none"
    append: str = ""
    deterministic: bool = False

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> MachineConfig:
        return cls(
            kernel=d.get("kernel"),
            memory=int(d["memory"]),
            bios=str(d.get("bios", "none")),
            append=str(d.get("append", "")),
            deterministic=bool(d.get("deterministic", False)),
        )


@dataclass(frozen=True)
class SliceResult:
    """Why ``run_slice`` returned.

    ``reason`` is "budget" (ran ``max_instructions``), "idle" (the hart waits in WFI; wake
    it at guest time ``idle_until``, or only on input if None), "poweroff", "fail" (the
    guest's code in ``exit_code``) or "reset" (call ``Machine.reset()`` to reboot).
    """

    retired: int
    reason: str
    idle_until: int | None = None
    exit_code: int = 0


def _resolve_bios(bios: str) -> str | None:
    if bios == "none":
        return None
    if bios == "default":
        return DEFAULT_BIOS
    return bios


class Machine:
    """One VM's hardware. ``console`` receives the UART's output bytes."""

    def __init__(
        self,
        config: MachineConfig,
        console: Console | None = None,
        trace: TraceLog | None = None,
        boot: bool = True,
    ) -> None:
        """Build the board; with ``boot`` false, RAM stays empty (an incoming migration or a
        snapshot restore fills it) and no image is read."""
        if config.memory < MIN_MEMORY or config.memory % 4096:
            raise LoaderError(
                f"memory size {format_size(config.memory)} invalid: need a multiple of 4K, "
                f"at least {format_size(MIN_MEMORY)}"
            )
        if boot and config.kernel is None and config.bios == "none":
            raise LoaderError("nothing to boot: give a kernel, a firmware, or both")
        self.config = config
        self.console: Console = console if console is not None else (lambda data: None)
        self.event: FinisherEvent | None = None

        self.clock = GuestClock(deterministic=config.deterministic)
        try:
            self.ram = GuestRAM(config.memory, base=RAM_BASE)
        except (OSError, MemoryError, OverflowError) as e:
            reason = e.strerror if isinstance(e, OSError) and e.strerror else "out of memory"
            raise LoaderError(
                f"cannot allocate {format_size(config.memory)} of guest RAM: {reason}"
            ) from None
        self.bus = Bus()
        self.hart = Hart(self.ram, self.bus, hartid=0, time_source=self.clock.mtime)
        self.clock.instret = lambda: int(self.hart.instret)
        self.hart.trace = trace  # the hart logs its traps and MMIO accesses

        self.bootrom = BootRom()
        self.clint = Clint(self.clock, self.hart.set_pending)
        self.plic = Plic(self.hart.set_pending)
        self.uart = Uart16550(self._console_out, lambda level: self.plic.set_level(UART_IRQ, level))
        self.finisher = TestFinisher(self._on_finisher)
        self.bus.attach(BOOTROM_BASE, BOOTROM_SIZE, self.bootrom, "bootrom")
        self.bus.attach(FINISHER_BASE, FINISHER_SIZE, self.finisher, "test")
        self.bus.attach(CLINT_BASE, CLINT_SIZE, self.clint, "clint")
        self.bus.attach(PLIC_BASE, PLIC_SIZE, self.plic, "plic")
        self.bus.attach(UART_BASE, UART_SIZE, self.uart, "uart")

        try:
            self.dtb = build_devicetree(RAM_BASE, config.memory, config.append)
        except ValueError as e:
            raise LoaderError(str(e)) from None
        self.dtb_addr = dtb_address(RAM_BASE, config.memory, len(self.dtb))
        self.images: list[Image] = self._parse_images() if boot else []
        if boot:
            self._load()

    # -- boot ----------------------------------------------------------------------------

    def _parse_images(self) -> list[Image]:
        images: list[Image] = []
        firmware = _resolve_bios(self.config.bios)
        if firmware is not None:
            images.append(parse_image(firmware, RAM_BASE, "firmware"))
            kernel_addr = KERNEL_ADDR_WITH_FIRMWARE
        else:
            kernel_addr = RAM_BASE
        if self.config.kernel is not None:
            images.append(parse_image(self.config.kernel, kernel_addr, "kernel"))
        dtb = Image("devicetree", self.dtb_addr, [Segment(self.dtb_addr, self.dtb, len(self.dtb))])
        check_placement([*images, dtb], RAM_BASE, self.config.memory)
        return images

    def _load(self) -> None:
        """Put images and DTB in RAM and point the hart at the boot ROM."""
        for image in self.images:
            load_into(self.ram, image)
        self.ram.write(self.dtb_addr, self.dtb)
        entry = self.images[0].entry
        # With firmware, the stage after it is the kernel (fw_dynamic reads this from a2).
        next_addr = self.images[1].entry if len(self.images) > 1 else 0
        self.bootrom.restore(
            {"version": 1, "entry": entry, "dtb_addr": self.dtb_addr, "next_addr": next_addr}
        )
        self.hart.reset(BOOTROM_BASE)

    def reset(self) -> None:
        """Reboot: what the guest asked for with the finisher's reset (0x7777)."""
        self.event = None
        now = self.clock.mtime()
        self.ram.clear()
        self.uart.reset()
        self.clint.reset()
        self.plic.reset()
        self._load()
        # The hart's counters restart at zero; guest time must not run backwards with them.
        self.clock.set_mtime(now)

    # -- running -------------------------------------------------------------------------

    def _console_out(self, data: bytes) -> None:
        self.console(data)

    def _on_finisher(self, event: FinisherEvent) -> None:
        self.event = event
        self.hart.request_exit()

    def _finished(self, retired: int) -> SliceResult:
        assert self.event is not None
        return SliceResult(retired, self.event.kind, exit_code=self.event.code)

    def pause(self) -> None:
        """Freeze guest time (real-time mode); ``run_slice`` resumes it."""
        self.clock.pause()

    def resume(self) -> None:
        self.clock.resume()

    def run_slice(self, max_instructions: int) -> SliceResult:
        """Run up to ``max_instructions``; see ``SliceResult`` for why it stopped."""
        if self.event is not None:
            return self._finished(0)
        self.clock.resume()
        hart, clint, clock = self.hart, self.clint, self.clock
        deterministic = clock.deterministic
        retired = 0
        while retired < max_instructions:
            clint.update()
            chunk = min(CHUNK, max_instructions - retired)
            if deterministic:
                deadline = clint.next_deadline()
                if deadline is not None:
                    ahead = deadline - clock.mtime()
                    if 0 < ahead < chunk:
                        chunk = ahead
            n = hart.run(chunk)
            retired += n
            if self.event is not None:
                return self._finished(retired)
            if hart.waiting:
                clint.update()
                if not hart.waiting:
                    continue
                deadline = clint.next_deadline()
                if deterministic and deadline is not None and deadline > clock.mtime():
                    clock.skip_to(deadline)  # nothing else can happen before it
                    continue
                return SliceResult(retired, "idle", idle_until=deadline)
            if n == 0:
                break  # the hart was asked to exit from outside
        return SliceResult(retired, "budget")

    def seconds_until(self, mtime: int) -> float:
        """Host seconds until guest time reaches ``mtime`` (real-time mode), at least 0."""
        return max(0.0, (mtime - self.clock.mtime()) / TIMEBASE_HZ)

    # -- VM state ------------------------------------------------------------------------

    def save(self) -> dict[str, Any]:
        """Board and device state; the hart and RAM are saved by their owners."""
        return {
            "version": _STATE_VERSION,
            "config": self.config.to_dict(),
            "dtb_addr": self.dtb_addr,
            "clock": self.clock.save(),
            "bootrom": self.bootrom.save(),
            "clint": self.clint.save(),
            "plic": self.plic.save(),
            "uart": self.uart.save(),
            "finisher": self.finisher.save(),
            "event": None if self.event is None else [self.event.kind, self.event.code],
        }

    def restore(self, state: dict[str, Any]) -> None:
        """Take over a saved board; refuses state from a board with different hardware."""
        check_version(state, "board", _STATE_VERSION)
        saved = MachineConfig.from_dict(state["config"])
        if saved.memory != self.config.memory:
            raise ValueError(
                f"saved VM has {format_size(saved.memory)} of RAM, "
                f"this one {format_size(self.config.memory)}"
            )
        if saved.deterministic != self.config.deterministic:
            mode = "deterministic" if saved.deterministic else "real-time"
            raise ValueError(f"saved VM used {mode} guest time; this one does not")
        self.clock.restore(state["clock"])
        self.bootrom.restore(state["bootrom"])
        self.clint.restore(state["clint"])
        self.uart.restore(state["uart"])
        self.plic.restore(state["plic"])  # after the UART: the PLIC's saved view wins
        self.finisher.restore(state["finisher"])
        self.dtb_addr = int(state["dtb_addr"])
        event = state.get("event")
        self.event = None if event is None else FinisherEvent(str(event[0]), int(event[1]))


def describe_images(machine: Machine) -> str:
    """One line per loaded image, for ``--trace``."""
    lines = []
    for image in machine.images:
        lines.append(
            f"loaded {os.path.basename(image.path)}: {image.low:#x}-{image.high:#x} "
            f"entry {image.entry:#x}"
        )
    lines.append(f"devicetree at {machine.dtb_addr:#x} ({len(machine.dtb)} bytes)")
    return "\n".join(lines)
