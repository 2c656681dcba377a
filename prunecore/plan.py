"""`Plan`: which units of which groups a pruned model keeps, as a closed, versioned JSON format.

A plan is keyed by group names (stable strings from `trace`) and unit indices, never by module
objects, so it serialises, survives a reload and can be re-applied to a fresh copy of the model.

Example:
    >>> plan = make_plan(model, graph, 0.5)
    >>> text = plan.to_json()
    >>> Plan.from_json(text) == plan
    True
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from typing import Any, Mapping

from prunecore.graph import ChannelGraph, InputSpec

__all__ = ["SCHEMA", "GroupPlan", "Plan", "PlanError", "kept_units"]

SCHEMA = "prunecore.plan/1"


class PlanError(ValueError):
    """A plan that is malformed or does not fit the model; the message says which part."""


def kept_units(size: int, sparsity: float, round_to: int = 1) -> int:
    """How many of `size` units survive `sparsity`: the one rounding rule of prunecore.

    The kept count is rounded half-up to a multiple of `round_to`, never below one multiple (a
    group is never emptied) and never above `size`.

    >>> kept_units(64, 0.3), kept_units(64, 0.3, round_to=8), kept_units(10, 0.95)
    (45, 48, 1)
    """
    if not 0.0 <= sparsity < 1.0:
        raise ValueError(f"sparsity must be in [0, 1), got {sparsity}")
    if round_to < 1:
        raise ValueError(f"round_to must be a positive integer, got {round_to}")
    if sparsity == 0.0:
        return size
    exact = size * (1.0 - sparsity) / round_to
    kept = math.floor(exact + 0.5) * round_to
    return max(min(kept, size), min(round_to, size))


@dataclass(frozen=True)
class GroupPlan:
    """Kept unit indices (sorted) of one group of `size` units."""

    size: int
    keep: tuple[int, ...]

    @property
    def sparsity(self) -> float:
        return 1.0 - len(self.keep) / self.size

    @property
    def removed(self) -> tuple[int, ...]:
        kept = set(self.keep)
        return tuple(i for i in range(self.size) if i not in kept)


@dataclass(frozen=True)
class Plan:
    """Per-group kept units plus what is needed to re-trace the model they belong to."""

    groups: Mapping[str, GroupPlan]
    inputs: tuple[InputSpec, ...]
    model_type: str
    criterion: str = "l1"
    round_to: int = 1
    meta: Mapping[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {
            "schema": SCHEMA,
            "model_type": self.model_type,
            "inputs": [{"shape": list(s.shape), "dtype": s.dtype} for s in self.inputs],
            "criterion": self.criterion,
            "round_to": self.round_to,
            "groups": {
                name: {"size": g.size, "keep": list(g.keep), "sparsity": round(g.sparsity, 6)}
                for name, g in self.groups.items()
            },
            "meta": dict(self.meta),
        }

    def to_json(self, indent: int | None = 2) -> str:
        return json.dumps(self.to_dict(), indent=indent)

    @classmethod
    def from_json(cls, text: str) -> Plan:
        try:
            data = json.loads(text)
        except json.JSONDecodeError as exc:
            raise PlanError(f"plan is not valid JSON: {exc}") from None
        return cls.from_dict(data)

    @classmethod
    def from_dict(cls, data: Any) -> Plan:
        _expect(isinstance(data, dict), "plan must be a JSON object")
        _expect(data.get("schema") == SCHEMA, f"plan schema must be {SCHEMA!r}, got {data.get('schema')!r}")
        allowed = {"schema", "model_type", "inputs", "criterion", "round_to", "groups", "meta"}
        _no_unknown(data, allowed, "plan")
        for key in ("model_type", "inputs", "groups"):
            _expect(key in data, f"plan is missing {key!r}")
        _expect(isinstance(data["model_type"], str), "model_type must be a string")
        inputs = data["inputs"]
        _expect(isinstance(inputs, list) and inputs, "inputs must be a non-empty list")
        specs = []
        for i, spec in enumerate(inputs):
            _expect(isinstance(spec, dict), f"inputs[{i}] must be an object")
            _no_unknown(spec, {"shape", "dtype"}, f"inputs[{i}]")
            shape = spec.get("shape")
            _expect(
                isinstance(shape, list) and all(_is_int(s) and s > 0 for s in shape),
                f"inputs[{i}].shape must be a list of positive integers",
            )
            _expect(isinstance(spec.get("dtype", "float32"), str), f"inputs[{i}].dtype must be a string")
            specs.append(InputSpec(tuple(shape), spec.get("dtype", "float32")))
        round_to = data.get("round_to", 1)
        _expect(_is_int(round_to) and round_to >= 1, "round_to must be a positive integer")
        criterion = data.get("criterion", "l1")
        _expect(isinstance(criterion, str), "criterion must be a string")
        meta = data.get("meta", {})
        _expect(isinstance(meta, dict), "meta must be an object")
        raw = data["groups"]
        _expect(isinstance(raw, dict), "groups must be an object keyed by group name")
        groups = {name: _group_from_dict(name, g) for name, g in raw.items()}
        return cls(groups, tuple(specs), data["model_type"], criterion, round_to, meta)

    def check(self, graph: ChannelGraph) -> None:
        """Raise `PlanError` unless this plan fits the traced model."""
        if self.model_type != graph.model_type:
            raise PlanError(f"plan is for a {self.model_type}, the model is a {graph.model_type}")
        for name, g in self.groups.items():
            if name not in graph:
                raise PlanError(f"plan names group {name!r}, which the model does not have")
            group = graph[name]
            if g.size != group.size:
                raise PlanError(f"plan gives group {name!r} {g.size} units, the model has {group.size}")
            if len(g.keep) < g.size and not group.prunable:
                raise PlanError(f"plan prunes group {name!r}, which cannot be pruned: it {group.reason}")


def _group_from_dict(name: str, g: Any) -> GroupPlan:
    where = f"groups[{name!r}]"
    _expect(isinstance(g, dict), f"{where} must be an object")
    _no_unknown(g, {"size", "keep", "sparsity"}, where)
    size, keep = g.get("size"), g.get("keep")
    _expect(_is_int(size) and size >= 1, f"{where}.size must be a positive integer")
    _expect(isinstance(keep, list) and all(_is_int(i) for i in keep), f"{where}.keep must be a list of integers")
    _expect(len(keep) >= 1, f"{where}.keep must keep at least one unit")
    _expect(all(0 <= i < size for i in keep), f"{where}.keep has indices outside [0, {size})")
    _expect(len(set(keep)) == len(keep), f"{where}.keep has duplicate indices")
    if "sparsity" in g:
        s = g["sparsity"]
        _expect(isinstance(s, (int, float)) and 0 <= s < 1, f"{where}.sparsity must be in [0, 1)")
        _expect(abs(s - (1 - len(keep) / size)) < 1e-4, f"{where}.sparsity does not match its kept units")
    return GroupPlan(size, tuple(sorted(keep)))


def _is_int(x: Any) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def _expect(ok: bool, message: str) -> None:
    if not ok:
        raise PlanError(message)


def _no_unknown(obj: dict, allowed: set[str], where: str) -> None:
    unknown = sorted(set(obj) - allowed)
    if unknown:
        raise PlanError(f"{where} has unknown field(s): {', '.join(map(repr, unknown))}")
