"""How each op moves channel labels: the rule table behind `trace`.

A rule receives a `Call` (the concrete argument values, their labels, the output value) and returns
the output's label. Along the way it records the tensor slices that lose positions
(`Coupling.record`), ties ids together (`Coupling.unify`), or forbids removing ids whose removal
would change the function in a way the pruned model could not reproduce (`Coupling.block`).
Anything without a rule blocks every channel it touches: an unknown op is never pruned wrong.
"""

from __future__ import annotations

import operator
from dataclasses import dataclass
from typing import Any, Callable

import torch
import torch.nn.functional as F
from torch import fx, nn

from prunecore._labels import (
    FIXED,
    Coupling,
    along,
    compress,
    expand_full,
    fixed_label,
    varying_dims,
)

Label = Any  # a label tensor, a tuple of labels (for tuple values), or None (non-tensors)


@dataclass
class Call:
    node: fx.Node
    args: tuple
    kwargs: dict
    labels: tuple
    klabels: dict
    out: Any
    st: Coupling
    module: nn.Module | None = None

    @property
    def where(self) -> str:
        """A readable name of the op for error reasons."""
        if self.node.op == "call_module":
            return f"{type(self.module).__name__} module {self.node.target!r}"
        target = self.node.target
        name = target if isinstance(target, str) else getattr(target, "__name__", str(target))
        return f"{name} at node {self.node.name!r}"

    def arg(self, i: int, name: str, default: Any = None) -> Any:
        if len(self.args) > i:
            return self.args[i]
        return self.kwargs.get(name, default)

    def node_arg(self, i: int, name: str, default: Any = None) -> Any:
        """The arg as written in the graph: a `fx.Node` where the value is computed at run time."""
        if len(self.node.args) > i:
            return self.node.args[i]
        return self.node.kwargs.get(name, default)


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


_SHAPE_METHODS = {"size", "dim", "numel", "ndimension", "nelement", "get_device"}
_SHAPE_ATTRS = {"shape", "ndim", "dtype", "device", "is_cuda", "layout", "requires_grad"}


def is_shape_query(node: fx.Node) -> bool:
    """Ops that read a tensor's metadata, not its values: channels pass them unconstrained."""
    if node.op == "call_method":
        return node.target in _SHAPE_METHODS
    if node.target is getattr:
        return len(node.args) > 1 and node.args[1] in _SHAPE_ATTRS
    return node.target in (len, torch.numel)


def walk_labels(labels: Any):
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
    shape = tuple(c.out.shape)
    nd = len(shape)
    ops = []
    for value, lab in tensor_operands(c):
        vshape = (1,) * (nd - value.dim()) + tuple(value.shape)
        lab = lab.reshape((1,) * (nd - lab.dim()) + tuple(lab.shape))
        bcast = {d for d in range(nd) if vshape[d] == 1 and shape[d] > 1}
        ops.append((lab, bcast, vshape == shape))
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


def reshape_label(c: Call, value: torch.Tensor, lab: torch.Tensor, dynamic: list[bool]) -> Label:
    """view/reshape/flatten/unflatten: merge or split the channel dim.

    A merge of the channel dim with constant dims (flatten into a Linear) is exact when the merged
    size is computed at run time. A split of the channel dim (channel shuffle) is exact when exactly
    one resulting dim is computed at run time: the other dims are fixed, so channels go in whole
    columns, and the ids in each column are tied together.
    """
    src, dst = tuple(value.shape), tuple(c.out.shape)
    full = expand_full(lab, src).reshape(dst)
    varying = varying_dims(lab)
    for bi, bj in _reshape_blocks(src, dst):
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
        c.st.block(lab, f"is reshaped by {c.where} in a way prunecore cannot follow")
    return full


def _shape_args(c: Call) -> tuple[list[Any], list[Any]]:
    """The requested shape of view/reshape, as values and as graph args."""
    vals, nodes = list(c.args[1:]), list(c.node.args[1:])
    if "shape" in c.kwargs:
        vals, nodes = [c.kwargs["shape"]], [c.node.kwargs["shape"]]
    if len(vals) == 1 and isinstance(vals[0], (tuple, list, torch.Size)):
        node = nodes[0]
        vals = list(vals[0])
        nodes = list(node) if isinstance(node, (tuple, list)) else [node] * len(vals)
    return vals, nodes


def view(c: Call) -> Label:
    value, lab = c.args[0], c.labels[0]
    vals, nodes = _shape_args(c)
    dynamic = [isinstance(n, fx.Node) or v == -1 for v, n in zip(vals, nodes)]
    return reshape_label(c, value, lab, dynamic)


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
    fn = getattr(torch.Tensor, c.node.target) if isinstance(c.node.target, str) else c.node.target
    return fn(full, *c.args[1:], **c.kwargs)


def squeeze(c: Call) -> Label:
    value, lab = c.args[0], c.labels[0]
    return expand_full(lab, value.shape).reshape(c.out.shape)


def getitem(c: Call) -> Label:
    container, lab = c.args[0], c.labels[0]
    index = c.args[1]
    if not isinstance(container, torch.Tensor):
        return lab[index] if isinstance(lab, (tuple, list, dict)) else None
    full = expand_full(lab, container.shape)
    varying = varying_dims(lab)
    items = index if isinstance(index, tuple) else (index,)
    if any(isinstance(i, (torch.Tensor, list)) for i in items):
        if varying:
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
        whole = isinstance(item, slice) and item == slice(None)
        if dim in varying and not whole:
            c.st.block(lab, f"is sliced by {c.where}")
        dim += 1
    return full[index]


def cat(c: Call, stack: bool = False) -> Label:
    """cat/stack: offsets along the joined dim; every other dim must keep the same channels."""
    tensors, labs = c.args[0], c.labels[0]
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
    name = c.node.target if isinstance(c.node.target, str) else c.node.target.__name__
    dim = norm_dim(c.arg(2, "dim", 0), value.dim())
    pieces = c.out
    full = expand_full(lab, value.shape)
    parts, offset = [], 0
    for piece in pieces:
        parts.append(full.narrow(dim, offset, piece.shape[dim]))
        offset += piece.shape[dim]
    if dim in varying_dims(lab):
        size_node = c.node_arg(1, "split_size_or_sections" if name == "split" else "chunks")
        equal = len({p.shape[dim] for p in pieces}) == 1
        computed = name == "chunk" or isinstance(size_node, fx.Node)
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
    m, name = c.module, c.node.target
    x, lab = c.args[0], c.labels[0]
    cdim = x.dim() - len(m.kernel_size) - 1
    st = c.st
    ids_in = st.channel_vector(lab, cdim, m.in_channels, f"{type(m).__name__} {name!r}")
    if m.groups == 1:
        ids_out = st.origin(name, m.out_channels)
        in_dim, out_dim = (0, 1) if m.transposed else (1, 0)
        st.record((name, "weight", in_dim), ids_in)
        st.record((name, "weight", out_dim), ids_out, output=True)
    else:
        ids_out = _grouped(st, ids_in, m.groups, m.out_channels, name)
        st.record((name, "weight", 0), ids_in if m.transposed else ids_out, output=True)
    if m.bias is not None:
        st.record((name, "bias", 0), ids_out)
    return along(ids_out, cdim, c.out.dim())


def _grouped(st: Coupling, ids_in: torch.Tensor, groups: int, out_channels: int, name: str) -> torch.Tensor:
    """Tie each conv group's input channels; its outputs share the group's id."""
    blocks = ids_in.reshape(groups, -1)  # (groups, in_per_group)
    st.unify(blocks, blocks[:, :1].expand_as(blocks), f"feeds grouped conv {name!r} beside fixed channels")
    return blocks[:, 0].repeat_interleave(out_channels // groups)  # (out_channels,)


def linear(c: Call) -> Label:
    m, name = c.module, c.node.target
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
    m, name = c.module, c.node.target
    ids_out = c.st.origin(name, m.embedding_dim)
    c.st.record((name, "weight", 1), ids_out, output=True)
    return along(ids_out, c.out.dim() - 1, c.out.dim())


def batchnorm(c: Call) -> Label:
    """BatchNorm/InstanceNorm: per-channel statistics, sliced with the channel."""
    m, name = c.module, c.node.target
    x, lab = c.args[0], c.labels[0]
    ids = c.st.channel_vector(lab, 1, x.shape[1], f"{type(m).__name__} {name!r}")
    for tensor in ("weight", "bias", "running_mean", "running_var"):
        if getattr(m, tensor, None) is not None:
            c.st.record((name, tensor, 0), ids)
    return lab


def prelu(c: Call) -> Label:
    m, name = c.module, c.node.target
    x, lab = c.args[0], c.labels[0]
    if m.num_parameters > 1:
        ids = c.st.channel_vector(lab, 1, x.shape[1], f"PReLU {name!r}")
        c.st.record((name, "weight", 0), ids)
    return lab


def norm_over_channels(c: Call) -> Label:
    """LayerNorm/GroupNorm/LocalResponseNorm compute statistics across channels."""
    x, lab = c.args[0], c.labels[0]
    m = c.module
    if isinstance(m, nn.LayerNorm):
        dims = set(range(x.dim() - len(m.normalized_shape), x.dim()))
    else:
        dims = set(range(1, x.dim()))
    if varying_dims(lab) & dims:
        c.st.block(lab, f"is normalised across channels by {c.where} (not supported yet)")
    return lab


# -- dispatch tables --------------------------------------------------------------------------------
_ACTIVATIONS = (
    nn.ReLU, nn.ReLU6, nn.SiLU, nn.GELU, nn.Hardswish, nn.Hardsigmoid, nn.Sigmoid, nn.Tanh,
    nn.LeakyReLU, nn.ELU, nn.SELU, nn.CELU, nn.Mish, nn.Hardtanh, nn.Softplus, nn.Softsign,
    nn.Tanhshrink, nn.Identity, nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Dropout3d,
    nn.AlphaDropout, nn.FeatureAlphaDropout,
)  # fmt: skip
_SPATIAL = (
    nn.MaxPool1d, nn.MaxPool2d, nn.MaxPool3d, nn.AvgPool1d, nn.AvgPool2d, nn.AvgPool3d,
    nn.AdaptiveAvgPool1d, nn.AdaptiveAvgPool2d, nn.AdaptiveAvgPool3d, nn.AdaptiveMaxPool1d,
    nn.AdaptiveMaxPool2d, nn.AdaptiveMaxPool3d, nn.Upsample, nn.UpsamplingNearest2d,
    nn.UpsamplingBilinear2d, nn.ZeroPad1d, nn.ZeroPad2d, nn.ZeroPad3d, nn.ConstantPad1d,
    nn.ConstantPad2d, nn.ConstantPad3d, nn.ReflectionPad1d, nn.ReflectionPad2d, nn.ReflectionPad3d,
    nn.ReplicationPad1d, nn.ReplicationPad2d, nn.ReplicationPad3d, nn.LPPool1d, nn.LPPool2d,
)  # fmt: skip

MODULE_RULES: list[tuple[type | tuple[type, ...], Rule]] = [
    (nn.modules.conv._ConvNd, conv),
    (nn.Linear, linear),
    (nn.Embedding, embedding),
    ((nn.modules.batchnorm._BatchNorm, nn.modules.instancenorm._InstanceNorm), batchnorm),
    (nn.PReLU, prelu),
    ((nn.LayerNorm, nn.GroupNorm, nn.LocalResponseNorm), norm_over_channels),
    (_ACTIVATIONS, elementwise),
    (_SPATIAL, channelwise),
    ((nn.Softmax, nn.LogSoftmax, nn.Softmin), softmax_like),
    (nn.Flatten, flatten),
    (nn.Unflatten, unflatten),
]


def module_rule(module: nn.Module) -> Rule:
    for types, rule in MODULE_RULES:
        if isinstance(module, types):
            return rule
    return unsupported


_ELEMENTWISE_FUNCTIONS = [
    operator.add, operator.sub, operator.mul, operator.truediv, operator.floordiv, operator.neg,
    operator.iadd, operator.isub, operator.imul, operator.itruediv, operator.pos, operator.pow,
    torch.add, torch.sub, torch.mul, torch.div, torch.neg, torch.pow, torch.where, torch.clamp,
    torch.relu, torch.sigmoid, torch.tanh, torch.exp, torch.abs, torch.sqrt, torch.rsqrt,
    torch.maximum, torch.minimum, torch.erf,
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
    F.adaptive_max_pool2d, F.adaptive_max_pool3d, F.interpolate, F.pad, torch.max_pool2d,
    torch.avg_pool1d, torch.adaptive_avg_pool1d,
]  # fmt: skip
_REDUCTIONS = ["mean", "sum", "amax", "amin", "max", "min", "std", "var", "logsumexp", "prod", "norm"]

FUNCTION_RULES: dict[Any, Rule] = {
    **{f: elementwise for f in _ELEMENTWISE_FUNCTIONS},
    **{f: channelwise for f in _SPATIAL_FUNCTIONS},
    **{getattr(torch, r): reduction for r in _REDUCTIONS},
    F.softmax: softmax_like, F.log_softmax: softmax_like, torch.softmax: softmax_like,
    torch.log_softmax: softmax_like,
    torch.flatten: flatten, torch.reshape: view, torch.unflatten: unflatten,
    torch.cat: cat, torch.concat: cat, torch.stack: lambda c: cat(c, stack=True),
    torch.chunk: chunk, torch.split: chunk, torch.unbind: unbind,
    torch.permute: apply_same, torch.transpose: apply_same, torch.unsqueeze: apply_same,
    torch.squeeze: squeeze, torch.flip: apply_same, torch.movedim: apply_same,
    operator.getitem: getitem,
}  # fmt: skip
METHOD_RULES: dict[str, Rule] = {
    **{m: elementwise for m in _ELEMENTWISE_METHODS},
    **{r: reduction for r in _REDUCTIONS},
    "softmax": softmax_like, "log_softmax": softmax_like,
    "view": view, "reshape": view, "flatten": flatten, "unflatten": unflatten,
    "chunk": chunk, "split": chunk, "unbind": unbind,
    "permute": apply_same, "transpose": apply_same, "unsqueeze": apply_same, "expand": apply_same,
    "repeat": apply_same, "flip": apply_same, "movedim": apply_same, "t": apply_same,
    "squeeze": squeeze, "expand_as": elementwise,
}  # fmt: skip


def _register_torchvision() -> None:
    """torchvision wraps a few functions as fx leaves; they pass channels through."""
    try:
        from torchvision.ops import stochastic_depth
    except ImportError:  # pragma: no cover - torchvision is a dependency
        return
    FUNCTION_RULES[stochastic_depth] = elementwise


_register_torchvision()


def container(c: Call) -> Label:
    """A namedtuple built from tensors (e.g. a model's several outputs): labels ride along."""
    return tuple(c.labels) + tuple(c.klabels.values())


def function_rule(node: fx.Node) -> Rule:
    if node.op == "call_method":
        return METHOD_RULES.get(node.target, unsupported)
    if isinstance(node.target, type) and issubclass(node.target, tuple):
        return container
    return FUNCTION_RULES.get(node.target, unsupported)


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

