"""The migration core moving a real running VM (the `dirtier` guest) in one process.

No worker processes and no sockets: the sender reads the real guest RAM and dirty log
while the real vCPU runs between its steps, exactly the interleaving the worker does, and
the receiver fills a second, incoming VM. The guest is deterministic (time from retired
instructions), so a migrated run must print exactly the bytes of an unmigrated one; and
the dirtier checks its own pages, so a lost or stale page makes it fail with code 3.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

from node.migration import (
    Completed,
    Failed,
    MigrationOptions,
    MigrationReceiver,
    MigrationSender,
    PauseVM,
    ResumeVM,
    SendMessage,
)
from node.migration.actions import Action
from node.migration.messages import Message, Pages
from vmcore.vm import VM, VMConfig, VMState, config_hash

GUESTS = Path(__file__).resolve().parent.parent / "guests" / "build"
TOKEN = b"vm-test-token"
SLICE = 20_000


def dirtier_config() -> VMConfig:
    return VMConfig(
        kernel=str(GUESTS / "dirtier.elf"),
        memory=16 << 20,
        append="wss=1 rate=20 ticks=4",
        deterministic=True,
    )


def run_to_end(vm: VM) -> None:
    spent = 0
    while vm.state is VMState.RUNNING and spent < 100_000_000:
        spent += vm.run_slice(200_000).retired


def unmigrated_output() -> bytes:
    out = bytearray()
    vm = VM(dirtier_config(), out.extend)
    vm.start()
    run_to_end(vm)
    assert vm.exit_code == 0, out.decode()
    return bytes(out)


def migrate_mid_run(
    tamper: Callable[[Message], Message] = lambda m: m, compression: str = "auto"
) -> tuple[VM, VM, bytearray, bytearray, list[Action], MigrationSender]:
    """Start the dirtier, migrate it after its first tick; return both VMs and consoles."""
    config = dirtier_config()
    src_out, dst_out = bytearray(), bytearray()
    src = VM(config, src_out.extend)
    src.start()
    while b"tick 1" not in src_out:
        src.run_slice(SLICE)

    dst = VM(config, dst_out.extend, incoming=True)

    def restore(state: dict[str, Any]) -> None:
        dst.load_state(state)
        dst.resume()

    # Migration time is simulated (a guest slice costs 2 ms, the link moves 100 MB/s) so the
    # rounds, and the test's outcome, are the same on every machine.
    now = [0.0]

    def clock() -> float:
        return now[0]

    sender = MigrationSender(
        src.ram.view,
        src.dirty_log,
        src.save_state,
        token=TOKEN,
        config_hash=config_hash(config),
        # A tiny budget forces several rounds and the convergence ladder.
        options=MigrationOptions(
            max_downtime_ms=0.01, max_downtime_max_ms=1000, compression=compression
        ),
        clock=clock,
        compression_timer=clock,
    )
    receiver = MigrationReceiver(
        dst.ram.view, token=TOKEN, config_hash=config_hash(config), restore=restore
    )
    log: list[Action] = []
    replies: list[Message] = []

    def source_do(actions: list[Action]) -> None:
        for action in actions:
            log.append(action)
            if isinstance(action, SendMessage):
                if isinstance(action.message, Pages):
                    now[0] += len(action.message.payload) / 100e6
                for reply in receiver.receive(tamper(action.message)):
                    if isinstance(reply, SendMessage):
                        replies.append(reply.message)
            elif isinstance(action, PauseVM):
                src.pause()
            elif isinstance(action, ResumeVM):
                src.resume()

    source_do(sender.start())
    while not sender.finished:
        # As the worker does: send all that credit allows, give the guest a slice, then
        # read what the destination answered meanwhile.
        while actions := sender.poll():
            source_do(actions)
        if src.state is VMState.RUNNING:
            src.run_slice(SLICE)
            now[0] += 0.002
        while replies:
            source_do(sender.receive(replies.pop(0)))
    return src, dst, src_out, dst_out, log, sender


def test_a_migrated_dirtier_prints_exactly_what_an_unmigrated_one_does() -> None:
    src, dst, src_out, dst_out, log, sender = migrate_mid_run()
    assert isinstance(log[-1], Completed), log[-1]
    assert src.state is VMState.PAUSED  # and it is never resumed: the destination owns it
    assert b"tick 0" in src_out and b"dirtier: done" not in src_out
    run_to_end(dst)
    assert dst.exit_code == 0, dst_out.decode()
    assert bytes(src_out + dst_out) == unmigrated_output()
    # Pages dirtied while earlier rounds ran were found by the dirty log and resent.
    assert len(sender.rounds) > 1
    assert sum(r.pages for r in sender.rounds[1:]) > 0
    assert sender.stats()["dirty-sync-count"] == len(sender.rounds) + 1


def test_a_page_corrupted_in_flight_leaves_the_dirtier_running_on_the_source() -> None:
    flipped: list[int] = []

    def flip_once(msg: Message) -> Message:
        # Round 0's first page holds the guest's code, which is never dirtied and resent.
        if isinstance(msg, Pages) and msg.round == 0 and not flipped:
            payload = bytearray(msg.payload)
            payload[100] ^= 0x80
            flipped.append(msg.seq)
            return Pages(
                msg.seq, msg.round, msg.encoding, msg.page_numbers, msg.zero_pages, bytes(payload)
            )
        return msg

    src, dst, src_out, dst_out, log, _ = migrate_mid_run(flip_once, compression="none")
    assert flipped
    end = log[-1]
    assert isinstance(end, Failed) and "memory digest mismatch" in end.reason
    assert src.state is VMState.RUNNING and dst.state is VMState.INCOMING
    run_to_end(src)
    assert src.exit_code == 0, src_out.decode()
    assert bytes(src_out) == unmigrated_output()
    assert dst_out == b""
