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


def _random_ram(seed: int = 2) -> bytearray:
    return bytearray(np.random.default_rng(seed).integers(0, 256, PAGES * PAGE, dtype=np.uint8))


def test_a_flipped_bit_in_any_word_of_a_page_is_detected() -> None:
    ram = _random_ram()
    before = ram_digest(memoryview(ram))
    for offset in range(7, PAGE, 509):
        ram[3 * PAGE + offset] ^= 0x80
        assert ram_digest(memoryview(ram)) != before, offset
        ram[3 * PAGE + offset] ^= 0x80


def test_pages_that_swapped_places_are_detected() -> None:
    ram = _random_ram()
    before = ram_digest(memoryview(ram))
    first, second = ram[2 * PAGE : 3 * PAGE], ram[9 * PAGE : 10 * PAGE]
    ram[2 * PAGE : 3 * PAGE], ram[9 * PAGE : 10 * PAGE] = second, first
    assert ram_digest(memoryview(ram)) != before


def test_a_lost_page_or_a_lost_zero_marker_is_detected() -> None:
    ram = _random_ram()
    pages = np.frombuffer(ram, dtype=np.uint8).reshape(PAGES, PAGE)
    sent = MemoryDigest(PAGES)
    sent.update(np.arange(PAGES), pages)
    lost = MemoryDigest(PAGES)
    lost.update(np.arange(1, PAGES), pages[1:])
    assert lost.value != sent.value
    # The source zeroes page 4 and says so; the destination never hears of it.
    sent.update_zero(np.array([4]))
    lost.update(np.array([0]), pages[:1])
    assert lost.value != sent.value


def test_a_contribution_is_zero_exactly_for_zero_pages() -> None:
    """The sender learns which pages of a batch are zero from their contributions."""
    data = np.frombuffer(_random_ram(), dtype=np.uint8).reshape(PAGES, PAGE).copy()
    data[::3] = 0
    data[1, PAGE - 1] = 0
    data[2, :] = 0
    data[2, PAGE - 1] = 1
    hashes = page_hashes(np.arange(PAGES), data)
    assert ((hashes == 0) == ~data.any(axis=1)).all()
