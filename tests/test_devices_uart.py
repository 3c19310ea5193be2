"""NS16550A behaviour that console drivers (polling and interrupt-driven) rely on."""

from __future__ import annotations

import msgpack
import pytest

from vmcore.devices.uart import (
    IER_RDA,
    IER_THRE,
    IIR_NONE,
    IIR_RDA,
    IIR_THRE,
    LCR,
    LCR_DLAB,
    LSR,
    LSR_DR,
    LSR_THRE,
    Uart16550,
)


class Harness:
    def __init__(self) -> None:
        self.out = bytearray()
        self.levels: list[bool] = []
        self.uart = Uart16550(self.out.extend, self.levels.append)

    @property
    def line(self) -> bool:
        return bool(self.levels) and self.levels[-1]

    def r(self, off: int) -> int:
        return self.uart.read(off, 1)

    def w(self, off: int, value: int) -> None:
        self.uart.write(off, 1, value)


def test_polled_transmit_reaches_sink_and_transmitter_is_always_ready() -> None:
    h = Harness()
    for ch in b"hi\n":
        assert h.r(LSR) & LSR_THRE
        h.w(0, ch)
    assert bytes(h.out) == b"hi\n"
    assert not h.line


def test_received_bytes_are_read_in_order_with_data_ready() -> None:
    h = Harness()
    assert not h.r(LSR) & LSR_DR
    h.uart.feed(b"ab")
    assert h.r(LSR) & LSR_DR
    assert h.r(0) == ord("a")
    assert h.r(0) == ord("b")
    assert not h.r(LSR) & LSR_DR
    assert h.r(0) == 0  # empty receiver reads as zero, no exception


def test_rx_interrupt_follows_enable_and_drains() -> None:
    h = Harness()
    h.uart.feed(b"x")
    assert not h.line  # not enabled yet
    h.w(1, IER_RDA)
    assert h.line
    assert h.r(2) & 0x0F == IIR_RDA
    h.r(0)
    assert not h.line
    assert h.r(2) & 0x0F == IIR_NONE


def test_thr_empty_interrupt_handshake() -> None:
    h = Harness()
    h.w(1, IER_THRE)
    assert h.line, "enabling THRE with an empty transmitter interrupts at once"
    assert h.r(2) & 0x0F == IIR_THRE
    assert not h.line, "reading IIR acknowledges THR empty"
    h.w(0, ord("z"))
    assert h.line, "each transmitted byte leaves THR empty again"
    h.w(1, 0)
    assert not h.line


def test_rx_has_priority_over_thre_in_iir() -> None:
    h = Harness()
    h.w(1, IER_THRE | IER_RDA)
    h.uart.feed(b"q")
    assert h.r(2) & 0x0F == IIR_RDA


def test_divisor_latch_does_not_disturb_data_path() -> None:
    h = Harness()
    h.w(LCR, LCR_DLAB | 0x03)
    h.w(0, 0x01)
    h.w(1, 0x00)
    assert h.r(0) == 0x01
    h.w(LCR, 0x03)
    assert bytes(h.out) == b""
    assert h.r(1) == 0  # IER, not DLM


def test_loopback_sends_output_back_to_receiver() -> None:
    h = Harness()
    h.w(4, 0x10)
    h.w(0, 0x5A)
    assert bytes(h.out) == b""
    assert h.r(0) == 0x5A


def test_fifo_control_reports_fifo_and_clears_receiver() -> None:
    h = Harness()
    h.uart.feed(b"abc")
    h.w(2, 0x07)
    assert h.r(2) & 0xC0 == 0xC0
    assert not h.r(LSR) & LSR_DR


def test_save_restore_keeps_queued_input_and_pending_interrupt() -> None:
    h = Harness()
    h.w(1, IER_RDA)
    h.uart.feed(b"xyz")
    h.r(0)
    state = msgpack.unpackb(msgpack.packb(h.uart.save()))
    h2 = Harness()
    h2.uart.restore(state)
    assert h2.line
    assert bytes(h2.r(0) for _ in range(2)) == b"yz"
    assert not h2.line


def test_restore_rejects_other_schema_version() -> None:
    h = Harness()
    state = h.uart.save()
    state["version"] = 99
    with pytest.raises(ValueError, match="uart state has schema version 99"):
        h.uart.restore(state)
