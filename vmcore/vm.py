"""A VM: one ``Machine`` with a lifecycle, a saveable state, and snapshots.

The VM is what the outside world drives (``ferry-vm``, the node's worker process, a
migration): it owns the state machine so that every caller gets the same, explicit answer
to "can I do this now?" instead of each host loop inventing its own flags::

    created ──start──► running ◄──resume── paused
                          │  └────pause────►  │
                          └──────stop─────────┴──► stopped
    incoming ──load_state──► paused        (any) ──emulator error──► failed

A guest that powers off (or fails through the test finisher) moves the VM to ``stopped``
with its exit code; only a fault of Ferry itself makes a VM ``failed``.

``save_state()`` is the single path for snapshots and migration (the pattern of
Firecracker's ``Persist``): board and device dicts from ``Machine.save()``, the hart's own
dict, and the config they belong to. RAM travels separately (a snapshot's page table, or a
migration's page stream).
"""

from __future__ import annotations

import enum
import hashlib
import os
import time
from dataclasses import dataclass
from typing import Any

import msgpack

from vmcore.board import Console, Machine, MachineConfig, TraceLog
from vmcore.clock import TIMEBASE_HZ
from vmcore.memory import DirtyLog, GuestRAM
from vmcore.snapshot import SnapshotError, read_snapshot, write_snapshot

VMConfig = MachineConfig
"""A VM's hardware and boot description (memory, kernel, bios, append, deterministic)."""

_STATE_VERSION = 1


class VMState(enum.StrEnum):
    CREATED = "created"
    RUNNING = "running"
    PAUSED = "paused"
    STOPPED = "stopped"
    INCOMING = "incoming"
    FAILED = "failed"


class VMStateError(Exception):
    """An operation the VM's current state does not allow (e.g. resuming a stopped VM)."""


class VMFailure(Exception):
    """The emulator itself failed while running the guest; the VM is now ``failed``."""


_ALLOWED: dict[str, set[VMState]] = {
    "start": {VMState.CREATED},
    "pause": {VMState.RUNNING},
    "resume": {VMState.PAUSED},
    "stop": {VMState.CREATED, VMState.RUNNING, VMState.PAUSED, VMState.INCOMING},
    "run": {VMState.RUNNING},
    "load_state": {VMState.INCOMING},
    "save_state": {VMState.PAUSED, VMState.CREATED, VMState.STOPPED},
}


@dataclass(frozen=True)
class SliceResult:
    """What one ``VM.run_slice`` did.

    ``reason``: "budget" (ran the whole budget), "idle" (the guest waits for an interrupt;
    ``idle_seconds`` says how long until its timer fires, None if only input can wake it),
    "poweroff", "fail" (guest failure code in ``exit_code``) or "reset" (the guest rebooted).
    """

    retired: int
    reason: str
    idle_seconds: float | None = None
    exit_code: int | None = None


def config_hash(config: VMConfig) -> str:
    """A stable digest of the hardware a saved state belongs to (migration's Hello)."""
    canonical = msgpack.packb(sorted(config.to_dict().items()), use_bin_type=True)
    return hashlib.sha256(canonical).hexdigest()


class VM:
    """One virtual machine. ``console`` receives the guest's UART output."""

    def __init__(
        self,
        config: VMConfig,
        console: Console | None = None,
        *,
        trace: TraceLog | None = None,
        incoming: bool = False,
    ) -> None:
        """Build and load the VM (raises ``LoaderError`` for a bad image or config).

        With ``incoming``, RAM stays zero and nothing is loaded: the VM waits for state from
        a migration or a snapshot (``load_state``).
        """
        self.config = config
        self.machine = Machine(config, console, trace=trace, boot=not incoming)
        self.state = VMState.INCOMING if incoming else VMState.CREATED
        self.exit_code: int | None = None
        self.failure: str | None = None
        self._run_wall = 0.0
        self._run_retired = 0

    # -- lifecycle -----------------------------------------------------------------------

    def _require(self, action: str) -> None:
        if self.state not in _ALLOWED[action]:
            raise VMStateError(f"cannot {action.replace('_', ' ')} a VM that is {self.state.value}")

    def start(self) -> None:
        self._require("start")
        self.state = VMState.RUNNING

    def pause(self) -> None:
        """Stop the vCPU between slices; guest time freezes with it."""
        self._require("pause")
        self.machine.pause()
        self.state = VMState.PAUSED

    def resume(self) -> None:
        self._require("resume")
        self.machine.resume()
        self.state = VMState.RUNNING

    def stop(self) -> None:
        """Stop for good (the host's power button held down)."""
        self._require("stop")
        self.machine.pause()
        self.state = VMState.STOPPED

    def fail(self, reason: str) -> None:
        """Mark the VM failed (an emulator fault, or a restore that cannot complete)."""
        self.machine.pause()
        self.state = VMState.FAILED
        self.failure = reason

    def request_poweroff(self) -> bool:
        """Ask the guest to shut down. The ``virt`` board has no power button that a bare
        guest listens to, so this returns False and the caller forces ``stop`` after its
        grace period."""
        return False

    # -- running -------------------------------------------------------------------------

    def run_slice(self, max_instructions: int) -> SliceResult:
        """Run the vCPU for at most ``max_instructions``, then return to the host loop."""
        self._require("run")
        started = time.perf_counter()
        try:
            result = self.machine.run_slice(max_instructions)
        except Exception as e:  # an emulator bug must not take the host process down
            self.fail(f"emulator error at pc={self.machine.hart.pc:#x}: {type(e).__name__}: {e}")
            raise VMFailure(self.failure) from e
        self._run_wall += time.perf_counter() - started
        self._run_retired += result.retired
        if result.reason in ("poweroff", "fail"):
            self.exit_code = 0 if result.reason == "poweroff" else result.exit_code
            self.machine.pause()
            self.state = VMState.STOPPED
            return SliceResult(result.retired, result.reason, exit_code=self.exit_code)
        if result.reason == "reset":
            self.machine.reset()
            return SliceResult(result.retired, "reset")
        if result.reason == "idle":
            idle = None
            if result.idle_until is not None:
                idle = self.machine.seconds_until(result.idle_until)
            return SliceResult(result.retired, "idle", idle_seconds=idle)
        return SliceResult(result.retired, "budget")

    def send_input(self, data: bytes) -> None:
        """Bytes typed at the guest's console (into the UART's receive FIFO)."""
        self.machine.uart.feed(data)

    # -- memory, for migration -------------------------------------------------------------

    @property
    def ram(self) -> GuestRAM:
        return self.machine.ram

    @property
    def dirty_log(self) -> DirtyLog:
        return self.machine.ram.dirty_log

    # -- state -----------------------------------------------------------------------------

    def save_state(self) -> dict[str, Any]:
        """Everything but RAM, as a msgpack-serialisable dict; the VM must not be running."""
        self._require("save_state")
        return {
            "version": _STATE_VERSION,
            "config": self.config.to_dict(),
            "config_hash": config_hash(self.config),
            "machine": self.machine.save(),
            "hart": self.machine.hart.save(),
            "exit_code": self.exit_code,
        }

    def load_state(self, state: dict[str, Any]) -> None:
        """Take over saved state (RAM already in place); the VM ends up ``paused``.

        A state from another board config or schema is refused with a clear ValueError,
        and the VM is left ``incoming``, untouched by the refused state.
        """
        self._require("load_state")
        if not isinstance(state, dict) or state.get("version") != _STATE_VERSION:
            version = state.get("version") if isinstance(state, dict) else None
            raise ValueError(
                f"VM state version {version!r} is not supported (this Ferry reads {_STATE_VERSION})"
            )
        if state.get("config_hash") != config_hash(self.config):
            raise ValueError("saved VM state belongs to a different board configuration")
        # The hart first: the devices then drive its interrupt lines from their restored
        # state. The other way round, the hart's saved mip would overwrite a line that a
        # device raised on restore (a CLINT deadline that passed after the last check
        # before the save) while the device believes it raised it: the interrupt is lost.
        self.machine.hart.restore(state["hart"])
        self.machine.restore(state["machine"])
        self.machine.pause()
        self.exit_code = state.get("exit_code")
        self.state = VMState.PAUSED

    # -- snapshots -------------------------------------------------------------------------

    def snapshot(self, path: str | os.PathLike[str]) -> int:
        """Write config, device state and RAM to ``path``; returns the file size.

        A running VM is paused for the write and keeps running afterwards.
        """
        was_running = self.state is VMState.RUNNING
        if was_running:
            self.pause()
        try:
            ram = self.machine.ram
            return write_snapshot(path, self.save_state(), ram.view, ram.never_written())
        finally:
            if was_running:
                self.resume()

    @classmethod
    def restore_snapshot(
        cls,
        path: str | os.PathLike[str],
        console: Console | None = None,
        *,
        trace: TraceLog | None = None,
    ) -> VM:
        """A paused VM rebuilt from a snapshot file, checked whole before anything is used."""
        snap = read_snapshot(path)
        try:
            config = VMConfig.from_dict(snap.state["config"])
        except (KeyError, TypeError, ValueError):
            raise SnapshotError(f"{path}: snapshot has no valid VM config") from None
        vm = cls(config, console, trace=trace, incoming=True)
        snap.apply_ram(vm.machine.ram.view)
        try:
            vm.load_state(snap.state)
        except (KeyError, TypeError, ValueError) as e:
            raise SnapshotError(f"{path}: {e}") from None
        return vm

    # -- observation -----------------------------------------------------------------------

    def stats(self) -> dict[str, Any]:
        """Counters a user watches: state, instructions, speed, guest time."""
        hart = self.machine.hart
        return {
            "state": self.state.value,
            "instret": int(hart.instret),
            "mips": (self._run_retired / self._run_wall / 1e6) if self._run_wall else 0.0,
            "guest_seconds": self.machine.clock.mtime() / TIMEBASE_HZ,
            "exit_code": self.exit_code,
            "failure": self.failure,
        }

