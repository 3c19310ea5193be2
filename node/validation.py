"""Checks on every field a client sends, before the agent acts on any of them.

The messages name the field and say what is wrong, in one line, because they are what a
user reads when ``ferry vm create`` fails.
"""

from __future__ import annotations

import os
import re

from node.errors import invalid
from protos.ferry.v1 import types_pb2

NAME_RE = re.compile(r"[a-z0-9][a-z0-9-]{0,62}")
PAGE_SIZE = 4096
MIN_MEMORY = 1 << 20
MAX_MEMORY = 1 << 40
MAX_APPEND = 4096
MAX_LABELS = 64


def check_name(name: str, field: str = "name") -> str:
    if not NAME_RE.fullmatch(name):
        raise invalid(
            f"{field} {name!r} is not a valid VM name "
            "(1-63 of a-z, 0-9 and '-', starting with a letter or digit)"
        )
    return name


def check_file(path: str, field: str) -> str:
    """An existing regular file on this node, as an absolute path."""
    if not path:
        raise invalid(f"{field} is required")
    if not os.path.isabs(path):
        raise invalid(f"{field} {path!r} must be an absolute path on the node")
    if not os.path.isfile(path):
        raise invalid(f"{field} {path}: no such file on this node")
    return path


def check_spec(spec: types_pb2.VMSpec) -> types_pb2.VMSpec:
    """The spec with defaults filled in (vcpus 1, bios "none"), or an INVALID_ARGUMENT."""
    check_name(spec.name, "spec.name")
    if spec.memory_bytes == 0:
        raise invalid("spec.memory_bytes is required")
    if spec.memory_bytes % PAGE_SIZE:
        raise invalid(f"spec.memory_bytes {spec.memory_bytes} is not a multiple of 4 KiB")
    if not MIN_MEMORY <= spec.memory_bytes <= MAX_MEMORY:
        raise invalid(f"spec.memory_bytes {spec.memory_bytes} is outside 1 MiB .. 1 TiB")
    vcpus = spec.vcpus or 1
    if vcpus != 1:
        raise invalid(f"spec.vcpus {vcpus}: Ferry VMs have exactly 1 vCPU for now")
    check_file(spec.kernel, "spec.kernel")
    bios = spec.bios or "none"
    if bios not in ("none", "default"):
        check_file(bios, "spec.bios")
    if len(spec.append) > MAX_APPEND:
        raise invalid(f"spec.append is longer than {MAX_APPEND} characters")
    if not spec.append.isprintable():
        raise invalid("spec.append contains non-printable characters")
    if len(spec.labels) > MAX_LABELS or len(spec.options) > MAX_LABELS:
        raise invalid(f"spec has more than {MAX_LABELS} labels or options")
    checked = types_pb2.VMSpec()
    checked.CopyFrom(spec)
    checked.vcpus = vcpus
    checked.bios = bios
    return checked
