"""How each op moves channel labels: the rule table behind `trace`.

A rule receives a `Call` (the concrete argument values, their labels, the output value) and returns
the output's label. Along the way it records the tensor slices that lose positions
(`Coupling.record`), ties ids together (`Coupling.unify`), or forbids removing ids whose removal
would change the function in a way the pruned model could not reproduce (`Coupling.block`).
Anything without a rule blocks every channel it touches: an unknown op is never pruned wrong.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Iterator

import torch
import torch.nn.functional as F
from torch import nn

from prunecore.attention import PrunedMultiheadAttention
from prunecore._labels import (
    FIXED,
    Coupling,
    SizeInt,
    shape_sizes,
    along,
    compress,
    expand_full,
    fixed_label,
    varying_dims,
)

Label = Any  # a label tensor, a tuple of labels (for tuple values), or None (non-tensors)


@dataclass
class Call:
    """One op seen while tracing: a torch function or tensor method, or a whole module's forward.

    `name` is the module's qualified name for a module call, else the enclosing module's (quoted)
    name; `tensor_names` maps the `id` of every parameter and buffer to its qualified name, so a
    rule can tell `self.weight` passed to a functional from a computed tensor.
    """

    fn: Any  # the function or method called (a module call: the module's class)
    args: tuple
    kwargs: dict
    labels: tuple
    klabels: dict
    out: Any
    st: Coupling
    module: nn.Module | None = None
    name: str = ""
    scope: tuple[type, ...] = ()  # types of the modules whose forward made this op, outermost first
    tensor_names: dict[int, str] = field(default_factory=dict)
    constants: bool = False  # inside a module whose shape constants surgery re-derives
    line: str = ""  # "file.py:123" of the model code that made this call
    watch: Callable[[torch.Tensor, torch.Tensor, str], None] | None = None

    @property
    def where(self) -> str:
        """A readable name of the op for error reasons."""
        at = f" ({self.line})" if self.line else ""
        if self.module is not None:
            return f"{type(self.module).__name__} module {self.name!r}{at}"
        return f"{function_name(self.fn)} in {self.name}{at}"

    def arg(self, i: int, name: str, default: Any = None) -> Any:
        if len(self.args) > i:
            return self.args[i]
        return self.kwargs.get(name, default)

    def tensor_name(self, value: Any) -> str | None:
        """Qualified name of a parameter or buffer of the model (`"layer1.0.bn1.weight"`), else None."""
        if not isinstance(value, torch.Tensor):
            return None
        return self.tensor_names.get(id(value))


def function_name(fn: Any) -> str:
    name = getattr(fn, "__name__", None) or str(fn)
    return name.strip("_") if name.startswith("__") else name


Rule = Callable[[Call], Label]


# -- helpers --------------------------------------------------------------------------------------
def fixed_like(value: Any) -> Label:
    if isinstance(value, torch.Tensor):
        return fixed_label(value.dim())
    if isinstance(value, (tuple, list)):
        return tuple(fixed_like(v) for v in value)
    if isinstance(value, dict):
        return {k: fixed_like(v) for k, v in value.items()}
    return None


def walk_labels(labels: Any) -> Iterator[torch.Tensor]:
    """Every tensor in a nested tuple / list / dict: the labels of a nested value (or its values)."""
    if isinstance(labels, torch.Tensor):
        yield labels
    elif isinstance(labels, (tuple, list)):
        for item in labels:
            yield from walk_labels(item)
    elif isinstance(labels, dict):
        for item in labels.values():
            yield from walk_labels(item)


def block_inputs(c: Call, reason: str) -> None:
    for lab in walk_labels((c.labels, c.klabels)):
        c.st.block(lab, reason)


def unsupported(c: Call) -> Label:
    block_inputs(c, f"reaches {c.where}, which prunecore does not know how to prune through")
    return fixed_like(c.out)


def tensor_operands(c: Call) -> list[tuple[torch.Tensor, torch.Tensor]]:
    pairs = list(zip(c.args, c.labels)) + [(c.kwargs[k], c.klabels[k]) for k in c.kwargs]
    return [(v, lab) for v, lab in pairs if isinstance(v, torch.Tensor) and isinstance(lab, torch.Tensor)]


def first_tensor(c: Call) -> tuple[torch.Tensor, torch.Tensor]:
    return tensor_operands(c)[0]


def norm_dim(dim: int, ndim: int) -> int:
    return dim + ndim if dim < 0 else dim


def dims_arg(dim: Any, ndim: int) -> list[int]:
    if dim is None:
        return list(range(ndim))
    if isinstance(dim, int):
        return [norm_dim(dim, ndim)]
    return [norm_dim(d, ndim) for d in dim]


# -- elementwise ----------------------------------------------------------------------------------
def elementwise(c: Call) -> Label:
    """Broadcasting ops (add, mul, activations, ...): aligned positions are one channel.

    An operand of size 1 along a dim does not tie the other operands' channels along that dim
    (a bias or a spatial attention map). An element that would need two different channels
    (an outer-product broadcast) blocks the operand it cannot follow.
    """
    if not isinstance(c.out, torch.Tensor):
        return fixed_like(c.out)
    nd = c.out.dim()
    operands = []
    for value, lab in tensor_operands(c):
        pad = (1,) * (nd - value.dim())
        operands.append((lab.reshape(pad + tuple(lab.shape)), pad + tuple(value.shape)))
    return broadcast(c, operands, tuple(c.out.shape))


def broadcast(c: Call, operands: list[tuple[torch.Tensor, tuple[int, ...]]], shape: tuple[int, ...]) -> Label:
    """Tie the channels of operands that meet elementwise in a `shape`-d space; the joint label.

    `operands` are (label, value shape), both already of rank `len(shape)`.
    """
    nd = len(shape)
    ops = []
    for lab, vshape in operands:
        bcast = {d for d in range(nd) if vshape[d] == 1 and shape[d] > 1}
        ops.append((lab, bcast, tuple(vshape) == tuple(shape)))
    if not ops:
        return fixed_label(nd)
    # full-size operands first: their ids are the ones the output carries
    ops.sort(key=lambda op: not op[2])
    joint = [max(lab.shape[d] for lab, _, _ in ops) for d in range(nd)]
    out = torch.full(joint, FIXED, dtype=torch.long)
    reason = f"is combined elementwise by {c.where} with channels that cannot be removed"
    for i, (la, ba, _) in enumerate(ops):
        va = varying_dims(la)
        for lb, bb, _ in ops[i + 1 :]:
            vb = varying_dims(lb)
            a_free = bool(va) and va <= bb  # lb is broadcast along all of la's channels
            b_free = bool(vb) and vb <= ba
            if a_free and b_free:
                c.st.block(la, f"meets an outer-product broadcast in {c.where}")
                c.st.block(lb, f"meets an outer-product broadcast in {c.where}")
            elif a_free:
                c.st.block(lb[lb >= 0], f"is broadcast against other channels in {c.where}")
            elif b_free:
                c.st.block(la[la >= 0], f"is broadcast against other channels in {c.where}")
            else:
                c.st.unify(la.expand(joint), lb.expand(joint), reason)
    for lab, _, _ in reversed(ops):
        lab = lab.expand(joint)
        out = torch.where(lab >= 0, lab, out)
    return out


def einsum(c: Call) -> Label:
    """einsum: operands meet elementwise in the space of all letters, then contracted letters go.

    A contraction over channels is exact when every operand carrying them loses the same
    positions (a masked channel adds zero to the sum), which the elementwise tie ensures.
    """
    equation = c.args[0].replace(" ", "")
    operands = c.args[1:]
    labels = c.labels[1:]
    if len(operands) == 1 and isinstance(operands[0], (tuple, list)):
        operands, labels = operands[0], labels[0]
    if "->" not in equation or "." in equation:
        return unsupported(c)
    inputs, output = equation.split("->")
    return contract(c, inputs.split(","), output, list(operands), list(labels))


def contract(c: Call, inputs: list[str], output: str, values: list, labels: list) -> Label:
    """Labels through a contraction `inputs -> output` written with one letter per dim."""
    letters = list(dict.fromkeys("".join(inputs)))
    size: dict[str, int] = {}
    for spec, value in zip(inputs, values):
        for ch, n in zip(spec, value.shape):
            size[ch] = max(size.get(ch, 1), n)
    shape = tuple(size[ch] for ch in letters)

    def to_joint(spec: str, t: torch.Tensor) -> torch.Tensor:
        """`t` indexed by `spec`, as a rank-len(letters) view in letter order (size 1 where absent)."""
        missing = [ch for ch in letters if ch not in spec]
        t = t.reshape(tuple(t.shape) + (1,) * len(missing))
        return t.permute([spec.index(ch) if ch in spec else len(spec) + missing.index(ch) for ch in letters])

    operands = []
    for spec, value, lab in zip(inputs, values, labels):
        if lab is None or lab.dim() != len(spec) or len(set(spec)) != len(spec):
            return unsupported(c)
        vshape = tuple(value.shape[spec.index(ch)] if ch in spec else 1 for ch in letters)
        operands.append((to_joint(spec, lab), vshape))
    broadcast(c, operands, shape)
    contracted = [letters.index(ch) for ch in letters if ch not in output]
    out = torch.full([1] * len(output), FIXED, dtype=torch.long)
    for lab, _ in operands:
        if varying_dims(lab) & set(contracted):
            continue  # its channels are summed away
        lab = lab.permute([letters.index(ch) for ch in output] + contracted)
        lab = lab.reshape(tuple(lab.shape[: len(output)]) + (-1,))[..., 0]
        out = torch.where(lab >= 0, lab, out)
    return out


def matmul(c: Call) -> Label:
    """matmul / @ / bmm as the equivalent einsum (batch dims broadcast)."""
    a, b = c.args[0], c.args[1]
    la, lb = c.labels[0], c.labels[1]
    if not (isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor)) or la is None or lb is None:
        return unsupported(c)
    nb = max(a.dim(), b.dim(), 2) - 2
    batch = "abcdefghij"[:nb]
    sa = batch[nb - max(a.dim() - 2, 0) :] + "nk" if a.dim() >= 2 else "k"
    sb = batch[nb - max(b.dim() - 2, 0) :] + "km" if b.dim() >= 2 else "k"
    out = (batch if a.dim() >= 2 and b.dim() >= 2 else (sa[:-2] or sb[:-2]))
    out += ("n" if a.dim() >= 2 else "") + ("m" if b.dim() >= 2 else "")
    la = la.reshape((1,) * (a.dim() - la.dim()) + tuple(la.shape))
    lb = lb.reshape((1,) * (b.dim() - lb.dim()) + tuple(lb.shape))
    return contract(c, [sa, sb], out, [a, b], [la, lb])


# -- channel-wise ops on (N, C, *spatial) -----------------------------------------------------------
def channelwise(c: Call) -> Label:
    """Pooling, interpolation, padding: channels pass through, spatial dims may change size."""
    value, lab = first_tensor(c)
    if value.dim() < 2 or not isinstance(c.out, torch.Tensor) or c.out.dim() != value.dim():
        return unsupported(c)
    spread = varying_dims(lab) - {1}
    if spread:
        c.st.block(lab, f"is spread over spatial dims entering {c.where}")
    keep = lab[(slice(None), slice(None)) + (slice(0, 1),) * (lab.dim() - 2)]
    if isinstance(c.out, tuple):
        return tuple(keep for _ in c.out)
    return keep


def pad(c: Call) -> Label:
    """F.pad: padded dims must not carry channels; the others (channels-last too) pass."""
    value, lab = first_tensor(c)
    widths = list(c.arg(1, "pad", ()))
    padded = {value.dim() - 1 - i // 2 for i, w in enumerate(widths) if int(w) != 0}
    if varying_dims(lab) & padded:
        c.st.block(lab, f"is padded along its channels by {c.where}")
        return fixed_like(c.out)
    return lab


def reduction(c: Call) -> Label:
    """mean/sum/amax/...: reducing over channels would mix kept and removed ones."""
    value, lab = first_tensor(c)
    dims = dims_arg(c.arg(1, "dim"), value.dim())
    keepdim = bool(c.arg(2, "keepdim", False))
    if varying_dims(lab) & set(dims):
        c.st.block(lab, f"is reduced over by {c.where}")
    index = tuple(slice(0, 1) if d in dims else slice(None) for d in range(lab.dim()))
    out = lab[index]
    if not keepdim:
        out = out.reshape([s for d, s in enumerate(out.shape) if d not in dims])
    if isinstance(c.out, tuple):  # max/min with dim return (values, indices)
        return tuple(out for _ in c.out)
    return out


def softmax_like(c: Call) -> Label:
    value, lab = first_tensor(c)
    dim = c.arg(1, "dim")
    if dim is None and c.module is not None:
        dim = c.module.dim
    dims = dims_arg(dim, value.dim())
    if varying_dims(lab) & set(dims):
        c.st.block(lab, f"is normalised over by {c.where}")
    return lab


# -- structural ops -------------------------------------------------------------------------------
def _reshape_blocks(src: tuple[int, ...], dst: tuple[int, ...]) -> list[tuple[list[int], list[int]]]:
    """Pair runs of source and destination dims whose sizes multiply to the same number."""
    blocks, i, j = [], 0, 0
    while i < len(src) or j < len(dst):
        bi, bj = [], []
        pi = pj = 1
        while True:
            if (pi == pj and bi and bj) or (i >= len(src) and j >= len(dst)):
                break
            if (pi <= pj and i < len(src)) or j >= len(dst):
                pi *= src[i]
                bi.append(i)
                i += 1
            else:
                pj *= dst[j]
                bj.append(j)
                j += 1
        # absorb trailing size-1 dims so they never form blocks of their own
        while i < len(src) and src[i] == 1 and (j >= len(dst) or dst[j] != 1):
            bi.append(i)
            i += 1
        while j < len(dst) and dst[j] == 1 and (i >= len(src) or src[i] != 1):
            bj.append(j)
            j += 1
        blocks.append((bi, bj))
    return blocks


def reshape_label(
    c: Call, value: torch.Tensor, lab: torch.Tensor, dynamic: list[bool], sizes: list[Any] | None = None
) -> Label:
    """view/reshape/flatten/unflatten: merge or split the channel dim.

    A merge of the channel dim with constant dims (flatten into a Linear) is exact when the merged
    size is computed at run time. A split of the channel dim (channel shuffle) is exact when exactly
    one resulting dim is computed at run time: the other dims are fixed, so channels go in whole
    columns, and the ids in each column are tied together. A size read from a tensor (`sizes[d]`
    a `SizeInt`) must measure the channels it reshapes: checked once all ties are known.
    """
    src, dst = tuple(value.shape), tuple(c.out.shape)
    full = expand_full(lab, src).reshape(dst)
    varying = varying_dims(lab)
    blocks = _reshape_blocks(src, dst)
    for _, bj in blocks:
        for d in bj:
            _check_size(c, sizes, d, full, bj)
    for bi, bj in blocks:
        vi = [d for d in bi if d in varying]
        if not vi:
            continue
        big_out = [d for d in bj if dst[d] > 1]
        free = [d for d in bj if dynamic[d]]
        if len(vi) == 1 and len(big_out) == 1 and big_out[0] in free:
            continue  # a merge (or a dim kept as it is) whose size is recomputed after pruning
        big_in = [d for d in bi if src[d] > 1]
        if len(big_in) == 1 and len([d for d in free if dst[d] > 1]) == 1:
            keep = next(d for d in free if dst[d] > 1)
            ref = full
            for d in bj:
                if d != keep:
                    ref = ref.narrow(d, 0, 1)
            c.st.unify(full, ref.expand_as(full), f"is split by {c.where} next to fixed channels")
            continue
        big_out = [d for d in bj if dst[d] > 1]
        if len(big_in) == 1 and big_out and owns_shapes(c):
            # a module whose shape attributes surgery re-derives (VisionTransformer.hidden_dim,
            # a head count): its constants follow the tensors; a split keeps the outer dim (the
            # heads of (heads, head_dim)) as the unit and ties the inner positions to it
            for d in big_out[1:]:
                ref = full.narrow(d, 0, 1)
                c.st.unify(full, ref.expand_as(full), f"is split by {c.where} next to fixed channels")
            continue
        # sizes fixed at trace time: fine for ids that own whole slices along these dims (a
        # table's head columns), decided once all ties are known
        for d in big_in:
            c.st.keep_whole(expand_full(lab, src), d, f"is reshaped by {c.where} in a way prunecore cannot follow")
    return full


def owns_shapes(c: Call) -> bool:
    """Whether the op runs inside a module whose shape constants surgery re-derives (`Handler.constants`)."""
    return c.constants


def _shape_args(c: Call) -> list[Any]:
    """The requested shape of view/reshape (ints, `SizeInt`s read from tensors, -1)."""
    vals = list(c.args[1:])
    if "shape" in c.kwargs:
        vals = [c.kwargs["shape"]]
    if len(vals) == 1 and isinstance(vals[0], (tuple, list, torch.Size)):
        vals = list(vals[0])
    return vals


def view(c: Call) -> Label:
    value, lab = c.args[0], c.labels[0]
    vals = _shape_args(c)
    dynamic = [isinstance(v, SizeInt) or v == -1 for v in vals]
    return reshape_label(c, value, lab, dynamic, vals)


def reshape_as(c: Call) -> Label:
    """`x.reshape_as(y)` / `x.view_as(y)`: a reshape to sizes read from `y` (LeViT's BatchNorm over tokens)."""
    value, other = c.args[0], c.args[1]
    if not isinstance(other, torch.Tensor) or c.labels[1] is None:
        return unsupported(c)
    sizes = shape_sizes(tuple(other.shape), c.labels[1])
    return reshape_label(c, value, c.labels[0], [True] * len(sizes), sizes)


def _check_size(c: Call, sizes: list[Any] | None, d: int, full: torch.Tensor, block: list[int]) -> None:
    """Record that the size requested for dim `d`, if read from a tensor, shrinks with the data."""
    size = sizes[d] if sizes is not None and d < len(sizes) else None
    if not isinstance(size, SizeInt) or not size.channels or owns_shapes(c):
        return
    data = full[tuple(slice(None) if i in block else 0 for i in range(full.dim()))].reshape(-1)  # (block size,)
    c.st.same_size(size.sources, data, size.derived, f"is reshaped by {c.where} to a size read from other channels")


def flatten(c: Call) -> Label:
    value, lab = c.args[0], c.labels[0]
    if c.module is not None:
        start, end = c.module.start_dim, c.module.end_dim
    else:
        start, end = c.arg(1, "start_dim", 0), c.arg(2, "end_dim", -1)
    nd = value.dim()
    if nd == 0:
        return lab.reshape(1)
    start, end = norm_dim(start, nd), norm_dim(end, nd)
    out_nd = nd - (end - start)
    return reshape_label(c, value, lab, [True] * out_nd)


def unflatten(c: Call) -> Label:
    value, lab = c.args[0], c.labels[0]
    if c.module is not None:
        dim, sizes = c.module.dim, c.module.unflattened_size
    else:
        dim, sizes = c.arg(1, "dim"), c.arg(2, "sizes")
    dim = norm_dim(dim, value.dim())
    dynamic = [True] * dim + [s == -1 for s in sizes] + [True] * (value.dim() - dim - 1)
    return reshape_label(c, value, lab, dynamic)


def apply_same(c: Call) -> Label:
    """permute/transpose/unsqueeze/expand/repeat/flip...: move labels exactly like the values."""
    value, lab = c.args[0], c.labels[0]
    full = expand_full(lab, value.shape)
    return c.fn(full, *c.args[1:], **c.kwargs)


def squeeze(c: Call) -> Label:
    value, lab = c.args[0], c.labels[0]
    return expand_full(lab, value.shape).reshape(c.out.shape)


def _covers(item: slice, size: int) -> bool:
    """The slice takes a whole dim of `size` and still would after the dim shrinks (`x[:, :k]`, k >= size).

    Python clamps slice bounds, so a stop at or past the end, or a start at or before the
    beginning, keeps meaning "everything" when channels go.
    """
    start_ok = item.start is None or item.start == 0 or item.start <= -size
    stop_ok = item.stop is None or item.stop >= size
    return start_ok and stop_ok and item.step in (None, 1)


def getitem(c: Call) -> Label:
    container, lab = c.args[0], c.labels[0]
    index = c.args[1]
    if not isinstance(container, torch.Tensor):
        return lab[index] if isinstance(lab, (tuple, list, dict)) else None
    full = expand_full(lab, container.shape)
    varying = varying_dims(lab)
    items = index if isinstance(index, tuple) else (index,)
    gathers = [i for i, item in enumerate(items) if isinstance(item, (torch.Tensor, list))]
    if gathers:
        if varying:
            before = items[: gathers[0]]
            if len(gathers) == 1 and all(isinstance(i, slice) and i == slice(None) for i in before):
                # a lookup along one dim (a position-bias table): channels may run along the others
                c.st.keep_whole(full, gathers[0], f"is looked up by position along its channels by {c.where}")
            else:
                c.st.block(lab, f"is indexed with a tensor by {c.where}")
        return full[index]
    consumed = sum(1 for i in items if i is not None and i is not Ellipsis)
    dim = 0
    for item in items:
        if item is Ellipsis:
            dim += container.dim() - consumed
            continue
        if item is None:
            continue
        if dim in varying and not (isinstance(item, slice) and _covers(item, container.shape[dim])):
            c.st.block(lab, f"is sliced by {c.where}")
        dim += 1
    return full[index]


def cat(c: Call, stack: bool = False) -> Label:
    """cat/stack: offsets along the joined dim; every other dim must keep the same channels."""
    tensors, labs = c.args[0], c.labels[0]
    if not stack:  # cat skips 1-D empty tensors whatever the others' rank (HF caches start as one)
        kept = [(t, lab) for t, lab in zip(tensors, labs) if not (t.dim() == 1 and t.numel() == 0)]
        if kept and len(kept) < len(tensors):
            tensors, labs = [t for t, _ in kept], [lab for _, lab in kept]
    nd = tensors[0].dim()
    dim = c.arg(1, "dim", 0)
    dim = norm_dim(dim, nd + 1 if stack else nd)
    if stack:
        tensors = [t.unsqueeze(dim) for t in tensors]
        labs = [lab.unsqueeze(dim) for lab in labs]
        nd += 1
    profiles = []
    for lab in labs:
        varying = varying_dims(lab)
        if dim in varying and varying - {dim}:
            c.st.block(lab, f"is joined by {c.where} while spread over several dims")
        profiles.append(lab.narrow(dim, 0, 1))
    if any(varying_dims(p) for p in profiles):
        for p in profiles[1:]:
            c.st.unify(profiles[0], p, f"is joined by {c.where} with channels that cannot be removed")
    sizes = [max(lab.shape[d] for lab in labs) if d != dim else 0 for d in range(nd)]
    parts = []
    for t, lab in zip(tensors, labs):
        shape = list(sizes)
        shape[dim] = t.shape[dim]
        parts.append(lab.expand(shape))
    return torch.cat(parts, dim)


def chunk(c: Call) -> Label:
    """chunk/split into equal pieces: a channel removed from one piece goes from every piece."""
    value, lab = c.args[0], c.labels[0]
    name = function_name(c.fn)
    dim = norm_dim(c.arg(2, "dim", 0), value.dim())
    pieces = c.out
    full = expand_full(lab, value.shape)
    parts, offset = [], 0
    for piece in pieces:
        parts.append(full.narrow(dim, offset, piece.shape[dim]))
        offset += piece.shape[dim]
    if dim in varying_dims(lab):
        size = c.arg(1, "split_size_or_sections" if name == "split" else "chunks")
        if name == "split" and "split_size" in c.kwargs:
            size = c.kwargs["split_size"]
        equal = len({p.shape[dim] for p in pieces}) == 1
        computed = name == "chunk" or isinstance(size, SizeInt) or owns_shapes(c)  # sizes `fix` re-derives
        if equal and computed:
            for p in parts[1:]:
                c.st.unify(parts[0], p, f"is split into equal pieces by {c.where} next to fixed channels")
        else:
            c.st.block(lab, f"is split into pieces of fixed size by {c.where}")
    return tuple(parts)


def unbind(c: Call) -> Label:
    value, lab = c.args[0], c.labels[0]
    dim = norm_dim(c.arg(1, "dim", 0), value.dim())
    if dim in varying_dims(lab):
        c.st.block(lab, f"is unbound by {c.where}")
    full = expand_full(lab, value.shape)
    return tuple(full.unbind(dim))


# -- modules that own channels ----------------------------------------------------------------------
def conv(c: Call) -> Label:
    """Conv and ConvTranspose 1d/2d/3d; weight is (out, in/g, *k), or (in, out/g, *k) transposed.

    Grouped convs lose whole conv groups: the input channels of a group are tied, its outputs
    share the group's id, and only weight dim 0 (which spans all groups) loses positions.
    """
    m, name = c.module, c.name
    x = c.args[0]
    cdim = x.dim() - len(m.kernel_size) - 1
    bias = "bias" if m.bias is not None else None
    return _conv_labels(c, name, "weight", bias, cdim, m.in_channels, m.out_channels, m.groups, m.transposed)


def _conv_labels(c: Call, name: str, weight: str, bias: str | None, cdim: int, in_channels: int, out_channels: int,
                 groups: int, transposed: bool) -> Label:  # fmt: skip
    lab, st = c.labels[0], c.st
    ids_in = st.channel_vector(lab, cdim, in_channels, c.where)
    if groups == 1:
        ids_out = st.origin(name, out_channels)
        in_dim, out_dim = (0, 1) if transposed else (1, 0)
        st.record((name, weight, in_dim), ids_in)
        st.record((name, weight, out_dim), ids_out, output=True)
    else:
        ids_out = _grouped(st, ids_in, groups, out_channels, name)
        st.record((name, weight, 0), ids_in if transposed else ids_out, output=True)
    if bias is not None:
        st.record((name, bias, 0), ids_out)
    return along(ids_out, cdim, c.out.dim())


def _owner(c: Call, value: Any) -> tuple[str, str] | None:
    """(module, tensor) of a parameter or buffer passed to a functional, else None."""
    name = c.tensor_name(value)
    if name is None:
        return None
    module, _, tensor = name.rpartition(".")
    return module, tensor


def functional_conv(c: Call) -> Label:
    """F.conv1d/2d/3d called with a module's own parameters (timm's `Conv2dSame`, a custom forward)."""
    x, weight, bias = c.args[0], c.arg(1, "weight"), c.arg(2, "bias")
    w, b = _owner(c, weight), _owner(c, bias)
    if w is None or (bias is not None and (b is None or b[0] != w[0])):
        return unsupported(c)
    groups = c.arg(6, "groups", 1)
    if groups != 1 and not isinstance(groups, SizeInt) and not owns_shapes(c):
        # a group count fixed at trace time (`groups=self.channels`) would not follow the pruned width
        return unsupported(c)
    groups = int(groups)
    cdim = x.dim() - (weight.dim() - 2) - 1
    out_channels = weight.shape[0]
    return _conv_labels(c, w[0], w[1], b[1] if b else None, cdim, x.shape[cdim], out_channels, groups, False)


def functional_linear(c: Call) -> Label:
    """F.linear with a module's own weight (a Linear subclass with its own forward).

    The bias may be computed in the forward (BEiT's `cat((q_bias, k_bias, v_bias))`): its
    positions are then tied to the output channels, which carries them back to the parameters.
    """
    x, weight, bias = c.args[0], c.arg(1, "weight"), c.arg(2, "bias")
    w, b = _owner(c, weight), _owner(c, bias)
    computed = c.labels[2] if len(c.labels) > 2 else c.klabels.get("bias")
    if w is None or weight.dim() != 2 or (bias is not None and b is None and computed is None):
        return unsupported(c)
    name, st = w[0], c.st
    ids_in = st.channel_vector(c.labels[0], x.dim() - 1, weight.shape[1], c.where)
    ids_out = st.origin(name, weight.shape[0])
    st.record((name, w[1], 1), ids_in)
    st.record((name, w[1], 0), ids_out, output=True)
    if b is not None:
        st.record((b[0], b[1], 0), ids_out)
    elif bias is not None:
        st.unify(expand_full(computed, bias.shape), ids_out, f"is the bias of {c.where}")
    return along(ids_out, c.out.dim() - 1, c.out.dim())


def functional_embedding(c: Call) -> Label:
    """F.embedding with a module's own table (an Embedding subclass with its own forward: Gemma's scaled one)."""
    weight = c.arg(1, "weight")
    w = _owner(c, weight)
    if w is None or weight.dim() != 2:
        return unsupported(c)
    return _embedding_labels(c, w[0], w[1], weight.shape[1])


def functional_batch_norm(c: Call) -> Label:
    """F.batch_norm with a module's own statistics and affine parameters (timm's `BatchNormAct2d`)."""
    x, lab = c.args[0], c.labels[0]
    tensors = [c.arg(i, key) for i, key in enumerate(("running_mean", "running_var", "weight", "bias"), start=1)]
    owners = [_owner(c, t) for t in tensors if t is not None]
    if any(o is None for o in owners):
        c.st.block(lab, f"is normalised by {c.where} with statistics computed in the forward")
        return lab
    if x.dim() < 2:
        return unsupported(c)
    ids = c.st.channel_vector(lab, 1, x.shape[1], c.where)
    for module, tensor in owners:
        c.st.record((module, tensor, 0), ids)
    return lab


def scaled_dot_product_attention(c: Call) -> Label:
    """F.scaled_dot_product_attention on (B, heads, tokens, head_dim): whole heads, never the head dim.

    Positions along the head dim are tied within each head, so only whole heads can go: the
    default scale 1/sqrt(head_dim) stays what it was. Query head h, key head h and value head h
    go together (the attention weights of head h mix the values of head h); with grouped-query
    attention (`enable_gqa`, Hq = g * Hkv) query heads h*g .. h*g+g-1 go with key/value head h,
    a whole KV group. A float mask that differs per head (T5's and Swin's relative position
    bias) loses the removed heads' rows with them.
    """
    roles = ("query", "key", "value")
    q, k, v = (c.arg(i, n) for i, n in enumerate(roles))
    lq, lk, lv = (c.labels[i] if i < len(c.labels) else c.klabels.get(n) for i, n in enumerate(roles))
    mask = c.arg(3, "attn_mask")
    lmask = c.labels[3] if len(c.labels) > 3 else c.klabels.get("attn_mask")
    if any(not isinstance(t, torch.Tensor) or t.dim() != 4 for t in (q, k, v)) or None in (lq, lk, lv):
        return unsupported(c)
    hq, hkv = q.shape[1], k.shape[1]
    if v.shape[1] != hkv or hq % hkv or (hq != hkv and not c.arg(7, "enable_gqa", False)):
        return unsupported(c)
    heads = []  # (labels compressed, constant along the head dim) of q, k, v
    for t, lab in ((q, lq), (k, lk), (v, lv)):
        lab = lab.reshape((1,) * (4 - lab.dim()) + tuple(lab.shape))
        if lab.shape[-1] > 1:
            full = expand_full(lab, lab.shape)
            c.st.unify(full, full.narrow(-1, 0, 1).expand_as(full), f"is one head in {c.where} beside fixed channels")
            lab = lab.narrow(-1, 0, 1)
        if 2 in varying_dims(lab):
            c.st.block(lab, f"is attended over by {c.where}")
        heads.append(lab)
    group = hq // hkv
    if group > 1:  # each key/value head serves `group` consecutive query heads
        heads[1:] = [h.repeat_interleave(group, dim=1) if h.shape[1] > 1 else h for h in heads[1:]]
    # every head's q, k, v (and its mask rows) meet elementwise along (B, H): one unit per head
    shape = (max(q.shape[0], k.shape[0]), hq, 1, 1)
    operands = [(h.narrow(2, 0, 1), (h.shape[0], h.shape[1], 1, 1)) for h in heads]
    if isinstance(mask, torch.Tensor) and lmask is not None:
        lmask = lmask.reshape((1,) * (4 - lmask.dim()) + tuple(lmask.shape))
        if varying_dims(lmask) - {1}:
            return unsupported(c)  # a mask computed from channels along the tokens: nothing to follow
        if mask.dim() == 4 and mask.shape[1] == hq:
            operands.append((lmask.narrow(2, 0, 1).narrow(3, 0, 1), (mask.shape[0], hq, 1, 1)))
        elif varying_dims(lmask):
            return unsupported(c)
    per_head = broadcast(c, operands, shape)  # (B|1, H|1, 1, 1)
    return per_head.expand(per_head.shape[0], hq, 1, 1)  # the output (B, Hq, N, Ev): one label per head


def normalize(c: Call) -> Label:
    """F.normalize: a norm along `dim`; channels along any other dim pass."""
    x, lab = c.args[0], c.labels[0]
    dims = dims_arg(c.arg(2, "dim", 1), x.dim())
    if varying_dims(lab) & set(dims):
        c.st.block(lab, f"is normalised over by {c.where}")
    return lab


def _grouped(st: Coupling, ids_in: torch.Tensor, groups: int, out_channels: int, name: str) -> torch.Tensor:
    """Tie each conv group's input channels; its outputs share the group's id."""
    blocks = ids_in.reshape(groups, -1)  # (groups, in_per_group)
    st.unify(blocks, blocks[:, :1].expand_as(blocks), f"feeds grouped conv {name!r} beside fixed channels")
    return blocks[:, 0].repeat_interleave(out_channels // groups)  # (out_channels,)


def linear(c: Call) -> Label:
    m, name = c.module, c.name
    x, lab = c.args[0], c.labels[0]
    st = c.st
    ids_in = st.channel_vector(lab, x.dim() - 1, m.in_features, f"Linear {name!r}")
    ids_out = st.origin(name, m.out_features)
    st.record((name, "weight", 1), ids_in)
    st.record((name, "weight", 0), ids_out, output=True)
    if m.bias is not None:
        st.record((name, "bias", 0), ids_out)
    return along(ids_out, c.out.dim() - 1, c.out.dim())


def embedding(c: Call) -> Label:
    return _embedding_labels(c, c.name, "weight", c.module.embedding_dim)


def _embedding_labels(c: Call, name: str, weight: str, width: int) -> Label:
    """A lookup table's rows: its `width` columns are fresh output channels, the output's last dim."""
    ids_out = c.st.origin(name, width)
    c.st.record((name, weight, 1), ids_out, output=True)
    return along(ids_out, c.out.dim() - 1, c.out.dim())


def batchnorm(c: Call) -> Label:
    """BatchNorm/InstanceNorm: per-channel statistics, sliced with the channel."""
    m, name = c.module, c.name
    x, lab = c.args[0], c.labels[0]
    ids = c.st.channel_vector(lab, 1, x.shape[1], f"{type(m).__name__} {name!r}")
    for tensor in ("weight", "bias", "running_mean", "running_var"):
        if getattr(m, tensor, None) is not None:
            c.st.record((name, tensor, 0), ids)
    return lab


def prelu(c: Call) -> Label:
    m, name = c.module, c.name
    x, lab = c.args[0], c.labels[0]
    if m.num_parameters > 1:
        ids = c.st.channel_vector(lab, 1, x.shape[1], f"PReLU {name!r}")
        c.st.record((name, "weight", 0), ids)
    return lab


def layer_norm(c: Call) -> Label:
    """LayerNorm (and subclasses such as torchvision's channels-first `LayerNorm2d`).

    Removing channels of the normalised dim slices weight and bias and makes the statistics run
    over the kept channels only; `apply_plan(mode="mask")` reproduces that with a masked norm, for
    which the trace records the input dim that carries the channels (`Coupling.norm_dims`).
    """
    m, name = c.module, c.name
    x, lab = c.args[0], c.labels[0]
    nd, k = x.dim(), len(m.normalized_shape)
    if type(m).forward is nn.LayerNorm.forward:
        dims = set(range(nd - k, nd))
    elif k == 1 and isinstance(c.out, torch.Tensor) and c.out.shape == x.shape:
        # its own forward (a permute around F.layer_norm): the channels sit on the dim of that size
        dims = {d for d in varying_dims(lab) if x.shape[d] == m.normalized_shape[0]}
    else:
        return unsupported(c)
    varying = varying_dims(lab) & dims
    if not varying:
        return lab
    if len(varying) > 1 or (m.weight is None and m.bias is None):
        why = "over several dims" if len(varying) > 1 else "without affine parameters (nothing to slice)"
        c.st.block(lab, f"is normalised by {c.where} {why}, which prunecore cannot prune")
        return lab
    (d,) = varying
    ids = c.st.channel_vector(lab, d, x.shape[d], c.where)
    wdim = d - (nd - k) if k > 1 else 0
    for tensor in ("weight", "bias"):
        if getattr(m, tensor, None) is not None:
            c.st.record((name, tensor, wdim), ids)
    c.st.norm_dims[name] = d - nd
    return lab


def rms_norm(c: Call) -> Label:
    """RMSNorm over the last dim (torch's `nn.RMSNorm`, Llama's, Qwen2's, T5's): a weight per channel.

    Like LayerNorm, removing channels makes the root mean square run over the kept ones only,
    which `apply_plan(mode="mask")` reproduces with a masked norm.
    """
    m, name = c.module, c.name
    x, lab = c.args[0], c.labels[0]
    weight = getattr(m, "weight", None)
    if not isinstance(weight, torch.Tensor) or weight.dim() != 1 or x.shape[-1] != weight.shape[0]:
        return unsupported(c)
    if x.dim() - 1 not in varying_dims(lab):
        return lab
    ids = c.st.channel_vector(lab, x.dim() - 1, x.shape[-1], c.where)
    c.st.record((name, "weight", 0), ids)
    c.st.norm_dims[name] = -1
    return lab


def group_norm(c: Call) -> Label:
    """GroupNorm: a unit is one whole norm group, so `num_groups` shrinks and channels-per-group stays.

    Statistics are per group, so removing whole groups leaves the kept groups' statistics as they
    were: the pruned model equals the masked one without a masked norm.
    """
    m, name = c.module, c.name
    x, lab = c.args[0], c.labels[0]
    if not varying_dims(lab) & set(range(1, x.dim())):
        return lab
    if not m.affine:
        c.st.block(lab, f"is normalised by {c.where} without affine parameters (nothing to slice)")
        return lab
    if not (isinstance(c.out, torch.Tensor) and c.out.shape == x.shape):
        return unsupported(c)
    ids = c.st.channel_vector(lab, 1, x.shape[1], c.where)
    if m.num_groups == 1:
        # one group over all channels (PoolFormer's GroupNorm1) normalises like a LayerNorm:
        # single channels may go, and mask mode needs the masked norm
        c.st.norm_dims[name] = 1 - x.dim()
    else:
        blocks = ids.reshape(m.num_groups, -1)  # (groups, channels per group)
        c.st.unify(blocks, blocks[:, :1].expand_as(blocks), f"is one group of {c.where} beside fixed channels")
    for tensor in ("weight", "bias"):
        c.st.record((name, tensor, 0), ids)
    return lab


def norm_over_channels(c: Call) -> Label:
    """LocalResponseNorm and functional norms: statistics across channels that prunecore cannot slice."""
    x, lab = first_tensor(c)
    if varying_dims(lab) - {0}:
        c.st.block(lab, f"is normalised across channels by {c.where} (use nn.LayerNorm / nn.GroupNorm modules)")
    return lab


def functional_layer_norm(c: Call) -> Label:
    """F.layer_norm normalises the trailing dims; channels elsewhere pass through."""
    x, lab = c.args[0], c.labels[0]
    k = len(c.arg(1, "normalized_shape"))
    if varying_dims(lab) & set(range(x.dim() - k, x.dim())):
        c.st.block(lab, f"is normalised across channels by {c.where} (use an nn.LayerNorm module)")
    return lab


def multihead_attention(c: Call) -> Label:
    """nn.MultiheadAttention: a unit is one whole head (its q, k, v rows and out_proj columns).

    The model width (the input channels, shared by query, key and value through `in_proj_weight`)
    and the heads are separate groups; the head dim inside a head is never pruned, so the
    attention scale 1/sqrt(head_dim) stays. After removal the module becomes a
    `prunecore.attention.PrunedMultiheadAttention`, which allows inner width != model width.
    """
    m, name = c.module, c.name
    if type(m) not in (nn.MultiheadAttention, PrunedMultiheadAttention) or m.bias_k is not None or m.add_zero_attn:
        return unsupported(c)
    roles = ("query", "key", "value")
    query, key, value = (c.arg(i, n) for i, n in enumerate(roles))
    lq, lk, lv = (c.labels[i] if i < len(c.labels) else c.klabels.get(n) for i, n in enumerate(roles))
    st = c.st
    ids_q = st.channel_vector(lq, query.dim() - 1, query.shape[-1], c.where)
    ids_k = st.channel_vector(lk, key.dim() - 1, key.shape[-1], c.where)
    ids_v = st.channel_vector(lv, value.dim() - 1, value.shape[-1], c.where)
    heads = st.origin(name, m.num_heads, names_group=True)
    inner = heads.repeat_interleave(m.head_dim)  # (num_heads * head_dim,)
    if m._qkv_same_embed_dim:
        shared = f"shares in_proj_weight in {c.where} with channels that cannot be removed"
        st.unify(ids_q, ids_k, shared)
        st.unify(ids_q, ids_v, shared)
        st.record((name, "in_proj_weight", 1), ids_q)
        st.record((name, "in_proj_weight", 0), inner.repeat(3), output=True)
    else:
        for tensor, ids in (("q_proj_weight", ids_q), ("k_proj_weight", ids_k), ("v_proj_weight", ids_v)):
            st.record((name, tensor, 1), ids)
            st.record((name, tensor, 0), inner, output=True)
    if m.in_proj_bias is not None:
        st.record((name, "in_proj_bias", 0), inner.repeat(3))
    out_proj = f"{name}.out_proj"
    ids_out = st.origin(out_proj, m.out_proj.out_features)
    st.record((out_proj, "weight", 1), inner)
    st.record((out_proj, "weight", 0), ids_out, output=True)
    if m.out_proj.bias is not None:
        st.record((out_proj, "bias", 0), ids_out)
    mask = c.arg(5, "attn_mask")
    if isinstance(mask, torch.Tensor) and mask.dim() == 3:
        st.block(heads, f"heads of {c.where} get a per-head attn_mask")
    attn_out, weights = c.out
    if weights is not None and c.watch is not None:
        c.watch(weights, heads, f"heads of {c.where} are averaged into attention weights the model uses")
    return (along(ids_out, attn_out.dim() - 1, attn_out.dim()), fixed_like(weights))


# -- dispatch tables --------------------------------------------------------------------------------
def opaque(c: Call) -> Label:
    """A module type the user declared a leaf (`leaf_modules=`): its channels are kept."""
    block_inputs(c, f"reaches {c.where}, a leaf module prunecore does not look inside")
    return fixed_like(c.out)


def fused_transformer_layer(c: Call) -> Label:
    """nn.TransformerEncoderLayer / DecoderLayer: in eval mode torch runs them as one fused kernel
    that reads the attention's sizes from `embed_dim`, so pruned heads or widths would crash it."""
    block_inputs(c, f"enters {c.where}, whose fused eval-mode fast path cannot take pruned attention")
    return fixed_like(c.out)


_ELEMENTWISE_FUNCTIONS = [
    torch.add, torch.sub, torch.mul, torch.div, torch.neg, torch.pow, torch.where, torch.clamp,
    torch.relu, torch.sigmoid, torch.tanh, torch.exp, torch.abs, torch.sqrt, torch.rsqrt,
    torch.maximum, torch.minimum, torch.erf, torch.addcmul, torch.addcdiv, torch.lerp, torch.square,
    torch.log, torch.sin, torch.cos, torch.clamp_min, torch.nn.functional.hardtanh,
    F.relu, F.relu6, F.gelu, F.silu, F.hardswish, F.hardsigmoid, F.sigmoid, F.tanh, F.leaky_relu,
    F.elu, F.selu, F.mish, F.hardtanh, F.softplus, F.dropout, F.dropout1d, F.dropout2d,
    F.dropout3d, F.alpha_dropout,
]  # fmt: skip
_ELEMENTWISE_METHODS = [
    "add", "sub", "mul", "div", "add_", "sub_", "mul_", "div_", "neg", "pow", "relu", "relu_",
    "sigmoid", "sigmoid_", "tanh", "exp", "abs", "sqrt", "rsqrt", "clamp", "clamp_", "clamp_min",
    "masked_fill", "masked_fill_", "contiguous", "clone", "detach", "float", "double", "half",
    "bfloat16", "to", "type", "type_as", "requires_grad_", "erf",
]  # fmt: skip
_SPATIAL_FUNCTIONS = [
    F.max_pool1d, F.max_pool2d, F.max_pool3d, F.avg_pool1d, F.avg_pool2d, F.avg_pool3d,
    F.adaptive_avg_pool1d, F.adaptive_avg_pool2d, F.adaptive_avg_pool3d, F.adaptive_max_pool1d,
    F.adaptive_max_pool2d, F.adaptive_max_pool3d, F.interpolate, torch.max_pool2d,
    torch.avg_pool1d, torch.adaptive_avg_pool1d,
]  # fmt: skip
_ELEMENTWISE_DUNDERS = [
    "__add__", "__radd__", "__iadd__", "__sub__", "__rsub__", "__isub__", "__mul__", "__rmul__", "__imul__",
    "__truediv__", "__rtruediv__", "__itruediv__", "__div__", "__rdiv__", "__idiv__", "__neg__", "__pos__",
    "__pow__", "__rpow__", "__ipow__", "__abs__", "__eq__", "__ne__", "__lt__", "__le__", "__gt__", "__ge__",
    "__and__", "__or__", "__xor__", "__invert__", "__floordiv__", "__rfloordiv__", "__mod__",
]  # fmt: skip
_REDUCTIONS = ["mean", "sum", "amax", "amin", "max", "min", "std", "var", "logsumexp", "prod", "norm"]

FUNCTION_RULES: dict[Any, Rule] = {
    **{f: elementwise for f in _ELEMENTWISE_FUNCTIONS},
    **{f: channelwise for f in _SPATIAL_FUNCTIONS},
    F.pad: pad, torch.constant_pad_nd: pad,
    **{getattr(torch, r): reduction for r in _REDUCTIONS},
    F.softmax: softmax_like, F.log_softmax: softmax_like, torch.softmax: softmax_like,
    torch.log_softmax: softmax_like,
    F.layer_norm: functional_layer_norm, F.group_norm: norm_over_channels, F.local_response_norm: norm_over_channels,
    torch.einsum: einsum, torch.matmul: matmul, torch.bmm: matmul,
    torch.flatten: flatten, torch.reshape: view, torch.unflatten: unflatten,
    torch.cat: cat, torch.concat: cat, torch.stack: lambda c: cat(c, stack=True),
    torch.chunk: chunk, torch.split: chunk, torch.unbind: unbind,
    torch.permute: apply_same, torch.transpose: apply_same, torch.unsqueeze: apply_same,
    torch.squeeze: squeeze, torch.flip: apply_same, torch.movedim: apply_same,
    torch.swapaxes: apply_same, torch.swapdims: apply_same, torch.moveaxis: apply_same,
    torch.roll: apply_same, torch.repeat_interleave: apply_same, torch.tile: apply_same,
    torch.conv1d: functional_conv, torch.conv2d: functional_conv, torch.conv3d: functional_conv,
    F.linear: functional_linear, F.batch_norm: functional_batch_norm, F.normalize: normalize,
    F.embedding: functional_embedding, F.scaled_dot_product_attention: scaled_dot_product_attention,
}  # fmt: skip
for _rule in (functional_conv, functional_linear, functional_batch_norm, functional_embedding):
    _rule.params_by_name = True  # type: ignore[attr-defined]  # parameters are recognised by name
METHOD_RULES: dict[str, Rule] = {
    **{m: elementwise for m in _ELEMENTWISE_METHODS},
    **{r: reduction for r in _REDUCTIONS},
    "softmax": softmax_like, "log_softmax": softmax_like,
    "view": view, "reshape": view, "flatten": flatten, "unflatten": unflatten,
    "chunk": chunk, "split": chunk, "unbind": unbind,
    "permute": apply_same, "transpose": apply_same, "unsqueeze": apply_same, "expand": apply_same,
    "repeat": apply_same, "flip": apply_same, "movedim": apply_same, "t": apply_same,
    "swapaxes": apply_same, "swapdims": apply_same, "moveaxis": apply_same, "roll": apply_same,
    "repeat_interleave": apply_same, "tile": apply_same,
    "squeeze": squeeze, "expand_as": elementwise, "matmul": matmul, "bmm": matmul,
    "reshape_as": reshape_as, "view_as": reshape_as, "addcmul": elementwise, "addcdiv": elementwise,
    "addcmul_": elementwise, "addcdiv_": elementwise, "lerp": elementwise, "square": elementwise,
    "gelu": elementwise, "silu": elementwise, "log": elementwise, "sin": elementwise, "cos": elementwise,
    "__getitem__": getitem, "__matmul__": matmul,
    **{d: elementwise for d in _ELEMENTWISE_DUNDERS},
}  # fmt: skip


_TENSOR_METHODS = {getattr(torch.Tensor, name, None): rule for name, rule in METHOD_RULES.items()}
_TENSOR_METHODS.pop(None, None)


def function_rule(fn: Any) -> Rule:
    """The rule of a torch function or tensor method as the tracing mode sees it."""
    rule = FUNCTION_RULES.get(fn) or _TENSOR_METHODS.get(fn)
    if rule is not None:
        return rule
    method = getattr(fn, "__objclass__", None) is torch._C.TensorBase
    if method or getattr(fn, "__qualname__", "").startswith("Tensor."):
        return METHOD_RULES.get(getattr(fn, "__name__", ""), unsupported)
    return unsupported


def output(st: Coupling, labels: Any) -> None:
    for lab in walk_labels(labels):
        st.block(lab, "reaches the model output")


def finish(st: Coupling, label: Label) -> Label:
    """Canonical form of an output label: ids replaced by roots, constant dims compressed."""
    if isinstance(label, torch.Tensor):
        return compress(st.roots(label))
    if isinstance(label, (tuple, list)):
        return tuple(finish(st, item) for item in label)
    if isinstance(label, dict):
        return {k: finish(st, v) for k, v in label.items()}
    return None

