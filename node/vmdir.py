"""Where one VM's files live in the node's data directory, and how they are read.

The data directory is the agent's memory across restarts: an agent that comes back finds
each VM's spec, the pid and socket of its running worker, and how a finished worker ended,
here, rather than in its own (lost) process state. Layout::

    DATA/vms/NAME/spec.json     the VMSpec (protobuf JSON), written by the agent
    DATA/vms/NAME/worker.pid    pid of the running worker, written by the worker
    DATA/vms/NAME/worker.lock   flock held by the running worker: never two copies of a VM
    DATA/vms/NAME/status.json   how the last worker ended (state, exit code, failure)
    DATA/vms/NAME/console.log   every byte of UART output, across reboots
    DATA/vms/NAME/worker.log    the worker's own stderr
    DATA/vms/NAME/migration.json  the last outgoing migration's final statistics
    DATA/vms/NAME/console.base  absolute offset of console.log's first byte (after a move)
    DATA/sock/HASH.sock         the worker's gRPC socket (short: unix paths max 107 bytes)
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from google.protobuf import json_format

from protos.ferry.v1 import types_pb2

UNIX_PATH_MAX = 107


@dataclass(frozen=True)
class VMDir:
    """The files of one VM (see the module docstring)."""

    data_dir: Path
    name: str

    @property
    def path(self) -> Path:
        return self.data_dir / "vms" / self.name

    @property
    def spec_file(self) -> Path:
        return self.path / "spec.json"

    @property
    def pid_file(self) -> Path:
        return self.path / "worker.pid"

    @property
    def lock_file(self) -> Path:
        return self.path / "worker.lock"

    @property
    def status_file(self) -> Path:
        return self.path / "status.json"

    @property
    def console_log(self) -> Path:
        return self.path / "console.log"

    @property
    def worker_log(self) -> Path:
        return self.path / "worker.log"

    @property
    def migration_file(self) -> Path:
        return self.path / "migration.json"

    @property
    def socket(self) -> Path:
        digest = hashlib.sha256(self.name.encode()).hexdigest()[:16]
        return self.data_dir / "sock" / f"{digest}.sock"

    def create(self) -> None:
        self.path.mkdir(parents=True, exist_ok=True)
        self.socket.parent.mkdir(parents=True, exist_ok=True)

    def write_spec(self, spec: types_pb2.VMSpec) -> None:
        _write_atomically(self.spec_file, json_format.MessageToJson(spec, sort_keys=True))

    def read_spec(self) -> types_pb2.VMSpec:
        return json_format.Parse(self.spec_file.read_text(), types_pb2.VMSpec())

    def write_status(self, status: dict[str, Any]) -> None:
        _write_atomically(self.status_file, json.dumps(status, sort_keys=True))

    def read_status(self) -> dict[str, Any] | None:
        """The last worker's final status, or None if it ended without writing one."""
        try:
            status = json.loads(self.status_file.read_text())
        except (OSError, ValueError):
            return None
        return status if isinstance(status, dict) else None

    def read_pid(self) -> int | None:
        try:
            return int(self.pid_file.read_text().strip())
        except (OSError, ValueError):
            return None


def list_vm_dirs(data_dir: Path) -> list[VMDir]:
    """Every VM the data directory knows, in name order."""
    root = data_dir / "vms"
    if not root.is_dir():
        return []
    return [VMDir(data_dir, p.name) for p in sorted(root.iterdir()) if (p / "spec.json").exists()]


def socket_path_fits(data_dir: Path) -> bool:
    """Whether worker sockets under ``data_dir`` stay within the kernel's unix path limit."""
    return len(str(VMDir(data_dir.resolve(), "x").socket)) <= UNIX_PATH_MAX


def _write_atomically(path: Path, text: str) -> None:
    # A crash mid-write must leave the old file or the new one, never half of either: an
    # agent restart trusts these files.
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)
