"""Guest RAM and the dirty log, driven both directly and through a running hart.

The property that live migration depends on: across any interleaving of guest stores and
fetches, every fetch returns exactly the pages written since the previous fetch - no
store is lost, and nothing is reported that was not written.
"""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from test_cpu_harness import ENGINE_IDS, ENGINES, HAVE_AS, Machine, assemble, use_engine

from vmcore.memory import PAGE_SIZE, GuestRAM


@pytest.fixture(autouse=True, params=ENGINES, ids=ENGINE_IDS)
def engine(request: pytest.FixtureRequest) -> int:
    """Every test here runs on the reference closures and on compiled blocks."""
    return use_engine(request.param)


def test_ram_geometry_and_zero_copy_pages() -> None:
    ram = GuestRAM(64 * PAGE_SIZE)
    assert (ram.base, ram.size, ram.page_count) == (0x8000_0000, 64 * PAGE_SIZE, 64)
    view = ram.pages(2, 3)
    assert len(view) == 3 * PAGE_SIZE
    ram.write(ram.base + 2 * PAGE_SIZE + 5, b"abc")
    assert bytes(view[5:8]) == b"abc"  # the view sees later writes: no copy
    assert ram.read(ram.base + 2 * PAGE_SIZE + 5, 3) == b"abc"


def test_ram_rejects_bad_sizes_and_ranges() -> None:
    with pytest.raises(ValueError, match="multiple of 4 KiB"):
        GuestRAM(1000)
    ram = GuestRAM(4 * PAGE_SIZE)
    with pytest.raises(ValueError, match="outside RAM"):
        ram.write(ram.base + 4 * PAGE_SIZE - 1, b"xy")
    with pytest.raises(ValueError, match="outside RAM"):
        ram.read(ram.base - 1, 1)
    with pytest.raises(ValueError):
        ram.pages(3, 2)


def test_zero_page_mask_and_clear() -> None:
    ram = GuestRAM(8 * PAGE_SIZE)
    ram.write(ram.base + 3 * PAGE_SIZE + 4095, b"\x01")
    ram.write(ram.base + 6 * PAGE_SIZE, b"\x80")
    mask = ram.zero_page_mask(0, 8)
    assert mask.tolist() == [True, True, True, False, True, True, False, True]
    assert ram.zero_page_mask(3, 1).tolist() == [False]
    ram.clear()
    assert ram.zero_page_mask(0, 8).all()


def test_device_writes_are_logged_only_while_enabled() -> None:
    ram = GuestRAM(16 * PAGE_SIZE)
    log = ram.dirty_log
    ram.write(ram.base, b"x")
    log.enable()
    assert log.fetch_and_reset().tolist() == []
    ram.write(ram.base + PAGE_SIZE - 1, b"ab")  # straddles pages 0 and 1
    ram.write(ram.base + 9 * PAGE_SIZE, bytes(PAGE_SIZE + 1))
    pages = log.fetch_and_reset()
    assert pages.tolist() == [0, 1, 9, 10]
    assert np.all(np.diff(pages) > 0)
    assert log.fetch_and_reset().tolist() == []
    log.disable()
    ram.write(ram.base, b"y")
    assert log.fetch_and_reset().tolist() == []


def test_dirty_rate_counts_pages_per_second() -> None:
    ram = GuestRAM(16 * PAGE_SIZE)
    log = ram.dirty_log
    log.enable()
    ram.write(ram.base, bytes(4 * PAGE_SIZE))
    ram.write(ram.base, bytes(4 * PAGE_SIZE))  # same pages again: counted once
    assert log.marks == 4
    assert log.dirty_rate(60.0) > 0


# A guest that performs the stores listed in a table: (offset, width, kind) per entry,
# kind 0 = plain store, 1 = amoadd, 2 = lr/sc pair. s1 counts completed entries so the
# test knows exactly which stores happened before each fetch.
STORE_LOOP = """
    li s2, 0x80010000         # table
    li s3, 0x80020000         # area
    li s1, 0
    ld s4, 0(s2)              # entry count
    addi s2, s2, 8
loop:
    beq s1, s4, done
    ld t0, 0(s2)              # offset
    ld t1, 8(s2)              # width
    ld t2, 16(s2)             # kind
    add t0, t0, s3
    bnez t2, atomic
    li t3, 1
    beq t1, t3, w1
    li t3, 4
    beq t1, t3, w4
    sd s1, 0(t0)
    j next
w1: sb s1, 0(t0)
    j next
w4: sw s1, 0(t0)
    j next
atomic:
    li t3, 1
    bne t2, t3, lrsc
    amoadd.d t4, s1, (t0)
    j next
lrsc:
    lr.d t4, (t0)
    sc.d t4, s1, (t0)
next:
    addi s2, s2, 24
    addi s1, s1, 1
    j loop
done:
    EXIT s1
"""
TABLE = 0x8001_0000
AREA = 0x8002_0000

entries = st.lists(
    st.tuples(st.integers(0, 16 * PAGE_SIZE - 8), st.sampled_from([1, 4, 8]),
              st.sampled_from([0, 0, 0, 1, 2])),
    min_size=1, max_size=64)


@pytest.mark.skipif(not HAVE_AS, reason="riscv64-unknown-elf-as not installed")
# The autouse `engine` fixture only selects the hart's engine; it holds no per-example state.
@settings(max_examples=25, deadline=None,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
@given(entries, st.lists(st.integers(1, 60), min_size=1, max_size=30), st.booleans())
def test_fetches_return_exactly_the_pages_written_in_between(
    table: list[tuple[int, int, int]], budgets: list[int], early_enable: bool
) -> None:
    m = Machine(assemble(STORE_LOOP), ram_size=1 << 20)
    table_addr, area = TABLE, AREA
    # Atomics are 8 bytes wide and must be aligned; plain stores may be misaligned.
    fixed = [(off & ~7, 8, kind) if kind else (off, w, kind) for off, w, kind in table]
    words = [len(fixed)] + [v for e in fixed for v in e]
    m.ram.write(table_addr, b"".join(v.to_bytes(8, "little") for v in words))
    log = m.ram.dirty_log
    if early_enable:
        log.enable()
        m.hart.run(budgets[0])  # some stores may happen before the first fetch
        log.fetch_and_reset()
        done = m.reg("s1")
    else:
        m.hart.run(budgets[0])
        done = m.reg("s1")
        log.enable()
    area_page0 = (area - m.ram.base) // PAGE_SIZE

    def pages(es: list[tuple[int, int, int]]) -> set[int]:
        return {area_page0 + (off + k) // PAGE_SIZE for off, w, _ in es for k in (0, w - 1)}

    # s1 counts completed entries: entry s1's store may or may not have happened when a
    # slice ends, so it may show up in either neighbouring fetch; every entry strictly
    # inside a window must show up in that window's fetch.
    first = done
    union: set[int] = set()
    for budget in [*budgets[1:], 10**6]:
        m.hart.run(budget)
        now = m.reg("s1")
        got = set(log.fetch_and_reset().tolist())
        assert pages(fixed[done + 1 : now]) <= got <= pages(fixed[done : now + 1])
        union |= got
        if m.exit.value is not None:
            break
        done = now
    assert pages(fixed[first + 1 :]) <= union <= pages(fixed[first:])
    assert m.exit.value == len(fixed)
