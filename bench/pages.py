"""Page-batch throughput: what the migration sender and receiver cost per byte of RAM.

Prints MB/s (of guest RAM, 10^6 bytes/s) for each step a 256-page (1 MiB) batch goes
through, median of 5 runs, so the figures can be set against the gRPC stream ceiling in
MEASUREMENTS.md (~1.5 GB/s with protobuf on loopback):

* zero-page scan (contiguous, as round 0 does it; and on a gathered batch),
* gathering a batch out of RAM, hashing it for the digest,
* encoding raw / zstd-1 / lz4 (with the compression ratio), decoding and applying each,
* a batch to bytes and back: through protobuf objects, and through the serialised form
  the migration stream uses (one payload copy out, none in); and a batch of scattered
  pages gathered then serialised (two copies) against one built straight from RAM
  (``wire.build_pages``, one copy),
* the whole sender and receiver state machines back to back in memory (no I/O); the
  sender alone also as the migration process runs it (batches built serialised).

Round 0 through a real gRPC stream between two processes, against the stream's own
ceiling measured in the same run, is in ``bench/migration.py``.

The synthetic RAM is a quarter zero pages, a quarter random bytes (incompressible) and
half "structured" pages (small integers and repeated text), a rough stand-in for a guest's
heap and page cache; compression figures depend on it. Never pass/fail.
"""

from __future__ import annotations

import functools
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))

from inmemory import IdleDirtyLog

from node.migration import (
    Ack,
    CompressionPolicy,
    MigrationOptions,
    MigrationReceiver,
    MigrationSender,
    Pages,
    SendMessage,
    decode_batch,
    wire,
)
from node.migration.digest import page_hashes
from node.migration.messages import BuildBatch
from protos.ferry.v1 import migration_pb2 as pb

PAGE = 4096
BATCH = 256
RAM_MIB = 64
RUNS = 5


def synthetic_ram(mib: int, seed: int = 1) -> bytearray:
    pages = mib * 256
    rng = np.random.default_rng(seed)
    ram = bytearray(pages * PAGE)
    grid = np.frombuffer(ram, dtype=np.uint8).reshape(pages, PAGE)
    kind = rng.integers(0, 4, size=pages)  # 0 zero, 1 random, 2-3 structured
    rand = kind == 1
    grid[rand] = rng.integers(0, 256, size=(int(rand.sum()), PAGE), dtype=np.uint8)
    structured = np.flatnonzero(kind >= 2)
    words = grid.view(np.uint64)
    words[structured] = rng.integers(0, 1 << 12, size=(len(structured), PAGE // 8), dtype=np.uint64)
    text = np.frombuffer(b"the quick brown fox jumps over the lazy dog; " * 92, np.uint8)[:2048]
    grid[structured[::2], :2048] = text
    return ram


def median_rate(nbytes: int, fn: Callable[[], object]) -> float:
    """Median MB/s of ``fn`` processing ``nbytes`` over RUNS runs (after one warm-up)."""
    fn()
    times = []
    for _ in range(RUNS):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return nbytes / statistics.median(times) / 1e6


def report(name: str, rate: float, extra: str = "") -> None:
    print(f"  {name:<44} {rate:9.0f} MB/s  {extra}")


def main() -> None:
    ram = synthetic_ram(RAM_MIB)
    total = len(ram)
    grid = np.frombuffer(ram, dtype=np.uint8).reshape(-1, PAGE)
    words = grid.view(np.uint64)
    page_count = len(grid)
    batches = [np.arange(i, min(i + BATCH, page_count)) for i in range(0, page_count, BATCH)]
    nonzero = np.flatnonzero(words.any(axis=1))
    nz_batches = [nonzero[i : i + BATCH] for i in range(0, len(nonzero), BATCH)]
    nz_bytes = len(nonzero) * PAGE
    print(
        f"page batches of {BATCH} pages, {RAM_MIB} MiB synthetic RAM "
        f"({len(nonzero) / page_count:.0%} non-zero), median of {RUNS}, MB/s of RAM"
    )

    print("scan and gather")
    report("zero scan, contiguous (round 0)", median_rate(total, lambda: words.any(axis=1)))
    report(
        "zero scan, gathered batches (later rounds)",
        median_rate(total, lambda: [words[b].any(axis=1) for b in batches]),
    )
    report("gather batch out of RAM", median_rate(nz_bytes, lambda: gather_each(grid, nz_batches)))
    gathered = [grid[b] for b in nz_batches]
    report(
        "digest (xxh3 per page, keyed)",
        median_rate(
            nz_bytes, lambda: [page_hashes(b, d) for b, d in zip(nz_batches, gathered, strict=True)]
        ),
    )

    print("encode / decode + apply (non-zero pages)")
    target = bytearray(total)
    for mode in ("none", "zstd", "lz4"):
        policy = CompressionPolicy(mode)
        encoded = [policy.encode(d, link_bandwidth=1.0) for d in gathered]
        size = sum(len(p) for _, p in encoded)
        report(
            f"gather + encode {mode if mode != 'none' else 'raw'}",
            median_rate(nz_bytes, functools.partial(encode_each, grid, nz_batches, policy)),
            f"ratio {size / nz_bytes:.2f}",
        )
        msgs = [
            Pages(seq=1, round=0, encoding=enc, page_numbers=b.astype(np.uint32), payload=pl)
            for b, (enc, pl) in zip(nz_batches, encoded, strict=True)
        ]
        dst = np.frombuffer(target, dtype=np.uint8).reshape(-1, PAGE)

        def decode_apply(msgs: list[Pages] = msgs, dst: np.ndarray = dst) -> None:
            for m in msgs:
                d = decode_batch(m, page_count)
                dst[d.pages] = d.data

        report(
            f"decode + apply {mode if mode != 'none' else 'raw'}",
            median_rate(nz_bytes, decode_apply),
        )

    print("batch to bytes and back (raw batches)")
    raw_policy = CompressionPolicy("none")
    raw_msgs = [
        Pages(1, 0, enc, b.astype(np.uint32), payload=pl)
        for b, (enc, pl) in zip(
            nz_batches, [raw_policy.encode(d, 1.0) for d in gathered], strict=True
        )
    ]
    report(
        "to protobuf + serialise",
        median_rate(nz_bytes, lambda: [wire.source_to_pb(m).SerializeToString() for m in raw_msgs]),
    )
    blobs = [wire.source_to_pb(m).SerializeToString() for m in raw_msgs]
    report(
        "parse + from protobuf",
        median_rate(
            nz_bytes, lambda: [wire.source_from_pb(pb.SourceMessage.FromString(b)) for b in blobs]
        ),
    )
    report(
        "encode_source (serialised form)",
        median_rate(nz_bytes, lambda: [wire.encode_source(m) for m in raw_msgs]),
    )
    report(
        "decode_source (serialised form)",
        median_rate(nz_bytes, lambda: [wire.decode_source(b) for b in blobs]),
    )
    report(
        "gather + encode_source (two copies)",
        median_rate(nz_bytes, functools.partial(gather_and_encode, grid, nz_batches)),
    )
    runs = [ram_runs(memoryview(ram), b) for b in nz_batches]
    report(
        "build_pages from RAM (one copy)",
        median_rate(nz_bytes, functools.partial(build_each, nz_batches, runs)),
    )

    print("state machines, in memory (round 0 of an idle guest)")
    report("sender alone, compression none", median_rate(nz_bytes, lambda: send_only(ram)))
    report(
        "sender alone, batches built serialised",
        median_rate(nz_bytes, lambda: send_only(ram, wire.build_pages)),
    )
    for mode in ("none", "lz4"):
        report(
            f"sender + receiver, compression {mode}",
            median_rate(nz_bytes, functools.partial(migrate, ram, mode)),
        )


def send_only(ram: bytearray, build_batch: BuildBatch | None = None) -> None:
    """Round 0 as the sender produces it, with the destination granting credit at once
    (and serialised as the stream would carry it)."""
    sender = MigrationSender(
        memoryview(ram),
        IdleDirtyLog(),
        dict,
        token=b"t",
        config_hash="c",
        options=MigrationOptions(compression="none"),
        build_batch=build_batch,
    )
    sender.start()
    sender.receive(Ack(0, 1024))
    sent = 0
    while (actions := sender.poll()) and isinstance(actions[0], SendMessage):
        if not isinstance(actions[0].message, Pages):
            break
        wire.encode_source(actions[0].message)
        sent += 1
        if sent % 1000 == 0:
            sender.receive(Ack(sent, 1000))


def gather_each(grid: np.ndarray, batches: list[np.ndarray]) -> None:
    # One batch alive at a time, as in the sender: allocator memory gets reused.
    for b in batches:
        grid[b]


def ram_runs(ram: memoryview, pages: np.ndarray) -> list[memoryview]:
    """The pages as views of RAM, one per run of consecutive pages."""
    breaks = np.flatnonzero(np.diff(pages) != 1) + 1
    starts = pages[np.concatenate(([0], breaks))] * PAGE
    ends = (pages[np.concatenate((breaks - 1, [len(pages) - 1]))] + 1) * PAGE
    return [ram[a:b] for a, b in zip(starts.tolist(), ends.tolist(), strict=True)]


def gather_and_encode(grid: np.ndarray, batches: list[np.ndarray]) -> None:
    for b in batches:
        wire.encode_source(Pages(1, 0, "raw", b.astype(np.uint32), payload=grid[b].data))


def build_each(batches: list[np.ndarray], runs: list[list[memoryview]]) -> None:
    no_zeros = np.zeros(0, dtype=np.uint32)
    for b, parts in zip(batches, runs, strict=True):
        wire.build_pages(1, 0, b.astype(np.uint32), no_zeros, parts)


def encode_each(grid: np.ndarray, batches: list[np.ndarray], policy: CompressionPolicy) -> None:
    for b in batches:
        policy.encode(grid[b], 1.0)


def migrate(ram: bytearray, compression: str) -> None:
    """One whole migration of an idle guest with no I/O: the protocol's own ceiling."""
    dest = bytearray(len(ram))
    sender = MigrationSender(
        memoryview(ram),
        IdleDirtyLog(),
        dict,
        token=b"t",
        config_hash="c",
        options=MigrationOptions(compression=compression),
    )
    receiver = MigrationReceiver(
        memoryview(dest), token=b"t", config_hash="c", restore=lambda s: None
    )
    inbox = [a.message for a in sender.start() if isinstance(a, SendMessage)]
    while not sender.finished:
        replies = []
        for msg in inbox:
            replies += [a.message for a in receiver.receive(msg) if isinstance(a, SendMessage)]
        inbox = []
        for reply in replies:
            inbox += [a.message for a in sender.receive(reply) if isinstance(a, SendMessage)]
        while actions := sender.poll():
            inbox += [a.message for a in actions if isinstance(a, SendMessage)]
    assert sender.phase == "completed", sender.reason


if __name__ == "__main__":
    main()
