"""An incremental digest of guest RAM that costs no downtime.

Hashing all of RAM at switchover would add ~130 ms per GiB to the downtime even with xxh3,
so both ends keep a running digest instead: each page contributes a hash keyed by its page
number, and the digest is the sum of the contributions modulo 2^64. A sum is commutative, so
pages may arrive in any order; and because the per-page hashes are kept in an array, a page
sent again simply replaces its old contribution. At switchover only the final round's pages
are hashed.

A page's contribution is ``mix(xxh3_64(contents) ^ key(page number))``, where ``mix`` is a
bijective 64-bit finaliser. Why this is enough: the digest's job is to catch pages corrupted,
lost or misplaced between the two ends (the stream is already authenticated by the one-time
token, so the peer is not an adversary). A changed page changes its xxh3 except with
probability ~2^-64, and ``mix`` is a bijection for a given page number, so its contribution
changes too; a lost page or a lost zero marker leaves a contribution that differs from the
other end's; two pages that swapped places are caught because the page number enters
*before* the non-linear ``mix`` (a plain sum of per-content hashes would not see a swap).

Why this shape rather than xxh3 seeded with the page number: every page must be hashed
anyway, and with one unseeded xxh3 the hash also says whether the page is all zero (it is
then exactly the hash of a zero page), so neither end reads a page a second time just to
look for zeros. A page whose hash matches the zero page's is confirmed by reading it, so a
guest that crafted an xxh3 collision with the zero page still cannot make its page skipped.

An all-zero page contributes 0 by definition, so zeroed RAM digests to 0 and both ends can
start from an empty state. A non-zero page whose mixed hash happens to be 0 is mapped to 1,
which makes "contribution is 0" mean exactly "the page is zero"; the sender uses that to know
which pages the destination holds as non-zero, and which pages of a batch became zero.
"""

from __future__ import annotations

import numpy as np
import xxhash

_MASK = (1 << 64) - 1
# Odd 64-bit constants: the page-number key multiplier and the finaliser's multipliers (the
# widely used MurmurHash3 fmix64 ones, chosen for avalanche; any odd constants are bijective).
_PAGE_KEY = np.uint64(0x9E3779B97F4A7C15)
_MIX_1 = np.uint64(0xFF51AFD7ED558CCD)
_MIX_2 = np.uint64(0xC4CEB9FE1A85EC53)
_SHIFT = np.uint64(33)
_zero_page_hash: dict[int, int] = {}


def _zero_hash(page_size: int) -> int:
    if page_size not in _zero_page_hash:
        _zero_page_hash[page_size] = xxhash.xxh3_64_intdigest(bytes(page_size))
    return _zero_page_hash[page_size]


def page_hashes(page_numbers: np.ndarray, data: np.ndarray) -> np.ndarray:
    """The contribution of each page: ``data[i]`` holds the contents of ``page_numbers[i]``.

    ``data`` is a 2-D uint8 array, one row per page. A contribution is 0 exactly where the
    row is all zero, so callers learn which pages are zero without scanning them again.
    """
    count = len(page_numbers)
    if count == 0:
        return np.zeros(0, dtype=np.uint64)
    if data.strides[1] != 1:
        data = np.ascontiguousarray(data)
    # xxhash has no vectorised form; mapping it over the rows (each a contiguous buffer)
    # keeps the per-page cost to the C call, with no Python bytecode per page.
    content = np.fromiter(map(xxhash.xxh3_64_intdigest, data), dtype=np.uint64, count=count)
    x = content ^ (np.asarray(page_numbers).astype(np.uint64) * _PAGE_KEY)
    x ^= x >> _SHIFT
    x *= _MIX_1
    x ^= x >> _SHIFT
    x *= _MIX_2
    x ^= x >> _SHIFT
    np.maximum(x, 1, out=x)
    maybe_zero = np.flatnonzero(content == np.uint64(_zero_hash(data.shape[1])))
    if len(maybe_zero):
        x[maybe_zero[~data[maybe_zero].any(axis=1)]] = 0
    return x


class MemoryDigest:
    """The running digest of one RAM image, updated as pages are sent or received."""

    def __init__(self, page_count: int) -> None:
        self.page_count = page_count
        self.hashes = np.zeros(page_count, dtype=np.uint64)
        self._total = 0

    @property
    def value(self) -> int:
        """The digest of RAM as of the last update, an integer in [0, 2^64)."""
        return self._total

    def update(self, page_numbers: np.ndarray, data: np.ndarray) -> None:
        """Record that the pages ``page_numbers`` now hold ``data`` (one row per page).

        Page numbers must be in range and distinct; callers validate wire input first.
        """
        self.set_hashes(page_numbers, page_hashes(page_numbers, data))

    def update_zero(self, page_numbers: np.ndarray) -> None:
        """Record that the pages ``page_numbers`` are now all zero."""
        if len(page_numbers):
            self.set_hashes(page_numbers, np.zeros(len(page_numbers), dtype=np.uint64))

    def set_hashes(self, page_numbers: np.ndarray, hashes: np.ndarray) -> None:
        """Replace the contributions of ``page_numbers`` by ``hashes`` (already computed)."""
        if len(page_numbers) == 0:
            return
        old = int(self.hashes[page_numbers].sum(dtype=np.uint64))
        new = int(hashes.sum(dtype=np.uint64))
        self.hashes[page_numbers] = hashes
        self._total = (self._total - old + new) & _MASK

    def is_zero(self, page_numbers: np.ndarray) -> np.ndarray:
        """Boolean array: True where the page's last recorded contents were all zero."""
        return self.hashes[page_numbers] == 0


def ram_digest(ram: memoryview, page_size: int = 4096) -> int:
    """The digest of a whole RAM image from scratch (tests, and checking the incremental one)."""
    data = np.frombuffer(ram, dtype=np.uint8).reshape(-1, page_size)
    hashes = page_hashes(np.arange(len(data), dtype=np.int64), data)
    return int(hashes.sum(dtype=np.uint64))
