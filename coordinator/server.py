"""ferry-coordinator: the cluster's control plane process.

One trio loop owns the cluster view (nodes, VMs, operations); grpcio serves the API from
its thread pool and hops into the loop. The state lives in one SQLite file, so stopping
and starting the coordinator on the same ``--state`` loses nothing: nodes keep running
their VMs meanwhile and the coordinator reconciles with them as they heartbeat again.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import signal
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import grpc
import trio
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from coordinator import scheduler
from coordinator.cluster import Cluster, Settings
from coordinator.migrate import Mover
from coordinator.service import CoordinatorService
from coordinator.sqlite_store import SqliteStore, StoreError
from protos.ferry.v1 import coordinator_pb2, coordinator_pb2_grpc

log = logging.getLogger("ferry-coordinator")


class StartupError(Exception):
    """A bad command line or environment; printed as one line, exit status 2."""


def _parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="ferry-coordinator",
        description="Ferry coordinator: the cluster API, scheduler, node health and state.",
    )
    parser.add_argument(
        "--listen", default="127.0.0.1:7400", help="HOST:PORT to serve on (default %(default)s)"
    )
    parser.add_argument(
        "--state", required=True, type=Path, help="SQLite state file (created if missing)"
    )
    parser.add_argument(
        "--heartbeat-timeout",
        type=float,
        default=10.0,
        metavar="S",
        help="seconds without a heartbeat before a node is marked down (default %(default)s)",
    )
    parser.add_argument(
        "--weigher",
        choices=scheduler.WEIGHERS,
        default="spread",
        help="placement: spread VMs over nodes, or pack them (default %(default)s)",
    )
    parser.add_argument(
        "--on-node-down",
        choices=("keep", "restart"),
        default="keep",
        help="VMs of a down node: keep waiting for it, or restart them elsewhere "
        "(default %(default)s)",
    )
    parser.add_argument(
        "--drain-parallel",
        type=int,
        default=2,
        metavar="K",
        help="migrations at once during a drain (default %(default)s)",
    )
    parser.add_argument(
        "--ready-file",
        type=Path,
        help="write {address, pid} here as JSON once serving (for launchers)",
    )
    args = parser.parse_args(argv)
    host, sep, port = args.listen.rpartition(":")
    if not sep or not host or not port.isdigit() or int(port) > 65535:
        raise StartupError(f"--listen {args.listen!r}: expected HOST:PORT")
    if args.heartbeat_timeout <= 0:
        raise StartupError("--heartbeat-timeout must be positive")
    if args.drain_parallel < 1:
        raise StartupError("--drain-parallel must be at least 1")
    return args


async def _serve(args: argparse.Namespace, store: SqliteStore) -> None:
    settings = Settings(
        heartbeat_timeout=args.heartbeat_timeout,
        weigher=args.weigher,
        on_node_down=args.on_node_down,
        drain_parallel=args.drain_parallel,
    )
    async with trio.open_nursery() as nursery:
        cluster = Cluster(store, settings)
        cluster.nursery = nursery
        mover = Mover(cluster, nursery)
        server = grpc.server(
            ThreadPoolExecutor(max_workers=64, thread_name_prefix="coord-grpc"),
            options=[("grpc.so_reuseport", 0)],
        )
        coordinator_pb2_grpc.add_CoordinatorServicer_to_server(
            CoordinatorService(cluster, mover, trio.lowlevel.current_trio_token()), server
        )
        service_name = coordinator_pb2.DESCRIPTOR.services_by_name["Coordinator"].full_name
        health_servicer = health.HealthServicer()
        health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
        reflection.enable_server_reflection(
            [service_name, health.SERVICE_NAME, reflection.SERVICE_NAME], server
        )
        try:
            port = server.add_insecure_port(args.listen)
        except RuntimeError:
            port = 0
        if port == 0:
            raise StartupError(f"cannot listen on {args.listen}")
        address = f"{args.listen.rpartition(':')[0]}:{port}"
        server.start()
        for name in ("", service_name):
            health_servicer.set(name, health_pb2.HealthCheckResponse.SERVING)
        if args.ready_file:
            args.ready_file.write_text(json.dumps({"address": address, "pid": os.getpid()}))
        log.info(
            "listening on %s: %d nodes and %d VMs in %s; heartbeat timeout %g s, weigher %s",
            address,
            len(cluster.nodes),
            len(cluster.vms),
            args.state,
            settings.heartbeat_timeout,
            settings.weigher,
        )
        nursery.start_soon(cluster.watch_health)
        with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
            async for _ in signals:
                break
        log.info("stopping")
        health_servicer.enter_graceful_shutdown()
        await trio.to_thread.run_sync(lambda: server.stop(1.0).wait())
        cluster.close()
        nursery.cancel_scope.cancel()


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(
        level=logging.INFO,
        format="%(asctime)s ferry-coordinator %(levelname)s %(message)s",
        stream=sys.stderr,
    )
    errors: list[BaseException] = []
    try:
        args = _parse_args(argv)
        args.state.parent.mkdir(parents=True, exist_ok=True)
        store = SqliteStore(args.state)
        try:
            trio.run(_serve, args, store)
        finally:
            store.close()
    except* (StartupError, StoreError, OSError) as group:  # from the nursery: a group
        errors.extend(group.exceptions)
    for error in errors:
        print(f"ferry-coordinator: {error}", file=sys.stderr)
    return 2 if errors else 0


if __name__ == "__main__":
    raise SystemExit(main())
