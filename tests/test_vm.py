"""The VM lifecycle and the save/restore path that snapshots and migration share."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from vmcore.snapshot import SnapshotError
from vmcore.vm import VM, VMConfig, VMState, VMStateError

GUESTS = Path(__file__).resolve().parent.parent / "guests" / "build"


def run_to_end(vm: VM, budget: int = 50_000_000) -> None:
    spent = 0
    while vm.state is VMState.RUNNING and spent < budget:
        spent += vm.run_slice(200_000).retired


def collect(vm_factory: type[VM] = VM, **kw: object) -> tuple[VM, bytearray]:
    out = bytearray()
    cfg = VMConfig(**kw)  # type: ignore[arg-type]
    return vm_factory(cfg, out.extend), out


def test_hello_powers_off_and_stops() -> None:
    vm, out = collect(kernel=str(GUESTS / "hello.elf"), memory=16 << 20)
    assert vm.state is VMState.CREATED
    vm.start()
    run_to_end(vm)
    assert vm.state is VMState.STOPPED
    assert vm.exit_code == 0
    assert b"Hello" in out


def test_invalid_transitions_are_refused() -> None:
    vm, _ = collect(kernel=str(GUESTS / "hello.elf"), memory=16 << 20)
    with pytest.raises(VMStateError, match="cannot resume a VM that is created"):
        vm.resume()
    with pytest.raises(VMStateError, match="cannot run"):
        vm.run_slice(10)
    vm.start()
    vm.pause()
    with pytest.raises(VMStateError, match="cannot pause a VM that is paused"):
        vm.pause()
    vm.stop()
    with pytest.raises(VMStateError, match="cannot start a VM that is stopped"):
        vm.start()


def ticker_config(ticks: int) -> VMConfig:
    return VMConfig(
        kernel=str(GUESTS / "ticker.elf"), memory=16 << 20, append=f"ticks={ticks}",
        deterministic=True,
    )


def test_saved_state_continues_byte_for_byte(tmp_path: Path) -> None:
    whole = bytearray()
    vm = VM(ticker_config(6), whole.extend)
    vm.start()
    run_to_end(vm)
    assert vm.exit_code == 0

    first = bytearray()
    vm = VM(ticker_config(6), first.extend)
    vm.start()
    while b"tick 2" not in first:
        vm.run_slice(3_000)
    vm.pause()
    snap = tmp_path / "t.snap"
    vm.snapshot(snap)
    assert b"tick 5" not in first  # the snapshot really is mid-run

    rest = bytearray()
    restored = VM.restore_snapshot(snap, rest.extend)
    assert restored.state is VMState.PAUSED
    restored.resume()
    run_to_end(restored)
    assert restored.exit_code == 0
    assert bytes(first + rest) == bytes(whole)


def test_state_from_another_board_is_refused(tmp_path: Path) -> None:
    vm = VM(ticker_config(50))
    vm.start()
    vm.run_slice(2_000)
    vm.pause()
    state = vm.save_state()
    other = VM(VMConfig(kernel=None, memory=32 << 20, bios="none"), incoming=True)
    with pytest.raises(ValueError, match="different board"):
        other.load_state(state)
    assert other.state is VMState.INCOMING
    state["version"] = 99
    same = VM(ticker_config(50), incoming=True)
    with pytest.raises(ValueError, match="version 99"):
        same.load_state(state)


def test_corrupted_snapshot_restores_nothing(tmp_path: Path) -> None:
    vm = VM(ticker_config(50))
    vm.start()
    vm.run_slice(2_000)
    snap = tmp_path / "t.snap"
    vm.snapshot(snap)
    assert vm.state is VMState.RUNNING  # snapshotting a running VM leaves it running
    blob = bytearray(snap.read_bytes())
    blob[len(blob) // 2] ^= 0xFF
    snap.write_bytes(bytes(blob))
    with pytest.raises(SnapshotError, match="digest"):
        VM.restore_snapshot(snap)


def test_a_snapshot_leaves_ram_the_guest_never_wrote_unallocated(tmp_path: Path) -> None:
    """Guest RAM is shared memory, where reading a page never written allocates it: a
    snapshot must not turn a small guest's RAM into a fully allocated one."""
    config = VMConfig(kernel=str(GUESTS / "ticker.elf"), memory=64 << 20, append="ticks=3")
    vm = VM(config, bytearray().extend)
    vm.start()
    vm.run_slice(50_000)
    ram = vm.machine.ram
    before = os.fstat(ram.fd).st_blocks * 512
    assert before < 8 << 20  # the ticker touches a few hundred KiB of 64 MiB
    vm.snapshot(tmp_path / "t.snap")
    assert os.fstat(ram.fd).st_blocks * 512 == before
