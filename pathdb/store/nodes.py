"""Conversion between :class:`pathdb.graph.Node` and rows of the ``nodes`` table."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from pathdb.graph import Node, NodeKind, Site

NODE_COLUMNS = (
    "node_id", "kind", "layer", "head", "site", "position", "kv_position", "label", "component",
)  # fmt: skip


def node_row(node_id: int, node: Node, names: Sequence[str] | None = None) -> tuple[Any, ...]:
    """The ``nodes`` row (without ``run_id``) for ``node``, in :data:`NODE_COLUMNS` order; ``names``
    labels role-aligned positions (``a3.h0<q>@END``)."""
    return (
        node_id,
        str(node.kind),
        node.layer,
        node.head,
        None if node.site is None else str(node.site),
        node.position,
        node.kv_position,
        node.label_with(names),
        node.component,
    )


def row_node(
    kind: str,
    layer: int,
    head: int | None,
    site: str | None,
    position: int | None,
    kv_position: int | None,
) -> Node:
    """Rebuild a :class:`Node` from the ``nodes`` columns kind..kv_position."""
    return Node(
        NodeKind(kind),
        int(layer),
        None if head is None else int(head),
        None if site is None else Site(site),
        None if position is None else int(position),
        None if kv_position is None else int(kv_position),
    )
