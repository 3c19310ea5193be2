"""The incremental memory digest agrees with a from-scratch digest iff RAM is the same."""

from __future__ import annotations

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

from node.migration import MemoryDigest, ram_digest
from node.migration.digest import page_hashes

PAGE = 4096
PAGES = 64


def test_zeroed_ram_digests_to_zero() -> None:
    assert ram_digest(memoryview(bytearray(PAGES * PAGE))) == 0
    assert MemoryDigest(PAGES).value == 0


def test_non_zero_page_never_contributes_zero() -> None:
    data = np.zeros((PAGES, PAGE), dtype=np.uint8)
    data[:, 0] = np.arange(1, PAGES + 1)
    assert (page_hashes(np.arange(PAGES), data) != 0).all()


def test_swapping_two_pages_changes_the_digest() -> None:
    ram = bytearray(PAGES * PAGE)
    ram[0:4] = b"aaaa"
    ram[PAGE : PAGE + 4] = b"bbbb"
    before = ram_digest(memoryview(ram))
    ram[0:4], ram[PAGE : PAGE + 4] = b"bbbb", b"aaaa"
    assert ram_digest(memoryview(ram)) != before


def test_a_resent_page_replaces_its_old_contribution() -> None:
    digest = MemoryDigest(PAGES)
    page = np.array([5])
    digest.update(page, np.full((1, PAGE), 1, np.uint8))
    digest.update(page, np.full((1, PAGE), 2, np.uint8))
    ram = bytearray(PAGES * PAGE)
    ram[5 * PAGE : 6 * PAGE] = bytes([2]) * PAGE
    assert digest.value == ram_digest(memoryview(ram))
    digest.update_zero(page)
    assert digest.value == 0


def test_one_flipped_bit_is_detected() -> None:
    ram = bytearray(np.random.default_rng(1).integers(0, 256, PAGES * PAGE, dtype=np.uint8))
    before = ram_digest(memoryview(ram))
    ram[12345] ^= 0x10
    assert ram_digest(memoryview(ram)) != before


@settings(max_examples=50, deadline=None)
@given(
    writes=st.lists(
        st.tuples(
            st.lists(st.integers(0, PAGES - 1), min_size=1, max_size=8, unique=True),
            st.integers(0, 3),
        ),
        max_size=12,
    )
)
def test_incremental_digest_equals_digest_of_the_final_ram(
    writes: list[tuple[list[int], int]],
) -> None:
    """Pages written, rewritten and zeroed in any order: the running sum tracks the RAM."""
    ram = bytearray(PAGES * PAGE)
    pages = np.frombuffer(ram, dtype=np.uint8).reshape(PAGES, PAGE)
    digest = MemoryDigest(PAGES)
    for numbers, fill in writes:
        idx = np.array(numbers)
        pages[idx] = 0
        if fill:
            pages[idx, : fill * 7] = fill + idx[:, None] % 5
        digest.update(idx, pages[idx])
    assert digest.value == ram_digest(memoryview(ram))
