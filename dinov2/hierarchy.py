"""The class hierarchy as a rooted tree: the only source of class indices in dino_hier.

A :class:`Tree` is built from a nested mapping (see :data:`dinov2.config.custom_hier.HIERARCHIES`)::

    Tree.from_nested({
        "lymphopoiesis": {"lymphoid_immature": ["lymphoblast"], "lymphocyte_mature": None},
        "artefact": ["smudge_cell"],
    })

Each key is a node; its value lists the children: another mapping, a sequence of leaf names, or
``None`` for a leaf. The root is implicit and named ``"root"``; it is not a node.

Index conventions used across the project:

* logits follow ``tree.leaves`` (depth-first order of the nested mapping);
* labels are indices into ``tree.nodes``: the leaves first (so a leaf's label equals its logit
  index), then the internal nodes in depth-first pre-order;
* because leaves are in depth-first order, the leaves under any node form the contiguous range
  ``tree.leaves[start:stop]`` with ``(start, stop) = tree.leaf_ranges[tree.index(node)]``.
"""

import difflib
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch

from dinov2.errors import TreeError

ROOT = "root"


def _read_only(values: list[Any]) -> np.ndarray:
    array = np.asarray(values, dtype=np.int64)
    array.flags.writeable = False
    return array


class Tree:
    """An immutable rooted tree of uniquely named nodes; build it with :meth:`Tree.from_nested`.

    Precomputed arrays (read-only ``numpy.int64``, one entry per node in ``tree.nodes`` order):
    ``parent_indices`` (index of the parent, ``-1`` for a child of the root), ``node_depths``
    (root 0, its children 1) and ``leaf_ranges`` (``[start, stop)`` of the node's leaves in
    ``tree.leaves``; ``[i, i + 1)`` for leaf i).
    """

    def __init__(self, children: Mapping) -> None:
        """Use :meth:`from_nested`; ``children`` maps every internal name and ``root`` to its child tuple."""
        self._children: dict[str, tuple[str, ...]] = dict(children)
        leaves: list[str] = []
        internal: list[str] = []
        parent: dict[str, str] = {}
        depth: dict[str, int] = {ROOT: 0}
        leaf_range: dict[str, tuple[int, int]] = {}

        def visit(name: str) -> None:
            start = len(leaves)
            if name in self._children:
                if name != ROOT:
                    internal.append(name)
                for child in self._children[name]:
                    parent[child] = name
                    depth[child] = depth[name] + 1
                    visit(child)
            else:
                leaves.append(name)
            leaf_range[name] = (start, len(leaves))

        visit(ROOT)
        self._leaves = tuple(leaves)
        self._nodes = self._leaves + tuple(internal)
        self._index = {name: i for i, name in enumerate(self._nodes)}
        self._parent = parent
        self._depth = depth
        self._leaf_range = leaf_range
        self._lineage = {ROOT: ()}
        for name in self._nodes[len(leaves) :] + self._leaves:  # parents come before their children
            self._lineage[name] = self._lineage.get(parent[name], ()) + (name,)
        self.parent_indices = _read_only([self._index.get(parent[n], -1) for n in self._nodes])
        self.node_depths = _read_only([depth[n] for n in self._nodes])
        self.leaf_ranges = _read_only([list(leaf_range[n]) for n in self._nodes]).reshape(-1, 2)

    # ------------------------------------------------------------------ construction
    @classmethod
    def from_nested(cls, mapping: Mapping) -> "Tree":
        """Build a tree from ``{name: children}``; children are a mapping, a sequence of leaf names or None.

        Raises :class:`TreeError` naming the culprit for: a non-string, empty or padded name, the
        reserved name ``root``, a name listed twice, a node with an empty list/mapping of children,
        or children of another type.
        """
        if not isinstance(mapping, Mapping) or not mapping:
            raise TreeError(f"a hierarchy must be a non-empty mapping of node names, got {mapping!r}")
        children: dict[str, tuple[str, ...]] = {}
        seen: dict[str, str] = {}

        def add(name: Any, under: str) -> None:
            where = "at the top level" if under == ROOT else f"under {under!r}"
            if not isinstance(name, str):
                raise TreeError(f"node names must be strings, got {name!r} ({type(name).__name__}) {where}")
            if not name.strip():
                raise TreeError(f"empty node name {where}")
            if name != name.strip():
                raise TreeError(f"node name {name!r} {where} has leading or trailing whitespace")
            if name == ROOT:
                raise TreeError(f"the name {ROOT!r} is reserved for the implicit root ({where})")
            if name in seen:
                first = "at the top level" if seen[name] == ROOT else f"under {seen[name]!r}"
                raise TreeError(f"node {name!r} is listed twice ({first} and {where}); node names must be unique")
            seen[name] = under

        def read(spec: Any, name: str) -> None:
            if spec is None:
                return
            if isinstance(spec, Mapping):
                items = list(spec.items())
            elif isinstance(spec, Sequence) and not isinstance(spec, str):
                items = [(leaf, None) for leaf in spec]
            else:
                raise TreeError(f"children of {name!r} must be a mapping, a list of leaf names or None, got {spec!r}")
            if not items:
                raise TreeError(f"node {name!r} has an empty list of children; write None for a leaf")
            for child, _ in items:
                add(child, name)
            children[name] = tuple(child for child, _ in items)
            for child, grandchildren in items:
                read(grandchildren, child)

        read(mapping, ROOT)
        return cls(children)

    def to_nested(self) -> dict[str, Any]:
        """The nested mapping ``Tree.from_nested`` reads back into an equal tree (JSON-able).

        A node whose children are all leaves becomes a list of names; otherwise a mapping whose
        leaves map to None.
        """

        def nest(name: str) -> Any:
            kids = self._children[name]
            if name != ROOT and all(kid not in self._children for kid in kids):
                return list(kids)
            return {kid: nest(kid) if kid in self._children else None for kid in kids}

        return nest(ROOT)

    # ------------------------------------------------------------------ names and indices
    @property
    def leaves(self) -> tuple[str, ...]:
        """Leaf names in depth-first order: the order of the logits."""
        return self._leaves

    @property
    def nodes(self) -> tuple[str, ...]:
        """All node names (root excluded): the leaves, then internal nodes in pre-order. Labels index this."""
        return self._nodes

    @property
    def internal_nodes(self) -> tuple[str, ...]:
        """Internal node names (root excluded) in depth-first pre-order."""
        return self._nodes[len(self._leaves) :]

    def preorder(self, name: str = ROOT) -> tuple[str, ...]:
        """Node names below ``name`` in depth-first pre-order: each node right before its subtree
        (a lineage, then its descendants; the leaves in logit order)."""
        order: list[str] = []
        stack = list(reversed(self.children(name)))
        while stack:
            node = stack.pop()
            order.append(node)
            stack.extend(reversed(self.children(node)))
        return tuple(order)

    @property
    def max_depth(self) -> int:
        """Depth of the deepest leaf (root 0)."""
        return int(self.node_depths.max())

    def _check(self, name: str, allow_root: bool = True) -> str:
        if (allow_root and name == ROOT) or name in self._index:
            return name
        close = difflib.get_close_matches(str(name), self._nodes, n=3)
        hint = f"; did you mean {', '.join(map(repr, close))}?" if close else ""
        raise TreeError(f"unknown node {name!r} (the tree has {len(self._nodes)} nodes){hint}")

    def index(self, name: str) -> int:
        """Index of a node in ``tree.nodes`` (the label of a sample annotated with it)."""
        return self._index[self._check(name, allow_root=False)]

    def is_leaf(self, name: str) -> bool:
        return self._check(name) not in self._children

    def children(self, name: str) -> tuple[str, ...]:
        """Child names in the given order; ``()`` for a leaf. ``children("root")`` gives the top level."""
        return self._children.get(self._check(name), ())

    def parent(self, name: str) -> str:
        """The parent's name, ``"root"`` for a top-level node."""
        return self._parent[self._check(name, allow_root=False)]

    def depth(self, name: str) -> int:
        """Number of edges from the root: root 0, top-level nodes (lineages) 1."""
        return self._depth[self._check(name)]

    def ancestors(self, name: str) -> tuple[str, ...]:
        """Ancestors from the parent upward, excluding the node itself and the root."""
        return tuple(reversed(self._lineage[self._check(name)][:-1]))

    def lca(self, a: str, b: str) -> str:
        """Lowest common ancestor of ``a`` and ``b`` (either one when it is above the other), or ``"root"``."""
        common = ROOT
        for x, y in zip(self._lineage[self._check(a)], self._lineage[self._check(b)]):
            if x != y:
                break
            common = x
        return common

    def distance(self, a: str, b: str) -> int:
        """Number of edges on the path a → lca(a, b) → b (0 when a == b)."""
        return self.depth(a) + self.depth(b) - 2 * self.depth(self.lca(a, b))

    def leaves_under(self, name: str) -> tuple[str, ...]:
        """Leaf names below a node in logit order; a leaf gives itself, ``"root"`` all leaves."""
        start, stop = self._leaf_range[self._check(name)]
        return self._leaves[start:stop]

    def at_level(self, name: str, level: int) -> str:
        """The ancestor-or-self of ``name`` at depth ``level`` (1 = lineage; 0 = ``"root"``).

        A node shallower than ``level`` is returned unchanged.
        """
        if level < 0:
            raise TreeError(f"level must be >= 0, got {level}")
        lineage = self._lineage[self._check(name)]
        return ROOT if level == 0 else lineage[min(level, len(lineage)) - 1]

    def membership(self) -> torch.Tensor:
        """Bool tensor ``[len(nodes), len(leaves)]``: entry (m, l) is True when leaf l lies under node m.

        Dense: prefer ``leaf_ranges`` for very large trees (20,000 nodes x 10,000 leaves = 200 MB).
        """
        leaf = torch.arange(len(self._leaves))
        ranges = torch.from_numpy(self.leaf_ranges.copy())
        return (leaf[None, :] >= ranges[:, :1]) & (leaf[None, :] < ranges[:, 1:])

    def __contains__(self, name: object) -> bool:
        """True for a node name (the root is not a node)."""
        return name in self._index

    # ------------------------------------------------------------------ comparison
    def __eq__(self, other: object) -> bool:
        return isinstance(other, Tree) and self._children == other._children

    def __hash__(self) -> int:
        return hash(tuple(sorted(self._children.items())))

    def __repr__(self) -> str:
        return (
            f"Tree({len(self._leaves)} leaves, {len(self.internal_nodes)} internal nodes, max depth {self.max_depth})"
        )
