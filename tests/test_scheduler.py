"""Placement as pure functions: filters say why each node was rejected; weighers choose."""

from __future__ import annotations

import pytest

from coordinator.scheduler import NodeView, NoPlacement, PlacementRequest, place, rejection

MiB = 1 << 20


def node(name: str, **kw: object) -> NodeView:
    fields: dict[str, object] = {
        "ready": True,
        "capacity_vcpus": 4,
        "capacity_memory": 1024 * MiB,
    }
    fields.update(kw)
    return NodeView(name=name, **fields)  # type: ignore[arg-type]


def req(**kw: object) -> PlacementRequest:
    fields: dict[str, object] = {"vcpus": 1, "memory": 64 * MiB}
    fields.update(kw)
    return PlacementRequest(**fields)  # type: ignore[arg-type]


def test_spread_picks_the_emptiest_node_and_pack_the_fullest_that_fits() -> None:
    nodes = [
        node("a", used_memory=512 * MiB, used_vcpus=2),
        node("b", used_memory=128 * MiB, used_vcpus=1),
        node("c", used_memory=960 * MiB, used_vcpus=3),
    ]
    assert place(req(), nodes, "spread") == "b"
    assert place(req(), nodes, "pack") == "c"
    # c has exactly 64 MiB left: pack still fits there; 65 MiB does not.
    assert place(req(memory=65 * MiB), nodes, "pack") == "a"


def test_ties_go_to_the_first_node_by_name() -> None:
    assert place(req(), [node("b"), node("a"), node("c")]) == "a"


def test_capacity_rejection_names_what_is_short() -> None:
    nodes = [node("a", used_memory=1000 * MiB), node("b", used_vcpus=4)]
    with pytest.raises(NoPlacement) as e:
        place(req(), nodes)
    assert e.value.rejections == {
        "a": "needs 64 MiB, 24 MiB free",
        "b": "needs 1 vCPUs, 0 free",
    }
    assert "a: needs 64 MiB, 24 MiB free" in str(e.value)


def test_down_cordoned_and_draining_nodes_are_never_chosen() -> None:
    nodes = [
        node("a", ready=False),
        node("b", cordoned=True),
        node("c", draining=True, cordoned=True),
    ]
    with pytest.raises(NoPlacement) as e:
        place(req(), nodes)
    assert e.value.rejections == {"a": "down", "b": "cordoned", "c": "draining"}
    assert place(req(), [*nodes, node("d", used_memory=900 * MiB)]) == "d"


def test_node_selector_must_match_every_label() -> None:
    nodes = [
        node("a", labels={"zone": "x"}),
        node("b", labels={"zone": "y", "disk": "ssd"}),
        node("c", labels={"zone": "y"}),
    ]
    assert place(req(node_selector={"zone": "y", "disk": "ssd"}), nodes) == "b"
    with pytest.raises(NoPlacement) as e:
        place(req(node_selector={"zone": "z"}), nodes)
    assert e.value.rejections["a"] == "label zone=z required, node has zone=x"
    assert rejection(node("d"), req(node_selector={"zone": "z"})) == (
        "label zone=z required, node has no zone"
    )


def test_anti_affinity_keeps_a_group_apart() -> None:
    nodes = [node("a", groups=frozenset({"web"})), node("b", used_memory=512 * MiB)]
    assert place(req(anti_affinity_group="web"), nodes) == "b"
    assert place(req(anti_affinity_group="db"), nodes) == "a"
    with pytest.raises(NoPlacement, match="anti-affinity group web"):
        place(req(anti_affinity_group="web"), nodes[:1])


def test_a_named_node_must_still_pass_the_filters_and_only_it_is_reported() -> None:
    nodes = [node("a"), node("b", used_memory=1024 * MiB)]
    assert place(req(only="a"), nodes) == "a"
    with pytest.raises(NoPlacement) as e:
        place(req(only="b"), nodes)
    assert list(e.value.rejections) == ["b"]
    with pytest.raises(NoPlacement, match="no such node"):
        place(req(only="zz"), nodes)


def test_a_migration_never_targets_its_source() -> None:
    nodes = [node("a"), node("b", used_memory=512 * MiB)]
    assert place(req(exclude=frozenset({"a"})), nodes) == "b"


def test_no_nodes_is_its_own_message() -> None:
    with pytest.raises(NoPlacement, match="no nodes are registered"):
        place(req(), [])


def test_unknown_weigher_is_refused() -> None:
    with pytest.raises(ValueError, match="unknown weigher"):
        place(req(), [node("a")], "random")
