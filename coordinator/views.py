"""How the ``ferry`` CLI shows API objects: stable JSON for scripts, tables for humans.

The JSON shapes are a public interface documented in ``docs/cli.md``: keys are only ever
added, never renamed or removed. They are built by hand rather than by protobuf's JSON
mapping so that states read as short lowercase words and sizes as plain byte counts.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import Any

from protos.ferry.v1 import coordinator_pb2, types_pb2


def vm_state(state: int) -> str:
    return types_pb2.VMState.Name(state).removeprefix("VM_STATE_").lower()  # type: ignore[arg-type]


def op_state(state: int) -> str:
    name = coordinator_pb2.OperationState.Name(state)  # type: ignore[arg-type]
    return name.removeprefix("OPERATION_STATE_").lower()


def migration_state(state: int) -> str:
    name = types_pb2.MigrationState.Name(state)  # type: ignore[arg-type]
    return name.removeprefix("MIGRATION_STATE_").lower()


def node_status(node: coordinator_pb2.Node) -> str:
    """One word: down, draining, drained, cordoned or ready (the first that applies)."""
    if node.state == coordinator_pb2.NODE_STATE_DOWN:
        return "down"
    if node.draining:
        return "draining"
    if node.drained:
        return "drained"
    if node.cordoned:
        return "cordoned"
    return "ready"


def node_json(node: coordinator_pb2.Node) -> dict[str, Any]:
    return {
        "name": node.name,
        "address": node.address,
        "status": node_status(node),
        "ready": node.state == coordinator_pb2.NODE_STATE_READY,
        "cordoned": node.cordoned,
        "draining": node.draining,
        "drained": node.drained,
        "capacity": {"vcpus": node.capacity.vcpus, "memory_bytes": node.capacity.memory_bytes},
        "used": {"vcpus": node.used.vcpus, "memory_bytes": node.used.memory_bytes},
        "labels": dict(sorted(node.labels.items())),
        "vm_count": node.vm_count,
        "last_heartbeat": node.last_heartbeat,
        "ferry_version": node.ferry_version,
    }


def vm_json(vm: coordinator_pb2.VM) -> dict[str, Any]:
    spec = vm.spec
    return {
        "name": spec.name,
        "node": vm.node,
        "state": vm_state(vm.state),
        "desired_state": vm_state(vm.desired_state),
        "generation": vm.generation,
        "memory_bytes": spec.memory_bytes,
        "vcpus": spec.vcpus or 1,
        "kernel": spec.kernel,
        "bios": spec.bios,
        "append": spec.append,
        "labels": dict(sorted(spec.labels.items())),
        "node_selector": dict(sorted(vm.node_selector.items())),
        "anti_affinity_group": vm.anti_affinity_group,
        "failure": vm.failure,
        "exit_code": vm.exit_code if vm.HasField("exit_code") else None,
        "mips": round(vm.mips, 3),
        "guest_seconds": round(vm.guest_seconds, 6),
        "console_bytes": vm.console_bytes,
        "created_at": vm.created_at,
        "operation": vm.operation or None,
    }


def migration_json(m: types_pb2.MigrationStatus) -> dict[str, Any]:
    return {
        "status": migration_state(m.status),
        "total_time_ms": round(m.total_time_ms, 3),
        "downtime_ms": round(m.downtime_ms, 3),
        "setup_time_ms": round(m.setup_time_ms, 3),
        "expected_downtime_ms": round(m.expected_downtime_ms, 3),
        "transferred": m.transferred,
        "remaining": m.remaining,
        "total": m.total,
        "duplicate": m.duplicate,
        "normal": m.normal,
        "compressed_bytes": m.compressed_bytes,
        "dirty_pages_rate": round(m.dirty_pages_rate, 3),
        "dirty_sync_count": m.dirty_sync_count,
        "cpu_throttle_percentage": m.cpu_throttle_percentage,
        "mbps": round(m.mbps, 3),
        # Monotonic seconds: the source's clock when its vCPU stopped, the destination's
        # when the guest resumed there (comparable only when both ends share a host).
        "paused_at": m.paused_at,
        "resumed_at": m.resumed_at,
        "error": m.error,
        "downtime_phases_ms": {k: round(v, 3) for k, v in m.downtime_phases_ms.items()},
        "rounds": [round_json(r) for r in m.rounds],
    }


def round_json(r: types_pb2.MigrationRound) -> dict[str, Any]:
    return {
        "number": r.number,
        "switchover": r.switchover,
        "pages": r.pages,
        "zero_pages": r.zero_pages,
        "bytes": r.bytes,
        "duration_ms": round(r.duration_ms, 3),
        "mbps": round(r.mbps, 3),
        "dirty_pages": r.dirty_pages,
        "dirty_pages_rate": round(r.dirty_pages_rate, 3),
        "expected_downtime_ms": round(r.expected_downtime_ms, 3),
        "cpu_throttle_percentage": r.cpu_throttle_percentage,
        "downtime_budget_ms": round(r.downtime_budget_ms, 3),
    }


def migration_rounds(m: types_pb2.MigrationStatus) -> str:
    """A migration's rounds as a table: what each moved, how fast, what the guest dirtied
    meanwhile, and the convergence policy's state; empty before round 0 ends."""
    rows = []
    for r in m.rounds:
        seconds = r.duration_ms / 1000
        rows.append(
            (
                "switchover" if r.switchover else r.number,
                r.pages,
                size(r.bytes),
                f"{r.duration_ms:.1f}",
                f"{r.bytes / seconds / 1e6:.0f}" if seconds > 0 else "-",
                "-" if r.switchover else r.dirty_pages,
                f"{r.expected_downtime_ms:.1f}",
                f"{r.cpu_throttle_percentage}%",
                f"{r.downtime_budget_ms:g}",
            )
        )
    if not rows:
        return ""
    headers = ("ROUND", "PAGES", "SENT", "MS", "MB/S", "DIRTIED")
    return table((*headers, "EXPECT-DOWN-MS", "THROTTLE", "BUDGET-MS"), rows)


_PHASE_ORDER = ("pause", "final-round", "destination")


def downtime_phases(m: types_pb2.MigrationStatus) -> str:
    """Where a migration's downtime went, one line: "pause 1.2 + final-round 0.8 +
    destination 3.1 ms"; empty before the switchover."""
    phases = m.downtime_phases_ms
    names = [n for n in _PHASE_ORDER if n in phases] + sorted(set(phases) - set(_PHASE_ORDER))
    if not names:
        return ""
    return " + ".join(f"{name} {phases[name]:.1f}" for name in names) + " ms"


def op_json(op: coordinator_pb2.Operation) -> dict[str, Any]:
    return {
        "id": op.id,
        "kind": op.kind,
        "target": op.target,
        "state": op_state(op.state),
        "progress": round(op.progress, 4),
        "message": op.message,
        "error": op.error,
        "created_at": op.created_at,
        "updated_at": op.updated_at,
        "items": [
            {
                "vm": i.vm,
                "state": op_state(i.state),
                "progress": round(i.progress, 4),
                "message": i.message,
                "source": i.source,
                "destination": i.destination,
                "migration": migration_json(i.migration) if i.HasField("migration") else None,
            }
            for i in op.items
        ],
    }


def event_json(e: coordinator_pb2.Event) -> dict[str, Any]:
    return {
        "seq": e.seq,
        "time": e.time,
        "kind": e.kind,
        "node": e.node,
        "vm": e.vm,
        "message": e.message,
        "operation": e.operation,
    }


def size(n: int) -> str:
    """Binary units, one decimal where it matters: 64M, 1.5G."""
    for unit, shift in (("T", 40), ("G", 30), ("M", 20), ("K", 10)):
        if n >= 1 << shift:
            value = n / (1 << shift)
            return f"{value:.0f}{unit}" if value == int(value) else f"{value:.1f}{unit}"
    return f"{n}B"


def table(headers: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
    """Left-aligned columns separated by two spaces, like kubectl."""
    cells = [[str(h) for h in headers], *[[str(c) for c in r] for r in rows]]
    widths = [max(len(row[i]) for row in cells) for i in range(len(headers))]
    return "\n".join(
        "  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip() for row in cells
    )


def age(timestamp: float) -> str:
    seconds = max(0.0, time.time() - timestamp)
    if seconds < 120:
        return f"{seconds:.0f}s"
    if seconds < 7200:
        return f"{seconds / 60:.0f}m"
    return f"{seconds / 3600:.0f}h"


def nodes_table(nodes: Sequence[coordinator_pb2.Node]) -> str:
    rows = [
        (
            n.name,
            node_status(n),
            n.address,
            f"{n.used.vcpus}/{n.capacity.vcpus}",
            f"{size(n.used.memory_bytes)}/{size(n.capacity.memory_bytes)}",
            n.vm_count,
            ",".join(f"{k}={v}" for k, v in sorted(n.labels.items())) or "-",
            age(n.last_heartbeat) if n.last_heartbeat else "-",
        )
        for n in nodes
    ]
    return table(("NAME", "STATUS", "ADDRESS", "VCPUS", "MEMORY", "VMS", "LABELS", "SEEN"), rows)


def vms_table(vms: Sequence[coordinator_pb2.VM]) -> str:
    rows = [
        (
            v.spec.name,
            v.node,
            vm_state(v.state),
            vm_state(v.desired_state),
            size(v.spec.memory_bytes),
            f"{v.mips:.1f}",
            f"{v.guest_seconds:.1f}s",
            v.generation,
            v.operation or "-",
        )
        for v in vms
    ]
    return table(
        ("NAME", "NODE", "STATE", "DESIRED", "MEMORY", "MIPS", "GUEST-TIME", "GEN", "OPERATION"),
        rows,
    )


def ops_table(ops: Sequence[coordinator_pb2.Operation]) -> str:
    rows = [
        (
            o.id,
            o.kind,
            o.target,
            op_state(o.state),
            f"{o.progress * 100:.0f}%",
            age(o.created_at),
            o.error or o.message or "-",
        )
        for o in ops
    ]
    return table(("ID", "KIND", "TARGET", "STATE", "PROGRESS", "AGE", "DETAIL"), rows)


def op_detail(op: coordinator_pb2.Operation) -> str:
    lines = [
        f"{op.id}  {op.kind} {op.target}: {op_state(op.state)} {op.progress * 100:.0f}%",
    ]
    if op.error:
        lines.append(f"error: {op.error}")
    if op.items:
        rows = []
        for i in op.items:
            m = i.migration
            rows.append(
                (
                    i.vm,
                    f"{i.source or '-'} -> {i.destination or '-'}",
                    op_state(i.state),
                    f"{i.progress * 100:.0f}%",
                    f"{m.downtime_ms:.1f}" if m.status else "-",
                    f"{m.total_time_ms:.0f}" if m.status else "-",
                    size(m.transferred) if m.status else "-",
                    i.message,
                )
            )
        lines.append(
            table(
                ("VM", "MOVE", "STATE", "PROGRESS", "DOWNTIME-MS", "TOTAL-MS", "SENT", "DETAIL"),
                rows,
            )
        )
        for i in op.items:
            if phases := downtime_phases(i.migration):
                lines.append(f"downtime of {i.vm}: {phases}")
            if rounds := migration_rounds(i.migration):
                lines.append(f"rounds of {i.vm}:")
                lines.append(rounds)
    return "\n".join(lines)


def node_detail(node: coordinator_pb2.Node, vms: Sequence[coordinator_pb2.VM]) -> str:
    lines = [
        f"name:       {node.name}",
        f"status:     {node_status(node)}",
        f"address:    {node.address}",
        f"vcpus:      {node.used.vcpus} used of {node.capacity.vcpus}",
        f"memory:     {size(node.used.memory_bytes)} used of {size(node.capacity.memory_bytes)}",
        "labels:     " + (",".join(f"{k}={v}" for k, v in sorted(node.labels.items())) or "-"),
        f"heartbeat:  {age(node.last_heartbeat)} ago" if node.last_heartbeat else "heartbeat:  -",
        f"version:    {node.ferry_version}",
    ]
    if vms:
        lines += ["", vms_table(vms)]
    return "\n".join(lines)


def vm_detail(vm: coordinator_pb2.VM) -> str:
    spec = vm.spec
    lines = [
        f"name:        {spec.name}",
        f"node:        {vm.node} (generation {vm.generation})",
        f"state:       {vm_state(vm.state)} (desired {vm_state(vm.desired_state)})",
        f"memory:      {size(spec.memory_bytes)}, {spec.vcpus or 1} vCPU",
        f"kernel:      {spec.kernel}",
    ]
    if spec.append:
        lines.append(f"append:      {spec.append}")
    if vm.node_selector:
        lines.append(
            "selector:    " + ",".join(f"{k}={v}" for k, v in sorted(vm.node_selector.items()))
        )
    if vm.anti_affinity_group:
        lines.append(f"anti-affinity: {vm.anti_affinity_group}")
    lines.append(f"guest:       {vm.guest_seconds:.2f}s at {vm.mips:.2f} MIPS")
    if vm.HasField("exit_code"):
        lines.append(f"exit code:   {vm.exit_code}")
    if vm.failure:
        lines.append(f"failure:     {vm.failure}")
    if vm.operation:
        lines.append(f"operation:   {vm.operation}")
    return "\n".join(lines)


def event_line(e: coordinator_pb2.Event) -> str:
    stamp = time.strftime("%H:%M:%S", time.localtime(e.time))
    return f"{stamp}  #{e.seq:<5} {e.kind:<18} {e.message}"
