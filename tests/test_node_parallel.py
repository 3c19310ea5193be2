"""Two VMs on one node run at once, each in its own worker process, on its own core."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from cluster import Cluster, NodeProcess
from elfgen import spin_guest

WINDOW = 2.0


@pytest.fixture
def cluster() -> Iterator[Cluster]:
    c = Cluster()
    yield c
    c.close()


def _rates(node: NodeProcess, names: list[str]) -> dict[str, float]:
    """Retired instructions per wall second of each VM over one window."""
    before = {n: node.get(n).instret for n in names}
    start = time.monotonic()
    time.sleep(WINDOW)
    after = {n: node.get(n).instret for n in names}
    elapsed = time.monotonic() - start
    return {n: (after[n] - before[n]) / elapsed for n in names}


def test_two_vms_progress_at_once(cluster: Cluster, tmp_path: Path) -> None:
    image = tmp_path / "spin.elf"
    image.write_bytes(spin_guest())
    node = cluster.node(vcpus=2)
    node.create("solo", image)
    solo = _rates(node, ["solo"])["solo"]
    node.create("pair", image)
    both = _rates(node, ["solo", "pair"])
    # Figures, not a pass/fail on speed: how close to solo speed each VM runs when both do.
    print(
        f"\ninstret/s alone: {solo:,.0f}; together: solo {both['solo']:,.0f}, "
        f"pair {both['pair']:,.0f} ({both['solo'] / solo:.2f}x and "
        f"{both['pair'] / solo:.2f}x of alone)"
    )
    assert both["solo"] > 0 and both["pair"] > 0
