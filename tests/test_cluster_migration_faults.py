"""Migrations that break at the worst moments, with real workers made to fail on cue.

The agents' test-only ``FERRY_FAULT`` hook (node/faults.py) makes one side's worker die or
cut the stream at a named point; the coordinator must then leave exactly one running copy
and record ownership where the guest really runs.
"""

from __future__ import annotations

import pytest
from coordcluster import CoordCluster, migration_available, wait_for

from protos.ferry.v1 import coordinator_pb2, node_pb2, types_pb2


def _migrate(cl: CoordCluster, name: str, to: str) -> coordinator_pb2.Operation:
    op = cl.stub.MigrateVM(coordinator_pb2.MigrateVMRequest(name=name, node=to), timeout=30)
    return list(cl.stub.WatchOperation(coordinator_pb2.OperationRef(id=op.id), timeout=300))[-1]


def _names(node: object) -> set[str]:
    vms = node.stub.ListVMs(node_pb2.ListVMsRequest(), timeout=10).vms  # type: ignore[attr-defined]
    return {v.spec.name for v in vms if v.state != types_pb2.VM_STATE_FAILED}


def test_destination_dying_mid_copy_leaves_the_vm_running_where_it_was(
    cl: CoordCluster, monkeypatch: pytest.MonkeyPatch
) -> None:
    a = cl.agent("na")
    monkeypatch.setenv("FERRY_FAULT", "dst:kill:round0")
    b = cl.agent("nb")
    monkeypatch.delenv("FERRY_FAULT")
    if not migration_available(cl.stub, a):
        pytest.skip("the agents do not implement live migration yet")
    cl.create("survivor", node="na")
    final = _migrate(cl, "survivor", "nb")
    assert final.state == coordinator_pb2.OPERATION_STATE_FAILED
    assert "survivor" in final.error
    vm = cl.vm("survivor")
    assert (vm.node, vm.generation, vm.operation) == ("na", 1, "")
    assert a.get("survivor").state == types_pb2.VM_STATE_RUNNING
    assert wait_for(lambda: "survivor" not in _names(b))
    kinds = [e.kind for e in cl.events() if e.vm == "survivor"]
    assert "vm-migration-failed" in kinds and "vm-migrated" not in kinds
    # Nothing is left reserved or busy: the VM migrates again (to a node without the fault,
    # since nb passes FERRY_FAULT to every worker it starts).
    cl.agent("nc")
    again = _migrate(cl, "survivor", "nc")
    assert again.state == coordinator_pb2.OPERATION_STATE_SUCCEEDED, again.error
    assert cl.vm("survivor").node == "nc"


def test_a_stream_cut_after_the_final_message_is_settled_by_the_destination(
    cl: CoordCluster, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("FERRY_FAULT", "src:drop:complete")
    a = cl.agent("na")
    monkeypatch.delenv("FERRY_FAULT")
    b = cl.agent("nb")
    if not migration_available(cl.stub, a):
        pytest.skip("the agents do not implement live migration yet")
    cl.create("limbo", node="na")
    final = _migrate(cl, "limbo", "nb")
    # The source could not tell whether the guest resumed on nb; nb says it did not, so the
    # source's paused copy resumes and the migration failed without losing the VM.
    assert final.items[0].migration.status == types_pb2.MIGRATION_STATE_UNKNOWN
    assert final.state == coordinator_pb2.OPERATION_STATE_FAILED
    vm = cl.vm("limbo")
    assert (vm.node, vm.generation) == ("na", 1)
    assert a.get("limbo").state == types_pb2.VM_STATE_RUNNING
    assert wait_for(lambda: "limbo" not in _names(b))
