"""Migrations run in memory, for tests and benches: the sender's and the receiver's messages
passed by hand, no stream between them, and the dirty log of a guest that writes nothing."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from node.migration import Action, MigrationReceiver, MigrationSender, Pages, SendMessage, wire


class IdleDirtyLog:
    """An idle guest's dirty log: nothing is ever dirty."""

    def enable(self) -> None: ...

    def disable(self) -> None: ...

    def fetch_and_reset(self) -> np.ndarray:
        return np.zeros(0, dtype=np.int64)


@dataclass
class InMemoryRun:
    """What a migration run in memory produced: the page batches the sender sent, and its
    actions other than sending (pause, resume, the outcome ...)."""

    sent: list[Pages] = field(default_factory=list)
    ending: list[Action] = field(default_factory=list)


def migrate_in_memory(
    sender: MigrationSender, receiver: MigrationReceiver, *, through_wire: bool = False
) -> InMemoryRun:
    """Run a migration to its end. ``through_wire``: each source message is serialised and
    parsed back as the stream would carry it, so the receiver sees what a peer would."""
    run = InMemoryRun()

    def take(actions: list[Action]) -> list[object]:
        messages: list[object] = []
        for action in actions:
            if isinstance(action, SendMessage):
                messages.append(action.message)
            else:
                run.ending.append(action)
        return messages

    inbox = take(sender.start())
    while not sender.finished:
        replies: list[object] = []
        for message in inbox:
            if isinstance(message, Pages):
                run.sent.append(message)
            if through_wire:
                message = wire.decode_source(wire.encode_source(message))  # type: ignore[arg-type]
            replies += [a.message for a in receiver.receive(message) if isinstance(a, SendMessage)]
        inbox = []
        for reply in replies:
            inbox += take(sender.receive(reply))  # type: ignore[arg-type]
        while actions := sender.poll():
            inbox += take(actions)
    return run
