"""Registering with the coordinator and heartbeating, tolerant of it being away.

A node must keep serving its VMs whether or not the coordinator is up (it may start later,
or restart), so failures here are retried with backoff and logged once per outage, never
raised.
"""

from __future__ import annotations

import functools
import logging
from typing import TYPE_CHECKING, Any

import grpc
import trio

from protos.ferry.v1 import coordinator_pb2, coordinator_pb2_grpc

if TYPE_CHECKING:
    from node.agent import Agent

log = logging.getLogger("ferry-node")

DEFAULT_INTERVAL = 2.0
MAX_BACKOFF = 10.0


async def _call(method: Any, request: Any) -> Any:
    return await trio.to_thread.run_sync(
        functools.partial(method, request, timeout=5.0), abandon_on_cancel=True
    )


async def run(agent: Agent, coordinator: str) -> None:
    """Register, then heartbeat every interval the coordinator asks for, forever."""
    channel = grpc.insecure_channel(coordinator)
    stub = coordinator_pb2_grpc.CoordinatorStub(channel)
    registered = False
    interval = DEFAULT_INTERVAL
    backoff = 0.5
    outage = False
    seq = 0
    try:
        while True:
            try:
                node = await agent.node_info()
                if not registered:
                    reply = await _call(
                        stub.RegisterNode, coordinator_pb2.RegisterNodeRequest(node=node)
                    )
                    registered = True
                    log.info("registered with coordinator %s", coordinator)
                else:
                    seq += 1
                    reply = await _call(
                        stub.Heartbeat, coordinator_pb2.HeartbeatRequest(node=node, seq=seq)
                    )
                    if reply.reregister:
                        registered = False
                        continue
                interval = reply.heartbeat_interval_seconds or interval
                if outage:
                    log.info("coordinator %s reachable again", coordinator)
                outage = False
                backoff = 0.5
                await trio.sleep(interval)
            except grpc.RpcError as e:
                if e.code() == grpc.StatusCode.NOT_FOUND:
                    registered = False  # the coordinator forgot us: introduce ourselves again
                if not outage:
                    log.warning(
                        "coordinator %s unreachable (%s); retrying with backoff",
                        coordinator,
                        e.code().name,
                    )
                outage = True
                await trio.sleep(backoff)
                backoff = min(backoff * 2, MAX_BACKOFF)
    finally:
        channel.close()
