"""Page batches: every encoding round-trips, and decoding rejects every malformed batch."""

from __future__ import annotations

import lz4.block
import numpy as np
import pytest
import zstandard
from hypothesis import given, settings
from hypothesis import strategies as st

from node.migration import BatchError, CompressionPolicy, Encoding, Pages, decode_batch
from node.migration.encoding import MAX_DATA_PAGES, MAX_ZERO_PAGES, compress

PAGE = 4096
PAGE_COUNT = 1024


def compressible_pages(n: int, seed: int = 0) -> np.ndarray:
    """Pages that look like guest memory: runs of small structured values."""
    rng = np.random.default_rng(seed)
    words = rng.integers(0, 16, size=(n, PAGE // 8), dtype=np.uint64)
    return words.view(np.uint8).reshape(n, PAGE)


def random_pages(n: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, size=(n, PAGE), dtype=np.uint8)


def batch(
    numbers: list[int] | np.ndarray,
    payload: bytes | memoryview,
    encoding: str = "raw",
    zeros: list[int] | np.ndarray | None = None,
) -> Pages:
    return Pages(
        seq=1,
        round=0,
        encoding=encoding,
        page_numbers=np.asarray(numbers, dtype=np.uint32),
        zero_pages=np.asarray(zeros if zeros is not None else [], dtype=np.uint32),
        payload=payload,
    )


class StepTimer:
    """A compressor stopwatch that reports a fixed time per measurement."""

    def __init__(self, seconds_per_call: float) -> None:
        self.t = 0.0
        self.step = seconds_per_call

    def __call__(self) -> float:
        self.t += self.step
        return self.t


@pytest.mark.parametrize("mode", ["none", "zstd", "lz4"])
def test_every_encoding_round_trips(mode: str) -> None:
    data = compressible_pages(256)
    numbers = np.arange(0, 512, 2)
    encoding, payload = CompressionPolicy(mode).encode(data, link_bandwidth=1e6)
    assert encoding == ("raw" if mode == "none" else mode)
    if mode != "none":
        assert len(payload) < data.nbytes / 2
    decoded = decode_batch(batch(numbers, payload, encoding), PAGE_COUNT)
    assert np.array_equal(decoded.pages, numbers)
    assert np.array_equal(decoded.data, data)


def test_incompressible_batch_goes_raw_even_when_compression_is_forced() -> None:
    data = random_pages(16)
    encoding, payload = CompressionPolicy("zstd").encode(data, link_bandwidth=1e6)
    assert encoding == Encoding.RAW
    assert payload == data.tobytes()


def test_auto_compresses_for_a_slow_link_and_not_for_a_fast_one() -> None:
    data = compressible_pages(256)
    # 64 KiB sample compressed in 1 ms: ~65 MB/s per codec, far slower than 10 GB/s and
    # far faster than 1 MB/s.
    fast = CompressionPolicy("auto", timer=StepTimer(0.0005))
    assert fast.encode(data, link_bandwidth=10e9)[0] == Encoding.RAW
    slow = CompressionPolicy("auto", timer=StepTimer(0.0005))
    encoding, payload = slow.encode(data, link_bandwidth=1e6)
    assert encoding in (Encoding.ZSTD, Encoding.LZ4)
    assert np.array_equal(decode_batch(batch(np.arange(256), payload, encoding), 256).data, data)


def test_auto_samples_rarely_where_no_codec_could_win_and_again_once_the_link_slows() -> None:
    data = compressible_pages(32)
    # Codecs measured at ~65 MB/s cannot beat a 10 GB/s link, even compressing to nothing.
    policy = CompressionPolicy("auto", timer=StepTimer(0.0005))
    for _ in range(400):
        assert policy.encode(data, link_bandwidth=10e9)[0] == Encoding.RAW
    assert policy.samples <= 5  # every 16th batch would be 25
    sampled = policy.samples
    encoding, _ = policy.encode(data, link_bandwidth=1e6)
    assert policy.samples == sampled + 1
    assert encoding in (Encoding.ZSTD, Encoding.LZ4)
    for _ in range(3 * CompressionPolicy.SAMPLE_EVERY):
        policy.encode(data, link_bandwidth=1e6)
    assert policy.samples == sampled + 4


def test_auto_sends_raw_before_the_link_is_measured() -> None:
    assert CompressionPolicy("auto").encode(compressible_pages(4), 0.0)[0] == Encoding.RAW


def test_unknown_compression_mode_is_a_clear_error() -> None:
    with pytest.raises(ValueError, match="unknown compression 'gzip'"):
        CompressionPolicy("gzip")


def test_zero_markers_need_no_payload() -> None:
    decoded = decode_batch(batch([], b"", zeros=[3, 9]), PAGE_COUNT)
    assert list(decoded.zero_pages) == [3, 9]
    assert decoded.data.shape == (0, PAGE)


@pytest.mark.parametrize(
    ("numbers", "zeros", "match"),
    [
        ([PAGE_COUNT], [], "page 1024, RAM has 1024"),
        ([0], [PAGE_COUNT + 7], "page 1031"),
        ([5, 5], [], "more than once"),
        ([5], [5], "more than once"),
        # In order, as a sender emits them, and out of order: both are checked.
        ([2, 4, 6], [1, 6, 9], "more than once"),
        ([6, 2, 4], [9, 1, 6], "more than once"),
        ([2, 4, 6, 4], [], "more than once"),
        ([3, 1, 2], [PAGE_COUNT], "page 1024"),
    ],
)
def test_bad_page_numbers_are_rejected(numbers: list[int], zeros: list[int], match: str) -> None:
    with pytest.raises(BatchError, match=match):
        decode_batch(batch(numbers, bytes(PAGE * len(numbers)), zeros=zeros), PAGE_COUNT)


def test_negative_and_huge_page_numbers_are_rejected() -> None:
    for dtype, value in ((np.int64, -1), (np.uint64, 2**64 - 1), (np.int32, -5)):
        numbers = np.array([value], dtype=dtype)
        msg = Pages(1, 0, "raw", numbers, np.zeros(0, np.uint32), bytes(PAGE))
        with pytest.raises(BatchError, match="RAM has"):
            decode_batch(msg, PAGE_COUNT)


def test_non_integer_page_numbers_are_rejected() -> None:
    msg = Pages(1, 0, "raw", np.array([1.5]), np.zeros(0, np.uint32), bytes(PAGE))
    with pytest.raises(BatchError, match="not integers"):
        decode_batch(msg, PAGE_COUNT)
    msg = Pages(1, 0, "raw", 7, np.zeros(0, np.uint32), bytes(PAGE))  # type: ignore[arg-type]
    with pytest.raises(BatchError, match="not a list"):
        decode_batch(msg, PAGE_COUNT)


def test_giant_page_counts_are_rejected_before_any_work() -> None:
    huge = np.zeros(MAX_DATA_PAGES + 1, dtype=np.uint32)
    with pytest.raises(BatchError, match="at most 1024"):
        decode_batch(batch(huge, b""), PAGE_COUNT)
    with pytest.raises(BatchError, match=f"at most {MAX_ZERO_PAGES}"):
        decode_batch(batch([], b"", zeros=np.zeros(MAX_ZERO_PAGES + 1)), PAGE_COUNT)


@pytest.mark.parametrize("delta", [-1, 1, -PAGE])
def test_raw_payload_size_must_be_exact(delta: int) -> None:
    with pytest.raises(BatchError, match="raw payload"):
        decode_batch(batch([1, 2], bytes(2 * PAGE + delta)), PAGE_COUNT)


def test_unknown_encoding_is_rejected() -> None:
    with pytest.raises(BatchError, match="unknown page encoding 'brotli'"):
        decode_batch(batch([1], bytes(PAGE), encoding="brotli"), PAGE_COUNT)


def test_zstd_bomb_is_rejected_without_decompressing() -> None:
    bomb = zstandard.ZstdCompressor(level=1).compress(bytes(256 << 20))
    assert len(bomb) < 64 * 1024
    with pytest.raises(BatchError, match="declares 268435456 bytes"):
        decode_batch(batch([1], bomb, encoding="zstd"), PAGE_COUNT)


def test_zstd_without_declared_size_or_with_trailing_data_is_rejected() -> None:
    undeclared = zstandard.ZstdCompressor(write_content_size=False).compress(bytes(PAGE))
    with pytest.raises(BatchError, match="declares"):
        decode_batch(batch([1], undeclared, encoding="zstd"), PAGE_COUNT)
    good = compress(Encoding.ZSTD, bytes(PAGE))
    with pytest.raises(BatchError, match="corrupt zstd"):
        decode_batch(batch([1], good + b"tail", encoding="zstd"), PAGE_COUNT)
    with pytest.raises(BatchError, match="frame header"):
        decode_batch(batch([1], b"not zstd at all", encoding="zstd"), PAGE_COUNT)


def test_lz4_that_expands_beyond_the_batch_is_rejected() -> None:
    bomb = lz4.block.compress(bytes(64 * PAGE), store_size=False)
    with pytest.raises(BatchError, match="lz4"):
        decode_batch(batch([1], bomb, encoding="lz4"), PAGE_COUNT)
    short = lz4.block.compress(bytes(PAGE // 2), store_size=False)
    with pytest.raises(BatchError, match="expands to 2048 bytes"):
        decode_batch(batch([1], short, encoding="lz4"), PAGE_COUNT)


def test_compressed_batch_without_pages_must_be_empty() -> None:
    with pytest.raises(BatchError, match="without data pages"):
        decode_batch(batch([], b"x", encoding="lz4"), PAGE_COUNT)


@settings(max_examples=40, deadline=None)
@given(
    picks=st.sets(st.integers(0, PAGE_COUNT - 1), min_size=1, max_size=40),
    mode=st.sampled_from(["none", "zstd", "lz4"]),
    seed=st.integers(0, 2**16),
)
def test_any_batch_round_trips(picks: set[int], mode: str, seed: int) -> None:
    numbers = np.array(sorted(picks))
    rng = np.random.default_rng(seed)
    data = compressible_pages(len(numbers), seed)
    data[rng.random(len(numbers)) < 0.3] = 7  # some pages very compressible
    encoding, payload = CompressionPolicy(mode).encode(data, link_bandwidth=1e6)
    decoded = decode_batch(batch(numbers, payload, encoding), PAGE_COUNT)
    assert np.array_equal(decoded.data, data)


@settings(max_examples=200, deadline=None)
@given(
    numbers=st.lists(st.integers(0, 63), max_size=12),
    zeros=st.lists(st.integers(0, 63), max_size=12),
)
def test_a_batch_is_accepted_exactly_when_no_page_repeats(
    numbers: list[int], zeros: list[int]
) -> None:
    """Sorted or not, a page listed twice (in either list, or in both) is refused."""
    msg = batch(numbers, bytes(PAGE * len(numbers)), zeros=zeros)
    if len(set(numbers + zeros)) == len(numbers + zeros):
        decoded = decode_batch(msg, PAGE_COUNT)
        assert list(decoded.pages) == numbers and list(decoded.zero_pages) == zeros
    else:
        with pytest.raises(BatchError, match="more than once"):
            decode_batch(msg, PAGE_COUNT)


@pytest.mark.parametrize(
    ("numbers", "run_start"),
    [([7, 8, 9], 7), ([7], 7), ([7, 9], -1), ([9, 8, 7], -1), ([8, 7, 9], -1), ([], -1)],
)
def test_only_pages_in_order_and_consecutive_are_a_run(numbers: list[int], run_start: int) -> None:
    """A receiver writes a run as one slice: anything else must not look like one."""
    decoded = decode_batch(batch(numbers, bytes(PAGE * len(numbers))), PAGE_COUNT)
    assert decoded.run_start == run_start
