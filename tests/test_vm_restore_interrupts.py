"""A restored VM sees the interrupts its devices hold pending, even ones nobody checked yet.

The board re-evaluates the CLINT's timer line between instruction chunks, so a VM can be
paused and saved after its ``mtimecmp`` deadline passed but before the line was raised:
the saved hart then has MTIP clear. The restored CLINT raises the line from the restored
time; if the hart's saved ``mip`` were loaded after that, the line would be lost for good
(the CLINT only signals changes), and a guest sleeping in WFI for that timer, as Linux's
idle loop does, would never wake on the destination of a migration.
"""

from __future__ import annotations

from pathlib import Path

from vmcore.vm import VM, VMConfig

GUESTS = Path(__file__).resolve().parent.parent / "guests" / "build"
MTIP = 1 << 7


def test_a_timer_deadline_passed_but_unchecked_at_save_interrupts_the_restored_hart() -> None:
    config = VMConfig(kernel=str(GUESTS / "ticker.elf"), memory=16 << 20)
    source = VM(config)
    source.start()
    source.run_slice(10_000)
    source.pause()
    # The deadline passes with no board check in between, as between two chunks.
    source.machine.clint.mtimecmp = source.machine.clock.mtime() - 1
    assert not source.machine.hart.mip & MTIP
    state = source.save_state()

    restored = VM(config, incoming=True)
    restored.ram.view[:] = source.ram.view
    restored.load_state(state)
    assert restored.machine.hart.mip & MTIP
    # And the line is consistent: the next check does not drop or re-raise it.
    restored.machine.clint.update()
    assert restored.machine.hart.mip & MTIP
