"""prunecore: structured pruning for PyTorch, driven by sensitivity analysis.

    >>> import prunecore as pc
    >>> graph = pc.trace(model, example)                   # channel groups and their coupling
    >>> plan = pc.make_plan(model, graph, 0.5, criterion="l1", round_to=8)
    >>> smaller = pc.apply_plan(model, plan)               # a new, smaller, ordinary nn.Module
    >>> pc.count(smaller, example).flops                   # MACs per example
"""

from prunecore.cost import Cost, ModuleCost, count
from prunecore.evaluate import evaluate, list_metrics, recalibrate_bn_
from prunecore.graph import ChannelGraph, ChannelGroup, InputSpec, Member, TraceError, trace
from prunecore.importance import list_criteria, register_criterion, score
from prunecore.models import ModelSpecError, load_model
from prunecore.plan import SCHEMA, GroupPlan, Plan, PlanError, kept_units
from prunecore.prune import make_plan, prune
from prunecore.samples import Sample, SampleError, list_samples, load_sample
from prunecore.sensitivity import DENSE, sweep
from prunecore.store import RunStore, StoreError
from prunecore.surgery import apply_plan

__version__ = "0.1.0"

__all__ = [
    "DENSE",
    "SCHEMA",
    "ChannelGraph",
    "ChannelGroup",
    "Cost",
    "GroupPlan",
    "InputSpec",
    "Member",
    "ModelSpecError",
    "ModuleCost",
    "Plan",
    "PlanError",
    "RunStore",
    "Sample",
    "SampleError",
    "StoreError",
    "TraceError",
    "apply_plan",
    "count",
    "evaluate",
    "kept_units",
    "list_criteria",
    "list_metrics",
    "list_samples",
    "load_model",
    "load_sample",
    "make_plan",
    "prune",
    "recalibrate_bn_",
    "register_criterion",
    "score",
    "sweep",
    "trace",
]
