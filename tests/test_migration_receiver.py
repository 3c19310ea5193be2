"""A hostile or broken source: the receiver answers one clean Error and discards the VM.

No input may raise out of ``receive`` or write outside the RAM buffer, so the RAM given to
the receiver here sits between guard bytes that must survive every test.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import msgpack
import numpy as np
import pytest
import zstandard
from hypothesis import given, settings
from hypothesis import strategies as st

from node.migration import (
    PROTOCOL_VERSION,
    Abort,
    Ack,
    Action,
    Complete,
    DeviceState,
    DiscardVM,
    Error,
    GuestRunning,
    Hello,
    MigrationReceiver,
    Pages,
    Refusal,
    Resumed,
    SendMessage,
    ram_digest,
)
from node.migration.encoding import compress
from node.migration.messages import Encoding

PAGE = 4096
PAGES = 64
GUARD = 3 * PAGE
TOKEN = b"t" * 32
CONFIG = "config-hash-1"


class Destination:
    """A receiver over a guarded RAM buffer, recording what it restored."""

    def __init__(self, window: int = 4) -> None:
        self.buffer = bytearray(b"\xa5" * GUARD + bytes(PAGES * PAGE) + b"\x5a" * GUARD)
        self.ram = memoryview(self.buffer)[GUARD : GUARD + PAGES * PAGE]
        self.restored: list[dict[str, Any]] = []
        self.receiver = MigrationReceiver(
            self.ram, token=TOKEN, config_hash=CONFIG, restore=self.restored.append, window=window
        )

    def hello(self) -> list[Action]:
        return self.receiver.receive(good_hello())

    def guards_intact(self) -> bool:
        return self.buffer[:GUARD] == b"\xa5" * GUARD and self.buffer[-GUARD:] == b"\x5a" * GUARD

    def ram_untouched(self) -> bool:
        return not any(self.ram)


def good_hello(**changes: Any) -> Hello:
    fields: dict[str, Any] = {
        "protocol_version": PROTOCOL_VERSION,
        "ferry_version": "x",
        "config_hash": CONFIG,
        "ram_size": PAGES * PAGE,
        "page_size": PAGE,
        "token": TOKEN,
    }
    fields.update(changes)
    return Hello(**fields)


def pages(seq: int, numbers: list[int], fill: int = 1, **changes: Any) -> Pages:
    fields: dict[str, Any] = {
        "seq": seq,
        "round": 0,
        "encoding": "raw",
        "page_numbers": np.array(numbers, dtype=np.uint32),
        "zero_pages": np.zeros(0, dtype=np.uint32),
        "payload": bytes([fill]) * (PAGE * len(numbers)),
    }
    fields.update(changes)
    return Pages(**fields)


def sent(actions: Sequence[object]) -> list[object]:
    return [a.message for a in actions if isinstance(a, SendMessage)]


def assert_rejected(dest: Destination, actions: Sequence[object], reason: str) -> None:
    messages = sent(actions)
    assert len(messages) == 1 and isinstance(messages[0], Error), actions
    assert reason in messages[0].reason
    assert "\n" not in messages[0].reason
    assert any(isinstance(a, DiscardVM) for a in actions)
    assert dest.receiver.phase == "failed"
    assert dest.guards_intact()
    assert dest.restored == []
    # Once failed, nothing more happens whatever arrives.
    assert dest.receiver.receive(pages(99, [0])) == []


def test_accepted_hello_grants_the_initial_window() -> None:
    dest = Destination()
    assert sent(dest.hello()) == [Ack(acked_seq=0, credit=4)]


def test_a_whole_stream_is_applied_verified_and_resumed() -> None:
    dest = Destination()
    dest.hello()
    assert sent(dest.receiver.receive(pages(1, [0, 63], fill=7))) == [Ack(1, 1)]
    assert sent(dest.receiver.receive(pages(2, [5], fill=9, round=1))) == [Ack(2, 1)]
    zero = pages(3, [], round=2, zero_pages=np.array([63], dtype=np.uint32), payload=b"")
    dest.receiver.receive(zero)
    assert dest.receiver.receive(DeviceState(msgpack.packb({"hart": {"pc": 5}}))) == []
    digest = dest.receiver.digest.value
    actions = dest.receiver.receive(Complete(digest))
    assert isinstance(sent(actions)[0], Resumed)
    assert any(isinstance(a, GuestRunning) for a in actions)
    assert dest.restored == [{"hart": {"pc": 5}}]
    grid = np.frombuffer(dest.ram, dtype=np.uint8).reshape(PAGES, PAGE)
    assert (grid[0] == 7).all() and (grid[5] == 9).all() and not grid[63].any()
    assert not grid[[1, 2, 3, 4, *range(6, 63)]].any()
    # A late Abort (a cancel that lost the race) changes nothing once the guest runs.
    assert dest.receiver.receive(Abort("too late")) == []
    assert dest.receiver.phase == "resumed"


def test_a_deep_window_is_acknowledged_a_quarter_at_a_time() -> None:
    """Fewer Acks, the same credit: every 4th batch of a 16-batch window is answered, and
    a batch listing no page (the source waiting for a round to end) at once."""
    dest = Destination(window=16)
    assert sent(dest.hello()) == [Ack(acked_seq=0, credit=16)]
    answers = [sent(dest.receiver.receive(pages(seq, [seq]))) for seq in range(1, 10)]
    assert answers == [[], [], [], [Ack(4, 4)], [], [], [], [Ack(8, 4)], []]
    flush = pages(10, [], payload=b"")
    assert sent(dest.receiver.receive(flush)) == [Ack(10, 2)]
    assert sent(dest.receiver.receive(pages(11, []))) == [Ack(11, 1)]


@pytest.mark.parametrize(
    "numbers",
    [[10, 11, 12, 13], [13, 12, 11, 10], [10, 12, 11, 13], [3, 40, 41, 60], [0, 63]],
    ids=["run", "reversed", "shuffled", "scattered", "ends"],
)
def test_every_page_of_a_batch_lands_where_its_number_says(numbers: list[int]) -> None:
    """Runs are written as one slice and other batches page by page: same result."""
    dest = Destination()
    dest.hello()
    contents = np.zeros((len(numbers), PAGE), dtype=np.uint8)
    for row, number in enumerate(numbers):
        contents[row] = number + 1
    batch = pages(1, numbers, payload=contents.tobytes())
    assert sent(dest.receiver.receive(batch)) == [Ack(1, 1)]
    grid = np.frombuffer(dest.ram, dtype=np.uint8).reshape(PAGES, PAGE)
    for number in range(PAGES):
        assert (grid[number] == (number + 1 if number in numbers else 0)).all(), number
    assert dest.receiver.digest.value == ram_digest(dest.ram)
    assert dest.guards_intact()


@pytest.mark.parametrize(
    ("changes", "reason"),
    [
        ({"token": b"t" * 31}, "bad-token"),
        ({"token": "t" * 32}, "bad-token"),
        ({"protocol_version": PROTOCOL_VERSION + 1}, "protocol-version"),
        # A peer from before the digest changed computes other digests.
        ({"protocol_version": 1}, "protocol-version"),
        ({"page_size": 8192}, "page-size"),
        ({"ram_size": 2 * PAGES * PAGE}, "ram-size"),
        ({"config_hash": "config-hash-2"}, "config"),
    ],
)
def test_bad_hello_gets_a_typed_refusal(changes: dict[str, Any], reason: str) -> None:
    dest = Destination()
    actions = dest.receiver.receive(good_hello(**changes))
    messages = sent(actions)
    assert len(messages) == 1 and isinstance(messages[0], Refusal)
    assert messages[0].reason == reason
    assert any(isinstance(a, DiscardVM) for a in actions)
    # A refused stream is over: pages that follow are ignored, RAM stays untouched.
    assert dest.receiver.receive(pages(1, [0])) == []
    assert dest.ram_untouched()


def test_token_is_checked_before_anything_else_is_revealed() -> None:
    dest = Destination()
    actions = dest.receiver.receive(good_hello(token=b"x", ram_size=1, config_hash="other"))
    refusal = sent(actions)[0]
    assert isinstance(refusal, Refusal) and refusal.reason == "bad-token"
    assert CONFIG not in refusal.detail


def bomb() -> bytes:
    return zstandard.ZstdCompressor(level=1).compress(bytes(64 << 20))


HOSTILE_BATCHES: list[tuple[str, Pages, str]] = [
    ("out of range", pages(1, [PAGES]), "RAM has 64 pages"),
    ("far out of range", pages(1, [2**32 - 1]), "RAM has 64 pages"),
    ("duplicate", pages(1, [3, 3]), "more than once"),
    ("giant count", pages(1, [], page_numbers=np.zeros(10**6, np.uint32)), "at most"),
    ("short payload", pages(1, [1], payload=bytes(PAGE - 1)), "raw payload"),
    ("long payload", pages(1, [1], payload=bytes(PAGE + 1)), "raw payload"),
    ("bomb", pages(1, [1], encoding="zstd", payload=bomb()), "declares 67108864"),
    ("bad lz4", pages(1, [1], encoding="lz4", payload=b"\xff" * 50), "lz4"),
    ("unknown encoding", pages(1, [1], encoding="xz"), "unknown page encoding"),
    ("skipped seq", pages(2, [1]), "expected batch 1"),
    ("seq as text", pages("1", [1]), "expected batch 1"),  # type: ignore[arg-type]
    ("round as text", pages(1, [1], round="0"), "round"),
    ("numbers as text", pages(1, [1], page_numbers="12"), "not integers"),
    ("payload as int", pages(1, [1], payload=5), "Pages"),
]


@pytest.mark.parametrize(
    ("batch", "reason"),
    [(b, r) for _, b, r in HOSTILE_BATCHES],
    ids=[name for name, _, _ in HOSTILE_BATCHES],
)
def test_hostile_batches_are_rejected_without_touching_ram(batch: Pages, reason: str) -> None:
    dest = Destination()
    dest.hello()
    assert_rejected(dest, dest.receiver.receive(batch), reason)
    assert dest.ram_untouched()


def test_batch_seen_twice_is_rejected() -> None:
    dest = Destination()
    dest.hello()
    dest.receiver.receive(pages(1, [1]))
    assert_rejected(dest, dest.receiver.receive(pages(1, [2])), "expected batch 2")


def test_rounds_may_not_go_backwards() -> None:
    dest = Destination()
    dest.hello()
    dest.receiver.receive(pages(1, [1], round=3))
    assert_rejected(dest, dest.receiver.receive(pages(2, [2], round=2)), "after round 3")


@pytest.mark.parametrize(
    ("prelude", "message", "reason"),
    [
        ([], pages(1, [1]), "expected Hello, got Pages"),
        ([], Complete(0), "expected Hello, got Complete"),
        ([good_hello()], good_hello(), "second Hello"),
        ([good_hello()], Complete(0), "Complete before the device state"),
        ([good_hello(), DeviceState(msgpack.packb({}))], pages(1, [1]), "Pages after"),
        ([good_hello(), DeviceState(msgpack.packb({}))], DeviceState(b"\x80"), "second"),
        ([good_hello()], Ack(0, 1), "unexpected Ack"),
        ([good_hello()], "not a message", "unexpected str"),
        ([good_hello(), DeviceState(msgpack.packb({}))], Complete("0"), "not an integer"),  # type: ignore[arg-type]
    ],
)
def test_messages_in_the_wrong_phase_are_errors(
    prelude: list[object], message: object, reason: str
) -> None:
    dest = Destination()
    for m in prelude:
        dest.receiver.receive(m)
    assert_rejected(dest, dest.receiver.receive(message), reason)


@pytest.mark.parametrize(
    ("blob", "reason"),
    [
        (b"\xc1", "not valid msgpack"),
        (msgpack.packb([1, 2]), "not a map"),
        (bytes(65 << 20), "exceeds"),
        ("text", "not bytes"),
    ],
)
def test_bad_device_state_is_rejected(blob: bytes, reason: str) -> None:
    dest = Destination()
    dest.hello()
    assert_rejected(dest, dest.receiver.receive(DeviceState(blob)), reason)


def test_digest_mismatch_fails_and_never_restores() -> None:
    dest = Destination()
    dest.hello()
    dest.receiver.receive(pages(1, [4], fill=3))
    dest.receiver.receive(DeviceState(msgpack.packb({"a": 1})))
    actions = dest.receiver.receive(Complete(dest.receiver.digest.value ^ 1))
    assert_rejected(dest, actions, "memory digest mismatch")


def test_restore_failure_is_an_error_not_a_resume() -> None:
    def restore(state: dict[str, Any]) -> None:
        raise KeyError("hart")

    dest = Destination()
    dest.receiver = MigrationReceiver(dest.ram, token=TOKEN, config_hash=CONFIG, restore=restore)
    dest.hello()
    dest.receiver.receive(DeviceState(msgpack.packb({})))
    actions = dest.receiver.receive(Complete(0))
    assert not any(isinstance(m, Resumed) for m in sent(actions))
    assert_rejected(dest, actions, "restoring the VM failed")


def test_abort_discards_and_answers() -> None:
    dest = Destination()
    dest.hello()
    dest.receiver.receive(pages(1, [1]))
    actions = dest.receiver.receive(Abort("operator cancel"))
    assert sent(actions) == [Error("aborted by the source: operator cancel")]
    assert any(isinstance(a, DiscardVM) for a in actions)
    assert dest.receiver.phase == "aborted"


def test_lost_connection_or_silence_discards_before_resume() -> None:
    dest = Destination()
    dest.hello()
    assert dest.receiver.connection_lost() == [DiscardVM("connection to the source lost")]
    now = [0.0]
    silent = MigrationReceiver(
        dest.ram,
        token=TOKEN,
        config_hash=CONFIG,
        restore=dest.restored.append,
        idle_timeout_s=10,
        clock=lambda: now[0],
    )
    assert silent.tick() == []
    now[0] = 10.0
    actions = silent.tick()
    assert sent(actions) == [Error("source silent for 10 s")]


def test_compressed_batches_are_applied() -> None:
    dest = Destination()
    dest.hello()
    raw = bytes(range(256)) * 32
    for seq, enc in ((1, Encoding.ZSTD), (2, Encoding.LZ4)):
        batch = pages(seq, [seq + 10, seq + 20], encoding=enc, payload=compress(enc, raw))
        assert sent(dest.receiver.receive(batch)) == [Ack(seq, 1)]
    assert bytes(dest.ram[11 * PAGE : 12 * PAGE]) == raw[:PAGE]
    assert bytes(dest.ram[22 * PAGE : 23 * PAGE]) == raw[PAGE:]


def test_receiver_stats_count_what_arrived() -> None:
    dest = Destination()
    dest.hello()
    dest.receiver.receive(pages(1, [1, 2]))
    dest.receiver.receive(pages(2, [], zero_pages=np.array([1], np.uint32), payload=b""))
    assert dest.receiver.stats() == {
        "status": "receiving",
        "batches": 2,
        "pages": 3,
        "payload-bytes": 2 * PAGE,
        "reason": "",
    }


def test_an_empty_expected_token_is_refused_at_construction() -> None:
    with pytest.raises(ValueError, match="non-empty token"):
        MigrationReceiver(memoryview(bytearray(PAGE)), token=b"", config_hash=CONFIG, restore=print)


def message_strategy() -> st.SearchStrategy[object]:
    numbers = st.lists(st.integers(-5, PAGES + 5), max_size=6).map(
        lambda xs: np.array(xs, dtype=np.int64)
    )
    payload = st.one_of(
        st.binary(max_size=3 * PAGE),
        st.integers(0, 3).map(lambda n: bytes([7]) * (n * PAGE)),
        st.integers(1, 3).map(lambda n: compress(Encoding.LZ4, bytes([9]) * (n * PAGE))),
        st.integers(1, 3).map(lambda n: compress(Encoding.ZSTD, bytes([9]) * (n * PAGE))),
    )
    batches = st.builds(
        Pages,
        seq=st.integers(0, 4),
        round=st.integers(-1, 3),
        encoding=st.sampled_from(["raw", "zstd", "lz4", "?"]),
        page_numbers=numbers,
        zero_pages=numbers,
        payload=payload,
    )
    return st.one_of(
        batches,
        batches,
        batches,
        st.just(good_hello()),
        st.builds(good_hello, ram_size=st.integers(0, 2**64)),
        st.builds(DeviceState, st.one_of(st.binary(max_size=64), st.just(msgpack.packb({})))),
        st.builds(Complete, st.integers(0, 2**64 - 1)),
        st.builds(Abort, st.text(max_size=10)),
        st.just(Ack(0, 1)),
    )


@settings(max_examples=200, deadline=None)
@given(messages=st.lists(message_strategy(), max_size=8))
def test_no_stream_makes_the_receiver_raise_or_write_out_of_bounds(
    messages: list[object],
) -> None:
    dest = Destination()
    ended = False
    for message in messages:
        actions = dest.receiver.receive(message)
        assert isinstance(actions, list)
        if ended:
            assert actions == []  # once over (whichever way), the stream is ignored
        ended = dest.receiver.finished
        assert dest.guards_intact()
    if dest.receiver.phase != "resumed":
        assert dest.restored == []
