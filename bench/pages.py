"""Page-batch throughput: what the migration sender and receiver cost per byte of RAM.

Prints MB/s (of guest RAM, 10^6 bytes/s) for each step a 256-page (1 MiB) batch goes
through, median of 5 runs, so the figures can be set against the gRPC stream ceiling in
MEASUREMENTS.md (~1.5 GB/s with protobuf on loopback):

* zero-page scan (contiguous, as round 0 does it; and on a gathered batch),
* gathering a batch out of RAM, hashing it for the digest,
* encoding raw / zstd-1 / lz4 (with the compression ratio), decoding and applying each,
* protobuf mapping and serialisation of a batch, both ways,
* the whole sender and receiver state machines back to back in memory (no I/O),
* with ``--grpc``: round 0 of an idle guest through a real gRPC stream to a receiver in
  another process, against the ceiling of the same stream carrying ready-made 1 MiB
  messages to a process that only counts them (the ratio the issue's aim is about).

The synthetic RAM is a quarter zero pages, a quarter random bytes (incompressible) and
half "structured" pages (small integers and repeated text), a rough stand-in for a guest's
heap and page cache; compression figures depend on it. Never pass/fail.
"""

from __future__ import annotations

import functools
import multiprocessing
import queue
import statistics
import sys
import threading
import time
from collections.abc import Callable, Iterator
from concurrent import futures
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

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
from node.migration.messages import Message
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

    print("protobuf mapping (raw batches)")
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

    print("state machines, in memory (round 0 of an idle guest)")
    report("sender alone, compression none", median_rate(nz_bytes, lambda: send_only(ram)))
    for mode in ("none", "lz4"):
        report(
            f"sender + receiver, compression {mode}",
            median_rate(nz_bytes, functools.partial(migrate, ram, mode)),
        )


class NoDirt:
    """An idle guest's dirty log: nothing is ever dirty."""

    def enable(self) -> None: ...

    def disable(self) -> None: ...

    def fetch_and_reset(self) -> np.ndarray:
        return np.zeros(0, dtype=np.int64)


def send_only(ram: bytearray) -> None:
    """Round 0 as the sender produces it, with the destination granting credit at once."""
    sender = MigrationSender(memoryview(ram), NoDirt(), dict, token=b"t", config_hash="c")
    sender.start()
    sender.receive(Ack(0, 1024))
    sent = 0
    while (actions := sender.poll()) and isinstance(actions[0], SendMessage):
        if not isinstance(actions[0].message, Pages):
            break
        sent += 1
        if sent % 1000 == 0:
            sender.receive(Ack(sent, 1000))


def gather_each(grid: np.ndarray, batches: list[np.ndarray]) -> None:
    # One batch alive at a time, as in the sender: allocator memory gets reused.
    for b in batches:
        grid[b]


def encode_each(grid: np.ndarray, batches: list[np.ndarray], policy: CompressionPolicy) -> None:
    for b in batches:
        policy.encode(grid[b], 1.0)


def migrate(ram: bytearray, compression: str) -> None:
    """One whole migration of an idle guest with no I/O: the protocol's own ceiling."""
    dest = bytearray(len(ram))
    sender = MigrationSender(
        memoryview(ram),
        NoDirt(),
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


# --------------------------------------------------------------------- over gRPC

_GRPC_OPTIONS = [
    ("grpc.max_receive_message_length", 64 << 20),
    ("grpc.max_send_message_length", 64 << 20),
]


def _destination_main(kind: str, ram_size: int, ports: Any) -> None:
    """A destination process: counts messages ("count") or runs a real receiver."""
    import grpc

    from protos.ferry.v1 import migration_pb2_grpc as pb_grpc

    class Destination(pb_grpc.MigrationServicer):
        def Migrate(
            self, requests: Iterator[pb.SourceMessage], context: object
        ) -> Iterator[pb.DestinationMessage]:
            if kind == "count":
                n = sum(1 for _ in requests)
                yield pb.DestinationMessage(ack=pb.Ack(acked_seq=n))
                return
            ram = bytearray(ram_size)
            receiver = MigrationReceiver(
                memoryview(ram), token=b"t", config_hash="c", restore=lambda s: None
            )
            for request in requests:
                for action in receiver.receive(wire.source_from_pb(request)):
                    if isinstance(action, SendMessage):
                        yield wire.destination_to_pb(action.message)  # type: ignore[arg-type]

    server = grpc.server(futures.ThreadPoolExecutor(max_workers=2), options=_GRPC_OPTIONS)
    pb_grpc.add_MigrationServicer_to_server(Destination(), server)
    ports.put(server.add_insecure_port("127.0.0.1:0"))
    server.start()
    server.wait_for_termination()


def _start_destination(kind: str, ram_size: int) -> tuple[Any, int]:
    ctx = multiprocessing.get_context("spawn")  # grpc does not survive fork
    ports = ctx.Queue()
    process = ctx.Process(target=_destination_main, args=(kind, ram_size, ports), daemon=True)
    process.start()
    return process, int(ports.get(timeout=60))


def grpc_ceiling(port: int, nbytes: int) -> float:
    """Seconds to stream ``nbytes`` of ready-made 1 MiB Pages messages."""
    import grpc

    from protos.ferry.v1 import migration_pb2_grpc as pb_grpc

    batch = pb.SourceMessage(
        pages=pb.Pages(
            seq=1,
            encoding=pb.ENCODING_RAW,
            page_numbers=list(range(BATCH)),
            payload=bytes(range(256)) * (BATCH * PAGE // 256),
        )
    )
    count = max(1, nbytes // (BATCH * PAGE))
    with grpc.insecure_channel(f"127.0.0.1:{port}", options=_GRPC_OPTIONS) as channel:
        stub = pb_grpc.MigrationStub(channel)
        t0 = time.perf_counter()
        for _ in stub.Migrate(iter([batch] * count)):
            pass
        return time.perf_counter() - t0


def grpc_migrate(port: int, ram: bytearray) -> float:
    """Seconds for a whole migration of an idle guest through gRPC (sender in one thread)."""
    import grpc

    from protos.ferry.v1 import migration_pb2_grpc as pb_grpc

    sender = MigrationSender(memoryview(ram), NoDirt(), dict, token=b"t", config_hash="c")
    replies: queue.Queue[Message | None] = queue.Queue()
    finished = threading.Event()

    def requests() -> Iterator[pb.SourceMessage]:
        # gRPC consumes this generator in its own thread; the sender lives only here.
        pending = sender.start()
        while True:
            for action in pending:
                if isinstance(action, SendMessage):
                    yield wire.source_to_pb(action.message)  # type: ignore[arg-type]
            if sender.finished:
                finished.set()
                return
            pending = sender.poll()
            if not pending:
                reply = replies.get()
                pending = sender.connection_lost() if reply is None else sender.receive(reply)

    with grpc.insecure_channel(f"127.0.0.1:{port}", options=_GRPC_OPTIONS) as channel:
        stub = pb_grpc.MigrationStub(channel)
        t0 = time.perf_counter()
        try:
            for response in stub.Migrate(requests()):
                replies.put(wire.destination_from_pb(response))
                if finished.is_set():
                    break
        finally:
            replies.put(None)
        elapsed = time.perf_counter() - t0
    assert sender.phase == "completed", sender.reason
    return elapsed


def grpc_section(ram: bytearray, nz_bytes: int) -> None:
    print("over a gRPC stream to another process (loopback), round 0 of an idle guest")
    counter, count_port = _start_destination("count", 0)
    receiver, recv_port = _start_destination("receive", len(ram))
    try:
        ceiling = []
        ferry = []
        for _ in range(RUNS):
            ceiling.append(nz_bytes / grpc_ceiling(count_port, nz_bytes) / 1e6)
            ferry.append(nz_bytes / grpc_migrate(recv_port, ram) / 1e6)
    finally:
        counter.terminate()
        receiver.terminate()
    c, f = statistics.median(ceiling), statistics.median(ferry)
    report("gRPC stream ceiling (ready-made messages)", c)
    report("Ferry sender -> gRPC -> receiver", f, f"{f / c:.0%} of the ceiling")


if __name__ == "__main__":
    main()
    if "--grpc" in sys.argv:
        ram = synthetic_ram(RAM_MIB)
        words = np.frombuffer(ram, dtype=np.uint64).reshape(-1, PAGE // 8)
        grpc_section(ram, int(words.any(axis=1).sum()) * PAGE)
