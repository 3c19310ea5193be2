"""Test finisher, boot ROM and guest clock."""

from __future__ import annotations

import shutil
import subprocess
import time
from pathlib import Path

import pytest

from vmcore.clock import GuestClock
from vmcore.devices.bootrom import BootRom, reset_vector
from vmcore.devices.finisher import FinisherEvent, TestFinisher


def test_finisher_reports_pass_fail_and_reset() -> None:
    events: list[FinisherEvent] = []
    f = TestFinisher(events.append)
    f.write(0, 4, 0x5555)
    f.write(0, 4, (42 << 16) | 0x3333)
    f.write(0, 4, 0x7777)
    f.write(0, 4, 0x1234)
    assert events == [
        FinisherEvent("poweroff"),
        FinisherEvent("fail", 42),
        FinisherEvent("reset"),
    ]


def test_bootrom_holds_entry_and_dtb_words() -> None:
    rom = BootRom(0x8020_0000, 0x87E0_0000)
    assert rom.read(24, 8) == 0x8020_0000
    assert rom.read(32, 8) == 0x87E0_0000
    assert rom.read(0, 4) == 0x00000297  # auipc t0, 0
    assert rom.read(40, 8) == 0x4942534F  # fw_dynamic_info magic, where a2 points


@pytest.mark.skipif(shutil.which("riscv64-unknown-elf-objdump") is None, reason="no objdump")
def test_bootrom_disassembles_to_the_documented_sequence(tmp_path: Path) -> None:
    path = tmp_path / "rom.bin"
    path.write_bytes(reset_vector(0x8000_0000, 0x87E0_0000))
    out = subprocess.run(
        ["riscv64-unknown-elf-objdump", "-b", "binary", "-m", "riscv:rv64", "-D", str(path)],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    for expected in ("auipc\tt0,0x0", "ld\ta1,32(t0)", "a2,t0,40", "ld\tt0,24(t0)", "jr\tt0"):
        assert expected in out
    assert "mhartid" in out


def test_real_time_clock_freezes_while_paused_and_survives_restore() -> None:
    clock = GuestClock()
    assert clock.mtime() == 0
    clock.resume()
    time.sleep(0.002)
    clock.pause()
    frozen = clock.mtime()
    assert frozen > 0
    time.sleep(0.002)
    assert clock.mtime() == frozen
    clone = GuestClock()
    clone.restore(clock.save())
    assert clone.mtime() == frozen
    clone.resume()
    assert clone.mtime() >= frozen


def test_deterministic_clock_counts_instructions_across_restore() -> None:
    instret = [1000]
    clock = GuestClock(deterministic=True)
    clock.instret = lambda: instret[0]
    clock.skip_to(5000)
    assert clock.mtime() == 5000
    state = clock.save()
    # A restored hart brings back its own instret; time continues from the saved tick.
    other_instret = [0]
    clone = GuestClock(deterministic=True)
    clone.instret = lambda: other_instret[0]
    clone.restore(state)
    other_instret[0] = 1000
    assert clone.mtime() == 5000
    other_instret[0] = 1010
    assert clone.mtime() == 5010
    with pytest.raises(ValueError, match="real-time"):
        clone.restore(GuestClock().save())


def test_finisher_accepts_opensbi_halfword_poweroff() -> None:
    events: list[FinisherEvent] = []
    TestFinisher(events.append).write(0, 2, 0x5555)
    assert events == [FinisherEvent("poweroff")]
