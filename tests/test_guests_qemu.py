"""Each committed guest image, run on QEMU, does what tests and benchmarks rely on.

QEMU is the reference machine: an image that misbehaves here is a broken image,
not a Ferry bug. The same images and expectations later run on Ferry.
"""

from __future__ import annotations

import re

import pytest
from qemu import guest_image, qemu_available, run_qemu

pytestmark = pytest.mark.skipif(not qemu_available(), reason="qemu-system-riscv64 not installed")

TICK = re.compile(r"^tick (\d+) sum=0x([0-9a-f]{16})$", re.MULTILINE)


def test_hello_prints_its_line_and_passes() -> None:
    status, output = run_qemu(guest_image("hello"))
    assert status == 0, output
    assert output == "Hello from a Ferry guest!\n"
