"""The platform-level interrupt controller, as QEMU ``virt`` wires it for hart 0.

Two contexts: 0 is hart 0 in M-mode (drives MEIP), 1 is hart 0 in S-mode (drives SEIP).
Devices raise and lower *levels* on their source; the PLIC's gateway turns a level into a
pending bit, and holds the source off while a context has claimed it and not yet completed
it, so a still-asserted level interrupts again only after ``complete``. That is what lets a
driver's handler drain a FIFO without being re-entered.

Register map (per the RISC-V PLIC specification, QEMU ``virt`` layout):
priorities at 4·id, pending bits at 0x1000, enables at 0x2000 + 0x80·ctx,
threshold at 0x200000 + 0x1000·ctx, claim/complete at threshold + 4.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from vmcore.devices.state import check_version

PLIC_BASE = 0x0C00_0000
PLIC_SIZE = 0x600000
NUM_SOURCES = 96
"""Source ids 1..95 exist (0 means "no interrupt"); the devicetree says ``riscv,ndev`` 95."""

PRIORITY_MASK = 0x7  # 3 priority bits, as QEMU virt: 0 disables, 7 is highest
CONTEXTS = 2

_PENDING = 0x1000
_ENABLE = 0x2000
_ENABLE_STRIDE = 0x80
_CONTEXT = 0x200000
_CONTEXT_STRIDE = 0x1000
_WORDS = NUM_SOURCES // 32
_MIP_LINES = (1 << 11, 1 << 9)  # MEIP for context 0, SEIP for context 1
_STATE_VERSION = 1

SetPending = Callable[[int, bool], None]


class Plic:
    """PLIC with level-triggered gateways; ``set_pending(mask, level)`` drives the hart."""

    def __init__(self, set_pending: SetPending) -> None:
        self.set_pending = set_pending
        self._clear()

    def _clear(self) -> None:
        self.priority = [0] * NUM_SOURCES
        self.level = [False] * NUM_SOURCES
        self.pending = [False] * NUM_SOURCES
        # The pending sources as a set too: usually empty or one element, so arbitration
        # (run on every level change, e.g. per UART byte) does not scan all 95 sources.
        self._pending_ids: set[int] = set()
        self.claimed = [False] * NUM_SOURCES
        self.enable = [[0] * _WORDS for _ in range(CONTEXTS)]
        self.threshold = [0] * CONTEXTS
        self._lines = [False] * CONTEXTS

    def reset(self) -> None:
        self._clear()
        for ctx in range(CONTEXTS):
            self.set_pending(_MIP_LINES[ctx], False)

    def set_level(self, source: int, level: bool) -> None:
        """A device's interrupt output: asserted (True) or deasserted (False)."""
        if not 0 < source < NUM_SOURCES:
            raise ValueError(f"PLIC source {source} out of range 1..{NUM_SOURCES - 1}")
        self.level[source] = level
        if level and not self.claimed[source]:
            self._set_pending(source, True)
        elif not level:
            # Level-triggered: a source that drops its line before being claimed withdraws.
            self._set_pending(source, False)
        self._update()

    def _set_pending(self, source: int, value: bool) -> None:
        self.pending[source] = value
        if value:
            self._pending_ids.add(source)
        else:
            self._pending_ids.discard(source)

    # -- arbitration ---------------------------------------------------------------------

    def _enabled(self, ctx: int, source: int) -> bool:
        return bool((self.enable[ctx][source >> 5] >> (source & 31)) & 1)

    def _best(self, ctx: int, threshold: int) -> int:
        """The highest-priority pending, enabled source above ``threshold`` (0 if none)."""
        best, best_prio = 0, threshold
        for source in sorted(self._pending_ids):
            if self.priority[source] > best_prio and self._enabled(ctx, source):
                best, best_prio = source, self.priority[source]
        return best

    def _update(self) -> None:
        for ctx in range(CONTEXTS):
            line = self._best(ctx, self.threshold[ctx]) != 0
            if line != self._lines[ctx]:
                self._lines[ctx] = line
                self.set_pending(_MIP_LINES[ctx], line)

    def claim(self, ctx: int) -> int:
        source = self._best(ctx, 0)
        if source:
            self._set_pending(source, False)
            self.claimed[source] = True
            self._update()
        return source

    def complete(self, ctx: int, source: int) -> None:
        if not 0 < source < NUM_SOURCES or not self._enabled(ctx, source):
            return  # the specification says such completions are ignored
        self.claimed[source] = False
        if self.level[source]:
            self._set_pending(source, True)
        self._update()

    # -- bus interface -------------------------------------------------------------------

    def read(self, offset: int, size: int) -> int:
        if size != 4 or offset % 4:
            return 0
        if offset < _PENDING:
            source = offset >> 2
            return self.priority[source] if source < NUM_SOURCES else 0
        if offset < _ENABLE:
            word = (offset - _PENDING) >> 2
            if word >= _WORDS:
                return 0
            bits = 0
            for i in range(32):
                if self.pending[word * 32 + i]:
                    bits |= 1 << i
            return bits
        if offset < _CONTEXT:
            ctx, rest = divmod(offset - _ENABLE, _ENABLE_STRIDE)
            word = rest >> 2
            if ctx < CONTEXTS and word < _WORDS:
                return self.enable[ctx][word]
            return 0
        ctx, rest = divmod(offset - _CONTEXT, _CONTEXT_STRIDE)
        if ctx >= CONTEXTS:
            return 0
        if rest == 0:
            return self.threshold[ctx]
        if rest == 4:
            return self.claim(ctx)
        return 0

    def write(self, offset: int, size: int, value: int) -> None:
        if size != 4 or offset % 4:
            return
        value &= 0xFFFF_FFFF
        if offset < _PENDING:
            source = offset >> 2
            if 0 < source < NUM_SOURCES:
                self.priority[source] = value & PRIORITY_MASK
                self._update()
            return
        if offset < _ENABLE:
            return  # pending bits are read-only
        if offset < _CONTEXT:
            ctx, rest = divmod(offset - _ENABLE, _ENABLE_STRIDE)
            word = rest >> 2
            if ctx < CONTEXTS and word < _WORDS:
                if word == 0:
                    value &= ~1  # source 0 does not exist
                self.enable[ctx][word] = value
                self._update()
            return
        ctx, rest = divmod(offset - _CONTEXT, _CONTEXT_STRIDE)
        if ctx >= CONTEXTS:
            return
        if rest == 0:
            self.threshold[ctx] = value & PRIORITY_MASK
            self._update()
        elif rest == 4:
            self.complete(ctx, value)

    # -- VM state ------------------------------------------------------------------------

    def save(self) -> dict[str, Any]:
        return {
            "version": _STATE_VERSION,
            "priority": list(self.priority),
            "level": list(self.level),
            "pending": list(self.pending),
            "claimed": list(self.claimed),
            "enable": [list(words) for words in self.enable],
            "threshold": list(self.threshold),
        }

    def restore(self, state: dict[str, Any]) -> None:
        check_version(state, "plic", _STATE_VERSION)
        for key in ("priority", "level", "pending", "claimed"):
            if len(state[key]) != NUM_SOURCES:
                raise ValueError(f"plic state: {key} does not have {NUM_SOURCES} sources")
        self.priority = [int(p) & PRIORITY_MASK for p in state["priority"]]
        self.level = [bool(v) for v in state["level"]]
        self.pending = [bool(v) for v in state["pending"]]
        self._pending_ids = {i for i, p in enumerate(self.pending) if p and i > 0}
        self.claimed = [bool(v) for v in state["claimed"]]
        self.enable = [[int(w) for w in words] for words in state["enable"]]
        self.threshold = [int(t) & PRIORITY_MASK for t in state["threshold"]]
        if len(self.enable) != CONTEXTS or any(len(w) != _WORDS for w in self.enable):
            raise ValueError("plic state: enable bits do not match this PLIC's contexts")
        # Force every line to be re-driven: the hart's mip is restored separately.
        self._lines = [False] * CONTEXTS
        for ctx in range(CONTEXTS):
            self.set_pending(_MIP_LINES[ctx], False)
        self._update()
