"""prunecore: structured pruning for PyTorch, driven by sensitivity analysis.

    >>> import prunecore as pc
    >>> graph = pc.trace(model, example)                   # channel groups and their coupling
    >>> plan = pc.make_plan(model, graph, 0.5, criterion="l1", round_to=8)
    >>> smaller = pc.apply_plan(model, plan)               # a new, smaller, ordinary nn.Module
    >>> pc.count(smaller, example).flops                   # MACs per example
"""

import importlib
import importlib.util
import sys
import types
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # what the lazy names below resolve to, for type checkers and IDEs
    from prunecore.allocate import (
        AllocationError,
        AllocationProblem,
        allocate,
        allocation_problem,
        list_methods,
        pareto,
        register_method,
        solve,
        with_latency,
        with_predictor,
        with_ties,
    )
    from prunecore.attention import PrunedMultiheadAttention
    from prunecore.cost import Cost, CostModel, FlopTerm, ModuleCost, cost_model, count, register_flops
    from prunecore.ops import Handler
    from prunecore.ops import register as register_handler
    from prunecore.deploy import DeployError, deploy_onnx, export_onnx, quantize_int8
    from prunecore.errors import ModelRunError, UserError
    from prunecore.evaluate import evaluate, evaluate_plan, list_metrics, recalibrate_bn_
    from prunecore.graph import ChannelGraph, ChannelGroup, InputSpec, Member, TraceError, trace
    from prunecore.hf import HFError, Statable, save_pretrained, statable
    from prunecore.importance import list_criteria, register_criterion, score
    from prunecore.latency import LatencyError, LatencyModel, latency_model, list_runtimes, measure_plans_ms
    from prunecore.models import (
        PRUNED_FORMAT, ModelSpec, ModelSpecError, canonical_spec, load_model, load_pruned, parse_spec, save_pruned,
    )
    from prunecore.measure import PlanMeasurement, measure_plan
    from prunecore.iterate import IterativeResult, prune_iteratively
    from prunecore.plan import (
        SCHEMA, Allocation, Budget, GroupPlan, MeasuredOn, Plan, PlanError, PredictedBy, Totals, compose, kept_units,
    )
    from prunecore.recover import FinetuneResult, distillation_loss, finetune
    from prunecore.predict import Predictor, calibrate
    from prunecore.prune import make_plan, prune
    from prunecore.refine import Refined, refine
    from prunecore.samples import Sample, SampleError, list_samples, load_sample
    from prunecore.sensitivity import DENSE, sweep
    from prunecore.store import RunStore, StoreError
    from prunecore.surgery import apply_plan

# Public name -> (module, attribute). Imported on first use (PEP 562), so `import prunecore` and the
# `prunecore` command's --help load neither torch nor the engine; `pc.trace` imports what it needs.
_LAZY: dict[str, tuple[str, str]] = {
    **{n: ("allocate", n) for n in ("AllocationError", "AllocationProblem", "allocate", "allocation_problem",
                                    "list_methods", "pareto", "register_method", "solve", "with_latency",
                                    "with_predictor", "with_ties")},
    "PrunedMultiheadAttention": ("attention", "PrunedMultiheadAttention"),
    **{n: ("cost", n) for n in ("Cost", "CostModel", "FlopTerm", "ModuleCost", "cost_model", "count",
                                "register_flops")},
    "Handler": ("ops", "Handler"),
    "register_handler": ("ops", "register"),
    **{n: ("deploy", n) for n in ("DeployError", "deploy_onnx", "export_onnx", "quantize_int8")},
    **{n: ("errors", n) for n in ("ModelRunError", "UserError")},
    **{n: ("evaluate", n) for n in ("evaluate", "evaluate_plan", "list_metrics", "recalibrate_bn_")},
    **{n: ("graph", n) for n in ("ChannelGraph", "ChannelGroup", "InputSpec", "Member", "TraceError", "trace")},
    **{n: ("hf", n) for n in ("HFError", "Statable", "save_pretrained", "statable")},
    **{n: ("importance", n) for n in ("list_criteria", "register_criterion", "score")},
    **{n: ("latency", n) for n in ("LatencyError", "LatencyModel", "latency_model", "list_runtimes",
                                   "measure_plans_ms")},
    **{n: ("models", n) for n in ("PRUNED_FORMAT", "ModelSpec", "ModelSpecError", "canonical_spec", "load_model",
                                  "load_pruned", "parse_spec", "save_pruned")},
    **{n: ("iterate", n) for n in ("IterativeResult", "prune_iteratively")},
    **{n: ("plan", n) for n in ("SCHEMA", "Allocation", "Budget", "GroupPlan", "MeasuredOn", "Plan", "PlanError",
                                "PredictedBy", "Totals", "compose", "kept_units")},
    **{n: ("recover", n) for n in ("FinetuneResult", "distillation_loss", "finetune")},
    **{n: ("measure", n) for n in ("PlanMeasurement", "measure_plan")},
    **{n: ("predict", n) for n in ("Predictor", "calibrate")},
    **{n: ("prune", n) for n in ("make_plan", "prune")},
    **{n: ("refine", n) for n in ("Refined", "refine")},
    **{n: ("samples", n) for n in ("Sample", "SampleError", "list_samples", "load_sample")},
    **{n: ("sensitivity", n) for n in ("DENSE", "sweep")},
    **{n: ("store", n) for n in ("RunStore", "StoreError")},
    "apply_plan": ("surgery", "apply_plan"),
}  # fmt: skip


def __getattr__(name: str) -> Any:
    """Import a public name (or a submodule, `pc.cost`) on first use and keep it in the package."""
    if name in _LAZY:
        module, attribute = _LAZY[name]
        value = getattr(importlib.import_module(f"prunecore.{module}"), attribute)
    elif not name.startswith("__") and importlib.util.find_spec(f"prunecore.{name}") is not None:
        value = importlib.import_module(f"prunecore.{name}")
    else:
        raise AttributeError(f"module 'prunecore' has no attribute {name!r}")
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))


class _Package(types.ModuleType):
    """The package module: importing a submodule named like a public function keeps the function.

    The import system sets `prunecore.prune` to the submodule once `prunecore.prune` is imported;
    the public `prune`, `evaluate` and `allocate` are the functions of those modules, as they were
    when this file imported everything eagerly.
    """

    def __setattr__(self, name: str, value: Any) -> None:
        if name in _LAZY and isinstance(value, types.ModuleType) and value.__name__ == f"prunecore.{name}":
            value = getattr(value, _LAZY[name][1])
        super().__setattr__(name, value)


sys.modules[__name__].__class__ = _Package


__version__ = "0.1.0"

__all__ = [
    "DENSE",
    "HFError",
    "SCHEMA",
    "Allocation",
    "AllocationError",
    "AllocationProblem",
    "Budget",
    "ChannelGraph",
    "ChannelGroup",
    "Cost",
    "CostModel",
    "DeployError",
    "FinetuneResult",
    "FlopTerm",
    "Handler",
    "GroupPlan",
    "InputSpec",
    "IterativeResult",
    "LatencyError",
    "LatencyModel",
    "MeasuredOn",
    "Member",
    "ModelRunError",
    "ModelSpec",
    "ModelSpecError",
    "PRUNED_FORMAT",
    "ModuleCost",
    "Plan",
    "PlanError",
    "PlanMeasurement",
    "PredictedBy",
    "Predictor",
    "PrunedMultiheadAttention",
    "Refined",
    "RunStore",
    "Sample",
    "SampleError",
    "Statable",
    "StoreError",
    "Totals",
    "TraceError",
    "UserError",
    "allocate",
    "allocation_problem",
    "apply_plan",
    "calibrate",
    "canonical_spec",
    "compose",
    "cost_model",
    "count",
    "deploy_onnx",
    "distillation_loss",
    "evaluate",
    "evaluate_plan",
    "export_onnx",
    "finetune",
    "kept_units",
    "latency_model",
    "list_criteria",
    "list_methods",
    "list_metrics",
    "list_runtimes",
    "list_samples",
    "load_model",
    "load_pruned",
    "load_sample",
    "make_plan",
    "measure_plan",
    "measure_plans_ms",
    "pareto",
    "parse_spec",
    "prune",
    "prune_iteratively",
    "quantize_int8",
    "recalibrate_bn_",
    "refine",
    "save_pretrained",
    "save_pruned",
    "register_criterion",
    "register_flops",
    "register_handler",
    "register_method",
    "score",
    "solve",
    "statable",
    "sweep",
    "trace",
    "with_latency",
    "with_predictor",
    "with_ties",
]
