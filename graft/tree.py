"""Draft trees: their shape (calibrated from the heads' measured accuracy, Medusa section 2.1.2),
their host-side structure for acceptance, and the per-depth index tensors that drafting uses on
the device. A chain is the tree whose nodes all have rank 0.

Node 0 is the root: the last known token. A node at depth d holds a draft for the token d places
after the root; its rank r says it is the parent's (r+1)-th best candidate.
"""
from __future__ import annotations

import heapq
from dataclasses import dataclass

import torch

from .config import GraftError


def default_accuracies(num_heads: int, ranks: int = 8) -> list[list[float]]:
    """A prior for untrained heads: depth k's rank-r candidate is right with 0.6^(k+1) * 0.5^r."""
    return [[0.6 ** (k + 1) * 0.5 ** r for r in range(ranks)] for k in range(num_heads)]


def build_tree(acc: list[list[float]], size: int) -> list[list[int]]:
    """The `size` draft paths of highest expected acceptance (Medusa, section 2.1.2).

    acc[k][r]: the measured chance that depth k+1's rank-r candidate is the backbone's token. A
    path (r_1, ..., r_d) is worth prod_k acc[k][r_k]; children are never worth more than their
    parent, so taking the best paths from a frontier keeps the tree prefix-closed.
    """
    heap = [(-acc[0][r], (r,)) for r in range(len(acc[0]))]
    heapq.heapify(heap)
    paths = []
    while heap and len(paths) < size:
        negv, path = heapq.heappop(heap)
        paths.append(list(path))
        d = len(path)
        if d < len(acc):
            for r in range(len(acc[d])):
                heapq.heappush(heap, (negv * acc[d][r], path + (r,)))
    return sorted(paths, key=lambda p: (len(p), p))


def expected_tokens(acc: list[list[float]], paths: list[list[int]]) -> float:
    """Expected new tokens per verification (bonus included) if depths are right independently
    with the calibrated chances: 1 + the sum over nodes of the chance that the node's whole path
    is right (a node is kept only if all its ancestors are)."""
    total = 1.0
    for p in paths:
        v = 1.0
        for k, r in enumerate(p):
            v *= acc[k][r] if k < len(acc) and r < len(acc[k]) else 0.0
        total += v
    return total


def _longs(x, device) -> torch.Tensor:
    """A list of ints as an index tensor on `device` (built on the host, copied once)."""
    return torch.tensor(list(x), dtype=torch.long).to(device)


def chain(depth: int) -> list[list[int]]:
    return [[0] * d for d in range(1, depth + 1)]


@dataclass
class Level:
    """The nodes of one depth d >= 1 and where their tokens come from, as device tensors.

    parents: the B nodes of depth d-1 that have children; width R: one more than the highest
    rank among their children (each parent's top-R candidates are drawn).
    nodes (M,): the depth-d nodes; flat (M,): each one's index into the parents' (B, R)
    candidates flattened. lines (B, d-1): each parent's path below
    the root; up (B,): each parent's own parent's row among the previous level's parents.
    """

    depth: int
    parents: list
    width: int
    nodes: torch.Tensor
    flat: torch.Tensor
    lines: torch.Tensor
    up: torch.Tensor


class Tree:
    """A fixed draft tree: host-side structure for acceptance, device tensors for the step."""

    dynamic = False

    def __init__(self, paths: list[list[int]]):
        if not isinstance(paths, (list, tuple)) or not all(
                isinstance(p, (list, tuple)) and p and all(type(r) is int and r >= 0 for r in p) for p in paths):
            raise GraftError("a draft tree must be a list of paths, each a non-empty list of ranks (integers >= 0): "
                             "re-export the folder to rebuild graft.json's tree")
        paths = sorted((tuple(p) for p in paths), key=lambda p: (len(p), p))
        index = {(): 0}
        parent, depth, rank = [-1], [0], [0]
        for p in paths:
            if p[:-1] not in index:
                raise GraftError(f"draft tree path {list(p)} has no parent path: the tree must be prefix-closed")
            index[p] = len(parent)
            parent.append(index[p[:-1]])
            depth.append(len(p))
            rank.append(p[-1])
        n = len(parent)
        self.lineage = []  # node i's ancestors-or-self, root first
        for i in range(n):
            line, j = [], i
            while j >= 0:
                line.append(j)
                j = parent[j]
            self.lineage.append(line[::-1])
        self.children = [[] for _ in range(n)]  # in rank order
        for i in range(1, n):
            self.children[parent[i]].append(i)
        anc = torch.zeros(n, n, dtype=torch.bool)  # (n, n) ancestor-or-self, for the attention mask
        for i, line in enumerate(self.lineage):
            anc[i, line] = True
        self.n = n
        self.paths = paths
        self.parents, self.depths, self.ranks = parent, depth, rank
        self.anc = anc
        self.max_depth = max(depth)
        # chained drafting expands depth d's parents (the nodes of depth d-1 with children) side
        # by side in a tail of slots past the committed ones: from tail_offsets[d] on
        expanding = [sum(1 for v in range(n) if depth[v] == d - 1 and self.children[v])
                     for d in range(2, self.max_depth + 1)]
        self.tail_offsets = {d: sum(expanding[:d - 2]) for d in range(2, self.max_depth + 1)}
        self.tail_size = sum(expanding)
        self._levels = {}  # the device tensors of `levels` and `by_rank`, by device

    def levels(self, device) -> list[Level]:
        """Per depth 1..max_depth, the index tensors that drafting gathers with (built once per
        device, so that a step copies no index list to the device)."""
        key = str(device)
        if key not in self._levels:
            out, rows = [], {0: 0}
            for d in range(1, self.max_depth + 1):
                parents = [v for v in range(self.n) if self.depths[v] == d - 1 and self.children[v]]
                kids = [c for v in parents for c in self.children[v]]
                R = max(self.ranks[c] for c in kids) + 1
                flat = [b * R + self.ranks[c] for b, v in enumerate(parents) for c in self.children[v]]
                lines = torch.tensor([self.lineage[v][1:] for v in parents], dtype=torch.long).view(len(parents), d - 1)
                up = [rows.get(self.parents[v], 0) for v in parents]
                rows = {v: b for b, v in enumerate(parents)}
                out.append(Level(d, parents, R, _longs(kids, device), _longs(flat, device),
                                 lines.to(device), _longs(up, device)))
            self._levels[key] = out
        return self._levels[key]

    def by_rank(self, device) -> tuple[int, torch.Tensor]:
        """Where drafts do not depend on the parent (the parallel families): the width R (one
        more than the highest rank), and for nodes 1..n-1 the index of each one's token among the
        depths' top-R candidates flattened (D, R): row depth-1, column rank."""
        key = ("by_rank", str(device))
        if key not in self._levels:
            width = max(self.ranks) + 1
            self._levels[key] = width, _longs(((d - 1) * width + r for d, r in zip(self.depths[1:], self.ranks[1:])),
                                              device)
        return self._levels[key]


class DynamicTree:
    """The shape of a tree the heads choose at every step (EAGLE-2): from the root, the `width`
    best candidates of each expanded node, the `width` best of those by cumulative draft
    probability expanded again, `depth` times; then the `size` best of all candidates are
    verified. Every shape is fixed (so the step stays capturable); which nodes hang where is data
    the step returns with the tokens (`parents`)."""

    dynamic = True

    def __init__(self, size: int, width: int, depth: int):
        if size < 1 or width < 1 or depth < 1:
            raise GraftError("a dynamic tree needs at least one node, one candidate per node and one depth")
        if size > self.capacity(width, depth):
            raise GraftError(f"a dynamic tree of {size} nodes needs more candidates than {width} per node over "
                             f"{depth} depths draft: lower --tree-size")
        self.size, self.width, self.max_depth = size, width, depth
        self.n = size + 1
        self.tail_offsets = {d: (d - 2) * width for d in range(2, depth + 1)}  # as Tree's: `width` per depth
        self.tail_size = (depth - 1) * width
        self.paths = ("dynamic", size, width, depth)  # a key for the captured steps
        self.anc = torch.eye(self.n, dtype=torch.bool)  # the step fills in each tree's own
        self.depths = [0] * self.n
        self._plans = {}

    @staticmethod
    def capacity(width: int, depth: int) -> int:
        """Candidates drafted per step: `width` at depth 1, width x width at every further depth."""
        return width + (depth - 1) * width * width

    @property
    def pool(self) -> int:
        return self.capacity(self.width, self.max_depth)

    def plan(self, device) -> dict:
        """The index tensors of the selection (`ChainedHeads.draft_dynamic`), built once per device.

        The pool holds depth 1's `width` candidates, then each further depth's width x width, row
        r the children of that depth's r-th frontier node. `up`: each candidate's parent as an
        index into the frontiers' pool indices (depths 1..D-1, `width` each) followed by the
        root's, which is `pool`."""
        key = str(device)
        if key not in self._plans:
            k, D = self.width, self.max_depth
            up = [(D - 1) * k] * k + [b * k + j // k for b in range(D - 1) for j in range(k * k)]
            depth = [1] * k + [d for d in range(2, D + 1) for _ in range(k * k)]

            self._plans[key] = {name: _longs(x, device) for name, x in (
                ("up", up), ("depth", depth), ("root", [self.pool]), ("first", range(k)),
                ("number", range(1, self.n)), ("zero", [0]))}
        return self._plans[key]


def accept(tokens: list, target: list, parents: list) -> tuple[list, list]:
    """Greedy acceptance over any tree, fixed or dynamic, given as each node's parent (node 0 the
    root, parents before children): the deepest node whose whole lineage matches the backbone's
    argmax (the first such on ties). tokens[i]: node i's token; target[i]: the backbone's argmax
    after node i. Returns (the accepted nodes, root first; the new tokens, bonus included)."""
    n = len(tokens)
    good, depth = [True] + [False] * (n - 1), [0] * n
    best = 0
    for i in range(1, n):
        p = parents[i]
        depth[i] = depth[p] + 1
        good[i] = good[p] and tokens[i] == target[p]
        if good[i] and depth[i] > depth[best]:
            best = i
    path = [best]
    while path[-1] != 0:
        path.append(parents[path[-1]])
    path = path[::-1]
    return path, [tokens[j] for j in path[1:]] + [target[best]]


def ancestors(parents: torch.Tensor, depth: int) -> torch.Tensor:
    """(n,) parent of each node (the root its own) -> (n, n) ancestor-or-self, by pointer
    jumping on the device: after r rounds a node has met its ancestors up to 2^r - 1 levels up,
    so ceil(log2(depth + 1)) rounds reach the root from every depth."""
    n = parents.numel()
    anc = torch.eye(n, dtype=torch.bool, device=parents.device)
    up = parents
    for _ in range(depth.bit_length()):  # 2^r - 1 >= depth
        anc = anc | anc[up]
        up = up[up]
    return anc
