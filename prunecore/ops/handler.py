"""`Handler`: everything prunecore knows about one module type, in one record.

A record holds the rule that moves channel labels through the module when the tracer follows it
whole, the fix that re-derives its shape attributes after slicing, and its FLOP formula. Library
modules (`ops.core` for torch.nn, `ops.torchvision`, `ops.timm`) each declare a plain list of
records; `prunecore.ops` assembles the registry. Each aspect is looked up separately on the
module's MRO, nearest class first, so a record for a subclass may add a FLOP formula and inherit
the rest.

Example:
    >>> Handler((nn.Linear,), rule=_rules.linear, fix=fix_linear, flops=weight_flops)
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

from torch import nn

_Args = tuple[Any, ...]
_Kwargs = dict[str, Any]


@dataclass(frozen=True)
class FlopTerm:
    """MACs of one op: `rows` times the product of the sizes of some dims of one weight.

    Keying MACs by weight dims lets a plan rescale them from kept positions alone. A conv or
    Linear uses its whole weight at every output position; attention's Q K^T scales with the
    query width only, the first third of dim 0 of `in_proj_weight`:

        >>> FlopTerm("fc", "fc", "weight", (0, 1), rows=10)  # Linear(4, 8) on 10 tokens: 320 MACs
        >>> FlopTerm("attn", "attn", "in_proj_weight", (0,), rows=L * S, part=(0, 3))
    """

    owner: str  # module the MACs are reported under in `Cost.modules`
    module: str  # module owning `tensor`
    tensor: str  # its parameter name, e.g. "weight", "in_proj_weight"
    dims: tuple[int, ...]  # dims whose sizes multiply
    rows: int  # per example once recorded; over the whole call when a rule returns it
    part: tuple[int, int] = (0, 1)  # (i, n): only the i-th of n equal slices of dims[0] (q of q|k|v)

    def axes(self) -> list[tuple[int, tuple[int, int]]]:
        """(dim, part) of every dim: the part slices the first dim only."""
        return [(d, self.part if i == 0 else (0, 1)) for i, d in enumerate(self.dims)]


FlopRule = Callable[[nn.Module, _Args, _Kwargs, Any], list[FlopTerm]]
"""(module, args, kwargs, output) of one call -> its terms, names relative to the module ("" is
the module itself), rows over the whole batch."""

LayerBuilder = Callable[[nn.Module, tuple[int, ...], tuple[int, ...]], tuple[nn.Module, tuple[int, ...]]]
"""(module, the shape of one call's input, a kept weight shape) -> a fresh stand-alone layer of that
weight shape (random weights, the module's other settings) and the input shape it takes: what a
latency table times (`prunecore.latency`)."""


@dataclass(frozen=True)
class Handler:
    """What prunecore knows about one module type (and its subclasses).

    `rule` follows the module whole: the tracer does not look inside. It applies to the class whose
    forward it was written for and to subclasses that keep that forward, unless `whole` says that
    subclasses with their own forward are followed whole too (norms, whose masked twin stands in for
    any subclass). `constants`: the forward reads shape attributes (`num_heads`) that `fix`
    re-derives, so reshapes by them may follow pruned channels, and sweeps run the module's own
    forward rather than a graph in which tracing froze those ints. `layer` builds the module alone
    at a pruned width, for latency tables.
    """

    types: tuple[type[nn.Module], ...]
    rule: Callable[[Any], Any] | None = None  # (prunecore._rules.Call) -> label
    fix: Callable[[Any], None] | None = None  # (module) -> None, in place
    flops: FlopRule | None = None
    layer: LayerBuilder | None = None
    whole: bool = False
    constants: bool = False


def arg(args: _Args, kwargs: _Kwargs, index: int, name: str) -> Any:
    """A forward argument passed by position or by keyword."""
    return args[index] if len(args) > index else kwargs[name]
