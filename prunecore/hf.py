"""HuggingFace transformers models: `hf:` model specs, example inputs, and saving a pruned model.

`hf:PATH` names a local model folder (its `config.json`, and weights in `model.safetensors` if
present) or a config JSON file (random init). Nothing is downloaded (`local_files_only`), no
model code from the folder runs (`trust_remote_code=False`) and only safetensors weights are
read: a folder with pickled `pytorch_model.bin` weights only is refused. The class comes from
`task=` (`causal-lm`, `masked-lm`, `sequence-classification`, `image-classification`, `base`, or
a transformers class name such as `T5EncoderModel`), else from the config's `architectures`:

    >>> load_model("hf:models/tinyllama")                      # LlamaForCausalLM, its weights
    >>> load_model("hf:configs/bert.json(task='sequence-classification',num_labels=3)")

`tokenizer=` names the tokenizer for text data (a `tokenizer.json`, a folder holding one, or
`'byte'`; by default the folder's own); other spec arguments override config fields.

A pruned model saved with `save_pretrained` reloads
with plain `from_pretrained`: pruning writes the new sizes into its config (`prunecore.ops.transformers`),
and `save_pretrained` refuses a model whose config cannot state them, rather than write a folder
that transformers cannot load (save it with `save_pruned` instead). A config states one head count
and one MLP width for all layers, so a plan allocated freely seldom fits it; `statable` gives the
ties and kept groups under which every plan does:

    >>> s = statable(model, graph)
    >>> plan = allocate(curves, graph, Budget(flops=0.7), model=model, ties=s.ties, exclude=list(s.keep))
"""

from __future__ import annotations

import copy
import json
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

import torch
from torch import nn

from prunecore.allocate import AllocationProblem, with_ties
from prunecore.errors import UserError
from prunecore.graph import ChannelGraph
from prunecore.ops.transformers import ATTENTION, CONFIG, MLP, UNSTATED, qualname

__all__ = ["HFError", "Statable", "TASKS", "example_shape", "load_hf", "save_pretrained", "statable", "tokenizer_for"]

TASKS = {
    "base": "AutoModel",
    "causal-lm": "AutoModelForCausalLM",
    "masked-lm": "AutoModelForMaskedLM",
    "sequence-classification": "AutoModelForSequenceClassification",
    "image-classification": "AutoModelForImageClassification",
}
DEFAULT_TOKENS = 128  # example sequence length when the config does not cap it lower


class HFError(UserError, ValueError):
    """A HuggingFace model folder or config cannot be used, or a pruned model cannot be saved for it."""


def _transformers() -> Any:
    try:
        import transformers
    except ImportError:
        raise HFError("HuggingFace models need transformers: pip install 'prunecore[hf]'") from None
    return transformers


def _config(path: Path, overrides: dict[str, Any]) -> Any:
    """The config of a model folder or a config JSON file, with `overrides` applied."""
    tf = _transformers()
    file = path / "config.json" if path.is_dir() else path
    if not file.is_file():
        where = f"folder {str(path)!r} has no config.json" if path.is_dir() else f"{str(path)!r} does not exist"
        raise HFError(f"hf: model spec: {where}; give a local model folder or a config JSON file (nothing is "
                      "downloaded)")  # fmt: skip
    try:
        values = json.loads(file.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise HFError(f"hf: config {str(file)!r} is not readable JSON: {exc}") from None
    if not isinstance(values, dict) or not isinstance(values.get("model_type"), str):
        raise HFError(f"hf: config {str(file)!r} has no \"model_type\" (e.g. \"llama\", \"bert\"), so the "
                      "architecture is unknown")  # fmt: skip
    values = {k: v for k, v in values.items() if k != "auto_map"}  # remote code is never used
    kind = values.pop("model_type")
    try:
        config = tf.AutoConfig.for_model(kind, **values)
    except (ValueError, KeyError, TypeError) as exc:
        raise HFError(f"hf: config {str(file)!r}: transformers {tf.__version__} cannot read model_type {kind!r} "
                      f"({str(exc).splitlines()[0] if str(exc) else type(exc).__name__})") from None  # fmt: skip
    for key, value in overrides.items():
        setattr(config, key, value)
    return config


def _model_class(config: Any, task: str | None) -> Any:
    tf = _transformers()
    if task is None:
        named = [getattr(tf, a, None) for a in (getattr(config, "architectures", None) or [])]
        named = [c for c in named if isinstance(c, type) and issubclass(c, tf.PreTrainedModel)]
        if named:
            return named[0]
        task = "base"
    auto = TASKS.get(task)
    cls = getattr(tf, auto or task, None)
    if cls is None or not isinstance(cls, type) or (auto is None and not issubclass(cls, tf.PreTrainedModel)):
        raise HFError(f"hf: task={task!r} is not one of {', '.join(TASKS)} nor a transformers model class "
                      "(e.g. 'T5EncoderModel')")  # fmt: skip
    return cls


def load_hf(path: str, task: str | None = None, **overrides: Any) -> nn.Module:
    """The model of a local folder or config file (see the module doc); eval mode."""
    tf = _transformers()
    where = Path(os.path.expanduser(path))
    config = _config(where, overrides)
    cls = _model_class(config, task)
    weights = where / "model.safetensors" if where.is_dir() else None
    sharded = where / "model.safetensors.index.json" if where.is_dir() else None
    if where.is_dir() and not weights.is_file() and not sharded.is_file():
        pickled = sorted(p.name for p in where.glob("pytorch_model*.bin"))
        if pickled:
            raise HFError(f"hf: folder {path!r} holds weights only as {pickled[0]}, a pickle file prunecore "
                          "never loads; convert it to model.safetensors (save_pretrained writes that)")  # fmt: skip
    try:
        if where.is_dir() and (weights.is_file() or sharded.is_file()):
            model = cls.from_pretrained(where, config=config, local_files_only=True, trust_remote_code=False,
                                        use_safetensors=True)  # fmt: skip
        else:
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(0)  # the same spec builds the same random model
                model = cls._from_config(config) if hasattr(cls, "_from_config") else cls.from_config(config)
    except (OSError, ValueError, RuntimeError, TypeError, KeyError) as exc:
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise HFError(f"hf: cannot build {cls.__name__} from {path!r}: {first}") from None
    if not isinstance(model, tf.PreTrainedModel):
        raise HFError(f"hf: {cls.__name__} did not build a transformers model")
    return model.eval()


def tokenizer_for(model: str | None) -> tuple[str | None, int | None]:
    """(tokenizer, vocabulary size) for text fed to the model a spec names; the tokenizer as `load_tokenizer` takes it.

    An `hf:` folder's own `tokenizer.json` (a clear error later if it has none), the spec's
    `tokenizer=` if given, UTF-8 bytes for an `hf:` config file (random init) and for every other
    model (the `tinylm` sample was trained on bytes).
    """
    from prunecore.models import parse_spec
    from prunecore.text import BYTE

    if model is None:
        return BYTE, None
    spec = parse_spec(model)
    if spec.kind != "hf":
        return BYTE, None
    path = Path(os.path.expanduser(spec.name))
    vocab = getattr(_config(path, {}), "vocab_size", None)
    chosen = spec.kwargs.get("tokenizer")
    if chosen is not None:
        return str(chosen), vocab
    return (str(path), vocab) if path.is_dir() else (BYTE, vocab)


def example_shape(model_or_path: nn.Module | str) -> tuple[tuple[int, ...], str]:
    """(shape, dtype) of an example input: (1, 3, H, W) float32 images, or (1, T) int64 token ids."""
    config = model_or_path.config if isinstance(model_or_path, nn.Module) else _config(Path(model_or_path), {})
    vision = getattr(config, "vision_config", None) or config
    size = getattr(vision, "image_size", None)
    if size is not None and getattr(config, "vocab_size", None) is None:
        side = size if isinstance(size, int) else tuple(size)
        h, w = (side, side) if isinstance(side, int) else side[:2]
        return (1, int(getattr(vision, "num_channels", 3)), int(h), int(w)), "float32"
    cap = getattr(config, "max_position_embeddings", None) or getattr(config, "n_positions", None)
    return (1, min(DEFAULT_TOKENS, int(cap)) if cap else DEFAULT_TOKENS), "int64"


def save_pretrained(model: nn.Module, path: str | Path) -> Path:
    """`model.save_pretrained(path)` for a pruned transformers model, after checking that it reloads.

    The config must state every pruned size (`config.prunecore_unstated` says what it cannot), and
    a model built from the config on the meta device must have exactly the pruned model's tensor
    shapes (this catches architectures prunecore has no config knowledge of). The folder is written
    beside `path` and moved into place, so a failed save leaves an earlier one intact.
    """
    tf = _transformers()
    if not isinstance(model, tf.PreTrainedModel):
        raise HFError(f"save_pretrained needs a transformers model; got {type(model).__name__} (use save_pruned)")
    unstated = getattr(model.config, UNSTATED, None)
    if unstated:
        raise HFError(f"{type(model).__name__}'s config cannot state this pruned model, so transformers could not "
                      f"load it: {'; '.join(unstated)}. Save it with prunecore.save_pruned, or allocate what the "
                      "config can state: prunecore.statable(model, graph) (CLI: allocate --statable)")  # fmt: skip
    validate = getattr(model.config, "validate", None)  # transformers' own checks of a config (v5)
    if callable(validate):
        try:
            validate()
        except Exception as exc:  # a validation error of huggingface_hub, wrapping transformers' ValueError
            cause = exc.__cause__ or exc
            first = (str(cause).strip().splitlines() or [type(cause).__name__])[0].rstrip(".")
            raise HFError(f"transformers refuses the pruned config of {type(model).__name__}: {first}. Prune to sizes "
                          "it accepts (e.g. round_to= a multiple that keeps the width divisible), or save it with "
                          "prunecore.save_pruned") from None  # fmt: skip
    mismatched = _mismatched(model)
    if mismatched:
        shown = ", ".join(f"{k} {tuple(a)} (config builds {tuple(b)})" for k, a, b in mismatched[:3])
        raise HFError(f"{type(model).__name__}'s config does not describe the pruned sizes of {len(mismatched)} "
                      f"tensors: {shown}; prunecore does not know where {type(model.config).__name__} keeps them. "
                      "Save it with prunecore.save_pruned")  # fmt: skip
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
    try:
        model.save_pretrained(staging, safe_serialization=True)
        if target.exists():
            old = Path(tempfile.mkdtemp(prefix=f".{target.name}.old.", dir=target.parent))
            os.replace(target, old / target.name)
            os.replace(staging, target)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(staging, target)
    finally:
        if staging.exists():
            shutil.rmtree(staging, ignore_errors=True)
    return target


@dataclass(frozen=True)
class Statable:
    """How to allocate so that the model's config can state the plan: `ties` (sets of groups that keep
    one count, e.g. every layer's MLP) and `keep` (group -> why it stays dense)."""

    ties: tuple[tuple[str, ...], ...]
    keep: Mapping[str, str]

    def constrain(self, problem: AllocationProblem) -> tuple[AllocationProblem, list[str]]:
        """`problem` with the ties, and the groups to exclude: what `solve` needs for a plan the config states."""
        return with_ties(problem, self.ties), list(self.keep)


def statable(model: nn.Module, graph: ChannelGraph) -> Statable:
    """The ties and kept groups under which any allocation of `model` saves with `save_pretrained`.

    A config states one head count and one MLP width for every layer, so the heads (or KV groups)
    of all layers are one tie, and so are their MLP neurons. Where the config states the head size
    apart from the width (Llama, Mistral, Qwen2, Qwen3, Gemma, T5, ViT), the width stays:
    transformers wants it a multiple of the head count. Where it derives the head size as
    hidden_size / heads (BERT, RoBERTa, GPT-2, OPT), the width joins the heads' tie in proportion
    (head-size units of width per head, so the quotient stays the head size), and so does every
    other group of the width's size (hidden -> hidden layers such as BERT's pooler, which the
    config sizes by hidden_size too); where that width cannot be pruned (DistilBERT's and CLIP's
    outputs), the heads stay. Every other group stays, with its reason; so does every group of a
    config prunecore has no knowledge of (Swin, ConvNeXt).
    """
    config = getattr(model, "config", None)
    if config is None or not hasattr(config, "model_type"):
        raise HFError(f"statable allocation is for transformers models, whose config states their sizes; "
                      f"{type(model).__name__} has no config (save it with save_pruned)")  # fmt: skip
    keys = CONFIG.get(config.model_type)
    prunable = [g.name for g in graph.groups if g.prunable]
    owner = {(m.module, m.tensor, m.dim): g for g in prunable for m in graph[g].members}
    kind = type(config).__name__
    if keys is None or (keys.heads is None and keys.mlp is None):
        return Statable((), {g: f"{kind} states no pruned size prunecore knows of" for g in prunable})
    heads, widths, mlp, head_sizes = [], [], [], set()
    for path, m in model.named_modules():
        name = qualname(type(m))
        if name in ATTENTION:
            query = f"{path}.{ATTENTION[name].query}"
            heads += _groups_of(model, query, owner, output=True)
            widths += _groups_of(model, query, owner, output=False)
            head_sizes.add(ATTENTION[name].head_size(m))
        elif name in MLP:
            mlp += _groups_of(model, f"{path}.{MLP[name]}", owner, output=True)
    heads, widths, mlp = (list(dict.fromkeys(g)) for g in (heads, widths, mlp))  # T5's layers share one heads group
    keep: dict[str, str] = {}
    tied_heads, tied_mlp = (_one_count(graph, what, groups, key, kind, keep)
                            for what, groups, key in (("attention heads", heads, keys.heads),
                                                      ("MLP neurons", mlp, keys.mlp)))  # fmt: skip
    if keys.head_dim is None and tied_heads:  # the head size is hidden_size / heads: the width goes with them
        size = graph[heads[0]].size
        if len(widths) == 1 and len(head_sizes) == 1 and graph[widths[0]].size == size * next(iter(head_sizes)):
            width = graph[widths[0]].size  # hidden -> hidden layers (BERT's pooler) are hidden_size too
            taken = set(tied_heads) | set(tied_mlp) | set(keep)
            tied_heads += tuple(g for g in prunable if graph[g].size == width and g not in taken)
        else:
            keep.update({g: f"attention heads: {kind} derives the head size from hidden_size / {keys.heads}, and the "
                            "width cannot shrink with them (it is not one prunable group feeding every attention)"
                         for g in tied_heads})  # fmt: skip
            tied_heads = ()
    ties = tuple(t for t in (tied_heads, tied_mlp) if t)
    tied = {g for t in ties for g in t}
    for g in prunable:
        if g in tied or g in keep:
            continue
        if g in widths:
            keep[g] = f"the model width: {kind} wants it a multiple of the head count, which allocation cannot promise"
        else:
            keep[g] = f"{kind} states no size for this group alone"
    return Statable(ties, keep)


def _one_count(graph: ChannelGraph, what: str, groups: list[str], key: str | None, kind: str,
               keep: dict[str, str]) -> tuple[str, ...]:  # fmt: skip
    """`groups` as one tie when the config states their count (`key`); else () and each kept, with why."""
    if key is None:
        keep.update({g: f"{what}: {kind} states no such count" for g in groups})
    elif len({graph[g].size for g in groups}) > 1:
        keep.update({g: f"{what}: the layers already differ in size, which one {key} cannot state" for g in groups})
    else:
        return tuple(groups)
    return ()


def _groups_of(model: nn.Module, layer: str, owner: Mapping[tuple[str, str, int], str], output: bool) -> list[str]:
    """The group that cuts the outputs (or inputs) of projection `layer`, if any: a Linear, or GPT-2's
    Conv1D (weight stored (in, out))."""
    linear = isinstance(model.get_submodule(layer), nn.Linear)
    group = owner.get((layer, "weight", (0 if linear else 1) if output else (1 if linear else 0)))
    return [group] if group is not None else []


def _mismatched(model: nn.Module) -> list[tuple[str, torch.Size, torch.Size]]:
    """Tensors whose shape differs from what the model's own config builds (on the meta device)."""
    with torch.device("meta"):
        fresh = type(model)(copy.deepcopy(model.config))
    built = {k: v.shape for k, v in fresh.state_dict().items()}
    return [(k, v.shape, built[k]) for k, v in model.state_dict().items() if k in built and built[k] != v.shape]
