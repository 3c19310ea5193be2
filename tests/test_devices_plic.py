"""PLIC: priorities, enables, thresholds and the claim/complete gateway for M and S contexts."""

from __future__ import annotations

import msgpack
import pytest
from hypothesis import given
from hypothesis import strategies as st

from vmcore.devices.plic import Plic

MEIP, SEIP = 1 << 11, 1 << 9
ENABLE0, ENABLE1 = 0x2000, 0x2080
THRESH0, CLAIM0 = 0x200000, 0x200004
THRESH1, CLAIM1 = 0x201000, 0x201004


class Lines:
    def __init__(self) -> None:
        self.mip = 0

    def set_pending(self, mask: int, level: bool) -> None:
        self.mip = (self.mip | mask) if level else (self.mip & ~mask)


def make() -> tuple[Plic, Lines]:
    lines = Lines()
    return Plic(lines.set_pending), lines


def test_source_needs_priority_and_enable_to_interrupt() -> None:
    plic, lines = make()
    plic.set_level(10, True)
    assert lines.mip == 0
    plic.write(10 * 4, 4, 1)
    assert lines.mip == 0
    plic.write(ENABLE1, 4, 1 << 10)
    assert lines.mip == SEIP
    assert plic.read(0x1000, 4) == 1 << 10


def test_claim_complete_gateway_for_a_level_source() -> None:
    plic, lines = make()
    plic.write(10 * 4, 4, 1)
    plic.write(ENABLE0, 4, 1 << 10)
    plic.set_level(10, True)
    assert lines.mip == MEIP
    assert plic.read(CLAIM0, 4) == 10
    assert lines.mip == 0, "a claimed source stays quiet until completed"
    assert plic.read(CLAIM0, 4) == 0
    plic.write(CLAIM0, 4, 10)
    assert lines.mip == MEIP, "still asserted after completion: pending again"
    plic.read(CLAIM0, 4)
    plic.set_level(10, False)
    plic.write(CLAIM0, 4, 10)
    assert lines.mip == 0


def test_threshold_masks_low_priorities() -> None:
    plic, lines = make()
    plic.write(5 * 4, 4, 2)
    plic.write(ENABLE0, 4, 1 << 5)
    plic.set_level(5, True)
    assert lines.mip == MEIP
    plic.write(THRESH0, 4, 2)
    assert lines.mip == 0
    plic.write(THRESH0, 4, 1)
    assert lines.mip == MEIP


def test_claim_returns_highest_priority_then_lowest_id() -> None:
    plic, _ = make()
    for src, prio in ((3, 1), (7, 5), (9, 5)):
        plic.write(src * 4, 4, prio)
        plic.set_level(src, True)
    plic.write(ENABLE0, 4, (1 << 3) | (1 << 7) | (1 << 9))
    assert [plic.read(CLAIM0, 4) for _ in range(4)] == [7, 9, 3, 0]


def test_contexts_are_independent() -> None:
    plic, lines = make()
    plic.write(10 * 4, 4, 1)
    plic.write(ENABLE1, 4, 1 << 10)
    plic.set_level(10, True)
    assert lines.mip == SEIP
    assert plic.read(CLAIM0, 4) == 0, "M context has the source disabled"
    assert plic.read(CLAIM1, 4) == 10


def test_save_restore_round_trip() -> None:
    plic, _ = make()
    plic.write(10 * 4, 4, 3)
    plic.write(ENABLE1, 4, 1 << 10)
    plic.write(THRESH1, 4, 1)
    plic.set_level(10, True)
    state = msgpack.unpackb(msgpack.packb(plic.save()))
    plic2, lines2 = make()
    plic2.restore(state)
    assert lines2.mip == SEIP
    assert plic2.read(10 * 4, 4) == 3
    assert plic2.read(THRESH1, 4) == 1
    assert plic2.read(CLAIM1, 4) == 10
    with pytest.raises(ValueError):
        plic2.restore({**state, "version": 0})


@given(
    st.dictionaries(
        st.integers(min_value=1, max_value=95),
        st.tuples(st.integers(min_value=0, max_value=7), st.booleans()),
        max_size=20,
    )
)
def test_claims_come_in_priority_order_for_any_configuration(
    sources: dict[int, tuple[int, bool]],
) -> None:
    plic, lines = make()
    enables = [0, 0, 0]
    for source, (prio, enabled) in sources.items():
        plic.write(source * 4, 4, prio)
        if enabled:
            enables[source // 32] |= 1 << (source % 32)
        plic.set_level(source, True)
    for word, bits in enumerate(enables):
        plic.write(ENABLE0 + 4 * word, 4, bits)
    expected = sorted(
        (s for s, (prio, enabled) in sources.items() if enabled and prio > 0),
        key=lambda s: (-sources[s][0], s),
    )
    assert bool(lines.mip & MEIP) == bool(expected)
    claimed = []
    while source := plic.read(CLAIM0, 4):
        claimed.append(source)
    assert claimed == expected
    assert not lines.mip & MEIP
