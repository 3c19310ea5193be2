"""The sender's own economies: how it reads RAM and builds batches, and that they change
nothing the destination ends up with."""

from __future__ import annotations

import dataclasses

import numpy as np
from inmemory import IdleDirtyLog, migrate_in_memory

from node.migration import MigrationOptions, MigrationReceiver, MigrationSender, wire

# Small pages, so that RAM spanning many of the scan's chunks stays small.
PAGE = 64
PAGES = 16 * 4096


def scattered_ram(seed: int = 3) -> tuple[bytearray, np.ndarray]:
    """RAM where a quarter of the pages, scattered, were never written (and are zero)."""
    ram = bytearray(PAGES * PAGE)
    grid = np.frombuffer(ram, dtype=np.uint8).reshape(PAGES, PAGE)
    rng = np.random.default_rng(seed)
    holes = rng.integers(0, 4, size=PAGES) == 0
    grid[~holes] = rng.integers(1, 256, size=(int((~holes).sum()), PAGE), dtype=np.uint8)
    return ram, holes


def test_round_0_asks_which_pages_were_never_backed_over_growing_spans() -> None:
    ram, holes = scattered_ram()
    asked: list[tuple[int, int]] = []

    def never_backed(first: int, last: int) -> np.ndarray:
        asked.append((first, last))
        return holes[first:last].copy()

    sender = MigrationSender(
        memoryview(ram),
        IdleDirtyLog(),
        dict,
        token=b"t",
        config_hash="c",
        page_size=PAGE,
        options=MigrationOptions(compression="none"),
        never_backed=never_backed,
        build_batch=wire.build_pages,
    )
    dest = bytearray(len(ram))
    receiver = MigrationReceiver(
        memoryview(dest), token=b"t", config_hash="c", restore=lambda s: None, page_size=PAGE
    )
    sent = migrate_in_memory(sender, receiver, through_wire=True).sent
    assert sender.phase == "completed"
    assert bytes(dest) == bytes(ram)
    # Each question covers four times the last, together all of RAM, each page once.
    assert asked == [(0, 4096), (4096, 20480), (20480, PAGES)]
    numbers = np.concatenate([b.page_numbers for b in sent])
    assert sorted(numbers.tolist()) == np.flatnonzero(~holes).tolist()


def test_batches_of_scattered_pages_are_serialised_as_they_are_built() -> None:
    ram, _ = scattered_ram(4)
    sender = MigrationSender(
        memoryview(ram),
        IdleDirtyLog(),
        dict,
        token=b"t",
        config_hash="c",
        page_size=PAGE,
        options=MigrationOptions(compression="none"),
        build_batch=wire.build_pages,
    )
    dest = bytearray(len(ram))
    receiver = MigrationReceiver(
        memoryview(dest), token=b"t", config_hash="c", restore=lambda s: None, page_size=PAGE
    )
    sent = migrate_in_memory(sender, receiver, through_wire=True).sent
    assert sender.phase == "completed" and bytes(dest) == bytes(ram)
    data = [b for b in sent if len(b.page_numbers)]
    assert data and all(b.serialised is not None for b in data)
    # Each batch's payload is its pages, in order, and its serialised form the one
    # encode_source would write for it.
    grid = np.frombuffer(ram, dtype=np.uint8).reshape(PAGES, PAGE)
    for batch in data[:5]:
        assert bytes(batch.payload) == grid[batch.page_numbers].tobytes()
        # (A copy made by replace() has no serialised form: encode_source writes it anew.)
        plain = dataclasses.replace(batch, payload=bytes(batch.payload))
        assert batch.serialised == wire.encode_source(plain)
