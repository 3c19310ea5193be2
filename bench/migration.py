"""Live migration of the `dirtier` guest, Ferry beside QEMU, with the gRPC stream's ceiling.

Prints, in one run on this machine:

1. The gRPC stream's ceiling between two processes on loopback: 1 MiB messages carried as
   ready-made bytes (the stream alone), and as protobuf messages serialised and parsed on
   each side; and Ferry's sender → stream → receiver pipeline moving 64 MiB of synthetic
   RAM (round 0 of a guest whose vCPU does not compete for the interpreter), as a fraction
   of both. Median of several runs.
2. For each case (RAM, working set, dirty rate): `dirtier` migrated on this machine three
   ways, with total time, downtime, bytes transferred, dirty-bitmap syncs (rounds), round-0
   throughput, and the ratios to QEMU:

   * ``node``: Ferry as users run it. Two real ``ferry-node`` agents and their VMM workers,
     driven as the coordinator drives them (PrepareIncoming, StartMigration,
     WatchMigration); the source worker's migration runs in its helper process
     (node.migration_process) beside the vCPU. Its throughput column is the bandwidth the
     sender last measured (QEMU's ``mbps``), which after a small final round is round 0's.
   * ``inproc``: the same migration core (node.migration) driven inside the vCPU's own
     process and thread, as Ferry's workers did before the helper process: two VM
     processes, a real gRPC ``Migrate`` stream carrying node.migration.wire's serialised
     form, residency hints on both ends, guest slices between the sender's steps. It shows
     what sharing one interpreter with the vCPU costs.
   * ``QEMU``: the same image on QEMU 7.2 (TCG), migrated through QMP.

Both Ferry ends share the host, so their monotonic clocks compare and downtime is measured
from the source's pause to the moment the destination's VM resumed. Repetitions ping-pong
the same running guest between the two processes (its own checks keep verifying its memory
all along), so the slow fill of a big working set on Ferry's interpreted vCPU is paid once
per case and way.

Both sides use a 300 ms downtime limit and unlimited bandwidth (QEMU's default cap of
128 MiB/s is raised, as libvirt does). Every case has a timeout; a migration that does not
converge ends by Ferry's policy (throttle, raise the downtime budget, cancel), and a QEMU
migration still running at the timeout is cancelled. Never pass/fail: exits 0.

The last two cases cannot converge on their own (a working set rewritten faster than the
capped link carries it); they show how each VMM ends such a migration, with auto-converge
(vCPU throttling) on and off.

At 0 MB/s the dirtier is an idle guest: between its 100 ms checks it waits for the timer
in ``wfi``, on both VMMs, and leaves the host's cores to the migration. At 4 and 64 MB/s it
runs flat out, and its vCPU competes with the migration for the two cores.

``--quick`` runs two small cases once (a smoke run); ``--policy`` runs only the two cases
that cannot converge on their own; ``--case RAM,WSS,RATE`` runs the cases named instead;
``--no-nodes`` leaves out ferry-node.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import multiprocessing
import os
import queue
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from concurrent import futures
from dataclasses import dataclass, field
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any, TypeVar

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))  # the cluster harness and in-memory helpers

import grpc  # noqa: E402
from inmemory import IdleDirtyLog  # noqa: E402

from node.allocator import hold_freed_buffers  # noqa: E402
from node.migration import (  # noqa: E402
    Action,
    Cancelled,
    Completed,
    DiscardVM,
    Failed,
    MigrationOptions,
    MigrationReceiver,
    MigrationSender,
    OutcomeUnknown,
    PauseVM,
    ResumeVM,
    SendMessage,
    SetThrottle,
    wire,
)
from node.migration.messages import DestinationMessage, Message, SourceMessage  # noqa: E402
from node.migration.residency import MemfdRAM  # noqa: E402
from vmcore.memory import GuestRAM  # noqa: E402
from vmcore.ramfile import ENVIRONMENT, open_ram_file  # noqa: E402

DIRTIER = ROOT / "guests" / "build" / "dirtier.elf"
QEMU = "qemu-system-riscv64"
MiB = 1 << 20
PAGE = 4096
BATCH_BYTES = 256 * PAGE
DOWNTIME_MS = 300.0
# Guest instructions per slice between the sender's steps, as the worker runs them.
SLICE = 20_000
CASE_TIMEOUT_S = 60.0
QEMU_TIMEOUT_S = 30.0
TOKEN = b"bench-migration-token"
GRPC_OPTIONS = [
    ("grpc.max_receive_message_length", 80 << 20),
    ("grpc.max_send_message_length", 80 << 20),
]
CEILING_RUNS = 5
# How often the VM processes hand the interpreter between the vCPU and gRPC's threads.
# Python's default, 5 ms, leaves gRPC's threads waiting behind the vCPU: measured here,
# 1 ms more than doubles round 0's throughput while the dirtier runs.
SWITCH_INTERVAL = 0.001
# Batches the destination lets the source have in flight (MigrationReceiver's default is 4):
# enough that gRPC's threads still have batches to write while the vCPU runs a slice.
WINDOW = 16
SYNTHETIC_MIB = 64
# Room the "lands in fresh memory" ceiling writes into: the synthetic RAM's size, so it
# covers every message of a run.
LAND_BYTES = SYNTHETIC_MIB * MiB


# =========================================================== the gRPC stream's ceiling


def _identity(data: bytes) -> bytes:
    return data


def _count_server_main(ports: Any) -> None:
    """A destination that only counts: raw bytes on one method, protobuf on another; and
    one that lands each raw message in fresh shared memory, as any destination of a
    migration must (allocating memory never written before is part of the cost)."""
    hold_freed_buffers()  # as Ferry's processes do: see node/allocator.py
    from protos.ferry.v1 import migration_pb2 as pb

    def count(requests: Iterator[Any], context: grpc.ServicerContext) -> Iterator[bytes]:
        n = sum(1 for _ in requests)
        yield pb.DestinationMessage(ack=pb.Ack(acked_seq=n)).SerializeToString()

    def land(requests: Iterator[bytes], context: grpc.ServicerContext) -> Iterator[bytes]:
        # A fresh file of the kind GuestRAM's is (vmcore.ramfile: huge pages where the host
        # allows), written the cheapest way there is (pwrite: no page fault per page, no
        # copy beside the one into the file).
        fd, _ = open_ram_file(LAND_BYTES)
        offset = n = 0
        for request in requests:
            size = min(len(request), LAND_BYTES - offset)
            os.pwrite(fd, memoryview(request)[:size], offset)
            offset, n = offset + size, n + 1
        os.close(fd)
        yield pb.DestinationMessage(ack=pb.Ack(acked_seq=n)).SerializeToString()

    handlers = {
        "Raw": grpc.stream_stream_rpc_method_handler(
            count, request_deserializer=_identity, response_serializer=_identity
        ),
        "Land": grpc.stream_stream_rpc_method_handler(
            land, request_deserializer=_identity, response_serializer=_identity
        ),
        "Proto": grpc.stream_stream_rpc_method_handler(
            count, request_deserializer=pb.SourceMessage.FromString, response_serializer=_identity
        ),
    }
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=2), options=GRPC_OPTIONS)
    service = grpc.method_handlers_generic_handler("bench.Count", handlers)
    server.add_generic_rpc_handlers((service,))
    ports.put(server.add_insecure_port("127.0.0.1:0"))
    server.start()
    server.wait_for_termination()


def _stream_seconds(port: int, method: str, message: Any, count: int) -> float:
    from protos.ferry.v1 import migration_pb2 as pb

    serialise = _identity if method in ("Raw", "Land") else pb.SourceMessage.SerializeToString
    with grpc.insecure_channel(f"127.0.0.1:{port}", options=GRPC_OPTIONS) as channel:
        call = channel.stream_stream(
            f"/bench.Count/{method}", request_serializer=serialise, response_deserializer=_identity
        )
        t0 = time.perf_counter()
        for _ in call(iter([message] * count)):
            pass
        return time.perf_counter() - t0


def synthetic_ram(mib: int, seed: int = 1) -> bytearray:
    """Guest-like RAM: a quarter zero pages, a quarter random, half small structured values."""
    pages = mib * MiB // PAGE
    rng = np.random.default_rng(seed)
    ram = bytearray(pages * PAGE)
    grid = np.frombuffer(ram, dtype=np.uint8).reshape(pages, PAGE)
    kind = rng.integers(0, 4, size=pages)
    rand = kind == 1
    grid[rand] = rng.integers(0, 256, size=(int(rand.sum()), PAGE), dtype=np.uint8)
    structured = np.flatnonzero(kind >= 2)
    words = grid.view(np.uint64)
    words[structured] = rng.integers(0, 1 << 12, size=(len(structured), PAGE // 8), dtype=np.uint64)
    return ram


def answer_in_parallel(
    requests: Iterator[SourceMessage],
    handle: Callable[[SourceMessage], list[DestinationMessage]],
    finished: Callable[[], bool],
) -> Iterator[DestinationMessage]:
    """The destination's stream loop, with reading and answering in two threads.

    grpcio's synchronous server waits for each yielded answer to be written before the
    handler runs again; answering every batch in the reading loop would add that wait to
    every batch. Here a thread reads and applies batches while the handler's own thread
    writes the acknowledgements.
    """
    answers: queue.SimpleQueue[DestinationMessage | None] = queue.SimpleQueue()

    def read() -> None:
        try:
            for request in requests:
                for answer in handle(request):
                    answers.put(answer)
                if finished():
                    break
        except grpc.RpcError:
            pass
        finally:
            answers.put(None)

    threading.Thread(target=read, name="migration-reader", daemon=True).start()
    while (answer := answers.get()) is not None:
        yield answer


def synthetic_sender(ram: bytearray) -> MigrationSender:
    """A sender of an idle synthetic guest, building batches as the migration process does."""
    return MigrationSender(
        memoryview(ram),
        IdleDirtyLog(),
        dict,
        token=TOKEN,
        config_hash="synthetic",
        build_batch=wire.build_pages,
    )


def synthetic_receiver(ram: GuestRAM, window: int) -> MigrationReceiver:
    """The receiver into ``ram`` (fresh, a memfd as an incoming worker has it), landing
    pages as the worker does."""
    return MigrationReceiver(
        ram.view,
        token=TOKEN,
        config_hash="synthetic",
        restore=lambda s: None,
        window=window,
        write_run=MemfdRAM(ram.fd, ram.view).write_run,
    )


def _synthetic_receiver_main(ram_size: int, window: int, ports: Any) -> None:
    """A destination process running the real receiver into a fresh RAM buffer per stream."""
    hold_freed_buffers()  # as Ferry's processes do: see node/allocator.py
    sys.setswitchinterval(SWITCH_INTERVAL)

    def migrate(
        requests: Iterator[SourceMessage], context: grpc.ServicerContext
    ) -> Iterator[DestinationMessage]:
        ram = GuestRAM(ram_size)  # held here: the receiver writes through its descriptor
        receiver = synthetic_receiver(ram, window)

        def handle(message: SourceMessage) -> list[DestinationMessage]:
            actions = receiver.receive(message)
            return [a.message for a in actions if isinstance(a, SendMessage)]  # type: ignore[misc]

        yield from answer_in_parallel(requests, handle, lambda: receiver.finished)

    server = grpc.server(futures.ThreadPoolExecutor(max_workers=2), options=GRPC_OPTIONS)
    server.add_generic_rpc_handlers((wire.migration_handler(migrate),))
    ports.put(server.add_insecure_port("127.0.0.1:0"))
    server.start()
    server.wait_for_termination()


def _spawn(target: Callable[..., None], *args: Any) -> tuple[Any, int]:
    ctx = multiprocessing.get_context("spawn")  # grpc does not survive fork
    ports = ctx.Queue()
    process = ctx.Process(target=target, args=(*args, ports), daemon=True)
    process.start()
    return process, int(ports.get(timeout=120))


def synthetic_round0_seconds(port: int, ram: bytearray) -> tuple[float, float, int]:
    """(seconds for the whole migration, seconds of round 0, compressed bytes sent) of an
    idle synthetic guest, compression "auto" as by default."""
    sender = synthetic_sender(ram)
    outbox: queue.SimpleQueue[Message | None] = queue.SimpleQueue()
    replies: queue.SimpleQueue[Message | None] = queue.SimpleQueue()
    with grpc.insecure_channel(f"127.0.0.1:{port}", options=GRPC_OPTIONS) as channel:
        call = wire.migrate_call(channel)(iter(outbox.get, None))
        reader = threading.Thread(target=_read_replies, args=(call, replies), daemon=True)
        t0 = time.perf_counter()
        reader.start()
        for action in sender.start():
            outbox.put(action.message)  # type: ignore[union-attr]
        while not sender.finished:
            while actions := sender.poll():
                for action in actions:
                    if isinstance(action, SendMessage):
                        outbox.put(action.message)
            reply = replies.get()
            actions = sender.connection_lost() if reply is None else sender.receive(reply)
            for action in actions:
                if isinstance(action, SendMessage):
                    outbox.put(action.message)
        elapsed = time.perf_counter() - t0
        outbox.put(None)
        call.cancel()
    assert sender.phase == "completed", sender.reason
    return elapsed, sender.rounds[0].duration_s, int(sender.stats()["compressed-bytes"])


def ends_cpu_without_grpc(ram: bytearray) -> tuple[float, float]:
    """(sender, receiver) CPU seconds per MiB of non-zero RAM that Ferry's two ends spend on
    their own work migrating an idle guest: the sender scanning, hashing and building
    batches, the receiver checking, hashing and landing them in fresh memory. Messages are
    serialised and parsed as on the wire but handed over in memory, not through gRPC, so
    the bare stream's cost added to these predicts the pipeline's."""
    sender = synthetic_sender(ram)
    dest = GuestRAM(len(ram))
    receiver = synthetic_receiver(dest, WINDOW)
    spent = [0.0, 0.0]
    clock = time.process_time
    replies: list[Message] = []

    def deliver(actions: list[Action]) -> None:
        for action in actions:
            if isinstance(action, SendMessage):
                t0 = clock()
                data = wire.encode_source(action.message)  # type: ignore[arg-type]
                t1 = clock()
                answers = receiver.receive(wire.decode_source(data))
                spent[0] += t1 - t0
                spent[1] += clock() - t1
                replies.extend(a.message for a in answers if isinstance(a, SendMessage))

    deliver(sender.start())
    while not sender.finished:
        t0 = clock()
        actions = sender.poll()
        if not actions and replies:
            actions = sender.receive(replies.pop(0))
        spent[0] += clock() - t0
        deliver(actions)
    assert sender.phase == "completed", sender.reason
    dest.close()
    mib = sender.stats()["normal"] * PAGE / MiB
    return spent[0] / mib, spent[1] / mib


def _read_replies(call: Any, replies: queue.SimpleQueue[Message | None]) -> None:
    try:
        for reply in call:
            replies.put(reply)
    except grpc.RpcError:
        pass
    replies.put(None)


@dataclass
class Ceiling:
    raw: float
    proto: float
    land: float
    ferry: float
    compressed: int = 0
    # CPU seconds per MiB moved (mean over the runs), each side: {"raw": (sender,
    # receiver), ...}, and "ends": Ferry's two ends with no gRPC between them.
    cpu: dict[str, tuple[float, float]] = field(default_factory=dict)


def _process_cpu(pid: int) -> float:
    """CPU seconds (user + system) a process has used, from /proc."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _own_cpu() -> float:
    return time.process_time()


_T = TypeVar("_T")


def _cpu_per_mib(
    run: Callable[[], _T], peer: int, nbytes: int
) -> tuple[_T, tuple[float, float]]:
    """(what ``run`` returns, (this process's, ``peer``'s) CPU seconds per MiB over it)."""
    own, other = _own_cpu(), _process_cpu(peer)
    result = run()
    mib = nbytes / MiB
    return result, ((_own_cpu() - own) / mib, (_process_cpu(peer) - other) / mib)


def measure_ceiling(runs: int = CEILING_RUNS) -> Ceiling:
    from protos.ferry.v1 import migration_pb2 as pb

    ram = synthetic_ram(SYNTHETIC_MIB)
    words = np.frombuffer(ram, dtype=np.uint64).reshape(-1, PAGE // 8)
    nonzero_bytes = int(words.any(axis=1).sum()) * PAGE
    count = nonzero_bytes // BATCH_BYTES
    payload = bytes(range(256)) * (BATCH_BYTES // 256)
    proto = pb.SourceMessage(
        pages=pb.Pages(seq=1, encoding=pb.ENCODING_RAW, page_numbers=range(256), payload=payload)
    )
    raw = proto.SerializeToString()
    counter, count_port = _spawn(_count_server_main)
    receiver, receive_port = _spawn(_synthetic_receiver_main, len(ram), WINDOW)
    rates: dict[str, list[float]] = {"raw": [], "proto": [], "land": [], "ferry": []}
    cpu: dict[str, list[tuple[float, float]]] = {"raw": [], "land": [], "ferry": [], "ends": []}
    compressed_bytes = 0
    streamed = count * BATCH_BYTES
    try:
        for _ in range(runs):
            seconds, used = _cpu_per_mib(
                lambda: _stream_seconds(count_port, "Raw", raw, count), counter.pid, streamed
            )
            rates["raw"].append(streamed / seconds)
            cpu["raw"].append(used)
            rates["proto"].append(streamed / _stream_seconds(count_port, "Proto", proto, count))
            seconds, used = _cpu_per_mib(
                lambda: _stream_seconds(count_port, "Land", raw, count), counter.pid, streamed
            )
            rates["land"].append(streamed / seconds)
            cpu["land"].append(used)
            (_, round0, compressed), used = _cpu_per_mib(
                lambda: synthetic_round0_seconds(receive_port, ram), receiver.pid, nonzero_bytes
            )
            rates["ferry"].append(nonzero_bytes / round0)
            cpu["ferry"].append(used)
            cpu["ends"].append(ends_cpu_without_grpc(ram))
            compressed_bytes = max(compressed_bytes, compressed)
    finally:
        counter.terminate()
        receiver.terminate()
    raw_rate, proto_rate, land_rate, ferry_rate = (statistics.median(rates[k]) for k in rates)
    # Means, not medians: /proc counts the peer's CPU in 10 ms ticks, ~0.2 ms per MiB of
    # one run's stream, and a median of runs would keep those steps.
    means = {
        k: (statistics.fmean(s for s, _ in v), statistics.fmean(r for _, r in v))
        for k, v in cpu.items()
    }
    return Ceiling(raw_rate, proto_rate, land_rate, ferry_rate, compressed_bytes, means)


# ======================================================== Ferry: two VM host processes


def _config(ram_mib: int, wss: int, rate: int) -> Any:
    from vmcore.vm import VMConfig

    return VMConfig(kernel=str(DIRTIER), memory=ram_mib * MiB, append=f"wss={wss} rate={rate}")


class VMHost:
    """One process's side of the bench: holds at most one VM, boots, sends or receives it.

    Runs in a spawned process; commands arrive on a pipe. While it holds a running VM and
    has no command to serve, it runs the guest, so the dirtier keeps dirtying.
    """

    def __init__(self, conn: Connection) -> None:
        from vmcore.vm import VM

        self.conn = conn
        self.vm: VM | None = None
        self.console = bytearray()

    def serve(self) -> None:
        while True:
            if self.vm is not None and self.vm.state == "running":
                if not self.conn.poll(0):
                    self._slice()
                    continue
            elif not self.conn.poll(0.05):
                continue
            command, args = self.conn.recv()
            if command == "quit":
                return
            try:
                result = getattr(self, command)(*args)
            except Exception as exc:  # reported to the bench, which prints it
                result = {"error": f"{type(exc).__name__}: {exc}"}
            self.conn.send(result)

    def _slice(self) -> None:
        assert self.vm is not None
        result = self.vm.run_slice(SLICE)
        if result.reason == "idle" and result.idle_seconds:
            # The guest waits for its timer: sleep, but stay responsive to commands.
            self.conn.poll(min(result.idle_seconds, 0.005))

    def boot(self, ram_mib: int, wss: int, rate: int) -> dict[str, Any]:
        from vmcore.vm import VM

        self.console = bytearray()
        self.vm = VM(_config(ram_mib, wss, rate), self.console.extend)
        self.vm.start()
        t0 = time.perf_counter()
        # Round 0 should find the working set filled: wait for the first tick.
        while b"tick 0" not in self.console and self.vm.state == "running":
            self._slice()
        console = self.console.decode(errors="replace")
        return {"fill_s": time.perf_counter() - t0, "console": console}

    def observe(self, seconds: float) -> dict[str, Any]:
        """Run the guest a while; return its console and whether it still runs."""
        assert self.vm is not None
        start = len(self.console)
        end = time.monotonic() + seconds
        while time.monotonic() < end and self.vm.state == "running":
            self._slice()
        return {
            "state": str(self.vm.state),
            "console": self.console[start:].decode(errors="replace"),
        }

    def receive(self, ram_mib: int, wss: int, rate: int, window: int = 0) -> dict[str, Any]:
        """Prepare an incoming VM, serve one Migrate stream, resume the guest."""
        from vmcore.vm import VM, config_hash

        self.console = bytearray()
        config = _config(ram_mib, wss, rate)
        vm = VM(config, self.console.extend, incoming=True)
        done = threading.Event()
        outcome: dict[str, Any] = {}

        def restore(state: dict[str, Any]) -> None:
            vm.load_state(state)
            vm.resume()
            outcome["resumed_at"] = time.monotonic()

        receiver = MigrationReceiver(
            vm.ram.view,
            token=TOKEN,
            config_hash=config_hash(config),
            restore=restore,
            window=window or WINDOW,
            write_run=MemfdRAM(vm.ram.fd, vm.ram.view).write_run,
        )

        def migrate(
            requests: Iterator[SourceMessage], context: grpc.ServicerContext
        ) -> Iterator[DestinationMessage]:
            def handle(message: SourceMessage) -> list[DestinationMessage]:
                answers: list[DestinationMessage] = []
                for action in receiver.receive(message):
                    if isinstance(action, SendMessage):
                        answers.append(action.message)  # type: ignore[arg-type]
                    elif isinstance(action, DiscardVM):
                        outcome["discarded"] = action.reason
                return answers

            try:
                yield from answer_in_parallel(requests, handle, lambda: receiver.finished)
                receiver.connection_lost("the source closed the stream")
            finally:
                done.set()

        server = grpc.server(futures.ThreadPoolExecutor(max_workers=2), options=GRPC_OPTIONS)
        server.add_generic_rpc_handlers((wire.migration_handler(migrate),))
        port = server.add_insecure_port("127.0.0.1:0")
        server.start()
        self.conn.send({"port": port})
        done.wait()
        server.stop(grace=1.0)
        if isinstance(receiver.phase, str) and receiver.phase == "resumed":
            self.vm = vm
        return {"phase": str(receiver.phase), "reason": receiver.reason, **outcome}

    def send(
        self,
        port: int,
        timeout_s: float,
        slice_instructions: int = 0,
        encode_here: bool = True,
        max_bandwidth: float = 0.0,
        auto_converge: bool = True,
    ) -> dict[str, Any]:
        """Migrate the running VM to ``port``, running guest slices between the steps.

        With ``encode_here`` batches are serialised in this (the vCPU's) thread, and
        gRPC's request thread only writes bytes: it then needs the interpreter for much
        less time, and it gets it only when the vCPU lets go.
        """
        slice_instructions = slice_instructions or SLICE
        from vmcore.vm import config_hash

        vm = self.vm
        assert vm is not None
        throttle = [0]
        paused_at = [0.0]
        sender = MigrationSender(
            vm.ram.view,
            vm.dirty_log,
            vm.save_state,
            token=TOKEN,
            config_hash=config_hash(vm.config),
            options=MigrationOptions(
                max_downtime_ms=DOWNTIME_MS,
                timeout_s=timeout_s,
                max_bandwidth=max_bandwidth,
                auto_converge=auto_converge,
            ),
            # GuestRAM is a memfd: its holes are the pages the guest never wrote.
            never_backed=MemfdRAM(vm.ram.fd, vm.ram.view).never_backed,
            build_batch=wire.build_pages,
        )
        outbox: queue.SimpleQueue[Message | bytes | None] = queue.SimpleQueue()
        replies: queue.SimpleQueue[Message | None] = queue.SimpleQueue()
        ending: list[Action] = []
        guest_wall = [0.0]
        retired = [0]
        started = time.monotonic()

        def do(actions: list[Action]) -> None:
            for action in actions:
                if isinstance(action, SendMessage):
                    message = action.message
                    outbox.put(wire.encode_source(message) if encode_here else message)  # type: ignore[arg-type]
                elif isinstance(action, PauseVM):
                    vm.pause()
                    paused_at[0] = time.monotonic()
                elif isinstance(action, ResumeVM):
                    vm.resume()
                elif isinstance(action, SetThrottle):
                    throttle[0] = action.percent
                elif isinstance(action, Completed | Cancelled | Failed | OutcomeUnknown):
                    ending.append(action)

        channel = grpc.insecure_channel(f"127.0.0.1:{port}", options=GRPC_OPTIONS)
        if encode_here:
            stream = channel.stream_stream(
                wire.MIGRATE_METHOD,
                request_serializer=_identity,
                response_deserializer=wire.decode_destination,
            )
        else:
            stream = wire.migrate_call(channel)
        call = stream(iter(outbox.get, None))
        threading.Thread(target=_read_replies, args=(call, replies), daemon=True).start()
        do(sender.start())
        hold_until = 0.0
        while not sender.finished:
            while not sender.finished and (actions := sender.poll()):
                do(actions)
            now = time.monotonic()
            wait = 0.002
            if vm.state == "running" and now >= hold_until:
                t0 = time.perf_counter()
                sliced = vm.run_slice(slice_instructions)
                spent = time.perf_counter() - t0
                guest_wall[0] += spent
                retired[0] += sliced.retired
                if throttle[0]:
                    # Auto-converge: run (100 - throttle) % of the time.
                    hold_until = time.monotonic() + spent * throttle[0] / (100 - throttle[0])
                if sliced.reason != "idle":
                    wait = 0.0
            ready = sender.ready_at
            if ready is not None:
                wait = max(0.0, min(ready - now, wait))
            try:
                reply = replies.get(timeout=wait) if wait > 0 else replies.get_nowait()
            except queue.Empty:
                reply = False  # type: ignore[assignment]
            while reply is not False:
                do(sender.connection_lost() if reply is None else sender.receive(reply))
                if reply is None or sender.finished:
                    break
                try:
                    reply = replies.get_nowait()
                except queue.Empty:
                    reply = False  # type: ignore[assignment]
            do(sender.tick())
        outbox.put(None)
        time.sleep(0.05)
        call.cancel()
        channel.close()
        end = ending[0] if ending else None
        stats = sender.stats()
        # Guest speed while migrating, against the wall time the migration took.
        guest_mips = retired[0] / max(time.monotonic() - started, 1e-9) / 1e6
        result = {
            "outcome": type(end).__name__,
            "reason": getattr(end, "reason", ""),
            "stats": stats,
            "paused_at": paused_at[0],
            "guest_mips": guest_mips,
            "rounds": [
                {"number": r.number, "bytes": r.bytes, "pages": r.pages, "s": r.duration_s}
                for r in sender.rounds
            ],
        }
        if isinstance(end, Completed):
            self.vm = None  # the destination owns the guest now
        return result


def _host_main(conn: Connection) -> None:
    hold_freed_buffers()  # as Ferry's processes do: see node/allocator.py
    sys.setswitchinterval(SWITCH_INTERVAL)
    VMHost(conn).serve()


class HostProcess:
    """The bench's handle on one VMHost process."""

    def __init__(self) -> None:
        ctx = multiprocessing.get_context("spawn")
        self.conn, child = ctx.Pipe()
        self.process = ctx.Process(target=_host_main, args=(child,), daemon=True)
        self.process.start()

    def call(self, command: str, *args: Any, timeout: float = 600.0) -> dict[str, Any]:
        self.conn.send((command, args))
        return self.result(timeout)

    def result(self, timeout: float) -> dict[str, Any]:
        if not self.conn.poll(timeout):
            raise TimeoutError("the VM host process did not answer")
        answer: dict[str, Any] = self.conn.recv()
        return answer

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self.conn.send(("quit", ()))
        self.process.join(5)
        if self.process.is_alive():
            self.process.terminate()
            self.process.join(5)


@dataclass
class Result:
    """One migration, from either VMM, in query-migrate's terms."""

    status: str
    total_ms: float
    downtime_ms: float
    transferred: int
    syncs: int
    round0_mbs: float = 0.0
    guest_mips: float = 0.0
    note: str = ""
    guest_ok: bool = True
    # ferry-node only: where the downtime went (MigrationStatus.downtime_phases_ms), and
    # the CPU seconds each process used during the migration (see CPUWatch).
    phases: dict[str, float] = field(default_factory=dict)
    cpu: dict[str, float] = field(default_factory=dict)


def ferry_migrate(source: HostProcess, dest: HostProcess, case: Case) -> Result:
    dest.conn.send(("receive", (case.ram_mib, case.wss, case.rate)))
    port = dest.result(60)["port"]
    sent = source.call(
        "send",
        port,
        case.timeout_s,
        0,
        True,
        case.cap_mbs * 1e6,
        case.auto_converge,
        timeout=case.timeout_s + 60,
    )
    received = dest.result(case.timeout_s + 60)
    if "error" in sent:
        return Result("error", 0, 0, 0, 0, note=sent["error"])
    stats = sent["stats"]
    rounds = sent["rounds"]
    round0 = rounds[0]["bytes"] / rounds[0]["s"] / 1e6 if rounds and rounds[0]["s"] > 0 else 0.0
    if sent["outcome"] != "Completed":
        return Result(
            stats["status"],
            stats["total-time"],
            0,
            stats["transferred"],
            stats["dirty-sync-count"],
            round0,
            guest_mips=sent["guest_mips"],
            note=sent["reason"][:90],
        )
    # Source pause to the destination's resume: both clocks are this host's monotonic one.
    downtime = (received["resumed_at"] - sent["paused_at"]) * 1000
    seen = dest.call("observe", 0.5)
    # The dirtier checks its own memory every tick: it keeps ticking only if nothing was lost.
    ok = seen["state"] == "running" and "tick " in seen["console"]
    note = "" if ok else f"guest after migration: {seen['state']} {seen['console'][-80:]!r}"
    if stats["compressed-bytes"]:
        note += f" compressed {stats['compressed-bytes']} bytes"
    return Result(
        "completed",
        stats["total-time"],
        downtime,
        stats["transferred"],
        stats["dirty-sync-count"],
        round0,
        guest_mips=sent["guest_mips"],
        guest_ok=ok,
        note=note.strip(),
    )


# ==================================================== Ferry: real ferry-node processes


def _children(pid: int) -> list[int]:
    found: list[int] = []
    with contextlib.suppress(OSError):
        for task in os.listdir(f"/proc/{pid}/task"):
            with contextlib.suppress(OSError), open(f"/proc/{pid}/task/{task}/children") as f:
                found += [int(child) for child in f.read().split()]
    return found


class CPUWatch:
    """CPU seconds three parts of a node-to-node migration use while it runs: the source
    worker (its vCPU, which keeps running the guest, and its side of the control channel),
    the migration process that sends (the source worker's child), and the destination
    worker that receives. Each process's count is read from /proc every few ms, so one that
    exits is counted up to its last reading; /proc counts in 10 ms ticks, so the bench sums
    the figures over a case's runs rather than reading single ones."""

    INTERVAL_S = 0.005

    def __init__(self, source_worker: int, destination_worker: int) -> None:
        self._source = source_worker
        self._destination = destination_worker
        self._first: dict[int, float] = {}
        self._last: dict[int, float] = {}
        self._senders: set[int] = set()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._watch, daemon=True)

    def _read(self) -> None:
        self._senders.update(_children(self._source))
        for pid in (self._source, self._destination, *self._senders):
            with contextlib.suppress(OSError, ValueError, IndexError):
                used = _process_cpu(pid)
                self._first.setdefault(pid, used)
                self._last[pid] = used

    def _watch(self) -> None:
        while not self._stop.wait(self.INTERVAL_S):
            self._read()

    def __enter__(self) -> CPUWatch:
        self._read()
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self._read()

    def used(self) -> dict[str, float]:
        """CPU seconds per part: ``source-worker``, ``sender``, ``receiver``."""

        def spent(pid: int) -> float:
            return self._last.get(pid, 0.0) - self._first.get(pid, 0.0)

        return {
            "source-worker": spent(self._source),
            "sender": sum(map(spent, self._senders)),
            "receiver": spent(self._destination),
        }


def _round0_mbs(status: Any) -> float:
    """Round 0's own rate (MB/s), from the rounds the node reports."""
    if not status.rounds or status.rounds[0].duration_ms <= 0:
        return 0.0
    first = status.rounds[0]
    return first.bytes / first.duration_ms / 1e3


def ferry_nodes_case(case: Case, repeats: int) -> list[Result]:
    """The same migrations through two ``ferry-node`` agents and their VMM workers, driven
    as the coordinator drives them (PrepareIncoming, StartMigration, WatchMigration)."""
    import cluster  # the multi-process test harness: starts and tears down real agents

    from protos.ferry.v1 import types_pb2

    results: list[Result] = []
    nodes = cluster.Cluster()
    try:
        a = nodes.node("bench-a", memory="4G")
        b = nodes.node("bench-b", memory="4G")
        append = f"wss={case.wss} rate={case.rate}"
        a.create("vm", DIRTIER, memory=case.ram_mib * MiB, append=append)
        deadline = time.monotonic() + 180
        while b"tick 0" not in a.console("vm", follow=False)[0]:
            if time.monotonic() > deadline:
                return [Result("error", 0, 0, 0, 0, note="guest never ticked on ferry-node")]
            time.sleep(0.1)
        options = types_pb2.MigrationOptions(
            max_downtime_ms=int(DOWNTIME_MS),
            timeout_s=int(case.timeout_s),
            max_bandwidth=int(case.cap_mbs * 1e6),
            auto_converge=case.auto_converge,
        )
        source, dest = a, b
        for _ in range(repeats):
            # Prepared first, so the guest speed below covers the migration itself.
            prepared = cluster.prepare(dest, source.get("vm").spec)
            instret = source.get("vm").instret
            with CPUWatch(source.get("vm").worker_pid, prepared.vm.worker_pid) as watch:
                status = cluster.migrate(source, dest, "vm", options, prepared=prepared)
            # The destination resumed at the source's last instruction and has run only a
            # moment since: its count less the count before is (nearly) what ran meanwhile.
            # A migration that did not complete left the guest running on the source.
            ran = (dest if status.resumed_at else source).get("vm").instret - instret
            mips = ran / max(status.total_time_ms, 1e-6) / 1e3
            name = types_pb2.MigrationState.Name(status.status)
            name = name.removeprefix("MIGRATION_STATE_").lower()
            if status.status != types_pb2.MIGRATION_STATE_COMPLETED:
                results.append(
                    Result(
                        name,
                        status.total_time_ms,
                        0,
                        status.transferred,
                        status.dirty_sync_count,
                        guest_mips=mips,
                        note=status.error[:90],
                    )
                )
                break
            before = dest.console("vm", follow=False)[0].count(b"tick ")
            time.sleep(0.5)
            after = dest.console("vm", follow=False)[0]
            ok = after.count(b"tick ") > before and b"CORRUPT" not in after
            results.append(
                Result(
                    name,
                    status.total_time_ms,
                    # Pause on the source to resume on the destination, one host's clock.
                    (status.resumed_at - status.paused_at) * 1000,
                    status.transferred,
                    status.dirty_sync_count,
                    _round0_mbs(status),
                    guest_mips=mips,
                    guest_ok=ok,
                    note="" if ok else "guest stopped ticking after the migration",
                    phases=dict(status.downtime_phases_ms),
                    cpu=watch.used(),
                )
            )
            if not ok:
                break
            source, dest = dest, source
    except Exception as exc:  # a bench reports, it does not crash
        results.append(Result("error", 0, 0, 0, 0, note=f"{type(exc).__name__}: {exc}"[:120]))
    finally:
        nodes.close()
    return results


# ================================================================================ QEMU


class QMP:
    """A minimal QMP client over a unix socket: commands in, answers out, events skipped."""

    def __init__(self, path: str, timeout: float = 10.0) -> None:
        deadline = time.monotonic() + timeout
        while True:
            try:
                self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
                self.sock.connect(path)
                break
            except OSError:
                self.sock.close()
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.02)
        self.sock.settimeout(timeout)
        self.file = self.sock.makefile("rb")
        self._read()  # greeting
        self.execute("qmp_capabilities")

    def _read(self) -> dict[str, Any]:
        while True:
            line = self.file.readline()
            if not line:
                raise ConnectionError("QMP connection closed")
            message: dict[str, Any] = json.loads(line)
            if "event" not in message:
                return message

    def execute(self, command: str, **arguments: Any) -> Any:
        request: dict[str, Any] = {"execute": command}
        if arguments:
            request["arguments"] = arguments
        self.sock.sendall(json.dumps(request).encode() + b"\n")
        answer = self._read()
        if "error" in answer:
            raise RuntimeError(f"QMP {command}: {answer['error'].get('desc')}")
        return answer.get("return")

    def close(self) -> None:
        self.sock.close()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def _qemu(case: Case, workdir: str, name: str, incoming: int | None) -> subprocess.Popen[bytes]:
    args = [
        QEMU, "-machine", "virt", "-bios", "none", "-nographic", "-nodefaults",
        "-serial", f"file:{workdir}/{name}.console",
        "-kernel", str(DIRTIER), "-append", f"wss={case.wss} rate={case.rate}",
        "-m", f"{case.ram_mib}M", "-qmp", f"unix:{workdir}/{name}.qmp,server=on,wait=off",
    ]  # fmt: skip
    if incoming is not None:
        args += ["-incoming", f"tcp:127.0.0.1:{incoming}"]
    # QEMU's own complaints (a destination whose migration was cancelled) go to its log.
    with open(f"{workdir}/{name}.log", "wb") as log:
        return subprocess.Popen(
            args, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=log
        )


def _console(workdir: str, name: str) -> str:
    try:
        return Path(workdir, f"{name}.console").read_text(errors="replace")
    except OSError:
        return ""


def qemu_migrate(case: Case) -> Result:
    workdir = tempfile.mkdtemp(prefix="ferry-bench-qemu-")
    port = _free_port()
    src = _qemu(case, workdir, "src", None)
    dst = _qemu(case, workdir, "dst", port)
    try:
        deadline = time.monotonic() + 60
        while "tick 0" not in _console(workdir, "src"):
            if time.monotonic() > deadline or src.poll() is not None:
                return Result("error", 0, 0, 0, 0, note="QEMU guest never ticked")
            time.sleep(0.01)
        qmp_src = QMP(f"{workdir}/src.qmp")
        QMP(f"{workdir}/dst.qmp").close()
        qmp_src.execute(
            "migrate-set-capabilities",
            capabilities=[{"capability": "auto-converge", "state": case.auto_converge}],
        )
        bandwidth = int(case.cap_mbs * 1e6) if case.cap_mbs else 1 << 40
        qmp_src.execute(
            "migrate-set-parameters", **{"max-bandwidth": bandwidth, "downtime-limit": 300}
        )
        started = time.monotonic()
        qmp_src.execute("migrate", uri=f"tcp:127.0.0.1:{port}")
        limit = max(QEMU_TIMEOUT_S, case.timeout_s / 2)
        deadline = time.monotonic() + limit
        note = ""
        while True:
            info = qmp_src.execute("query-migrate")
            if info.get("status") in ("completed", "failed", "cancelled"):
                break
            if time.monotonic() > deadline:
                qmp_src.execute("migrate_cancel")
                note = f"still running after {limit:g} s: cancelled by the bench"
            time.sleep(0.005)
        ram = info.get("ram", {})
        ticks_before = _console(workdir, "dst").count("tick ")
        time.sleep(0.5)
        after = _console(workdir, "dst")
        ok = info.get("status") == "completed" and after.count("tick ") > ticks_before
        if info.get("status") == "completed" and not ok:
            # QEMU 7.2 restores the CLINT's mtimecmp without re-arming the timer behind it,
            # so a guest that waits in wfi for it (the idle dirtier) sleeps on. The
            # migration's own figures are unaffected.
            note = "destination printed no tick after resuming (QEMU 7.2: timer not re-armed)"
        # A cancelled migration reports no total-time: the bench's own clock stands in.
        total = info.get("total-time", (time.monotonic() - started) * 1000)
        return Result(
            str(info.get("status")),
            float(total),
            float(info.get("downtime", 0)),
            int(ram.get("transferred", 0)),
            int(ram.get("dirty-sync-count", 0)),
            float(ram.get("mbps", 0)) / 8,
            note=note or str(info.get("error-desc", "")),
            guest_ok=ok,
        )
    finally:
        for p in (src, dst):
            p.kill()
            p.wait()
        shutil.rmtree(workdir, ignore_errors=True)


# ================================================================================ cases


@dataclass(frozen=True)
class Case:
    ram_mib: int
    wss: int
    rate: int  # pages per ms of guest time: 0, 1 (4 MB/s), 16 (64 MB/s)
    # A bandwidth cap in MB/s (0: unlimited) and auto-converge (vCPU throttling) on or off.
    # A cap below the dirty rate makes a case that cannot converge on its own, to show how
    # each VMM ends it: Ferry by its policy (throttle, raise the downtime budget, cancel).
    cap_mbs: float = 0.0
    auto_converge: bool = True

    @property
    def label(self) -> str:
        ram = f"{self.ram_mib // 1024} GiB" if self.ram_mib >= 1024 else f"{self.ram_mib} MiB"
        label = f"{ram:>7} {self.wss:>4} MiB {self.rate * 4:>3} MB/s"
        if self.cap_mbs:
            label += f" cap {self.cap_mbs:g} MB/s" + ("" if self.auto_converge else " no AC")
        return label

    @property
    def timeout_s(self) -> float:
        """Policy cases need many slow rounds; the others end in well under a second."""
        return 120.0 if self.cap_mbs else CASE_TIMEOUT_S


@dataclass
class CaseResults:
    ferry: list[Result] = field(default_factory=list)
    nodes: list[Result] = field(default_factory=list)
    qemu: list[Result] = field(default_factory=list)
    fill_s: float = 0.0


def run_case(case: Case, repeats: int, with_nodes: bool) -> CaseResults:
    results = CaseResults()
    a, b = HostProcess(), HostProcess()
    try:
        booted = a.call("boot", case.ram_mib, case.wss, case.rate)
        if "error" in booted:
            results.ferry.append(Result("error", 0, 0, 0, 0, note=booted["error"]))
        else:
            results.fill_s = booted["fill_s"]
            source, dest = a, b
            for _ in range(repeats):
                result = ferry_migrate(source, dest, case)
                results.ferry.append(result)
                if result.status != "completed" or not result.guest_ok:
                    break
                source, dest = dest, source
    except (TimeoutError, OSError, EOFError) as exc:  # a stuck or dead host process
        results.ferry.append(Result("error", 0, 0, 0, 0, note=f"{type(exc).__name__}: {exc}"))
    finally:
        a.close()
        b.close()
    if with_nodes:
        results.nodes = ferry_nodes_case(case, repeats)
    if shutil.which(QEMU):
        for _ in range(repeats):
            try:
                results.qemu.append(qemu_migrate(case))
            except (OSError, RuntimeError, ValueError) as exc:  # QMP trouble: report it
                results.qemu.append(Result("error", 0, 0, 0, 0, note=f"QEMU: {exc}"[:120]))
                break
    return results


def median_result(results: list[Result]) -> Result | None:
    """The run with the median total time (so its figures belong together)."""
    if not results:
        return None
    done = [r for r in results if r.status == "completed"] or results
    return sorted(done, key=lambda r: r.total_ms)[(len(done) - 1) // 2]


def _cpu_line(results: list[Result], capped: bool) -> str:
    """"; ferry-node CPU per MiB sent: ..." (summed over the runs), or nothing. The source
    worker's share includes the guest's own running; under a bandwidth cap the figures
    are per MiB of a stream held back, and bound nothing."""
    runs = [r for r in results if r.cpu and r.transferred]
    if not runs:
        return ""
    mib = sum(r.transferred for r in runs) / MiB
    parts = {name: sum(r.cpu[name] for r in runs) * 1000 / mib for name in runs[0].cpu}
    total = sum(parts.values())
    line = "; ferry-node CPU ms per MiB sent: " + ", ".join(
        f"{name} {ms:.2f}" for name, ms in parts.items()
    )
    if capped:
        return line
    # Two cores between them: what that much CPU per MiB allows at best.
    return line + f" (sum {total:.2f}: at most {2 * MiB / total / 1e3:.0f} MB/s on 2 cores)"


def _phases_line(results: list[Result]) -> str:
    """"; ferry-node downtime phases (median ms): pause 1.0 + ..." or nothing."""
    names = ("pause", "final-round", "destination")
    runs = [r.phases for r in results if all(n in r.phases for n in names)]
    if not runs:
        return ""
    medians = " + ".join(f"{n} {statistics.median(p[n] for p in runs):.1f}" for n in names)
    return f"; ferry-node downtime phases (median ms): {medians}"


def _ratio(a: float, b: float) -> str:
    return f"{a / b:5.2f}" if b > 0 else "    -"


def print_table(rows: list[tuple[Case, CaseResults]]) -> None:
    header = (
        f"{'RAM / WSS / dirty':>24} | {'VMM':6} {'n':>2} {'status':>9} {'total ms':>9} "
        f"{'down ms':>8} {'MiB sent':>9} {'syncs':>5} {'r0 MB/s':>8} | "
        f"{'total':>5} {'down':>5} {'sent':>5}"
    )
    print(header)
    print("-" * len(header))
    for case, res in rows:
        qemu = median_result(res.qemu)
        first = True
        for name, runs in (("node", res.nodes), ("inproc", res.ferry), ("QEMU", res.qemu)):
            r = median_result(runs)
            n = len(runs)
            if r is None:
                continue
            ratios = ""
            if name != "QEMU" and qemu is not None and r.status == qemu.status == "completed":
                ratios = (
                    f"{_ratio(r.total_ms, qemu.total_ms)} {_ratio(r.downtime_ms, qemu.downtime_ms)}"
                    f" {_ratio(r.transferred, qemu.transferred)}"
                )
            label = case.label if first else ""
            first = False
            print(
                f"{label:>24} | {name:6} {n:>2} {r.status:>9} {r.total_ms:9.0f} "
                f"{r.downtime_ms:8.1f} {r.transferred / MiB:9.1f} {r.syncs:5d} "
                f"{r.round0_mbs:8.0f} | {ratios}"
            )
            if r.note:
                print(f"{'':>24} |   note: {r.note}")


def _arguments() -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description="Live migration of the dirtier guest: Ferry (two ferry-node agents, and "
        "the in-process driver as an ablation) and QEMU side by side, with the gRPC stream's "
        "ceilings measured in the same run. Prints figures; never passes or fails."
    )
    parser.add_argument(
        "--quick", action="store_true", help="one 256 MiB guest at 0 and 64 MB/s, run once"
    )
    parser.add_argument(
        "--policy",
        action="store_true",
        help="only the two cases that cannot converge by themselves (a 2 MB/s cap)",
    )
    parser.add_argument(
        "--no-nodes", action="store_true", help="leave out the ferry-node rows (faster)"
    )
    parser.add_argument(
        "--case",
        metavar="RAM,WSS,RATE",
        action="append",
        type=_case,
        help="run this case (RAM and working set in MiB, RATE in pages per ms: 0, 1 = 4 MB/s, "
        "16 = 64 MB/s) instead of the default set; may be repeated",
    )
    parser.add_argument(
        "--repeats", type=int, default=0, help="runs per case and VMM (default 3; --quick: 1)"
    )
    return parser.parse_args()


def _case(text: str) -> Case:
    try:
        ram, wss, rate = (int(part) for part in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not RAM,WSS,RATE (three integers)") from None
    if ram <= 0 or not 0 < wss < ram or rate < 0:
        raise argparse.ArgumentTypeError(f"{text!r}: need 0 < WSS < RAM and RATE >= 0")
    return Case(ram, wss, rate)


def main() -> None:
    args = _arguments()
    # Every process on both ends of every stream measured here, the bare ones included,
    # keeps freed batch buffers as Ferry's migration processes do (node/allocator.py).
    hold_freed_buffers()
    quick = args.quick
    with_nodes = not args.no_nodes
    if not DIRTIER.exists():
        print(f"no guest image at {DIRTIER}: run `make guests` first")
        return
    backing = os.environ.get(ENVIRONMENT) or "memfd"
    print(f"guest RAM backing: {backing} (vmcore/ramfile.py; {ENVIRONMENT}=huge to compare)")
    print("gRPC stream ceiling on loopback (1 MiB messages, two processes), median of "
          f"{CEILING_RUNS}:")  # fmt: skip
    ceiling = measure_ceiling(3 if quick else CEILING_RUNS)
    print(f"  stream alone, ready-made bytes            {ceiling.raw / 1e6:7.0f} MB/s")
    print(f"  protobuf messages serialised and parsed   {ceiling.proto / 1e6:7.0f} MB/s")
    print(
        f"  ready-made bytes landed in fresh memory   {ceiling.land / 1e6:7.0f} MB/s "
        f"({ceiling.land / ceiling.raw:.0%} of the raw stream: what receiving into RAM "
        "never written before costs any destination)"
    )
    print(
        f"  Ferry round 0, sender -> receiver ({SYNTHETIC_MIB} MiB synthetic RAM, no vCPU): "
        f"{ceiling.ferry / 1e6:.0f} MB/s = {ceiling.ferry / ceiling.raw:.0%} of the raw stream, "
        f"{ceiling.ferry / ceiling.proto:.0%} of protobuf's, "
        f"{ceiling.ferry / ceiling.land:.0%} of landing in fresh memory; compression auto chose to "
        f"compress {ceiling.compressed} bytes"
    )
    ms = {k: (1000 * send, 1000 * receive) for k, (send, receive) in ceiling.cpu.items()}
    ends = ms.pop("ends")
    print(
        "  CPU per MiB moved, sender / receiver: "
        + ", ".join(f"{k} {s:.2f} / {r:.2f} ms" for k, (s, r) in ms.items())
    )
    print(
        f"  Ferry's ends with no gRPC between them: sender {ends[0]:.2f} / receiver "
        f"{ends[1]:.2f} ms per MiB; with the bare stream's own cost added, "
        f"{ends[0] + ms['raw'][0]:.2f} / {ends[1] + ms['raw'][1]:.2f} (measured with gRPC: "
        f"{ms['ferry'][0]:.2f} / {ms['ferry'][1]:.2f})"
    )
    # On one 2-core host both ends share the cores; on two hosts each end has its own, and
    # the busier end bounds the stream. Per-MiB CPU says what that bound would be.
    bound = {k: 1000 / max(s, r) * MiB for k, (s, r) in ms.items()}
    print(
        f"  each end on cores of its own, the busier end bounds the stream at: raw "
        f"{bound['raw'] / 1e6:.0f} MB/s, landing {bound['land'] / 1e6:.0f}, Ferry "
        f"{bound['ferry'] / 1e6:.0f} = {bound['ferry'] / bound['raw']:.0%} of raw"
    )
    # Here both ends share 2 cores: a rate needs at most 2 cores' worth of CPU per MiB moved.
    aim = 0.7 * ceiling.raw
    budget = 2 * 1000 * MiB / aim
    print(
        f"  70% of the raw stream is {aim / 1e6:.0f} MB/s: on 2 cores, at most {budget:.2f} ms "
        "of CPU per MiB for both ends together (and the source's vCPU); the bare landing "
        f"stream uses {sum(ms['land']):.2f}, Ferry's pipeline {sum(ms['ferry']):.2f}"
    )
    sys.stdout.flush()

    # A 4 MiB working set rewritten at 64 MB/s over a link capped at 2 MB/s: every round
    # leaves the whole working set dirty, and sending it would take ~2 s of downtime, above
    # the highest budget Ferry's policy will raise to. With auto-converge the throttled
    # guest dirties less and the migration converges; without, the policy must cancel.
    policy = [Case(256, 4, 16, cap_mbs=2.0, auto_converge=ac) for ac in (True, False)]
    if args.case:
        cases = args.case
    elif args.policy:
        cases = policy
    elif quick:
        cases = [Case(256, 16, rate) for rate in (0, 16)]
    else:
        cases = [
            Case(ram, wss, rate)
            for ram in (256, 1024)
            for wss in (16, 128)
            for rate in (0, 1, 16)
        ] + policy
    repeats = args.repeats or (1 if quick else 3)
    print(
        f"\ndirtier migrated on this host, downtime limit {DOWNTIME_MS:g} ms, unlimited bandwidth "
        f"unless a cap is shown; median of {repeats} by total time (capped cases run once); "
        "ratios are Ferry/QEMU"
    )
    rows = []
    t0 = time.monotonic()
    for case in cases:
        # A case that cannot converge takes a minute or more per way and repetition; its
        # point is how it ends, which one run shows.
        res = run_case(case, 1 if case.cap_mbs else repeats, with_nodes)
        rows.append((case, res))
        print(
            f"  {case.label}: Ferry fill {res.fill_s:.1f} s; total ms "
            f"ferry-node {[round(r.total_ms) for r in res.nodes]}, "
            f"inproc {[round(r.total_ms) for r in res.ferry]}, "
            f"QEMU {[round(r.total_ms) for r in res.qemu]}; "
            "guest MIPS while migrating: ferry-node "
            f"{[round(r.guest_mips, 2) for r in res.nodes]}, "
            f"inproc {[round(r.guest_mips, 2) for r in res.ferry]}"
            f"{_phases_line(res.nodes)}{_cpu_line(res.nodes, bool(case.cap_mbs))}",
            flush=True,
        )
    print()
    print_table(rows)
    print()
    # A round 0 of 16 MiB lasts a few tens of ms, so its start (the first batches, the
    # stream's windows opening) weighs on its rate; one of 128 MiB shows the steady pace.
    for guest, busy in (("idle (0 MB/s, waiting in wfi)", False), ("busy (writing)", True)):
        for name, pick in (("ferry-node", "nodes"), ("in the vCPU's process", "ferry")):
            parts = []
            for wss in sorted({case.wss for case, _ in rows}):
                round0 = [
                    r.round0_mbs * 1e6
                    for case, res in rows
                    if not case.cap_mbs and (case.rate > 0) == busy and case.wss == wss
                    for r in getattr(res, pick)
                    if r.status == "completed" and r.round0_mbs
                ]
                if round0:
                    r0 = statistics.median(round0)
                    parts.append(
                        f"{wss} MiB working set {r0 / 1e6:.0f} MB/s = {r0 / ceiling.raw:.0%} of "
                        f"the raw stream, {r0 / ceiling.land:.0%} of landing"
                    )
            if parts:
                print(f"Ferry round 0, dirtier {guest}, {name} (medians): " + "; ".join(parts))
    print(f"bench took {time.monotonic() - t0:.0f} s")


if __name__ == "__main__":
    os.environ.setdefault("GRPC_VERBOSITY", "ERROR")
    main()
