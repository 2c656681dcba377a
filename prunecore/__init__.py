"""prunecore: structured pruning for PyTorch, driven by sensitivity analysis.

    >>> import prunecore as pc
    >>> graph = pc.trace(model, example)                   # channel groups and their coupling
    >>> plan = pc.make_plan(model, graph, 0.5, criterion="l1", round_to=8)
    >>> smaller = pc.apply_plan(model, plan)               # a new, smaller, ordinary nn.Module
    >>> pc.count(smaller, example).flops                   # MACs per example
"""

from prunecore.allocate import (
    AllocationError,
    AllocationProblem,
    allocate,
    allocation_problem,
    list_methods,
    pareto,
    register_method,
    solve,
)
from prunecore.attention import PrunedMultiheadAttention
from prunecore.cost import Cost, CostModel, FlopTerm, ModuleCost, cost_model, count, register_flops
from prunecore.ops import Handler
from prunecore.ops import register as register_handler
from prunecore.errors import ModelRunError, UserError
from prunecore.evaluate import evaluate, evaluate_plan, list_metrics, recalibrate_bn_
from prunecore.graph import ChannelGraph, ChannelGroup, InputSpec, Member, TraceError, trace
from prunecore.importance import list_criteria, register_criterion, score
from prunecore.models import PRUNED_FORMAT, ModelSpecError, load_model, load_pruned, save_pruned
from prunecore.plan import SCHEMA, Allocation, Budget, GroupPlan, Plan, PlanError, Totals, kept_units
from prunecore.prune import make_plan, prune
from prunecore.samples import Sample, SampleError, list_samples, load_sample
from prunecore.sensitivity import DENSE, sweep
from prunecore.store import RunStore, StoreError
from prunecore.surgery import apply_plan

__version__ = "0.1.0"

__all__ = [
    "DENSE",
    "SCHEMA",
    "Allocation",
    "AllocationError",
    "AllocationProblem",
    "Budget",
    "ChannelGraph",
    "ChannelGroup",
    "Cost",
    "CostModel",
    "FlopTerm",
    "Handler",
    "GroupPlan",
    "InputSpec",
    "Member",
    "ModelRunError",
    "ModelSpecError",
    "PRUNED_FORMAT",
    "ModuleCost",
    "Plan",
    "PlanError",
    "PrunedMultiheadAttention",
    "RunStore",
    "Sample",
    "SampleError",
    "StoreError",
    "Totals",
    "TraceError",
    "UserError",
    "allocate",
    "allocation_problem",
    "apply_plan",
    "cost_model",
    "count",
    "evaluate",
    "evaluate_plan",
    "kept_units",
    "list_criteria",
    "list_methods",
    "list_metrics",
    "list_samples",
    "load_model",
    "load_pruned",
    "load_sample",
    "make_plan",
    "pareto",
    "prune",
    "recalibrate_bn_",
    "save_pruned",
    "register_criterion",
    "register_flops",
    "register_handler",
    "register_method",
    "score",
    "solve",
    "sweep",
    "trace",
]
