"""NS16550A UART: the guest's console, as on QEMU ``virt`` (0x1000_0000, PLIC source 10).

Transmission is instantaneous: a byte written to THR goes straight to the output sink, so
the transmitter is always empty (LSR.THRE and LSR.TEMT always set). The "THR empty"
interrupt therefore follows the 16550's rule for an always-idle transmitter: it is raised
when the guest enables it and after every THR write, and cleared by writing THR or by
reading IIR while it is the reported cause. Interrupt-driven drivers (Linux's 8250) rely on
exactly that handshake.

Received bytes are queued without a size limit, so console input is never dropped while a
guest is busy; the guest sees "data ready" until the queue is empty.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable
from typing import Any

from vmcore.devices.state import check_version

UART_BASE = 0x1000_0000
UART_SIZE = 0x100
UART_IRQ = 10
UART_CLOCK_HZ = 3_686_400

# Register offsets (DLAB=0 meaning, DLAB=1 meaning where it differs).
RBR_THR_DLL = 0
IER_DLM = 1
IIR_FCR = 2
LCR = 3
MCR = 4
LSR = 5
MSR = 6
SCR = 7

IER_RDA = 0x01  # received data available
IER_THRE = 0x02  # transmitter holding register empty
IER_RLS = 0x04  # receiver line status
IER_MS = 0x08  # modem status

IIR_NONE = 0x01
IIR_RLS = 0x06
IIR_RDA = 0x04
IIR_THRE = 0x02
IIR_FIFO_ENABLED = 0xC0

LCR_DLAB = 0x80
LSR_DR = 0x01
LSR_OE = 0x02
LSR_THRE = 0x20
LSR_TEMT = 0x40
MCR_LOOP = 0x10
FCR_ENABLE = 0x01
FCR_CLEAR_RX = 0x02

_STATE_VERSION = 1

Sink = Callable[[bytes], None]
IrqLine = Callable[[bool], None]


class Uart16550:
    """The UART; ``sink`` receives transmitted bytes, ``irq`` is its interrupt line."""

    def __init__(self, sink: Sink, irq: IrqLine) -> None:
        self.sink = sink
        self.irq = irq
        self.rx: deque[int] = deque()
        self._clear()

    def _clear(self) -> None:
        self.rx.clear()
        self.ier = 0
        self.lcr = 0
        self.mcr = 0
        self.scr = 0
        self.fcr = 0
        self.dll = 0x0C  # 9600 baud at 1.8432 MHz, a conventional power-on divisor
        self.dlm = 0
        self.lsr_errors = 0
        self.thre_pending = False
        self._line = False

    def reset(self) -> None:
        self._clear()
        self.irq(False)

    def feed(self, data: bytes) -> None:
        """Queue bytes from the console as if they arrived on the serial line."""
        if not data:
            return
        self.rx.extend(data)
        self._update()

    # -- interrupt logic -----------------------------------------------------------------

    def _cause(self) -> int:
        """The IIR cause code of the highest-priority pending interrupt."""
        if self.ier & IER_RLS and self.lsr_errors:
            return IIR_RLS
        if self.ier & IER_RDA and self.rx:
            return IIR_RDA
        if self.ier & IER_THRE and self.thre_pending:
            return IIR_THRE
        return IIR_NONE

    def _update(self) -> None:
        line = self._cause() != IIR_NONE
        if line != self._line:
            self._line = line
            self.irq(line)

    def _lsr(self) -> int:
        value = LSR_THRE | LSR_TEMT | self.lsr_errors
        if self.rx:
            value |= LSR_DR
        return value

    def _msr(self) -> int:
        if self.mcr & MCR_LOOP:
            # Loopback wires the modem outputs back to the inputs (DTR→DSR, RTS→CTS, ...).
            return (
                ((self.mcr & 0x02) << 3)
                | ((self.mcr & 0x01) << 5)
                | ((self.mcr & 0x04) << 4)
                | ((self.mcr & 0x08) << 4)
            )
        return 0xB0  # carrier detect, data set ready, clear to send: a cable is attached

    # -- bus interface -------------------------------------------------------------------

    def read(self, offset: int, size: int) -> int:
        if size != 1:
            # Byte registers; wider accesses see the first register in the low byte.
            return self.read(offset, 1)
        dlab = self.lcr & LCR_DLAB
        if offset == RBR_THR_DLL:
            if dlab:
                return self.dll
            value = self.rx.popleft() if self.rx else 0
            self._update()
            return value
        if offset == IER_DLM:
            return self.dlm if dlab else self.ier
        if offset == IIR_FCR:
            cause = self._cause()
            if cause == IIR_THRE:
                self.thre_pending = False  # reading IIR acknowledges "THR empty"
                self._update()
            return cause | (IIR_FIFO_ENABLED if self.fcr & FCR_ENABLE else 0)
        if offset == LCR:
            return self.lcr
        if offset == MCR:
            return self.mcr
        if offset == LSR:
            value = self._lsr()
            if self.lsr_errors:
                self.lsr_errors = 0  # error bits clear on read
                self._update()
            return value
        if offset == MSR:
            return self._msr()
        if offset == SCR:
            return self.scr
        return 0

    def write(self, offset: int, size: int, value: int) -> None:
        value &= 0xFF
        dlab = self.lcr & LCR_DLAB
        if offset == RBR_THR_DLL:
            if dlab:
                self.dll = value
                return
            if self.mcr & MCR_LOOP:
                self.rx.append(value)
            else:
                self.sink(bytes((value,)))
            # The byte left at once: THR is empty again and says so.
            self.thre_pending = True
            self._update()
        elif offset == IER_DLM:
            if dlab:
                self.dlm = value
                return
            was = self.ier
            self.ier = value & 0x0F
            if self.ier & IER_THRE and not was & IER_THRE:
                self.thre_pending = True
            self._update()
        elif offset == IIR_FCR:
            if value & FCR_CLEAR_RX:
                self.rx.clear()
            self.fcr = value & 0xC9  # enable, DMA mode and trigger level stick
            self._update()
        elif offset == LCR:
            self.lcr = value
        elif offset == MCR:
            self.mcr = value & 0x1F
        elif offset == SCR:
            self.scr = value

    # -- VM state ------------------------------------------------------------------------

    def save(self) -> dict[str, Any]:
        return {
            "version": _STATE_VERSION,
            "rx": bytes(self.rx),
            "ier": self.ier,
            "lcr": self.lcr,
            "mcr": self.mcr,
            "scr": self.scr,
            "fcr": self.fcr,
            "dll": self.dll,
            "dlm": self.dlm,
            "lsr_errors": self.lsr_errors,
            "thre_pending": self.thre_pending,
        }

    def restore(self, state: dict[str, Any]) -> None:
        check_version(state, "uart", _STATE_VERSION)
        self.rx = deque(bytes(state["rx"]))
        self.ier = int(state["ier"]) & 0x0F
        self.lcr = int(state["lcr"]) & 0xFF
        self.mcr = int(state["mcr"]) & 0x1F
        self.scr = int(state["scr"]) & 0xFF
        self.fcr = int(state["fcr"]) & 0xFF
        self.dll = int(state["dll"]) & 0xFF
        self.dlm = int(state["dlm"]) & 0xFF
        self.lsr_errors = int(state["lsr_errors"]) & 0x1E
        self.thre_pending = bool(state["thre_pending"])
        self._line = self._cause() != IIR_NONE
        self.irq(self._line)
