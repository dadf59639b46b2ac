"""Graph model: the nodes of a pre-LN transformer's residual-stream graph, their labels and predecessors.

A path is a tuple of nodes, start first, ending at a FINAL node (see DESIGN.md section 2).
Nodes are small frozen dataclasses so they can be hashed, stored and compared cheaply.
"""

from __future__ import annotations

import re
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from enum import StrEnum
from functools import lru_cache
from itertools import pairwise


class NodeKind(StrEnum):
    """What a node computes."""

    EMBED = "embed"
    ATTN = "attn"
    MLP = "mlp"
    FINAL = "final"


class Site(StrEnum):
    """Where an attention head reads the residual stream: query row, or key and/or value rows."""

    Q = "q"
    KV = "kv"
    K = "k"
    V = "v"


KV_SITES = (Site.KV, Site.K, Site.V)


class GraphError(ValueError):
    """A node or path that does not exist in the model's graph."""


@dataclass(frozen=True, slots=True)
class Node:
    """One node of the path graph.

    ``layer``: -1 for EMBED, ``n_layers`` for FINAL, the block index otherwise.
    ``head``: attention head, or None for the whole attention layer (``batch_heads`` pre-screen).
    ``position``: the position the node writes at, or None for all positions (non-positional).
    ``kv_position``: for kv/k/v-side heads, the source position read; None means all sources
    ``<= position`` (the ``batch_positions`` pre-screen, or a non-positional node).
    """

    kind: NodeKind
    layer: int
    head: int | None = None
    site: Site | None = None
    position: int | None = None
    kv_position: int | None = None

    # ---- constructors -------------------------------------------------------------------
    @staticmethod
    def embed(position: int | None = None) -> Node:
        return Node(NodeKind.EMBED, -1, position=position)

    @staticmethod
    def mlp(layer: int, position: int | None = None) -> Node:
        return Node(NodeKind.MLP, layer, position=position)

    @staticmethod
    def attn(
        layer: int,
        head: int | None,
        site: Site | str = Site.Q,
        position: int | None = None,
        kv_position: int | None = None,
    ) -> Node:
        s = Site(site)
        if s is Site.Q and kv_position is not None:
            raise GraphError("a query-side head reads its own position: kv_position must be None")
        return Node(NodeKind.ATTN, layer, head, s, position, kv_position)

    @staticmethod
    def final(n_layers: int, position: int | None = None) -> Node:
        return Node(NodeKind.FINAL, n_layers, position=position)

    # ---- properties ---------------------------------------------------------------------
    @property
    def is_kv(self) -> bool:
        return self.site in KV_SITES

    @property
    def read_position(self) -> int | None:
        """The residual position this node reads (None: all positions / all sources)."""
        if self.kind is NodeKind.ATTN and self.is_kv:
            return self.kv_position
        return self.position

    @property
    def label(self) -> str:
        """Canonical MIB-style label, e.g. ``input@3``, ``a5.h1<kv>@14:3``, ``m4@10``, ``logits@14``."""
        return self.label_with(None)

    def label_with(self, names: Sequence[str] | None) -> str:
        """The label with positions written as ``names[position]`` (role positions, e.g.
        ``a1.h2<kv>@END:S2``); ``names=None`` writes the integer positions of :attr:`label`."""
        if self.kind is NodeKind.EMBED:
            base = "input"
        elif self.kind is NodeKind.MLP:
            base = f"m{self.layer}"
        elif self.kind is NodeKind.FINAL:
            base = "logits"
        else:
            head = "" if self.head is None else f".h{self.head}"
            base = f"a{self.layer}{head}<{self.site}>"
        if self.position is None:
            return base
        pos = f"@{self.position if names is None else names[self.position]}"
        if self.kind is NodeKind.ATTN and self.is_kv:
            if self.kv_position is None:
                pos += ":*"
            else:
                pos += f":{self.kv_position if names is None else names[self.kv_position]}"
        return base + pos

    @property
    def component(self) -> str:
        """Position-free component name (MIB style): ``input``, ``a3.h2``, ``m5``, ``logits``."""
        if self.kind is NodeKind.EMBED:
            return "input"
        if self.kind is NodeKind.MLP:
            return f"m{self.layer}"
        if self.kind is NodeKind.FINAL:
            return "logits"
        return f"a{self.layer}" if self.head is None else f"a{self.layer}.h{self.head}"

    def __str__(self) -> str:
        return self.label

    def sort_key(self) -> tuple[int, int, int, int, int, int]:
        """Deterministic order: by layer, attention before MLP, then head, site, positions."""
        kind_order = {NodeKind.EMBED: 0, NodeKind.ATTN: 1, NodeKind.MLP: 2, NodeKind.FINAL: 3}
        site_order = {None: 0, Site.Q: 0, Site.KV: 1, Site.K: 2, Site.V: 3}
        return (
            self.layer,
            kind_order[self.kind],
            -1 if self.head is None else self.head,
            site_order[self.site],
            -1 if self.position is None else self.position,
            -1 if self.kv_position is None else self.kv_position,
        )


_LABEL_RE = re.compile(
    r"^(?:(?P<input>input)|(?P<logits>logits)|m(?P<mlp>\d+)"
    r"|a(?P<alayer>\d+)(?:\.h(?P<head>\d+))?<(?P<site>q|kv|k|v)>)"
    r"(?:@(?P<pos>\d+)(?::(?P<kv>\d+|\*))?)?$"
)


def parse_label(label: str, n_layers: int | None = None) -> Node:
    """Inverse of :attr:`Node.label`. ``n_layers`` is needed to place ``logits`` (FINAL)."""
    m = _LABEL_RE.match(label.strip())
    if m is None:
        raise GraphError(
            f"cannot parse node label {label!r}: expected e.g. 'input@3', 'm4@10', "
            "'a3.h0<q>@10', 'a5.h1<kv>@14:3' or 'logits@14'"
        )
    pos = None if m["pos"] is None else int(m["pos"])
    kv_raw = m["kv"]
    if m["input"]:
        node = Node.embed(pos)
    elif m["logits"]:
        if n_layers is None:
            raise GraphError("parsing a 'logits' label needs n_layers")
        node = Node.final(n_layers, pos)
    elif m["mlp"] is not None:
        node = Node.mlp(int(m["mlp"]), pos)
    else:
        site = Site(m["site"])
        kv = None if kv_raw in (None, "*") else int(kv_raw)
        if site is Site.Q and kv_raw is not None:
            raise GraphError(f"label {label!r}: a query-side head has no ':kv' position")
        head = None if m["head"] is None else int(m["head"])
        node = Node.attn(int(m["alayer"]), head, site, pos, kv)
    if kv_raw is not None and node.kind is not NodeKind.ATTN:
        raise GraphError(f"label {label!r}: only kv-side heads take a ':kv' position")
    return node


@dataclass(frozen=True, slots=True)
class ModelShape:
    """The part of a model's config that fixes its graph."""

    n_layers: int
    n_heads: int
    n_positions: int  # sequence length of the prompts being analysed (or role positions)
    # role-aligned positions (pathdb.positions): per query position, the key/value source
    # positions some prompt has at or before it; None: causal integer positions (0..p)
    kv_sources: tuple[tuple[int, ...], ...] | None = None
    # parallel attention + MLP blocks (GPT-NeoX/Pythia, GPT-J): the heads of layer l do not feed
    # MLP(l), which reads the block input (pathdb.arch.parallel_blocks)
    parallel: bool = False

    def sources(self, position: int) -> Sequence[int]:
        """The key/value source positions a head writing at ``position`` may read."""
        return range(position + 1) if self.kv_sources is None else self.kv_sources[position]

    def validate(self, node: Node) -> None:
        """Raise :class:`GraphError` naming the problem if ``node`` is not in this graph."""
        if node.kind in (NodeKind.ATTN, NodeKind.MLP) and not 0 <= node.layer < self.n_layers:
            raise GraphError(
                f"{node.label}: layer {node.layer} out of range 0..{self.n_layers - 1}"
            )
        if node.kind is NodeKind.FINAL and node.layer != self.n_layers:
            raise GraphError(f"{node.label}: FINAL must have layer n_layers={self.n_layers}")
        if node.head is not None and not 0 <= node.head < self.n_heads:
            raise GraphError(f"{node.label}: head {node.head} out of range 0..{self.n_heads - 1}")
        if node.position is not None and not 0 <= node.position < self.n_positions:
            raise GraphError(
                f"{node.label}: position {node.position} out of range 0..{self.n_positions - 1}"
            )
        if node.kind is NodeKind.ATTN:
            if node.site is None:
                raise GraphError(f"{node.label}: an attention node needs a site (q, kv, k or v)")
            if node.kv_position is not None:
                if node.position is None:
                    raise GraphError(f"{node.label}: kv_position needs a query position")
                if node.kv_position < 0:
                    raise GraphError(f"{node.label}: negative key/value position")
                if node.kv_position not in self.sources(node.position):
                    raise GraphError(
                        f"{node.label}: key/value position {node.kv_position} is after the query "
                        f"position {node.position} (causal attention reads k <= p)"
                    )

    def validate_path(self, path: Sequence[Node]) -> None:
        """Check every node and every consecutive edge of ``path`` (start first, FINAL last)."""
        if not path or path[-1].kind is not NodeKind.FINAL:
            raise GraphError("a path must end at a FINAL (logits) node")
        for n in path:
            self.validate(n)
        for sender, receiver in pairwise(path):
            if not feeds(sender, receiver, parallel=self.parallel):
                raise GraphError(f"{sender.label} does not feed {receiver.label}")


def _layer_feeds(sender: Node, receiver: Node, parallel: bool) -> bool:
    if sender.kind is NodeKind.EMBED or receiver.kind is NodeKind.FINAL:
        return sender.kind is not NodeKind.FINAL
    if receiver.kind is NodeKind.EMBED or sender.kind is NodeKind.FINAL:
        return False
    if sender.layer < receiver.layer:
        return True
    return (
        not parallel
        and sender.layer == receiver.layer
        and sender.kind is NodeKind.ATTN
        and receiver.kind is NodeKind.MLP
    )


def feeds(sender: Node, receiver: Node, *, parallel: bool = False) -> bool:
    """True when ``sender``'s output reaches ``receiver``'s input site directly (one edge);
    ``parallel``: the model's blocks are parallel (same-layer heads do not feed the MLP)."""
    if not _layer_feeds(sender, receiver, parallel):
        return False
    read = receiver.read_position
    if receiver.position is None:  # non-positional receiver: non-positional senders only
        return sender.position is None
    if read is None:  # kv-side receiver over all sources <= position
        return sender.position is not None and sender.position <= receiver.position
    return sender.position == read


def senders_at(
    shape: ModelShape,
    position: int | None,
    max_layer: int,
    *,
    include_same_layer_attn: bool = False,
    heads: bool = True,
    kv_sites: Sequence[Site] = (Site.KV,),
) -> Iterator[Node]:
    """Every sender writing at ``position`` from layers ``< max_layer`` (plus the attention of
    ``max_layer`` itself when ``include_same_layer_attn``), EMBED first, in :meth:`Node.sort_key` order.

    ``heads=False`` yields whole attention layers (head None) instead of single heads.
    ``kv_sites`` chooses the kv-side node family: ``(KV,)`` or the finer ``(K, V)`` split.
    """
    yield Node.embed(position)
    head_range: list[int | None] = list(range(shape.n_heads)) if heads else [None]
    kv_range: list[int | None] = [None] if position is None else list(shape.sources(position))
    top = max_layer + 1 if include_same_layer_attn else max_layer
    for layer in range(top):
        for head in head_range:
            yield Node.attn(layer, head, Site.Q, position)
            for site in kv_sites:
                for k in kv_range:
                    yield Node.attn(layer, head, site, position, k)
        if layer < max_layer:
            yield Node.mlp(layer, position)


def predecessors(
    receiver: Node,
    shape: ModelShape,
    *,
    heads: bool = True,
    kv_sites: Sequence[Site] = (Site.KV,),
) -> list[Node]:
    """All senders that feed ``receiver`` directly, in deterministic order (DESIGN.md section 2)."""
    if receiver.kind is NodeKind.EMBED:
        return []
    if receiver.kind is NodeKind.FINAL:
        max_layer, same = shape.n_layers, False
    elif receiver.kind is NodeKind.MLP:
        max_layer, same = receiver.layer, not shape.parallel
    else:
        max_layer, same = receiver.layer, False
    if (
        receiver.kind is NodeKind.ATTN
        and receiver.is_kv
        and receiver.position is not None
        and receiver.kv_position is None
    ):
        read_positions: list[int | None] = list(shape.sources(receiver.position))
    else:
        read_positions = [receiver.read_position]
    sites = tuple(kv_sites)
    out: list[Node] = []
    for r in read_positions:
        out.extend(_senders_cached(shape, r, max_layer, same, heads, sites))
    return out


@lru_cache(maxsize=4096)
def _senders_cached(
    shape: ModelShape,
    position: int | None,
    max_layer: int,
    same: bool,
    heads: bool,
    kv_sites: tuple[Site, ...],
) -> tuple[Node, ...]:
    """Memoised :func:`senders_at` (nodes are immutable, so the tuples are shared safely)."""
    return tuple(
        senders_at(
            shape, position, max_layer, include_same_layer_attn=same, heads=heads, kv_sites=kv_sites
        )
    )


Path = tuple[Node, ...]


def path_label(path: Sequence[Node]) -> str:
    """Readable chain, e.g. ``input@3 -> a3.h0<q>@10 -> m4@10 -> logits@14``."""
    return " -> ".join(n.label for n in path)


def is_complete(path: Sequence[Node]) -> bool:
    """A path is complete when it starts at the embedding."""
    return bool(path) and path[0].kind is NodeKind.EMBED


def count_paths(
    root: Node,
    shape: ModelShape,
    *,
    kv_sites: Sequence[Site] = (Site.KV,),
    max_depth: int | None = None,
) -> tuple[int, int]:
    """``(all, complete)``: how many paths a search that extends everything from ``[root]`` evaluates.

    Counted by dynamic programming over (start node, extensions left), without enumerating: the
    exhaustive strategy uses it to refuse a search too large to run before anything is loaded.
    ``max_depth`` counts nodes before the root, as ``SearchParams.max_depth`` does.
    """
    sites = tuple(kv_sites)
    memo: dict[tuple[Node, int], tuple[int, int]] = {}
    unlimited = shape.n_layers * 2 + 2  # longer than any path of the layered graph

    def below(node: Node, left: int) -> tuple[int, int]:
        key = (node, left)
        if key in memo:
            return memo[key]
        total = complete = 0
        for c in predecessors(node, shape, kv_sites=sites):
            total += 1
            if c.kind is NodeKind.EMBED:
                complete += 1
            elif left > 1:
                t, k = below(c, left - 1)
                total += t
                complete += k
        memo[key] = (total, complete)
        return total, complete

    return below(root, unlimited if max_depth is None else max_depth)
