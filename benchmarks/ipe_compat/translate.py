"""Map ipe path nodes to pathdb :class:`pathdb.graph.Node` labels, so the two path sets compare.

EMBED_Node -> ``input@p``; MLP_Node -> ``m{l}@p``; ATTN_Node(patch_query) -> ``a{l}.h{h}<q>@p``;
ATTN_Node(patch_key & patch_value, keyvalue_position k) -> ``a{l}.h{h}<kv>@p:k`` (k / v alone ->
``<k>`` / ``<v>``); FINAL_Node -> ``logits@p``. Non-positional nodes have no ``@``.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from pathdb.graph import Node, Site

Labels = tuple[str, ...]


def ipe_node(node: Any, n_layers: int) -> Node:
    """The pathdb node equivalent to one ipe node (ipe's FINAL sits at layer n_layers - 1)."""
    kind = type(node).__name__
    pos = node.position
    if kind == "EMBED_Node":
        return Node.embed(pos)
    if kind == "MLP_Node":
        return Node.mlp(node.layer, pos)
    if kind == "FINAL_Node":
        return Node.final(n_layers, pos)
    if kind != "ATTN_Node":
        raise ValueError(f"unknown ipe node type {kind!r}")
    if node.patch_query and not (node.patch_key or node.patch_value):
        return Node.attn(node.layer, node.head, Site.Q, pos)
    if node.patch_query:
        raise ValueError(f"ipe node patches query and key/value at once: {node!r}")
    if node.patch_key and node.patch_value:
        return Node.attn(node.layer, node.head, Site.KV, pos, node.keyvalue_position)
    site = Site.K if node.patch_key else Site.V
    return Node.attn(node.layer, node.head, site, pos, node.keyvalue_position)


def ipe_labels(path: Sequence[Any], n_layers: int) -> Labels:
    """Labels of an ipe path (start first, FINAL last), as pathdb writes them."""
    return tuple(ipe_node(n, n_layers).label for n in path)


def pathdb_labels(path: Sequence[Node]) -> Labels:
    """Labels of a pathdb path (start first, FINAL last)."""
    return tuple(n.label for n in path)
