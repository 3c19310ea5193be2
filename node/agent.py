"""ferry-node: the node agent. It runs one VMM worker process per VM and supervises it.

The agent's own state is a cache: the truth about each VM lives in its worker (while one
runs) and in the data directory (spec, pid, lock, final status, console log). So a restarted
agent rebuilds its view from the directory, adopts the workers that still run, and reports
the rest as they ended (or as lost), never starting a second copy of any VM.

All agent state is touched only from the trio loop; the gRPC handlers in
:mod:`node.service` hop into it.
"""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import json
import logging
import os
import secrets
import shutil
import signal
import socket
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
import trio
from google.protobuf import json_format
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from node import FERRY_VERSION, registration, supervisor
from node.console import log_end
from node.errors import AgentError, invalid, not_found
from node.service import NodeAgentService
from node.validation import NAME_RE, check_file, check_name, check_spec
from node.vmdir import VMDir, list_vm_dirs, socket_path_fits
from node.worker_client import WorkerClient
from protos.ferry.v1 import node_pb2, node_pb2_grpc, types_pb2, worker_pb2
from vmcore import ramfile
from vmcore.sizes import parse_size

log = logging.getLogger("ferry-node")

DEFAULT_STOP_TIMEOUT = 10.0
WORKER_START_TIMEOUT = 60.0
DEFAULT_INCOMING_TIMEOUT = 60.0
MAX_TOKEN_BYTES = 1024
# How long PrepareIncoming waits for a copy that just migrated away from here to finish
# exiting (a few seconds at most: see Agent._let_moved_away_copy_exit).
MOVED_AWAY_EXIT_S = 15.0

_FINAL_STATES = {
    "stopped": types_pb2.VM_STATE_STOPPED,
    "failed": types_pb2.VM_STATE_FAILED,
    "migrated": types_pb2.VM_STATE_MIGRATED,
}
_LIVE_STATES = {
    types_pb2.VM_STATE_CREATED,
    types_pb2.VM_STATE_RUNNING,
    types_pb2.VM_STATE_PAUSED,
    types_pb2.VM_STATE_INCOMING,
    types_pb2.VM_STATE_MIGRATING,
}


@dataclass
class AgentConfig:
    name: str
    listen: str
    data_dir: Path
    capacity: types_pb2.Resources
    console_buffer: int = 1 << 20
    coordinator: str | None = None
    labels: dict[str, str] = field(default_factory=dict)


@dataclass
class VMRecord:
    """What the agent knows of one VM. ``pid`` is non-zero while a worker runs it."""

    vm_dir: VMDir
    spec: types_pb2.VMSpec
    created_at: float
    pid: int = 0
    client: WorkerClient | None = None
    exited: trio.Event = field(default_factory=trio.Event)
    last_status: worker_pb2.WorkerStatus | None = None
    final: dict[str, Any] | None = None
    expected_exit: bool = False

    @property
    def name(self) -> str:
        return self.vm_dir.name

    @property
    def has_worker(self) -> bool:
        return self.pid != 0


class Agent:
    """The node's VMs and their workers; every method runs in the trio loop."""

    def __init__(self, config: AgentConfig, nursery: trio.Nursery) -> None:
        self.config = config
        self.data_dir = config.data_dir
        self.nursery = nursery
        self.vms: dict[str, VMRecord] = {}
        self.started_at = time.time()
        self.address = config.listen
        # Create, restore and start-from-stopped check capacity and then spawn: one at a
        # time, so two requests cannot both fit into the same free memory.
        self._admission = trio.Lock()

    # -- recovery ----------------------------------------------------------------------

    async def recover(self) -> None:
        """Rebuild the VM table from the data directory; adopt workers that still run."""
        for vm_dir in list_vm_dirs(self.data_dir):
            try:
                spec = vm_dir.read_spec()
            except (OSError, ValueError) as e:
                log.warning("skipping %s: unreadable spec (%s)", vm_dir.path, e)
                continue
            record = VMRecord(vm_dir, spec, created_at=vm_dir.spec_file.stat().st_mtime)
            self.vms[vm_dir.name] = record
            pid = vm_dir.read_pid()
            alive = supervisor.worker_is_alive(vm_dir)
            if alive and pid and supervisor.cmdline_matches(pid, vm_dir):
                record.pid = pid
                record.client = WorkerClient(vm_dir)
                self.nursery.start_soon(self._watch_adopted, record, pid)
                await self._refresh(record)
                if record.last_status is None:
                    log.warning("VM %s: adopted worker %d does not answer yet", spec.name, pid)
                log.info("VM %s: adopted running worker pid %d", spec.name, pid)
                continue
            status = vm_dir.read_status()
            if status is not None and status.get("phase") == "final":
                record.final = status
            else:
                reason = "worker lost while the agent was down (it left no final status)"
                if status is not None and status.get("phase") == "load":
                    reason = str(status.get("error", reason))
                record.final = {"phase": "final", "state": "failed", "failure": reason}
                vm_dir.write_status(record.final)
                log.warning("VM %s: %s", spec.name, reason)

    # -- supervision -------------------------------------------------------------------

    async def _spawn(
        self,
        record: VMRecord,
        *,
        start: bool,
        restore: str | None = None,
        incoming: bool = False,
    ) -> None:
        """Start a worker for ``record`` and wait until it serves, or raise why it could not."""
        vm_dir = record.vm_dir
        with contextlib.suppress(FileNotFoundError):
            vm_dir.status_file.unlink()
        # An earlier worker's last migration (say, before the VM left and came back) is not
        # this one's: get_migration falls back to the file when the worker does not answer.
        with contextlib.suppress(FileNotFoundError):
            vm_dir.migration_file.unlink()
        if supervisor.worker_is_alive(vm_dir):
            raise AgentError(
                grpc.StatusCode.FAILED_PRECONDITION,
                f"VM {record.name!r} already has a running worker",
            )
        with contextlib.suppress(FileNotFoundError):
            vm_dir.socket.unlink()  # a killed predecessor's: readiness means the new socket
        process = await supervisor.spawn_worker(
            vm_dir, self.config.console_buffer, start=start, restore=restore, incoming=incoming
        )
        record.pid = process.pid
        record.final = None
        record.exited = trio.Event()
        record.expected_exit = False
        record.client = WorkerClient(vm_dir)
        self.nursery.start_soon(self._watch_child, record, process)
        deadline = trio.current_time() + WORKER_START_TIMEOUT
        while trio.current_time() < deadline:
            if record.exited.is_set():
                break
            if vm_dir.socket.exists():
                with contextlib.suppress(AgentError):
                    record.last_status = await record.client.status(timeout=2.0, ready=True)
                    log.info("VM %s: worker pid %d serving", record.name, process.pid)
                    return
            with trio.move_on_after(0.02):
                await record.exited.wait()
        if not record.exited.is_set():
            record.expected_exit = True
            supervisor.kill(process.pid)
            await record.exited.wait()
            raise AgentError(
                grpc.StatusCode.INTERNAL, f"the worker of VM {record.name!r} did not come up"
            )
        final: dict[str, Any] = record.final or {}
        if final.get("phase") == "final" and not final.get("by_agent"):
            return  # the guest ran and ended (a quick poweroff) before we looked
        if final.get("code") == "INVALID_ARGUMENT":
            raise invalid(str(final.get("error")))
        raise AgentError(
            grpc.StatusCode.INTERNAL,
            f"the worker of VM {record.name!r} failed to start: "
            f"{final.get('error') or final.get('failure')}",
        )

    async def _watch_child(self, record: VMRecord, process: trio.Process) -> None:
        returncode = await process.wait()
        self._worker_ended(record, process.pid, returncode)

    async def _watch_adopted(self, record: VMRecord, pid: int) -> None:
        await supervisor.wait_pid(pid)
        self._worker_ended(record, pid, None)

    def _worker_ended(self, record: VMRecord, pid: int, returncode: int | None) -> None:
        if record.pid != pid:
            return
        status = record.vm_dir.read_status()
        if status is not None and status.get("phase") == "load":
            record.final = {"phase": "final", "state": "failed", **status}
            record.final["failure"] = str(status.get("error"))
        elif status is not None and status.get("phase") == "final":
            record.final = status
        else:
            reason = supervisor.describe_exit(returncode)
            if record.expected_exit:
                reason = "stopped by the agent"
            record.final = {
                "phase": "final",
                "state": "failed",
                "failure": reason,
                "instret": record.last_status.instret if record.last_status else 0,
                "by_agent": True,
            }
            if self.vms.get(record.name) is record:
                record.vm_dir.write_status(record.final)
            if not record.expected_exit:
                log.warning("VM %s: %s", record.name, reason)
        with contextlib.suppress(FileNotFoundError):
            if record.vm_dir.read_pid() == pid:
                record.vm_dir.pid_file.unlink()
        record.pid = 0
        if record.client is not None:
            record.client.close()
            record.client = None
        record.exited.set()
        log.info("VM %s: worker pid %d ended, VM %s", record.name, pid, record.final["state"])

    # -- views -------------------------------------------------------------------------

    def _record(self, name: str) -> VMRecord:
        check_name(name)
        record = self.vms.get(name)
        if record is None:
            raise not_found(name)
        return record

    async def _refresh(self, record: VMRecord) -> None:
        if record.client is None or not record.has_worker:
            return
        try:
            record.last_status = await record.client.status(timeout=2.0)
        except AgentError:
            # A worker whose VM has ended stops answering before its process is gone; its
            # final status is already on disk, and fresher than the last answer.
            final = record.vm_dir.read_status()
            if final is not None and final.get("phase") == "final":
                if record.last_status is None:
                    record.last_status = worker_pb2.WorkerStatus(name=record.name)
                record.last_status.state = _FINAL_STATES.get(
                    str(final.get("state")), types_pb2.VM_STATE_FAILED
                )
                record.last_status.instret = int(final.get("instret") or 0)
                record.last_status.guest_seconds = float(final.get("guest_seconds") or 0.0)
                record.last_status.console_bytes = int(final.get("console_bytes") or 0)
                record.last_status.failure = str(final.get("failure") or "")
                if final.get("exit_code") is not None:
                    record.last_status.exit_code = int(final["exit_code"])

    def _info(self, record: VMRecord) -> types_pb2.VMInfo:
        info = types_pb2.VMInfo(
            spec=record.spec,
            node=self.config.name,
            worker_pid=record.pid,
            created_at=record.created_at,
        )
        if record.has_worker and record.last_status is not None:
            st = record.last_status
            info.state = st.state
            info.failure = st.failure
            if st.HasField("exit_code"):
                info.exit_code = st.exit_code
            info.instret = st.instret
            info.mips = st.mips
            info.guest_seconds = st.guest_seconds
            info.console_bytes = st.console_bytes
        elif record.has_worker:
            info.state = types_pb2.VM_STATE_CREATED
        else:
            final = record.final or {"state": "failed", "failure": "no worker and no status"}
            info.state = _FINAL_STATES.get(str(final.get("state")), types_pb2.VM_STATE_FAILED)
            info.failure = str(final.get("failure") or "")
            if final.get("exit_code") is not None:
                info.exit_code = int(final["exit_code"])
            info.instret = int(final.get("instret") or 0)
            info.guest_seconds = float(final.get("guest_seconds") or 0.0)
            info.console_bytes = log_end(record.vm_dir.console_log)
        return info

    def _holds_resources(self, record: VMRecord) -> bool:
        if not record.has_worker:
            return False
        return record.last_status is None or record.last_status.state in _LIVE_STATES

    def used(self) -> types_pb2.Resources:
        used = types_pb2.Resources()
        for record in self.vms.values():
            if self._holds_resources(record):
                used.vcpus += record.spec.vcpus or 1
                used.memory_bytes += record.spec.memory_bytes
        return used

    def _admit(self, spec: types_pb2.VMSpec, exclude: VMRecord | None = None) -> None:
        used = types_pb2.Resources()
        for record in self.vms.values():
            if record is not exclude and self._holds_resources(record):
                used.vcpus += record.spec.vcpus or 1
                used.memory_bytes += record.spec.memory_bytes
        cap = self.config.capacity
        vcpus = spec.vcpus or 1
        if used.vcpus + vcpus > cap.vcpus:
            raise AgentError(
                grpc.StatusCode.RESOURCE_EXHAUSTED,
                f"not enough vCPUs on node {self.config.name}: VM {spec.name!r} needs {vcpus}, "
                f"{cap.vcpus - used.vcpus} of {cap.vcpus} free",
            )
        if used.memory_bytes + spec.memory_bytes > cap.memory_bytes:
            free = cap.memory_bytes - used.memory_bytes
            raise AgentError(
                grpc.StatusCode.RESOURCE_EXHAUSTED,
                f"not enough memory on node {self.config.name}: VM {spec.name!r} needs "
                f"{spec.memory_bytes >> 20} MiB, {free >> 20} of "
                f"{cap.memory_bytes >> 20} MiB free",
            )

    # -- the API -----------------------------------------------------------------------

    def _new_record(self, spec: types_pb2.VMSpec) -> VMRecord:
        """A fresh data directory and record for an admitted spec; files left by an earlier
        VM of the same name (destroyed, or migrated away) go first."""
        vm_dir = VMDir(self.data_dir, spec.name)
        if vm_dir.path.exists():
            shutil.rmtree(vm_dir.path)
        vm_dir.create()
        vm_dir.write_spec(spec)
        record = VMRecord(vm_dir, spec, created_at=time.time())
        self.vms[spec.name] = record
        return record

    async def create_vm(self, spec: types_pb2.VMSpec, start: bool) -> types_pb2.VMInfo:
        spec = check_spec(spec)
        async with self._admission:
            if spec.name in self.vms:
                raise AgentError(
                    grpc.StatusCode.ALREADY_EXISTS, f"a VM named {spec.name!r} already exists"
                )
            self._admit(spec)
            record = self._new_record(spec)
            try:
                await self._spawn(record, start=start)
            except BaseException:
                del self.vms[spec.name]
                if record.has_worker:
                    record.expected_exit = True
                    supervisor.kill(record.pid)
                shutil.rmtree(record.vm_dir.path, ignore_errors=True)
                raise
        log.info("VM %s: created (%d MiB), start=%s", spec.name, spec.memory_bytes >> 20, start)
        return self._info(record)

    async def restore(self, name: str, path: str, start: bool) -> types_pb2.VMInfo:
        check_name(name)
        check_file(path, "path")
        async with self._admission:
            if name in self.vms:
                raise AgentError(
                    grpc.StatusCode.ALREADY_EXISTS, f"a VM named {name!r} already exists"
                )
            vm_dir = VMDir(self.data_dir, name)
            if vm_dir.path.exists():
                shutil.rmtree(vm_dir.path)
            vm_dir.create()
            spec = types_pb2.VMSpec(name=name, vcpus=1)
            vm_dir.write_spec(spec)
            record = VMRecord(vm_dir, spec, created_at=time.time())
            self.vms[name] = record
            try:
                await self._spawn(record, start=False, restore=path)
                assert record.last_status is not None
                record.spec = record.last_status.spec
                vm_dir.write_spec(record.spec)
                self._admit(record.spec, exclude=record)
                if start:
                    assert record.client is not None
                    record.last_status = await record.client.control(
                        worker_pb2.WORKER_ACTION_RESUME
                    )
            except BaseException:
                del self.vms[name]
                if record.has_worker:
                    record.expected_exit = True
                    supervisor.kill(record.pid)
                    await record.exited.wait()
                shutil.rmtree(record.vm_dir.path, ignore_errors=True)
                raise
        log.info("VM %s: restored from %s", name, path)
        return self._info(record)

    # -- live migration ------------------------------------------------------------------

    def _migration_host(self) -> tuple[str, str]:
        """(address a migration worker binds, host the source is told to connect to)."""
        host = self.address.rpartition(":")[0].strip("[]")
        if host in ("", "0.0.0.0", "::"):
            return host or "0.0.0.0", socket.getfqdn()
        return host, host

    async def _let_moved_away_copy_exit(self, record: VMRecord) -> None:
        """A copy that just migrated away keeps its worker a moment (its console followers
        drain, its migration process is reaped): wait for it, bounded, so that moving a VM
        straight back here is not refused as a name already taken."""
        if not record.has_worker:
            return
        await self._refresh(record)
        status = record.last_status
        if status is not None and status.state == types_pb2.VM_STATE_MIGRATED:
            with trio.move_on_after(MOVED_AWAY_EXIT_S):
                await record.exited.wait()

    @staticmethod
    def _replaceable(record: VMRecord) -> bool:
        """A copy that moved away, or an incoming VM that never arrived, may be replaced
        by a new incoming migration of the same name."""
        if record.has_worker or record.final is None:
            return False
        return record.final.get("state") == "migrated" or bool(record.final.get("incoming_failed"))

    async def prepare_incoming(
        self, spec: types_pb2.VMSpec, token: bytes, timeout: float
    ) -> node_pb2.PrepareIncomingResponse:
        spec = check_spec(spec)
        if timeout < 0 or timeout > 3600:
            raise invalid(f"timeout_s {timeout} is outside 0 .. 3600")
        if len(token) > MAX_TOKEN_BYTES:
            raise invalid(f"token is longer than {MAX_TOKEN_BYTES} bytes")
        token = token or secrets.token_bytes(32)
        bind_host, advertised = self._migration_host()
        if (moved_away := self.vms.get(spec.name)) is not None:
            await self._let_moved_away_copy_exit(moved_away)
        async with self._admission:
            existing = self.vms.get(spec.name)
            if existing is not None:
                if not self._replaceable(existing):
                    raise AgentError(
                        grpc.StatusCode.ALREADY_EXISTS, f"a VM named {spec.name!r} already exists"
                    )
                del self.vms[spec.name]
            self._admit(spec)
            record = self._new_record(spec)
            try:
                await self._spawn(record, start=False, incoming=True)
                if record.client is None:
                    raise AgentError(
                        grpc.StatusCode.INTERNAL, f"the incoming worker of {spec.name!r} ended"
                    )
                endpoint = await record.client.listen_incoming(
                    token, bind_host, timeout or DEFAULT_INCOMING_TIMEOUT
                )
            except BaseException:
                del self.vms[spec.name]
                if record.has_worker:
                    record.expected_exit = True
                    supervisor.kill(record.pid)
                    await record.exited.wait()
                shutil.rmtree(record.vm_dir.path, ignore_errors=True)
                raise
        if advertised != bind_host:
            endpoint = f"{advertised}:{endpoint.rpartition(':')[2]}"
        log.info("VM %s: incoming migration prepared on %s", spec.name, endpoint)
        return node_pb2.PrepareIncomingResponse(
            endpoint=endpoint, token=token, vm=self._info(record)
        )

    async def start_migration(
        self, name: str, endpoint: str, token: bytes, options: types_pb2.MigrationOptions
    ) -> types_pb2.MigrationStatus:
        record = self._record(name)
        if record.client is None or not record.has_worker:
            state = types_pb2.VMState.Name(self._info(record).state)[9:].lower()
            raise AgentError(
                grpc.StatusCode.FAILED_PRECONDITION,
                f"VM {name!r} is {state}; only a running VM can be live-migrated",
            )
        status = await record.client.start_migration(endpoint, token, options)
        await self._refresh(record)
        log.info("VM %s: migrating to %s", name, endpoint)
        return status

    def _saved_migration(self, record: VMRecord) -> types_pb2.MigrationStatus:
        try:
            return json_format.Parse(
                record.vm_dir.migration_file.read_text(), types_pb2.MigrationStatus()
            )
        except (OSError, json_format.ParseError):
            return types_pb2.MigrationStatus(vm=record.name, status=types_pb2.MIGRATION_STATE_NONE)

    async def get_migration(self, name: str) -> types_pb2.MigrationStatus:
        record = self._record(name)
        if record.client is not None and record.has_worker:
            with contextlib.suppress(AgentError):
                status = await record.client.get_migration()
                if status.status != types_pb2.MIGRATION_STATE_NONE:
                    return status
        # No worker, or one that never migrated: the last migration's final figures.
        return self._saved_migration(record)

    async def worker_client(self, name: str) -> WorkerClient | None:
        """The channel to the VM's worker, or None when no worker runs it (NOT_FOUND for a
        VM this node does not know)."""
        record = self._record(name)
        return record.client if record.has_worker else None

    async def cancel_migration(self, name: str) -> types_pb2.MigrationStatus:
        record = self._record(name)
        if record.client is not None and record.has_worker:
            with contextlib.suppress(AgentError):
                status = await record.client.cancel_migration()
                if status.status != types_pb2.MIGRATION_STATE_NONE:
                    log.info("VM %s: migration cancel requested", name)
                    await self._refresh(record)
                    return status
        return self._saved_migration(record)

    async def start_vm(self, name: str) -> types_pb2.VMInfo:
        record = self._record(name)
        if not record.has_worker:
            async with self._admission:
                if not record.has_worker:
                    self._admit(record.spec, exclude=record)
                    check_spec(record.spec)
                    await self._spawn(record, start=True)
                    log.info("VM %s: booted again", name)
            return self._info(record)
        await self._refresh(record)
        state = record.last_status.state if record.last_status else None
        if state == types_pb2.VM_STATE_RUNNING:
            return self._info(record)
        action = (
            worker_pb2.WORKER_ACTION_RESUME
            if state == types_pb2.VM_STATE_PAUSED
            else worker_pb2.WORKER_ACTION_START
        )
        return await self._control(record, action)

    async def _control(
        self, record: VMRecord, action: worker_pb2.WorkerAction.ValueType, timeout: float = 0.0
    ) -> types_pb2.VMInfo:
        if record.client is None or not record.has_worker:
            state = self._info(record).state
            raise AgentError(
                grpc.StatusCode.FAILED_PRECONDITION,
                f"VM {record.name!r} is {types_pb2.VMState.Name(state)[9:].lower()}",
            )
        record.last_status = await record.client.control(action, timeout)
        return self._info(record)

    async def pause_vm(self, name: str) -> types_pb2.VMInfo:
        return await self._control(self._record(name), worker_pb2.WORKER_ACTION_PAUSE)

    async def resume_vm(self, name: str) -> types_pb2.VMInfo:
        return await self._control(self._record(name), worker_pb2.WORKER_ACTION_RESUME)

    async def stop_vm(self, name: str, timeout: float, force: bool) -> types_pb2.VMInfo:
        record = self._record(name)
        if timeout < 0 or timeout > 3600:
            raise invalid(f"timeout_seconds {timeout} is outside 0 .. 3600")
        if not record.has_worker:
            return self._info(record)
        action = worker_pb2.WORKER_ACTION_FORCE_STOP if force else worker_pb2.WORKER_ACTION_STOP
        await self._control(record, action, timeout or DEFAULT_STOP_TIMEOUT)
        # The worker exits once its VM has stopped; its final status is the answer.
        with trio.move_on_after(10.0):
            await record.exited.wait()
        return self._info(record)

    async def destroy_vm(self, name: str) -> None:
        record = self._record(name)
        del self.vms[name]
        if record.has_worker:
            record.expected_exit = True
            supervisor.kill(record.pid)
            with trio.move_on_after(10.0):
                await record.exited.wait()
        shutil.rmtree(record.vm_dir.path, ignore_errors=True)
        with contextlib.suppress(FileNotFoundError):
            record.vm_dir.socket.unlink()
        log.info("VM %s: destroyed", name)

    async def get_vm(self, name: str) -> types_pb2.VMInfo:
        record = self._record(name)
        await self._refresh(record)
        return self._info(record)

    async def list_vms(self) -> list[types_pb2.VMInfo]:
        records = list(self.vms.values())
        async with trio.open_nursery() as nursery:
            for record in records:
                nursery.start_soon(self._refresh, record)
        return [self._info(r) for r in sorted(records, key=lambda r: r.name)]

    async def node_info(self) -> types_pb2.NodeInfo:
        vms = await self.list_vms()
        return types_pb2.NodeInfo(
            name=self.config.name,
            address=self.address,
            capacity=self.config.capacity,
            used=self.used(),
            vms=vms,
            ferry_version=FERRY_VERSION,
            labels=self.config.labels,
            started_at=self.started_at,
        )

    async def snapshot(self, name: str, path: str) -> tuple[str, int]:
        record = self._record(name)
        if not path:
            path = str(record.vm_dir.path / "snapshot.ferry")
        if not os.path.isabs(path):
            raise invalid(f"path {path!r} must be an absolute path on the node")
        if not os.path.isdir(os.path.dirname(path)):
            raise invalid(f"path {path}: directory {os.path.dirname(path)} does not exist")
        if record.client is None or not record.has_worker:
            raise AgentError(
                grpc.StatusCode.FAILED_PRECONDITION, f"VM {name!r} has no running worker"
            )
        size = await record.client.snapshot(path)
        return path, size

    # -- console -----------------------------------------------------------------------

    async def console_target(self, name: str) -> tuple[VMDir, bool]:
        """The VM's files and whether a worker (hence a live console) runs it."""
        record = self._record(name)
        return record.vm_dir, record.has_worker

    async def console_state(self, name: str, worker_ended: bool) -> types_pb2.VMState.ValueType:
        """The VM's state for the end of a console stream; ``worker_ended`` says the
        worker's own stream ended, so its exit is imminent and worth waiting for."""
        record = self.vms.get(name)
        if record is None:
            return types_pb2.VM_STATE_UNSPECIFIED
        if worker_ended and record.has_worker:
            with trio.move_on_after(5.0):
                await record.exited.wait()
        await self._refresh(record)
        return self._info(record).state

    async def send_input(self, name: str, data: bytes) -> None:
        record = self._record(name)
        if record.client is None or not record.has_worker:
            raise AgentError(grpc.StatusCode.FAILED_PRECONDITION, f"VM {name!r} is not running")
        await record.client.send_input(data)


# -- the ferry-node command ------------------------------------------------------------


class StartupError(Exception):
    """A bad command line or environment; printed as one line, exit status 2."""


def _host_memory() -> int:
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("MemTotal:"):
                return int(line.split()[1]) * 1024
    raise StartupError("cannot read MemTotal from /proc/meminfo; pass --memory")


def _parse_args(argv: list[str] | None) -> AgentConfig:
    parser = argparse.ArgumentParser(
        prog="ferry-node",
        description="Ferry node agent: runs and supervises one VMM worker process per VM.",
    )
    parser.add_argument("--name", required=True, help="this node's name in the cluster")
    parser.add_argument("--listen", required=True, help="HOST:PORT to serve on (port 0: any)")
    parser.add_argument("--data-dir", required=True, type=Path, help="VM files, logs, sockets")
    parser.add_argument("--coordinator", help="HOST:PORT of ferry-coordinator to register with")
    parser.add_argument("--vcpus", type=int, help="vCPUs to offer (default: host CPUs)")
    parser.add_argument("--memory", help="guest memory to offer, e.g. 8G (default: host RAM)")
    parser.add_argument(
        "--console-buffer", default="1M", help="console bytes kept in memory per VM (default 1M)"
    )
    parser.add_argument(
        "--label", action="append", default=[], metavar="K=V", help="node label (repeatable)"
    )
    parser.add_argument(
        "--ram-backing",
        choices=ramfile.BACKINGS,
        default=os.environ.get(ramfile.ENVIRONMENT) or "memfd",
        help="guest RAM's pages: memfd (4 KiB, the default), huge (2 MiB pages on a private "
        "tmpfs; needs CAP_SYS_ADMIN; faster where the host does not reclaim free memory), "
        f"auto (huge where possible). Default: ${ramfile.ENVIRONMENT}, else memfd",
    )
    args = parser.parse_args(argv)
    try:
        ramfile.check_backing(args.ram_backing)
    except ramfile.RAMBackingError as e:
        raise StartupError(f"--ram-backing {args.ram_backing}: {e}") from None
    # Workers take the agent's environment, and create their VM's RAM from it.
    os.environ[ramfile.ENVIRONMENT] = args.ram_backing
    if not NAME_RE.fullmatch(args.name):
        raise StartupError(
            f"--name {args.name!r}: use 1-63 of a-z, 0-9 and '-', starting with a letter or digit"
        )
    host, sep, port = args.listen.rpartition(":")
    if not sep or not host or not port.isdigit() or int(port) > 65535:
        raise StartupError(f"--listen {args.listen!r}: expected HOST:PORT")
    try:
        memory = parse_size(args.memory) if args.memory else _host_memory()
        console_buffer = parse_size(args.console_buffer, default_unit="")
    except ValueError as e:
        raise StartupError(str(e)) from None
    vcpus = args.vcpus if args.vcpus is not None else (os.cpu_count() or 1)
    if vcpus < 1 or memory < (1 << 20) or console_buffer < 1:
        raise StartupError("--vcpus, --memory and --console-buffer must be positive")
    labels = {}
    for item in args.label:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise StartupError(f"--label {item!r}: expected KEY=VALUE")
        labels[key] = value
    data_dir = args.data_dir.resolve()
    if not socket_path_fits(data_dir):
        raise StartupError(f"--data-dir {data_dir} is too long for unix socket paths")
    return AgentConfig(
        name=args.name,
        listen=args.listen,
        data_dir=data_dir,
        capacity=types_pb2.Resources(vcpus=vcpus, memory_bytes=memory),
        console_buffer=console_buffer,
        coordinator=args.coordinator,
        labels=labels,
    )


def _lock_data_dir(data_dir: Path) -> int:
    data_dir.mkdir(parents=True, exist_ok=True)
    fd = os.open(data_dir / "agent.lock", os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        raise StartupError(f"data dir {data_dir} is in use by another ferry-node") from None
    return fd


async def _serve(config: AgentConfig) -> None:
    async with trio.open_nursery() as nursery:
        agent = Agent(config, nursery)
        await agent.recover()
        server = grpc.server(
            # A console follower holds a thread while it follows: room for many of them.
            ThreadPoolExecutor(max_workers=128, thread_name_prefix="agent-grpc"),
            # Without this, a second agent could silently share a port that is taken.
            options=[("grpc.so_reuseport", 0)],
        )
        node_pb2_grpc.add_NodeAgentServicer_to_server(
            NodeAgentService(agent, trio.lowlevel.current_trio_token()), server
        )
        service_name = node_pb2.DESCRIPTOR.services_by_name["NodeAgent"].full_name
        health_servicer = health.HealthServicer()
        health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
        reflection.enable_server_reflection(
            [service_name, health.SERVICE_NAME, reflection.SERVICE_NAME], server
        )
        try:
            port = server.add_insecure_port(config.listen)
        except RuntimeError:
            port = 0
        if port == 0:
            raise StartupError(f"cannot listen on {config.listen}")
        agent.address = f"{config.listen.rpartition(':')[0]}:{port}"
        server.start()
        for name in ("", service_name):
            health_servicer.set(name, health_pb2.HealthCheckResponse.SERVING)
        (config.data_dir / "agent.json").write_text(
            json.dumps({"name": config.name, "address": agent.address, "pid": os.getpid()})
        )
        cap = config.capacity
        log.info(
            "node %s listening on %s: %d vCPUs, %d MiB, %d VMs known, data %s",
            config.name,
            agent.address,
            cap.vcpus,
            cap.memory_bytes >> 20,
            len(agent.vms),
            config.data_dir,
        )
        if config.coordinator:
            nursery.start_soon(registration.run, agent, config.coordinator)
        with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
            async for _ in signals:
                break
        running = sum(1 for r in agent.vms.values() if r.has_worker)
        log.info("stopping; %d VM workers keep running and will be adopted on restart", running)
        health_servicer.enter_graceful_shutdown()
        await trio.to_thread.run_sync(lambda: server.stop(1.0).wait())
        nursery.cancel_scope.cancel()


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(
        level=logging.INFO,
        format="%(asctime)s ferry-node %(levelname)s %(message)s",
        stream=sys.stderr,
    )
    errors: list[BaseException] = []
    try:
        config = _parse_args(argv)
        _lock_data_dir(config.data_dir)
        trio.run(_serve, config)
    except* StartupError as group:  # raised inside the agent's nursery, hence a group
        errors.extend(group.exceptions)
    for error in errors:
        print(f"ferry-node: {error}", file=sys.stderr)
    return 2 if errors else 0


if __name__ == "__main__":
    raise SystemExit(main())
