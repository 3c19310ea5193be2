"""Human-readable memory sizes (``64M``, ``1G``, ``128MiB``) as users type them on a command line.

Suffixes are binary (K = 1024), as QEMU's ``-m`` reads them: nobody sizes guest RAM in
powers of ten, and accepting ``MB`` as 10**6 would silently give a guest a non-page-aligned
amount of memory.
"""

from __future__ import annotations

import re

_UNITS = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}
_SIZE = re.compile(r"^\s*(\d+)\s*([KMGT]?)(?:I?B)?\s*$", re.IGNORECASE)


def parse_size(text: str, default_unit: str = "M") -> int:
    """Return the number of bytes ``text`` names; a bare number is in ``default_unit``.

    A bare number means mebibytes by default, like ``qemu -m 128``. Raises ValueError with a
    message fit to show a user for anything else.
    """
    m = _SIZE.match(text)
    if m is None:
        raise ValueError(f"invalid size {text!r} (expected e.g. 64M, 1G, 128MiB)")
    number, unit = int(m.group(1)), m.group(2).upper()
    if not unit and not re.search(r"[bB]\s*$", text):
        unit = default_unit.upper()
    return number * _UNITS[unit]


def format_size(n: int) -> str:
    """The shortest exact binary spelling of ``n`` bytes, for messages (``134217728`` → 128M)."""
    for suffix in ("T", "G", "M", "K"):
        unit = _UNITS[suffix]
        if n and n % unit == 0:
            return f"{n // unit}{suffix}"
    return f"{n}B"
