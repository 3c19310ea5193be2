"""``ferry-vm`` as a user drives it: exit statuses, console in and out, and bad inputs."""

from __future__ import annotations

import os
import pty
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from elfgen import (
    EM_X86_64,
    T0,
    T1,
    addi,
    echo_guest,
    finisher_guest,
    jal,
    lui,
    make_elf,
    program,
    sb,
    spin_guest,
)

from vmcore.cli import main
from vmcore.sizes import format_size, parse_size

ROOT = Path(__file__).resolve().parent.parent
HELLO = ROOT / "guests" / "build" / "hello.elf"
TICKER = ROOT / "guests" / "build" / "ticker.elf"
SBI_HELLO = ROOT / "guests" / "build" / "sbi-hello.elf"


def ferry_vm(
    *args: str, stdin: bytes | None = None, timeout: float = 120
) -> subprocess.CompletedProcess[bytes]:
    return subprocess.run(
        [sys.executable, "-m", "vmcore.cli", *args],
        input=stdin,
        stdin=None if stdin is not None else subprocess.DEVNULL,
        capture_output=True,
        timeout=timeout,
        cwd=ROOT,
        check=False,
    )


def image(tmp_path: Path, name: str, data: bytes) -> str:
    path = tmp_path / name
    path.write_bytes(data)
    return str(path)


@pytest.mark.parametrize(
    ("text", "size"),
    [
        ("64M", 64 << 20),
        ("1G", 1 << 30),
        ("128MiB", 128 << 20),
        ("512k", 512 << 10),
        ("256", 256 << 20),
    ],
)
def test_sizes_parse(text: str, size: int) -> None:
    assert parse_size(text) == size


@pytest.mark.parametrize("text", ["12Q", "", "M", "-1M", "1.5G", "64MX"])
def test_nonsense_sizes_rejected(text: str) -> None:
    with pytest.raises(ValueError, match="invalid size"):
        parse_size(text)


def test_format_size() -> None:
    assert format_size(128 << 20) == "128M"
    assert format_size(4097) == "4097B"


@pytest.mark.skipif(not HELLO.exists(), reason="guest images not built")
def test_hello_prints_and_exits_zero() -> None:
    done = ferry_vm("run", "--kernel", str(HELLO), "--bios", "none")
    assert done.returncode == 0, done.stderr.decode()
    assert done.stdout == b"Hello from a Ferry guest!\r\n"  # the guest writes CRLF


def test_guest_fail_code_is_the_exit_status(tmp_path: Path) -> None:
    done = ferry_vm("run", "--kernel", image(tmp_path, "f.elf", finisher_guest((7 << 16) | 0x3333)))
    assert done.returncode == 7, done.stderr.decode()


def test_timeout_exits_124(tmp_path: Path) -> None:
    done = ferry_vm(
        "run", "--kernel", image(tmp_path, "spin.elf", spin_guest()), "--timeout", "0.5"
    )
    assert done.returncode == 124


def test_stdin_reaches_the_uart(tmp_path: Path) -> None:
    done = ferry_vm("run", "--kernel", image(tmp_path, "echo.elf", echo_guest()), stdin=b"ping q")
    assert done.returncode == 0, done.stderr.decode()
    assert done.stdout == b"ping q"


@pytest.mark.skipif(not TICKER.exists(), reason="guest images not built")
def test_deterministic_runs_print_identical_bytes() -> None:
    args = ("run", "--kernel", str(TICKER), "--append", "ticks=3", "--deterministic")
    first, second = ferry_vm(*args), ferry_vm(*args)
    assert first.returncode == 0, first.stderr.decode()
    assert first.stdout.count(b"tick ") == 3
    assert first.stdout == second.stdout


def bad_inputs(tmp_path: Path) -> list[tuple[list[str], str]]:
    good = make_elf([(0x8000_0000, b"\x6f\x00\x00\x00", 4)])
    return [
        (["--kernel", str(tmp_path / "missing.elf")], "no such file"),
        (
            [
                "--kernel",
                image(tmp_path, "x86.elf", make_elf([(0x8000_0000, b"x", 1)], machine=EM_X86_64)),
            ],
            "not RISC-V",
        ),
        (
            [
                "--kernel",
                image(tmp_path, "far.elf", make_elf([(0x9000_0000, b"x", 1)])),
                "-m",
                "64M",
            ],
            "outside RAM",
        ),
        (
            [
                "--kernel",
                image(tmp_path, "cut.elf", make_elf([(0x8000_0000, b"y" * 256, 256)])[:200]),
            ],
            "truncated",
        ),
        (["--kernel", image(tmp_path, "ok.elf", good), "-m", "12Q"], "invalid size"),
        (["--kernel", image(tmp_path, "ok2.elf", good), "-m", "1M"], "memory size"),
        (["--kernel", image(tmp_path, "ok3.elf", good), "--timeout", "soon"], "invalid timeout"),
        (["--kernel", image(tmp_path, "ok6.elf", good), "-m", "64T"], "cannot allocate 64T"),
        (
            ["--kernel", image(tmp_path, "ok4.elf", good), "--bios", str(tmp_path / "nofw.bin")],
            "no such file",
        ),
        (["--kernel", image(tmp_path, "ok5.elf", good), "--append", "a\x01b"], "printable"),
        (["--bios", "none"], "--kernel"),
        (
            [
                "--kernel",
                image(
                    tmp_path,
                    "lap.elf",
                    make_elf([(0x8000_0000, b"a" * 64, 64), (0x8000_0020, b"b", 1)]),
                ),
            ],
            "overlaps",
        ),
    ]


def test_bad_inputs_are_one_line_errors_with_status_2(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    for args, message in bad_inputs(tmp_path):
        with pytest.raises(SystemExit) as exited:
            main(["run", *args])
        out, err = capsys.readouterr()
        assert exited.value.code == 2, (args, err)
        assert err.startswith("ferry-vm: error: "), (args, err)
        assert err.count("\n") == 1, (args, err)
        assert message in err, (args, err)
        assert out == ""


def test_bad_input_through_the_real_command(tmp_path: Path) -> None:
    done = ferry_vm("run", "--kernel", str(tmp_path / "absent.elf"))
    assert done.returncode == 2
    assert (
        done.stderr == f"ferry-vm: error: kernel {tmp_path / 'absent.elf'}: no such file\n".encode()
    )


def test_help_describes_the_run_command() -> None:
    done = ferry_vm("run", "--help")
    assert done.returncode == 0
    for option in (
        b"--kernel",
        b"--bios",
        b"--append",
        b"--timeout",
        b"--deterministic",
        b"--trace",
    ):
        assert option in done.stdout


@pytest.mark.skipif(not HELLO.exists(), reason="guest images not built")
def test_trace_logs_images_mmio_and_traps_to_stderr() -> None:
    done = ferry_vm("run", "--kernel", str(TICKER), "--append", "ticks=1", "--trace")
    assert done.returncode == 0
    err = done.stderr.decode()
    assert "loaded ticker.elf" in err
    assert "mmio write 0x10000000/1" in err  # the UART transmitting
    assert "trap interrupt (cause 0x8000000000000007)" in err  # the machine timer
    assert b"tick 0" in done.stdout


def test_terminal_input_reaches_the_uart(tmp_path: Path) -> None:
    master, slave = pty.openpty()
    try:
        proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "vmcore.cli",
                "run",
                "--kernel",
                image(tmp_path, "e.elf", echo_guest()),
            ],
            stdin=slave,
            stdout=subprocess.PIPE,
            cwd=ROOT,
        )
        os.write(master, b"tty q")
        out, _ = proc.communicate(timeout=60)
    finally:
        os.close(master)
        os.close(slave)
    assert proc.returncode == 0
    assert out == b"tty q"


@pytest.mark.skipif(not TICKER.exists(), reason="guest images not built")
def test_snapshot_on_exit_restores_and_continues_the_tick_sequence(tmp_path: Path) -> None:
    snap = str(tmp_path / "ticker.snap")
    args = ["--append", "ticks=100000", "--deterministic"]
    first = ferry_vm(
        "run", "--kernel", str(TICKER), *args, "--timeout", "1", "--save-on-exit", snap
    )
    assert first.returncode == 124, first.stderr.decode()
    assert b"saved snapshot" in first.stderr
    second = ferry_vm("restore", snap, "--timeout", "1")
    assert second.returncode == 124, second.stderr.decode()
    both = first.stdout + second.stdout
    ticks = both.count(b"\n")
    assert first.stdout.count(b"\n") >= 1 and second.stdout.count(b"\n") >= 1
    whole = ferry_vm(
        "run", "--kernel", str(TICKER), "--append", f"ticks={ticks + 1}", "--deterministic"
    )
    assert whole.returncode == 0
    assert whole.stdout.startswith(both)


def test_restore_rejects_a_damaged_snapshot(tmp_path: Path) -> None:
    bad = tmp_path / "bad.snap"
    bad.write_bytes(b"not a snapshot at all")
    done = ferry_vm("restore", str(bad))
    err = done.stderr.decode()
    assert done.returncode == 2
    assert err.startswith("ferry-vm: error: ") and err.count("\n") == 1, err


def test_bios_path_runs_a_raw_firmware_from_ram_base(tmp_path: Path) -> None:
    # Raw firmware: the finisher guest's code without its ELF wrapper, so it only works if
    # it lands at 0x80000000; the kernel beside it must not overlap it.
    raw_firmware = finisher_guest((5 << 16) | 0x3333)[-20:]
    kernel = image(tmp_path, "Image", b"\x6f\x00\x00\x00")
    done = ferry_vm("run", "--bios", image(tmp_path, "fw.bin", raw_firmware), "--kernel", kernel)
    assert done.returncode == 5, done.stderr.decode()


FW_DYNAMIC = Path("/usr/lib/riscv64-linux-gnu/opensbi/generic/fw_dynamic.elf")


@pytest.mark.skipif(not FW_DYNAMIC.exists(), reason="Debian's OpenSBI not installed")
@pytest.mark.skipif(not SBI_HELLO.exists(), reason="guest images not built")
def test_fw_dynamic_finds_the_kernel_through_a2() -> None:
    done = ferry_vm("run", "--bios", str(FW_DYNAMIC), "--kernel", str(SBI_HELLO), "--timeout", "60")
    assert done.returncode == 0, done.stdout.decode(errors="replace")
    assert b"Domain0 Next Address      : 0x0000000080200000" in done.stdout
    assert b"sbi-hello: shutting down" in done.stdout


@pytest.mark.skipif(not TICKER.exists(), reason="guest images not built")
def test_sigterm_with_save_on_exit_stops_cleanly_with_a_snapshot(tmp_path: Path) -> None:
    snap = tmp_path / "t.snap"
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "vmcore.cli",
            "run",
            "--kernel",
            str(TICKER),
            "--save-on-exit",
            str(snap),
        ],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        cwd=ROOT,
    )
    assert proc.stdout is not None
    first_tick = proc.stdout.readline()  # the guest is running
    assert proc.stderr is not None
    proc.send_signal(signal.SIGUSR1)  # a snapshot while it keeps running
    assert b"saved snapshot" in proc.stderr.readline()
    proc.stdout.readline()  # and it does keep running
    proc.terminate()
    _, err = proc.communicate(timeout=60)
    assert first_tick.startswith(b"tick 0")
    assert proc.returncode == 128 + signal.SIGTERM, err.decode()
    assert b"saved snapshot" in err
    restored = ferry_vm("restore", str(snap), "--timeout", "0.5")
    assert restored.returncode == 124
    assert restored.stdout.startswith(b"tick ")


def test_sigint_stops_an_idle_guest_promptly_with_a_snapshot(tmp_path: Path) -> None:
    # Print "x" (so the test knows the run loop is up), then wfi forever with no timer armed.
    code = program(lui(T0, 0x10000), addi(T1, 0, ord("x")), sb(T1, T0, 0), 0x10500073, jal(0, -4))
    guest = image(tmp_path, "wfi.elf", make_elf([(0x8000_0000, code, len(code))]))
    snap = tmp_path / "idle.snap"
    proc = subprocess.Popen(
        [sys.executable, "-m", "vmcore.cli", "run", "--kernel", guest, "--save-on-exit", str(snap)],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        cwd=ROOT,
    )
    assert proc.stdout is not None
    assert proc.stdout.read(1) == b"x"
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 128 + signal.SIGINT, err.decode()
    assert snap.exists()
