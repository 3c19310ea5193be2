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

GUESTS = Path(__file__).resolve().parent.parent / "guests"
BUILD = GUESTS / "build"
CROSS_GCC = "riscv64-unknown-elf-gcc"


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


def test_expected_images_are_committed() -> None:
    sums = read_sums(BUILD / "SHA256SUMS")
    for name in ("hello.elf", "ticker.elf", "dirtier.elf", "cpubench.elf", "sbi-hello.elf"):
        assert name in sums


@pytest.mark.skipif(shutil.which(CROSS_GCC) is None, reason=f"{CROSS_GCC} not installed")
def test_rebuild_from_clean_copy_is_byte_identical(tmp_path: Path) -> None:
    # A copy in another directory also proves no build path leaks into the images.
    copy = tmp_path / "guests-copy"
    shutil.copytree(GUESTS, copy, ignore=shutil.ignore_patterns("build"))
    done = subprocess.run(
        ["make", "-s", "-C", str(copy)], capture_output=True, text=True, check=False
    )
    assert done.returncode == 0, done.stdout + done.stderr
    assert (copy / "build" / "SHA256SUMS").read_text() == (BUILD / "SHA256SUMS").read_text()
    for name in read_sums(BUILD / "SHA256SUMS"):
        assert (copy / "build" / name).read_bytes() == (BUILD / name).read_bytes(), name
