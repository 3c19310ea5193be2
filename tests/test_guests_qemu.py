"""Each committed guest image, run on QEMU, does what tests and benchmarks rely on.

QEMU is the reference machine: an image that misbehaves here is a broken image,
not a Ferry bug. The same images and expectations later run on Ferry.
"""

from __future__ import annotations

import itertools
import re

import pytest
from qemu import OPENSBI_FW_JUMP, guest_image, isa_programs, qemu_available, run_qemu

pytestmark = pytest.mark.skipif(not qemu_available(), reason="qemu-system-riscv64 not installed")

TICK = re.compile(r"^tick (\d+) sum=0x([0-9a-f]{16})$", re.MULTILINE)


def test_hello_prints_its_line_and_passes() -> None:
    status, output = run_qemu(guest_image("hello"))
    assert status == 0, output
    assert output == "Hello from a Ferry guest!\n"


def mix64(x: int) -> int:
    """The guests' mixing function (lib/mix.h), to predict their sums."""
    m = (1 << 64) - 1
    x ^= x >> 30
    x = (x * 0xBF58476D1CE4E5B9) & m
    x ^= x >> 27
    x = (x * 0x94D049BB133111EB) & m
    return x ^ (x >> 31)


def ticks(output: str) -> list[tuple[int, int]]:
    return [(int(n), int(s, 16)) for n, s in TICK.findall(output)]


def test_ticker_prints_deterministic_ticks_then_passes() -> None:
    status, output = run_qemu(guest_image("ticker"), append="ticks=5")
    assert status == 0, output
    expected, total = [], 0
    for n in range(5):
        total = mix64(total ^ (n + 0x9E3779B97F4A7C15))
        expected.append((n, total))
    assert ticks(output) == expected
    assert output.endswith("ticker: done after 5 ticks\n")


def test_boot_arguments_are_matched_by_whole_key() -> None:
    # Real command lines carry other words; "xticks=9" must not read as "ticks=9".
    status, output = run_qemu(guest_image("ticker"), append="console=ttyS0 xticks=9 ticks=2 quiet")
    assert status == 0, output
    assert [n for n, _ in ticks(output)] == [0, 1]


@pytest.mark.parametrize(("rate", "shown"), [("1000", "1000/ms"), ("max", "max")])
def test_dirtier_sum_changes_every_tick_when_writing(rate: str, shown: str) -> None:
    status, output = run_qemu(guest_image("dirtier"), append=f"wss=16 rate={rate} ticks=5")
    assert status == 0, output
    assert output.startswith(f"dirtier: wss=16MiB pages=4096 rate={shown} hot=1.0\n")
    got = ticks(output)
    assert [n for n, _ in got] == list(range(5))
    sums = [s for _, s in got]
    assert all(a != b for a, b in itertools.pairwise(sums)), output


def test_dirtier_sum_is_constant_when_idle() -> None:
    status, output = run_qemu(guest_image("dirtier"), append="wss=16 rate=0 ticks=5")
    assert status == 0, output
    got = ticks(output)
    assert [n for n, _ in got] == list(range(5))
    assert len({s for _, s in got}) == 1


def test_dirtier_reads_fraction_and_run_time() -> None:
    status, output = run_qemu(guest_image("dirtier"), append="wss=2 rate=5 hot=0.25 time=1")
    assert status == 0, output
    assert output.startswith("dirtier: wss=2MiB pages=512 rate=5/ms hot=0.25\n")
    assert [n for n, _ in ticks(output)] == list(range(10))


def test_dirtier_catches_a_corrupted_page() -> None:
    status, output = run_qemu(guest_image("dirtier"), append="wss=4 rate=10 ticks=3 corrupt=1000")
    assert status == 3, output
    assert "dirtier: CORRUPT page 1000 " in output


def test_dirtier_refuses_a_working_set_larger_than_ram() -> None:
    status, output = run_qemu(guest_image("dirtier"), append="wss=200", memory="128M")
    assert status == 2, output
    assert "dirtier: wss=200MiB does not fit in RAM" in output


def test_cpubench_prints_result_and_instruction_count() -> None:
    status, output = run_qemu(guest_image("cpubench"), append="n=1")
    assert status == 0, output
    assert re.search(r"^cpubench: result=0x[0-9a-f]{16} instret=\d+$", output, re.MULTILINE)


@pytest.mark.parametrize("name", isa_programs())
def test_isa_program_passes(name: str) -> None:
    status, output = run_qemu(guest_image(f"isa/{name}"))
    assert (status, output) == (0, f"PASS {name}\n")


@pytest.mark.parametrize("name", isa_programs())
def test_isa_program_passes_without_floating_point(name: str) -> None:
    # Ferry's hart is RV64IMAC: the programs must also hold where misa has no F or D.
    status, output = run_qemu(
        guest_image(f"isa/{name}"), extra_args=["-cpu", "rv64,f=false,d=false"]
    )
    assert (status, output) == (0, f"PASS {name}\n")


def test_sbi_hello_runs_under_opensbi_and_shuts_down() -> None:
    if not OPENSBI_FW_JUMP.exists():
        pytest.skip(f"{OPENSBI_FW_JUMP} not installed")
    status, output = run_qemu(guest_image("sbi-hello"), bios=OPENSBI_FW_JUMP)
    assert status == 0, output
    lines = [line for line in output.splitlines() if line.startswith("sbi-hello:")]
    assert lines[0] == "sbi-hello: S-mode payload on hart 0"
    assert re.fullmatch(r"sbi-hello: SBI specification \d+\.\d+", lines[1])
    assert re.fullmatch(r"sbi-hello: extensions TIME=yes .* SRST=yes DBCN=(yes|no)", lines[2])
    assert lines[4:] == [
        "sbi-hello: timer interrupt 1",
        "sbi-hello: timer interrupt 2",
        "sbi-hello: timer interrupt 3",
        "sbi-hello: shutting down through SRST",
    ]
