"""The SiFive test finisher (``sifive,test0``): how a guest powers off, fails or resets.

A store at offset 0 (a word, or only the low halfword, as OpenSBI writes it): low half
0x5555 = pass/poweroff, 0x3333 = fail with the exit code in the high half, 0x7777 = reset.
Other values are ignored, as QEMU ignores them.
The finisher does not stop anything itself; it reports to the board, which stops the hart.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from vmcore.devices.state import check_version

FINISHER_BASE = 0x10_0000
FINISHER_SIZE = 0x1000

FINISHER_PASS = 0x5555
FINISHER_FAIL = 0x3333
FINISHER_RESET = 0x7777

_STATE_VERSION = 1


@dataclass(frozen=True)
class FinisherEvent:
    """What the guest asked for: ``kind`` is "poweroff", "fail" or "reset"."""

    kind: str
    code: int = 0


class TestFinisher:
    """Reports the guest's request through ``on_event``."""

    __test__ = False  # not a pytest test class despite the name

    def __init__(self, on_event: Callable[[FinisherEvent], None]) -> None:
        self.on_event = on_event

    def read(self, offset: int, size: int) -> int:
        return 0

    def write(self, offset: int, size: int, value: int) -> None:
        if offset != 0 or size < 2:
            return  # OpenSBI's driver stores a halfword; RV guests usually a word
        status, code = value & 0xFFFF, (value >> 16) & 0xFFFF
        if status == FINISHER_PASS:
            self.on_event(FinisherEvent("poweroff"))
        elif status == FINISHER_FAIL:
            self.on_event(FinisherEvent("fail", code))
        elif status == FINISHER_RESET:
            self.on_event(FinisherEvent("reset"))

    def save(self) -> dict[str, Any]:
        return {"version": _STATE_VERSION}

    def restore(self, state: dict[str, Any]) -> None:
        check_version(state, "finisher", _STATE_VERSION)
