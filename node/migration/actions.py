"""What the migration state machines ask their driver (the VMM worker) to do.

The state machines perform no I/O and never touch the VM except through RAM reads (sender)
and writes (receiver). Everything else is returned as an action, to be carried out **in
order, before the state machine is called again**: the sender relies on that (for instance
it fetches the final dirty set right after :class:`PauseVM`, trusting the vCPU is stopped).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from node.migration.messages import Message


@dataclass(frozen=True)
class SendMessage:
    """Send ``message`` on the migration stream."""

    message: Message


@dataclass(frozen=True)
class PauseVM:
    """Stop the source vCPU (switchover begins; downtime starts now)."""


@dataclass(frozen=True)
class ResumeVM:
    """Run the source vCPU again: the migration failed or was cancelled after a pause."""


@dataclass(frozen=True)
class SetThrottle:
    """Slow the vCPU to ``100 - percent`` % of its speed (auto-converge); 0 lifts it."""

    percent: int


@dataclass(frozen=True)
class Completed:
    """The destination runs the guest. The source must never run this VM again.

    ``paused_at`` is the source's clock when the vCPU stopped, ``resumed_at`` the
    destination's clock when its guest started; both are reported because the two clocks
    are only comparable when both ends share a host.
    """

    stats: dict[str, Any] = field(default_factory=dict)
    paused_at: float = 0.0
    resumed_at: float = 0.0


@dataclass(frozen=True)
class Cancelled:
    """Stopped by request or by policy; the source VM runs on, untouched."""

    reason: str


@dataclass(frozen=True)
class Failed:
    """Stopped by a fault; the source VM runs on, untouched."""

    reason: str


@dataclass(frozen=True)
class OutcomeUnknown:
    """The stream broke after the final message: the destination may or may not run the guest.

    The source VM stays paused. Only the coordinator (which asks the destination, and owns
    the VM's generation number) can decide whether to resume it or discard it; resuming it
    blindly could leave two running copies.
    """

    reason: str


@dataclass(frozen=True)
class DiscardVM:
    """Receiver: throw the incoming VM away (refused, aborted or invalid input)."""

    reason: str


@dataclass(frozen=True)
class GuestRunning:
    """Receiver: the migrated guest runs here now; the migration is over."""


Action = (
    SendMessage
    | PauseVM
    | ResumeVM
    | SetThrottle
    | Completed
    | Cancelled
    | Failed
    | OutcomeUnknown
    | DiscardVM
    | GuestRunning
)
