"""The committed guest images are the ones their sources build.

Machines without the cross toolchain run the prebuilt images, so those images
must be exactly what `make -C guests` produces: checked by their SHA-256 sums,
and, where the toolchain is installed, by rebuilding from a clean copy.
"""

from __future__ import annotations

import hashlib
import shutil
import subprocess
from pathlib import Path

import pytest
from elftools.elf.constants import P_FLAGS
from elftools.elf.elffile import ELFFile

GUESTS = Path(__file__).resolve().parent.parent / "guests"
BUILD = GUESTS / "build"
CROSS_GCC = "riscv64-unknown-elf-gcc"
EF_RISCV_RVC = 0x1
EF_RISCV_FLOAT_ABI = 0x6
S_MODE_IMAGES = {"sbi-hello.elf": 0x80200000}
RAM_BASE = 0x80000000


def read_sums(path: Path) -> dict[str, str]:
    sums: dict[str, str] = {}
    for line in path.read_text().splitlines():
        digest, name = line.split(maxsplit=1)
        sums[name.lstrip("*")] = digest
    return sums


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_checksums_match_committed_images() -> None:
    sums = read_sums(BUILD / "SHA256SUMS")
    images = sorted(str(p.relative_to(BUILD)) for p in BUILD.rglob("*.elf"))
    assert sorted(sums) == images, "SHA256SUMS and guests/build/ list different images"
    for name, digest in sums.items():
        assert sha256(BUILD / name) == digest, f"{name} does not match SHA256SUMS"


EXPECTED_IMAGES = [
    *(f"{name}.elf" for name in ("hello", "ticker", "dirtier", "cpubench", "sbi-hello")),
    *(f"isa/{name}.elf" for name in (
        "rv64i", "rv64m", "rv64a", "rv64c", "zicsr", "traps", "sv39", "interrupts",
    )),
]


def test_expected_images_are_committed() -> None:
    sums = read_sums(BUILD / "SHA256SUMS")
    missing = [name for name in EXPECTED_IMAGES if name not in sums]
    assert not missing


@pytest.mark.parametrize("name", sorted(read_sums(BUILD / "SHA256SUMS")))
def test_image_fits_the_board_and_the_isa(name: str) -> None:
    """What the loaders rely on: RISC-V ELF64, entry where the board jumps, no FP."""
    with (BUILD / name).open("rb") as f:
        elf = ELFFile(f)
        assert elf.elfclass == 64 and elf["e_machine"] == "EM_RISCV"
        assert elf["e_type"] == "ET_EXEC"
        assert elf["e_entry"] == S_MODE_IMAGES.get(name, RAM_BASE)
        assert elf["e_flags"] & EF_RISCV_FLOAT_ABI == 0, "hard-float ABI"
        assert elf["e_flags"] & EF_RISCV_RVC
        loads = [seg for seg in elf.iter_segments() if seg["p_type"] == "PT_LOAD"]
        assert loads
        for seg in loads:
            assert seg["p_paddr"] >= elf["e_entry"]
            assert seg["p_filesz"] <= seg["p_memsz"]
            assert not (seg["p_flags"] & P_FLAGS.PF_W and seg["p_flags"] & P_FLAGS.PF_X)
        attributes = elf.get_section_by_name(".riscv.attributes")
        assert attributes is not None
        # Tag_RISCV_arch, e.g. "rv64i2p1_m2p0_a2p1_c2p0_zicsr2p0_zifencei2p0".
        arch = attributes.data().split(b"rv64", 1)[1].split(b"\0", 1)[0].decode()
        extensions = {part.rstrip("0123456789p") for part in arch.split("_")}
        assert {"i", "m", "a", "c"} <= extensions
        assert not extensions & {"f", "d", "q", "v"}, f"rv64{arch}"


@pytest.mark.skipif(shutil.which(CROSS_GCC) is None, reason=f"{CROSS_GCC} not installed")
def test_rebuild_from_clean_copy_is_byte_identical(tmp_path: Path) -> None:
    # A copy in another directory also proves no build path leaks into the images.
    copy = tmp_path / "guests-copy"
    shutil.copytree(GUESTS, copy, ignore=shutil.ignore_patterns("build"))
    done = subprocess.run(
        ["make", "-s", "-j2", "-C", str(copy)], capture_output=True, text=True, check=False
    )
    assert done.returncode == 0, done.stdout + done.stderr
    toolchain = (copy / "build" / "TOOLCHAIN").read_text()
    committed_toolchain = (BUILD / "TOOLCHAIN").read_text()
    hint = (
        f"committed images were built with:\n{committed_toolchain}this machine has:\n{toolchain}"
        "(run `make guests` and commit guests/build/ if the toolchain changed on purpose)"
    )
    for name in read_sums(BUILD / "SHA256SUMS"):
        same = (copy / "build" / name).read_bytes() == (BUILD / name).read_bytes()
        assert same, f"{name} differs when rebuilt from source; {hint}"
    assert (copy / "build" / "SHA256SUMS").read_text() == (BUILD / "SHA256SUMS").read_text()
