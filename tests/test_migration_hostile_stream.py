"""An incoming worker facing a hostile migration stream: it holds the one-time token and
a matching Hello, then sends a batch no honest source would. The destination must answer
with one clear error, write nothing outside the VM's RAM, and discard the incoming VM.

These drive a real ``ferry-node`` and its incoming VMM worker; the client speaks the
protocol's own wire form, so the worker's stream reader meets the batch exactly as it
would arrive from a source.
"""

from __future__ import annotations

import grpc
import numpy as np
import pytest
from cluster import DIRTIER, Cluster, prepare
from test_migration_cluster_faults import assert_discarded

from node.migration import wire
from node.migration.messages import PROTOCOL_VERSION, Ack, Error, Hello, Pages
from node.worker import vm_config
from protos.ferry.v1 import types_pb2
from vmcore.vm import config_hash

RAM = 16 << 20
PAGES = RAM // 4096


def _pages(numbers: list[int], payload: bytes) -> Pages:
    return Pages(
        seq=1,
        round=0,
        encoding="raw",
        page_numbers=np.array(numbers, dtype=np.uint32),
        zero_pages=np.zeros(0, dtype=np.uint32),
        payload=payload,
    )


@pytest.mark.parametrize(
    ("batch", "why"),
    [
        (_pages([PAGES + 5], bytes(4096)), f"include page {PAGES + 5}, RAM has {PAGES} pages"),
        (_pages([3, 3], bytes(8192)), "more than once"),
        (_pages([7], bytes(100)), "raw payload is 100 bytes"),
    ],
    ids=["page-out-of-range", "duplicate-page", "short-payload"],
)
def test_a_hostile_batch_is_refused_and_the_incoming_vm_discarded(
    cluster: Cluster, batch: Pages, why: str
) -> None:
    node = cluster.node("dst")
    spec = types_pb2.VMSpec(name="vm", kernel=str(DIRTIER), memory_bytes=RAM, append="wss=1")
    prepared = prepare(node, spec)
    hello = Hello(
        protocol_version=PROTOCOL_VERSION,
        ferry_version="test",
        config_hash=config_hash(vm_config(prepared.vm.spec)),
        ram_size=RAM,
        page_size=4096,
        token=prepared.token,
    )
    with grpc.insecure_channel(prepared.endpoint) as channel:
        replies = list(wire.migrate_call(channel)(iter([hello, batch]), timeout=30))
    assert isinstance(replies[0], Ack), replies  # the Hello was good: credit granted
    errors = [r for r in replies if isinstance(r, Error)]
    assert len(errors) == 1 and why in errors[0].reason, replies
    assert_discarded(node)
