"""Channel labels: the bookkeeping behind `trace`.

Every tensor seen while tracing gets a *label*: an int64 tensor of the same rank whose element says
which channel id that element belongs to, i.e. which channel's removal deletes it. Labels are kept
*compressed*: a dimension along which the label is constant has size 1, so a `(B, C, H, W)`
activation of a conv carries a `(1, C, 1, 1)` label. `FIXED` marks elements no channel owns (the
model input, outputs of ops the tracer does not understand): they can never be removed.

`Coupling` is the mutable state of one trace: a union-find over channel ids (two ids in one set
must be removed together), the ids that must not be removed (with a readable reason), and the
tensor slices ("slots") that lose positions when ids are removed.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable

import numpy as np
import torch

FIXED = -1
"""Label of an element that no channel owns: it can never be removed."""

Slot = tuple[str, str, int]
"""(qualified module name, tensor attribute name, dim) of a tensor that loses slices."""


def compress(label: torch.Tensor) -> torch.Tensor:
    """Shrink every dimension along which `label` is constant to size 1."""
    for d in range(label.dim()):
        if label.shape[d] > 1:
            first = label.narrow(d, 0, 1)
            if bool((label == first).all()):
                label = first
    return label.contiguous()


def varying_dims(label: torch.Tensor) -> set[int]:
    """Dims along which a compressed label changes."""
    return {d for d in range(label.dim()) if label.shape[d] > 1}


def fixed_label(ndim: int) -> torch.Tensor:
    return torch.full((1,) * ndim, FIXED, dtype=torch.long)


def expand_full(label: torch.Tensor, shape: torch.Size | tuple[int, ...]) -> torch.Tensor:
    """The label at the value's full shape (a copy, safe to reshape)."""
    return label.expand(tuple(shape)).contiguous()


def along(values: torch.Tensor, dim: int, ndim: int) -> torch.Tensor:
    """Place a 1-D vector of ids along `dim` of an otherwise compressed rank-`ndim` label."""
    shape = [1] * ndim
    shape[dim] = values.numel()
    return values.reshape(shape)


class SizeInt(int):
    """An int read from a tensor's shape at trace time, with the channel ids it measures.

    `sources` holds one 1-D id vector per shape read this value was computed from (`C // heads`
    has one, `C * H` two). Arithmetic keeps the sources, so a reshape can tell a size that follows
    pruning (read from the tensor being reshaped) from one that does not.
    """

    sources: tuple[torch.Tensor, ...]
    derived: bool  # computed by arithmetic, not read directly

    def __new__(cls, value: int, sources: tuple[torch.Tensor, ...], derived: bool = False) -> SizeInt:
        obj = super().__new__(cls, value)
        obj.sources = sources
        obj.derived = derived
        return obj

    @property
    def channels(self) -> bool:
        """Whether any channel id (not only fixed positions) went into this size."""
        return any(bool((s >= 0).any()) for s in self.sources)


def _size_op(name: str) -> Callable:
    base = getattr(int, name)

    def op(self: SizeInt, *other: Any) -> Any:
        result = base(self, *other)
        if not isinstance(result, int) or isinstance(result, bool) or result is NotImplemented:
            return result
        extra = tuple(s for o in other if isinstance(o, SizeInt) for s in o.sources)
        return SizeInt(result, self.sources + extra, derived=True)

    op.__name__ = name
    return op


for _name in ("__add__", "__radd__", "__sub__", "__rsub__", "__mul__", "__rmul__", "__floordiv__",
              "__rfloordiv__", "__mod__", "__rmod__", "__neg__", "__pos__", "__abs__", "__pow__"):  # fmt: skip
    setattr(SizeInt, _name, _size_op(_name))


def shape_sizes(shape: tuple[int, ...], label: torch.Tensor) -> list[SizeInt]:
    """The sizes of a value of `shape` with `label`, each carrying the ids owning its positions.

    A dim along which the label does not change is not a channel dim: no removal shrinks it, so
    its size carries no ids.
    """
    if label.dim() != len(shape):
        label = fixed_label(len(shape))
    full = label.expand(tuple(shape))
    sizes = []
    for d, n in enumerate(shape):
        if label.shape[d] == 1:
            ids = torch.full((n,), FIXED, dtype=torch.long)
        else:
            ids = full[tuple(slice(None) if i == d else 0 for i in range(full.dim()))]  # (n,)
        sizes.append(SizeInt(n, (ids,)))
    return sizes


@dataclass
class Coupling:
    """Union-find over channel ids plus what a trace learned about them."""

    parent: list[int] = field(default_factory=list)
    blocked: dict[int, str] = field(default_factory=dict)
    slots: dict[Slot, torch.Tensor] = field(default_factory=dict)
    output_slots: set[Slot] = field(default_factory=set)
    origins: dict[str, torch.Tensor] = field(default_factory=dict)
    params: dict[str, torch.Tensor] = field(default_factory=dict)
    group_names: set[str] = field(default_factory=set)
    norm_dims: dict[str, int] = field(default_factory=dict)  # norm module -> input dim of its channels
    whole_along: list[tuple[torch.Tensor, int, str]] = field(default_factory=list)
    sizes: list[tuple[tuple[torch.Tensor, ...], torch.Tensor, bool, str]] = field(default_factory=list)
    _table: np.ndarray | None = field(default=None, repr=False)

    # -- ids ----------------------------------------------------------------------------------
    def fresh(self, n: int) -> torch.Tensor:
        base = len(self.parent)
        self.parent.extend(range(base, base + n))
        return torch.arange(base, base + n, dtype=torch.long)

    def origin(self, module: str, n: int, names_group: bool = False) -> torch.Tensor:
        """The ids of a module's `n` output channels; the same ids each time it is called.

        `names_group`: the group these ids end up in is named after `module` even if another
        producer ran first (attention heads are named after the attention module, not after the
        small MLP that computes Swin-V2's position bias).
        """
        if module not in self.origins:
            self.origins[module] = self.fresh(n)
        if names_group:
            self.group_names.add(module)
        return self.origins[module]

    def param(self, target: str, value: torch.Tensor) -> torch.Tensor:
        """One id per element of a loose parameter or buffer (read through `get_attr`)."""
        if target not in self.params:
            self.params[target] = self.fresh(value.numel()).reshape(value.shape)
        return self.params[target]

    def find(self, i: int) -> int:
        parent = self.parent
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    def union(self, a: int, b: int) -> None:
        ra, rb = self.find(a), self.find(b)
        if ra != rb:
            # keep the older id as root so that roots follow creation order
            if ra < rb:
                self.parent[rb] = ra
            else:
                self.parent[ra] = rb
            self._table = None

    def roots(self, label: torch.Tensor) -> torch.Tensor:
        """Replace each id by its current root; FIXED stays FIXED."""
        if label.numel() == 0:
            return label
        if label.numel() >= 4096:  # a parameter's per-element ids: one vectorised lookup
            ids = label.numpy()
            if not (ids >= 0).any():
                return label
            return torch.from_numpy(np.where(ids >= 0, self.root_table()[np.maximum(ids, 0)], ids))
        uniq, inverse = torch.unique(label, return_inverse=True)
        mapped = torch.tensor([self.find(i) if i >= 0 else i for i in uniq.tolist()], dtype=torch.long)
        return mapped[inverse]

    def root_table(self) -> np.ndarray:
        """The root of every id, `(ids,)`; cached until the next union or new id."""
        if self._table is None or len(self._table) != len(self.parent):
            table = np.asarray(self.parent, dtype=np.int64)
            while True:
                up = table[table]
                if np.array_equal(up, table):
                    break
                table = up
            self._table = table
        return self._table

    # -- constraints --------------------------------------------------------------------------
    def block(self, label: torch.Tensor | None, reason: str) -> None:
        """Ids in `label` must never be removed."""
        if label is None:
            return
        for i in torch.unique(label).tolist():
            if i >= 0 and i not in self.blocked:
                self.blocked[i] = reason

    def unify(self, a: torch.Tensor, b: torch.Tensor, reason: str) -> None:
        """Positions of `a` and `b` (same shape) must be removed together.

        An id facing a FIXED element cannot be removed at all (`reason` says why).
        """
        a, b = torch.broadcast_tensors(a, b)
        ab = compress(torch.stack([a, b]))  # dims along which neither changes carry no new pairs
        a, b = ab[0], ab[-1]
        both = (a >= 0) & (b >= 0)
        if bool(both.any()):
            width = int(b.max()) + 1
            pairs = torch.unique(a[both] * width + b[both])  # distinct (a, b) pairs, one int each
            for x, y in zip((pairs // width).tolist(), (pairs % width).tolist()):
                self.union(x, y)
        self.block(a[(a >= 0) & (b == FIXED)], reason)
        self.block(b[(b >= 0) & (a == FIXED)], reason)

    def keep_whole(self, label: torch.Tensor, dim: int, reason: str) -> None:
        """No id may own only part of `label` along `dim` (checked once all ties are known).

        A tensor indexed along `dim` by position (a lookup table) can lose whole slices along the
        other dims, but removing positions along `dim` would shift what the index points at.
        """
        self.whole_along.append((label, dim, reason))

    def check_whole(self) -> None:
        for label, dim, reason in self.whole_along:
            roots = self.roots(label).movedim(dim, 0)
            roots = roots.reshape(roots.shape[0], -1)  # (positions along dim, rest)
            rows = torch.arange(roots.shape[0]).unsqueeze(1).expand_as(roots)
            owned = roots >= 0
            pairs = torch.unique(torch.stack([roots[owned], rows[owned]]), dim=1)
            ids, spans = torch.unique(pairs[0], return_counts=True)
            self.block(ids[spans < roots.shape[0]], reason)

    def same_size(self, sources: tuple[torch.Tensor, ...], data: torch.Tensor, derived: bool, reason: str) -> None:
        """A reshape asks for a size read from `sources`; the data's ids along that dim are `data`.

        Checked once all ties are known (`check_sizes`): a size read directly must measure the same
        ids as the data (so both shrink alike); a size computed from reads (`C // heads`) must be
        read from channels of the data.
        """
        self.sizes.append((sources, data, derived, reason))

    def check_sizes(self) -> None:
        for sources, data, derived, reason in self.sizes:
            roots = self.roots(data)
            reads = [self.roots(s) for s in sources]
            if derived:
                mine = set(roots[roots >= 0].tolist())
                ok = all(set(r[r >= 0].tolist()) <= mine for r in reads)
            else:
                ok = len(reads) == 1 and torch.equal(torch.sort(reads[0]).values, torch.sort(roots).values)
            if not ok:
                self.block(roots, reason)
                for r in reads:
                    self.block(r, reason)

    def record(self, slot: Slot, ids: torch.Tensor, output: bool = False) -> None:
        """`ids[i]` owns position i along the slot's dim. A reused module unifies its calls."""
        ids = ids.reshape(-1)
        if slot in self.slots:
            self.unify(self.slots[slot], ids, f"{slot[0]} is called on tensors whose channels differ")
        else:
            self.slots[slot] = ids
        if output:
            self.output_slots.add(slot)

    def channel_vector(self, label: torch.Tensor, dim: int, size: int, what: str) -> torch.Tensor:
        """The ids along `dim` of a label; ids that also vary along other dims are blocked."""
        others = varying_dims(label) - {dim}
        if others:
            self.block(label, f"{what} sees channels spread over more than its channel dimension")
        index = [slice(None) if d == dim else slice(0, 1) for d in range(label.dim())]
        return label[tuple(index)].reshape(-1).expand(size).contiguous()
