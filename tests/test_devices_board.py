"""The board's run loop as the VM layer drives it: slice results, reset, idle, save/restore."""

from __future__ import annotations

from pathlib import Path

import msgpack
import pytest
from elfgen import finisher_guest, make_elf, program, spin_guest

from vmcore.board import Machine, MachineConfig

ROOT = Path(__file__).resolve().parent.parent
TICKER = ROOT / "guests" / "build" / "ticker.elf"
WFI = 0x10500073


def machine_for(tmp_path: Path, elf: bytes, **kw: object) -> tuple[Machine, bytearray]:
    path = tmp_path / "guest.elf"
    path.write_bytes(elf)
    out = bytearray()
    return Machine(MachineConfig(kernel=str(path), **kw), console=out.extend), out  # type: ignore[arg-type]


def test_budget_is_respected_and_reported(tmp_path: Path) -> None:
    m, _ = machine_for(tmp_path, spin_guest())
    result = m.run_slice(5000)
    assert result.reason == "budget"
    assert 5000 <= result.retired < 5000 + 64


def test_poweroff_and_fail_end_the_run_for_good(tmp_path: Path) -> None:
    m, _ = machine_for(tmp_path, finisher_guest(0x5555))
    assert m.run_slice(10_000).reason == "poweroff"
    assert m.run_slice(10_000).retired == 0
    m2, _ = machine_for(tmp_path, finisher_guest((9 << 16) | 0x3333))
    result = m2.run_slice(10_000)
    assert (result.reason, result.exit_code) == ("fail", 9)


def test_reset_reboots_from_the_boot_rom(tmp_path: Path) -> None:
    m, _ = machine_for(tmp_path, finisher_guest(0x7777))
    first = m.run_slice(10_000)
    assert first.reason == "reset"
    m.reset()
    second = m.run_slice(10_000)
    assert second.reason == "reset"
    assert second.retired == first.retired


def test_wfi_without_a_timer_is_idle_with_no_deadline(tmp_path: Path) -> None:
    code = program(WFI, 0x0000006F)
    m, _ = machine_for(tmp_path, make_elf([(0x8000_0000, code, len(code))]))
    result = m.run_slice(10_000)
    assert result.reason == "idle"
    assert result.idle_until is None


def _run_to_end(m: Machine) -> tuple[str, int]:
    retired = 0
    while True:
        result = m.run_slice(100_000)
        retired += result.retired
        if result.reason != "budget":
            return result.reason, retired


@pytest.mark.skipif(not TICKER.exists(), reason="guest images not built")
def test_deterministic_save_restore_continues_byte_for_byte() -> None:
    config = MachineConfig(kernel=str(TICKER), append="ticks=4", deterministic=True)
    whole_out = bytearray()
    whole = Machine(config, console=whole_out.extend)
    reason, total = _run_to_end(whole)
    assert reason == "poweroff"

    first_out = bytearray()
    first = Machine(config, console=first_out.extend)
    done = 0
    while done < total // 2:
        result = first.run_slice(min(7_777, total // 2 - done))
        assert result.reason in ("budget", "idle")
        done += result.retired
    state = msgpack.unpackb(
        msgpack.packb({"board": first.save(), "hart": first.hart.save()}), strict_map_key=False
    )
    second_out = bytearray()
    second = Machine(config, console=second_out.extend, boot=False)
    second.ram.view[:] = first.ram.view
    second.hart.restore(state["hart"])
    second.restore(state["board"])
    assert _run_to_end(second)[0] == "poweroff"
    assert b"tick " in first_out and b"tick " in second_out
    assert bytes(first_out + second_out) == bytes(whole_out)


def test_restore_refuses_a_different_board(tmp_path: Path) -> None:
    m, _ = machine_for(tmp_path, spin_guest())
    state = m.save()
    other, _ = machine_for(tmp_path, spin_guest(), memory=64 << 20)
    with pytest.raises(ValueError, match="128M of RAM, this one 64M"):
        other.restore(state)
    det, _ = machine_for(tmp_path, spin_guest(), deterministic=True)
    with pytest.raises(ValueError, match="real-time"):
        det.restore(state)


def test_reset_does_not_turn_deterministic_time_back(tmp_path: Path) -> None:
    m, _ = machine_for(tmp_path, finisher_guest(0x7777), deterministic=True)
    m.run_slice(10_000)
    before = m.clock.mtime()
    assert before > 0
    m.reset()
    assert m.clock.mtime() == before
    m.run_slice(10_000)
    assert m.clock.mtime() > before
