"""The call tree of one query: every RLM loop and every model call is a node.

The tree is the bookkeeping; the structure that guarantees "a failure or cancellation of a
query cancels its whole subtree and kills its workers" is the anyio task-group nesting in
the engine, which mirrors this tree one to one (each RLM node runs in its own task group,
each fan-out item is a task in it).

Node ids are short counters ("n1", "n2", ...) assigned in creation order: deterministic
for a deterministic run, readable in traces, unique within a query.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Literal

from . import _events

__all__ = ["CallTree", "Node", "NodeKind", "NodeStatus"]

NodeKind = Literal["rlm", "llm"]
NodeStatus = Literal["running", "ok", "error", "budget", "cancelled", "timeout"]


@dataclass(slots=True, kw_only=True)
class Node:
    node_id: str
    parent_id: str | None
    depth: int
    kind: NodeKind
    model: str
    label: str
    started_at: float
    finished_at: float | None = None
    status: NodeStatus = "running"
    error: str | None = None
    children: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return {
            "node_id": self.node_id,
            "parent_id": self.parent_id,
            "depth": self.depth,
            "kind": self.kind,
            "model": self.model,
            "label": self.label,
            "started_at": self.started_at,
            "finished_at": self.finished_at,
            "status": self.status,
            "error": self.error,
            "children": list(self.children),
        }


class CallTree:
    """Nodes of one query, by id, with parent links."""

    def __init__(self, clock: Callable[[], float]) -> None:
        self._clock = clock
        self._ids = itertools.count(1)
        self.nodes: dict[str, Node] = {}

    def open(self, *, parent: Node | None, depth: int, kind: NodeKind, model: str, label: str) -> Node:
        node = Node(
            node_id=f"n{next(self._ids)}",
            parent_id=parent.node_id if parent else None,
            depth=depth,
            kind=kind,
            model=model,
            label=label,
            started_at=self._clock(),
        )
        self.nodes[node.node_id] = node
        if parent is not None:
            parent.children.append(node.node_id)
        with _events.bind(node_id=node.node_id, depth=depth):
            _events.emit(
                _events.NodeStart,
                parent_id=node.parent_id,
                node_kind=kind,
                model=model,
                label=label,
            )
        return node

    def close(self, node: Node, status: NodeStatus, error: str | None = None) -> None:
        if node.finished_at is not None:
            return
        node.finished_at = self._clock()
        node.status = status
        node.error = error
        with _events.bind(node_id=node.node_id, depth=node.depth):
            _events.emit(_events.NodeFinish, status=status, error=error)

    @property
    def root(self) -> Node | None:
        return self.nodes.get("n1")
