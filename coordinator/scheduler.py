"""Where a VM goes: filter the nodes, then weigh the survivors (as OpenStack Nova does).

Pure functions over plain values, so placement is tested without processes and a failure
can say, node by node, why each one was rejected. The coordinator builds the
:class:`NodeView` list from its store (its own accounting of what each node holds, plus
reservations for migrations in flight) and calls :func:`place`.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field

WEIGHERS = ("spread", "pack")


@dataclass(frozen=True)
class NodeView:
    """What the scheduler needs to know about one node."""

    name: str
    ready: bool
    capacity_vcpus: int
    capacity_memory: int
    used_vcpus: int = 0
    used_memory: int = 0
    cordoned: bool = False
    draining: bool = False
    labels: Mapping[str, str] = field(default_factory=dict)
    # Anti-affinity groups of the VMs already on the node.
    groups: frozenset[str] = frozenset()

    @property
    def free_vcpus(self) -> int:
        return self.capacity_vcpus - self.used_vcpus

    @property
    def free_memory(self) -> int:
        return self.capacity_memory - self.used_memory


@dataclass(frozen=True)
class PlacementRequest:
    """What a VM needs from a node."""

    vcpus: int
    memory: int
    node_selector: Mapping[str, str] = field(default_factory=dict)
    anti_affinity_group: str = ""
    # Nodes that must not be chosen (a migration's source).
    exclude: frozenset[str] = frozenset()
    # Only this node may be chosen (the user named it); the filters still apply.
    only: str = ""


class NoPlacement(Exception):
    """No node passes the filters; ``rejections`` says why, node by node."""

    def __init__(self, rejections: Mapping[str, str]) -> None:
        self.rejections = dict(rejections)
        if not rejections:
            text = "no nodes are registered"
        else:
            text = "; ".join(f"{n}: {why}" for n, why in sorted(rejections.items()))
        super().__init__(f"no node can take the VM ({text})")


def _mib(n: int) -> str:
    return f"{n / (1 << 20):.0f} MiB"


def _state(node: NodeView, req: PlacementRequest) -> str | None:
    if node.name in req.exclude:
        return "is the VM's current node"
    if req.only and node.name != req.only:
        return f"not the requested node {req.only}"
    if not node.ready:
        return "down"
    if node.draining:
        return "draining"
    if node.cordoned:
        return "cordoned"
    return None


def _capacity(node: NodeView, req: PlacementRequest) -> str | None:
    if node.free_vcpus < req.vcpus:
        return f"needs {req.vcpus} vCPUs, {max(node.free_vcpus, 0)} free"
    if node.free_memory < req.memory:
        return f"needs {_mib(req.memory)}, {_mib(max(node.free_memory, 0))} free"
    return None


def _labels(node: NodeView, req: PlacementRequest) -> str | None:
    for key, value in sorted(req.node_selector.items()):
        if node.labels.get(key) != value:
            have = node.labels.get(key)
            return (
                f"label {key}={value} required, node has {key}={have}"
                if have is not None
                else f"label {key}={value} required, node has no {key}"
            )
    return None


def _anti_affinity(node: NodeView, req: PlacementRequest) -> str | None:
    if req.anti_affinity_group and req.anti_affinity_group in node.groups:
        return f"already runs a VM of anti-affinity group {req.anti_affinity_group}"
    return None


FILTERS: tuple[Callable[[NodeView, PlacementRequest], str | None], ...] = (
    _state,
    _capacity,
    _labels,
    _anti_affinity,
)


def rejection(node: NodeView, req: PlacementRequest) -> str | None:
    """Why ``node`` cannot take the VM (the first filter that fails), or None."""
    for check in FILTERS:
        reason = check(node, req)
        if reason is not None:
            return reason
    return None


def _free_share(node: NodeView, req: PlacementRequest) -> float:
    """Fraction of the node left free after placing the VM (memory and vCPUs averaged)."""
    mem = (node.free_memory - req.memory) / max(node.capacity_memory, 1)
    cpu = (node.free_vcpus - req.vcpus) / max(node.capacity_vcpus, 1)
    return (mem + cpu) / 2


def weigh(node: NodeView, req: PlacementRequest, weigher: str) -> float:
    """Higher is better. spread: the emptiest node; pack: the fullest that fits."""
    share = _free_share(node, req)
    if weigher == "spread":
        return share
    if weigher == "pack":
        return -share
    raise ValueError(f"unknown weigher {weigher!r}; choose from {', '.join(WEIGHERS)}")


def place(req: PlacementRequest, nodes: Sequence[NodeView], weigher: str = "spread") -> str:
    """The chosen node's name; raises :class:`NoPlacement` with every node's rejection."""
    if weigher not in WEIGHERS:
        raise ValueError(f"unknown weigher {weigher!r}; choose from {', '.join(WEIGHERS)}")
    if req.only and req.only not in {n.name for n in nodes}:
        raise NoPlacement({req.only: "no such node"})
    rejections: dict[str, str] = {}
    fit: list[NodeView] = []
    for node in nodes:
        reason = rejection(node, req)
        if reason is None:
            fit.append(node)
        elif not req.only or node.name == req.only:
            rejections[node.name] = reason
    if not fit:
        raise NoPlacement(rejections)
    # Ties go to the alphabetically first node, so placement is reproducible.
    best = max(fit, key=lambda n: (weigh(n, req, weigher), [-ord(c) for c in n.name]))
    return best.name
