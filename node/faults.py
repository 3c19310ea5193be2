"""Fault injection for migration tests (FOR TESTS ONLY): ``FERRY_FAULT=<side>:<action>:<point>``.

The "never lose a VM" promise is about what happens when a process dies or a stream breaks
at one precise moment of a migration, and the only honest way to test that is to make real
worker processes fail at those moments. A worker reads ``FERRY_FAULT`` from its
environment once (the agent passes its own environment on, so setting it on a test's
ferry-node applies to every worker that node starts) and fires the fault the first time it
reaches the named point. Unset, nothing here does anything. Never set it in production.

* ``side``: ``src`` (the worker sending a VM) or ``dst`` (the worker receiving one).
* ``action``: ``kill`` (the worker dies at once, as under SIGKILL; on the source its
  migration process with it), ``stall`` (the worker's migration stream stops reading and
  answering, forever), ``drop`` (the stream is cut; the worker lives on), ``corrupt``
  (``dst`` only: one byte of the batch's first page is flipped on arrival, as if damaged
  in flight), ``kill-helper`` (``src`` only: the migration process, which runs the
  source's side of the stream apart from the worker, dies at once; the worker lives on).

The source's points fire in its migration process (:mod:`node.migration_process`), which
inherits the worker's environment.
* ``point``: ``hello`` (the Hello), ``round0`` (the first batch of round 0), ``round1`` (the
  first batch of a later round), ``switchover`` (``src``: the vCPU has just paused for the
  switchover; ``dst``: the device state arrived), ``complete`` (the final message), and
  ``resumed`` (``dst`` only: ``Resumed`` is sent and the guest runs here). The source
  fires just before it sends the point's message (a dropped stream never carries it); the
  destination as the message arrives, before it is applied.
"""

from __future__ import annotations

import os
import signal
import time
from dataclasses import dataclass, field

SIDES = ("src", "dst")
ACTIONS = ("kill", "stall", "drop", "corrupt", "kill-helper")
POINTS = ("hello", "round0", "round1", "switchover", "complete", "resumed")


@dataclass
class Fault:
    side: str
    action: str
    point: str
    fired: bool = field(default=False)

    def at(self, side: str, point: str, worker_pid: int = 0) -> str | None:
        """The action to take if this is the fault's moment (once), else None.

        ``worker_pid``: called in a migration process, the worker it serves, which ``kill``
        takes down first.
        """
        if self.fired or side != self.side or point != self.point:
            return None
        self.fired = True
        if self.action == "kill" and worker_pid:
            os.kill(worker_pid, signal.SIGKILL)
        if self.action in ("kill", "kill-helper"):
            os.kill(os.getpid(), signal.SIGKILL)
        if self.action == "stall":
            while True:
                time.sleep(3600)
        return self.action


def from_environment() -> Fault | None:
    """The fault ``FERRY_FAULT`` asks for; a malformed value is ignored with no effect."""
    value = os.environ.get("FERRY_FAULT", "")
    parts = value.split(":")
    if len(parts) != 3 or parts[0] not in SIDES or parts[1] not in ACTIONS:
        return None
    if parts[2] not in POINTS:
        return None
    return Fault(parts[0], parts[1], parts[2])
