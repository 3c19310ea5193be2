"""Page batches on the wire: packing with optional compression, and strict unpacking.

A batch is up to :data:`BATCH_PAGES` pages (1 MiB, the measured sweet spot for Python gRPC).
Its payload is the data pages concatenated (``raw``), or that compressed as a whole with
zstd level 1 or an lz4 block. Pages that became all-zero travel as bare page numbers.

Compression is chosen per batch and only when it wins. On loopback the link (~1.5 GB/s) is
faster than either compressor (zstd-1 ~0.3 GB/s, lz4 ~0.5 GB/s), so compressing would slow
the migration down; on a slow link it saves time. :class:`CompressionPolicy` therefore
compares, per batch, the time to send raw bytes against the time to compress, send fewer and
decompress them, from the measured link bandwidth and the codecs' measured speeds and ratio
on this guest's pages (refreshed by compressing a small sample now and then). Compression
must win by a clear margin, because on one host both ends share the CPUs that compressing
and decompressing would take from the stream itself.

Unpacking (:func:`decode_batch`) trusts nothing: encoding known, page counts bounded, page
numbers in range and distinct, raw payload exactly the right size, and compressed payloads
decompressed into at most the size the page count implies (a declared size is checked
before any buffer is allocated, so a decompression bomb costs nothing).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass

import lz4.block
import numpy as np
import zstandard

from node.migration.messages import Encoding, Pages

PAGE_SIZE = 4096
BATCH_PAGES = 256
# Bounds a receiver enforces; generous next to what a sender emits, small enough that a
# hostile batch can neither allocate much nor make validation slow.
MAX_DATA_PAGES = 1024
MAX_ZERO_PAGES = 16384
# Bytes per page number on the wire, and a rough per-message framing overhead.
_NUMBER_BYTES = 4
_FRAME_BYTES = 32

_ZSTD_LEVEL = 1
_zstd_compressor = zstandard.ZstdCompressor(level=_ZSTD_LEVEL, write_content_size=True)
_zstd_decompressor = zstandard.ZstdDecompressor()


class BatchError(ValueError):
    """A page batch from the wire that must not be applied; the message says why."""


def compress(encoding: Encoding, raw: bytes | memoryview) -> bytes:
    """Compress ``raw`` with ``encoding`` (which must not be RAW)."""
    if encoding is Encoding.ZSTD:
        return _zstd_compressor.compress(raw)
    if encoding is Encoding.LZ4:
        return lz4.block.compress(raw, store_size=False)
    raise ValueError(f"{encoding} is not a compression")


def decompress(encoding: str, payload: bytes | memoryview, expected_size: int) -> bytes:
    """Decompress ``payload`` that must expand to exactly ``expected_size`` bytes.

    Never allocates more than ``expected_size`` (plus codec overhead) whatever the input says.
    """
    if encoding == Encoding.ZSTD:
        try:
            declared = zstandard.frame_content_size(payload)
        except zstandard.ZstdError as exc:
            raise BatchError(f"zstd payload has no valid frame header: {exc}") from None
        if declared != expected_size:
            raise BatchError(
                f"zstd payload declares {declared} bytes, the batch needs {expected_size}"
            )
        try:
            out = _zstd_decompressor.decompress(
                payload, max_output_size=expected_size, allow_extra_data=False
            )
        except zstandard.ZstdError as exc:
            raise BatchError(f"corrupt zstd payload: {exc}") from None
    elif encoding == Encoding.LZ4:
        try:
            out = lz4.block.decompress(payload, uncompressed_size=expected_size)
        except lz4.block.LZ4BlockError:
            raise BatchError("corrupt lz4 payload, or it expands beyond the batch") from None
    else:
        raise BatchError(f"unknown page encoding {encoding!r}")
    if len(out) != expected_size:
        raise BatchError(f"payload expands to {len(out)} bytes, the batch needs {expected_size}")
    return out


def wire_size(batch: Pages) -> int:
    """Approximate bytes a batch occupies on the wire (for bandwidth and pacing)."""
    numbers = len(batch.page_numbers) + len(batch.zero_pages)
    return len(batch.payload) + numbers * _NUMBER_BYTES + _FRAME_BYTES


@dataclass(frozen=True)
class DecodedBatch:
    """A validated batch: ``data[i]`` (a row of uint8) is the new content of ``pages[i]``.

    ``run_start`` is the first page when ``pages`` is one run of consecutive pages in order
    (the common case), so a receiver can write the batch as one slice; otherwise -1.
    """

    pages: np.ndarray
    data: np.ndarray
    zero_pages: np.ndarray
    run_start: int = -1


def _page_array(values: object, what: str, limit: int, page_count: int) -> tuple[np.ndarray, bool]:
    """The page numbers as int64, checked to be in range; and whether they are strictly
    increasing (then distinct, and bounded by their ends)."""
    # Check the length before converting, so a giant list costs nothing.
    try:
        count = len(values)  # type: ignore[arg-type]
    except TypeError:
        raise BatchError(f"{what} is not a list of page numbers") from None
    if count > limit:
        raise BatchError(f"batch lists {count} {what}, at most {limit} allowed")
    if count == 0:
        return np.zeros(0, dtype=np.int64), True
    arr = np.asarray(values)
    if arr.ndim != 1 or arr.dtype.kind not in "iu":
        raise BatchError(f"{what} are not integers")
    # uint64 beyond int64's range would wrap; anything that large is out of range anyway.
    if arr.dtype.kind == "u" and arr.dtype.itemsize == 8 and int(arr.max()) >= page_count:
        raise BatchError(f"{what} include page {int(arr.max())}, RAM has {page_count} pages")
    arr = arr.astype(np.int64)
    increasing = count < 2 or bool((arr[1:] > arr[:-1]).all())
    if increasing:
        lo, hi = int(arr[0]), int(arr[-1])
    else:
        lo, hi = int(arr.min()), int(arr.max())
    if lo < 0 or hi >= page_count:
        bad = lo if lo < 0 else hi
        raise BatchError(f"{what} include page {bad}, RAM has {page_count} pages")
    return arr, increasing


def _check_distinct(
    pages: np.ndarray, sorted_pages: bool, zeros: np.ndarray, sorted_zeros: bool
) -> None:
    if sorted_pages and sorted_zeros:
        # What our sender emits: two increasing lists, distinct unless they share a page.
        if not len(pages) or not len(zeros):
            return
        slot = np.minimum(np.searchsorted(pages, zeros), len(pages) - 1)
        if not (pages[slot] == zeros).any():
            return
    else:
        every = np.concatenate((pages, zeros))
        if len(np.unique(every)) == len(every):
            return
    raise BatchError("batch lists a page more than once")


def decode_batch(batch: Pages, page_count: int, page_size: int = PAGE_SIZE) -> DecodedBatch:
    """Validate a batch from the wire and unpack its payload; raises :class:`BatchError`."""
    pages, sorted_pages = _page_array(batch.page_numbers, "data pages", MAX_DATA_PAGES, page_count)
    zeros, sorted_zeros = _page_array(batch.zero_pages, "zero pages", MAX_ZERO_PAGES, page_count)
    _check_distinct(pages, sorted_pages, zeros, sorted_zeros)
    expected = len(pages) * page_size
    payload = batch.payload
    if batch.encoding == Encoding.RAW:
        if len(payload) != expected:
            raise BatchError(
                f"raw payload is {len(payload)} bytes, {len(pages)} pages need {expected}"
            )
        raw: bytes | memoryview = payload
    elif batch.encoding in (Encoding.ZSTD, Encoding.LZ4):
        if not pages.size:
            if payload:
                raise BatchError("batch without data pages carries a payload")
            raw = b""
        else:
            raw = decompress(batch.encoding, payload, expected)
    else:
        raise BatchError(f"unknown page encoding {batch.encoding!r}")
    data = np.frombuffer(raw, dtype=np.uint8).reshape(len(pages), page_size)
    run_start = -1
    if len(pages) and sorted_pages and int(pages[-1]) - int(pages[0]) == len(pages) - 1:
        run_start = int(pages[0])
    return DecodedBatch(pages=pages, data=data, zero_pages=zeros, run_start=run_start)


@dataclass
class _CodecEstimate:
    """What compressing this guest's pages with one codec costs and saves."""

    seconds_per_byte: float = 0.0
    ratio: float = 1.0
    # The destination's cost to decompress, estimated by decompressing samples here.
    decode_seconds_per_byte: float = 0.0
    measured: bool = False

    def record(
        self, raw_bytes: int, out_bytes: int, seconds: float, decode_seconds: float | None = None
    ) -> None:
        spb = max(seconds, 1e-9) / raw_bytes
        ratio = out_bytes / raw_bytes
        dspb = None if decode_seconds is None else max(decode_seconds, 1e-9) / raw_bytes
        if not self.measured:
            self.seconds_per_byte, self.ratio, self.measured = spb, ratio, True
            if dspb is not None:
                self.decode_seconds_per_byte = dspb
        else:
            # Exponential average: page contents drift during a migration, slowly.
            self.seconds_per_byte += 0.3 * (spb - self.seconds_per_byte)
            self.ratio += 0.3 * (ratio - self.ratio)
            if dspb is not None:
                self.decode_seconds_per_byte += 0.3 * (dspb - self.decode_seconds_per_byte)

    def cost_per_byte(self, link_bandwidth: float) -> float:
        """Seconds per byte of RAM to compress, send and decompress with this codec."""
        return self.seconds_per_byte + self.decode_seconds_per_byte + self.ratio / link_bandwidth


COMPRESSION_MODES = ("auto", "none", "zstd", "lz4")


class CompressionPolicy:
    """Chooses raw, zstd or lz4 for each batch, and compresses it.

    ``mode`` is ``"none"`` (always raw), ``"zstd"`` or ``"lz4"`` (that codec whenever its
    output is smaller) or ``"auto"``: the codec whose predicted send time beats raw's, given
    the link bandwidth, else raw. ``timer`` measures compressor speed; it is real CPU time,
    not the migration's (possibly simulated) clock.

    "auto" learns the codecs' speed and ratio by compressing a sample of a batch now and
    then. On a link that even a codec twice as fast as measured, compressing to nothing,
    could not beat (loopback, where the link outruns both), samples only refresh figures
    that cannot change the choice, so their interval grows (up to :attr:`SAMPLE_MAX`
    batches); once the link looks slow enough for a codec to have a chance, the next batch
    is sampled and sampling returns to every :attr:`SAMPLE_EVERY` batches.
    """

    SAMPLE_EVERY = 16
    SAMPLE_MAX = 1024
    SAMPLE_PAGES = 16
    # A codec is used only when its predicted cost is below this fraction of raw's.
    MARGIN = 0.8
    # How much faster than measured a codec might turn out on other pages (more repetitive
    # ones compress faster) before the link is beyond its reach.
    HEADROOM = 2.0

    def __init__(self, mode: str = "auto", timer: Callable[[], float] = time.perf_counter):
        if mode not in COMPRESSION_MODES:
            raise ValueError(
                f"unknown compression {mode!r}; choose one of {', '.join(COMPRESSION_MODES)}"
            )
        self.mode = mode
        self._timer = timer
        self._estimates = {Encoding.ZSTD: _CodecEstimate(), Encoding.LZ4: _CodecEstimate()}
        self._batches = 0
        self._next_sample = 1
        self._sample_interval = self.SAMPLE_EVERY
        self.samples = 0
        # Seconds spent compressing, so bandwidth measurement can leave it out.
        self.busy_seconds = 0.0

    def encode(
        self, data: np.ndarray, link_bandwidth: float
    ) -> tuple[Encoding, bytes | memoryview]:
        """Pack the rows of ``data`` (pages) for a link of ``link_bandwidth`` bytes/s.

        ``link_bandwidth`` 0 means not measured yet, ``math.inf`` asks for raw. A raw
        payload is a view of ``data`` when ``data`` is contiguous (no copy).
        """
        raw = np.ascontiguousarray(data).reshape(-1).data
        if not len(raw):
            return Encoding.RAW, raw
        codec = self.choose(link_bandwidth, lambda: data[: self.SAMPLE_PAGES])
        if codec is None:
            return Encoding.RAW, raw
        return self.pack(codec, raw)

    def choose(self, link_bandwidth: float, sample: Callable[[], np.ndarray]) -> Encoding | None:
        """The codec for the next (non-empty) batch, or None to send it raw.

        ``sample`` returns a few of the batch's pages (rows); it is called only when "auto"
        measures the codecs, so a caller that would have to gather them pays only then.
        """
        if self.mode == "none":
            return None
        if self.mode != "auto":
            return Encoding(self.mode)
        self._batches += 1
        reachable = not self._out_of_reach(link_bandwidth)
        if reachable and self._sample_interval > self.SAMPLE_EVERY:
            # The link slowed down to where compressing might pay: measure now.
            self._sample_interval = self.SAMPLE_EVERY
            self._next_sample = self._batches
        if self._batches >= self._next_sample:
            self._sample(np.ascontiguousarray(sample()[: self.SAMPLE_PAGES]))
            if self._out_of_reach(link_bandwidth):
                self._sample_interval = min(2 * self._sample_interval, self.SAMPLE_MAX)
            else:
                self._sample_interval = self.SAMPLE_EVERY
            self._next_sample = self._batches + self._sample_interval
        return self._best_codec(link_bandwidth)

    def pack(self, codec: Encoding, raw: bytes | memoryview) -> tuple[Encoding, bytes | memoryview]:
        """Compress ``raw`` (whole pages) with ``codec``; raw itself if that is no smaller."""
        t0 = self._timer()
        packed = compress(codec, raw)
        spent = self._timer() - t0
        self.busy_seconds += spent
        self._estimates[codec].record(len(raw), len(packed), spent)
        if len(packed) >= len(raw):
            return Encoding.RAW, raw
        return codec, packed

    def _sample(self, data: np.ndarray) -> None:
        self.samples += 1
        sample = data.reshape(-1).data
        for codec, estimate in self._estimates.items():
            t0 = self._timer()
            packed = compress(codec, sample)
            t1 = self._timer()
            decompress(codec, packed, len(sample))
            t2 = self._timer()
            self.busy_seconds += t2 - t0
            estimate.record(len(sample), len(packed), t1 - t0, t2 - t1)

    def _out_of_reach(self, link_bandwidth: float) -> bool:
        """Whether no codec could beat raw on this link, whatever the pages: even one
        :attr:`HEADROOM` times faster than measured, with output of no size at all."""
        if link_bandwidth <= 0:
            return False  # not measured yet: keep learning
        for est in self._estimates.values():
            if not est.measured:
                return False
            coding = (est.seconds_per_byte + est.decode_seconds_per_byte) / self.HEADROOM
            if coding < self.MARGIN / link_bandwidth:
                return False
        return True

    def _best_codec(self, link_bandwidth: float) -> Encoding | None:
        if link_bandwidth <= 0:
            return None
        best: Encoding | None = None
        best_cost = self.MARGIN / link_bandwidth
        for codec, est in self._estimates.items():
            if not est.measured:
                continue
            cost = est.cost_per_byte(link_bandwidth)
            if cost < best_cost:
                best, best_cost = codec, cost
        return best
