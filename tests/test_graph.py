"""The graph model: labels round-trip, predecessor sets follow DESIGN.md, bad nodes are named."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pathdb.graph import (
    GraphError,
    ModelShape,
    Node,
    NodeKind,
    Site,
    feeds,
    is_complete,
    parse_label,
    path_label,
    predecessors,
)

SHAPE = ModelShape(n_layers=3, n_heads=2, n_positions=5)


def _all_nodes(shape: ModelShape) -> list[Node]:
    out: list[Node] = [Node.final(shape.n_layers, p) for p in range(shape.n_positions)]
    for p in [None, *range(shape.n_positions)]:
        out.append(Node.embed(p))
        for layer in range(shape.n_layers):
            out.append(Node.mlp(layer, p))
            for h in [None, *range(shape.n_heads)]:
                out.append(Node.attn(layer, h, Site.Q, p))
                for site in (Site.KV, Site.K, Site.V):
                    ks = [None] if p is None else [None, *range(p + 1)]
                    out.extend(Node.attn(layer, h, site, p, k) for k in ks)
    return out


def test_labels_round_trip_and_are_unique() -> None:
    nodes = _all_nodes(SHAPE)
    labels = [n.label for n in nodes]
    assert len(set(labels)) == len(nodes)
    for n in nodes:
        assert parse_label(n.label, SHAPE.n_layers) == n


@pytest.mark.parametrize(
    ("label", "node"),
    [
        ("input@3", Node.embed(3)),
        ("m4@10", Node.mlp(4, 10)),
        ("a3.h0<q>@10", Node.attn(3, 0, "q", 10)),
        ("a5.h1<kv>@14:3", Node.attn(5, 1, "kv", 14, 3)),
        ("a5.h1<k>@14:3", Node.attn(5, 1, "k", 14, 3)),
        ("a2<q>@7", Node.attn(2, None, "q", 7)),
        ("a2.h1<kv>@7:*", Node.attn(2, 1, "kv", 7, None)),
        ("a2.h1<v>", Node.attn(2, 1, "v", None, None)),
        ("logits@14", Node.final(6, 14)),
    ],
)
def test_documented_labels(label: str, node: Node) -> None:
    assert node.label == label
    assert parse_label(label, 6) == node


@pytest.mark.parametrize("bad", ["a3.h0@10", "x1@2", "a1.h0<q>@3:1", "m1@2:0", "logits@"])
def test_unparseable_labels_are_named(bad: str) -> None:
    with pytest.raises(GraphError, match="label"):
        parse_label(bad, 4)


def _senders_at(shape: ModelShape, r: int, max_layer: int, same_layer_attn: bool) -> int:
    """Closed-form count: EMBED + per layer (H query heads + H*(r+1) kv heads + MLP)."""
    per_attn = shape.n_heads * (1 + r + 1)
    return 1 + max_layer * (per_attn + 1) + (per_attn if same_layer_attn else 0)


def test_predecessor_counts_follow_the_design() -> None:
    L, p = SHAPE.n_layers, 4
    assert len(predecessors(Node.final(L, p), SHAPE)) == _senders_at(SHAPE, p, L, False)
    assert len(predecessors(Node.mlp(1, p), SHAPE)) == _senders_at(SHAPE, p, 1, True)
    assert len(predecessors(Node.attn(2, 0, "q", p), SHAPE)) == _senders_at(SHAPE, p, 2, False)
    # a kv-side head reads source k: its senders write at k
    assert len(predecessors(Node.attn(2, 0, "kv", p, 1), SHAPE)) == _senders_at(SHAPE, 1, 2, False)
    # all sources (batch_positions screen): senders at every k <= p
    assert len(predecessors(Node.attn(2, 0, "kv", p, None), SHAPE)) == sum(
        _senders_at(SHAPE, k, 2, False) for k in range(p + 1)
    )
    assert predecessors(Node.embed(p), SHAPE) == []


def test_every_predecessor_feeds_and_nothing_else_does() -> None:
    nodes = _all_nodes(SHAPE)
    for receiver in nodes:
        if receiver.kind is NodeKind.EMBED or (
            receiver.head is None and receiver.kind is NodeKind.ATTN
        ):
            continue
        preds = predecessors(receiver, SHAPE)
        assert len(set(preds)) == len(preds)
        single = [n for n in nodes if n.kind is not NodeKind.FINAL and (n.kind is not NodeKind.ATTN or n.head is not None)
                  and (n.site in (None, Site.Q, Site.KV)) and not (n.is_kv and n.position is not None and n.kv_position is None)]  # fmt: skip
        want = {n for n in single if feeds(n, receiver)}
        assert set(preds) == want, receiver.label


def test_feeds_rules() -> None:
    assert feeds(Node.attn(1, 0, "q", 3), Node.mlp(1, 3))  # same-layer attention -> MLP
    assert not feeds(Node.mlp(1, 3), Node.attn(1, 0, "q", 3))  # MLP does not feed same-layer heads
    assert not feeds(Node.attn(1, 0, "q", 3), Node.attn(1, 1, "q", 3))
    assert feeds(Node.embed(2), Node.attn(0, 0, "kv", 3, 2))  # kv head reads the source position
    assert not feeds(Node.embed(3), Node.attn(0, 0, "kv", 3, 2))
    assert feeds(Node.mlp(2, 4), Node.final(3, 4)) and not feeds(Node.mlp(2, 3), Node.final(3, 4))


@pytest.mark.parametrize(
    ("node", "fragment"),
    [
        (Node.attn(1, 5, "q", 2), "head 5 out of range"),
        (Node.mlp(7, 2), "layer 7 out of range"),
        (Node.mlp(1, 9), "position 9 out of range"),
        (Node.attn(1, 0, "kv", 2, 3), "after the query position"),
    ],
)
def test_invalid_nodes_are_named(node: Node, fragment: str) -> None:
    with pytest.raises(GraphError, match=fragment):
        SHAPE.validate(node)


def test_paths() -> None:
    path = (Node.embed(3), Node.attn(0, 1, "q", 3), Node.mlp(1, 3), Node.final(3, 3))
    SHAPE.validate_path(path)
    assert is_complete(path)
    assert path_label(path) == "input@3 -> a0.h1<q>@3 -> m1@3 -> logits@3"
    with pytest.raises(GraphError, match="does not feed"):
        SHAPE.validate_path((Node.mlp(2, 3), Node.attn(1, 0, "q", 3), Node.final(3, 3)))
    with pytest.raises(GraphError, match="FINAL"):
        SHAPE.validate_path((Node.embed(3), Node.mlp(1, 3)))


@settings(max_examples=30, deadline=None)
@given(st.integers(1, 4), st.integers(1, 3), st.integers(1, 6), st.data())
def test_predecessor_sets_random_shapes(
    n_layers: int, n_heads: int, n_pos: int, data: st.DataObject
) -> None:
    shape = ModelShape(n_layers, n_heads, n_pos)
    p = data.draw(st.integers(0, n_pos - 1))
    preds = predecessors(Node.final(n_layers, p), shape)
    assert len(preds) == _senders_at(shape, p, n_layers, False)
    for n in preds:
        shape.validate(n)
        assert feeds(n, Node.final(n_layers, p))
