"""Fixtures shared by the multi-process tests."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from cluster import Cluster
from coordcluster import CoordCluster


@pytest.fixture
def cluster() -> Iterator[Cluster]:
    """Agents started on localhost for one test, every process torn down after it."""
    c = Cluster()
    try:
        yield c
    finally:
        c.close()


@pytest.fixture
def cl() -> Iterator[CoordCluster]:
    """A coordinator on localhost for one test (agents added by the test), torn down after."""
    c = CoordCluster()
    try:
        yield c
    finally:
        c.close()
