"""prunecore.attention: on dense weights each module computes what the stock one computes; with
heads (or model-width channels) removed it computes what the stock module with those weights
zeroed computes; and apply_plan produces and re-traces it."""

from __future__ import annotations

import copy
import math

import pytest
import torch
from torch import nn
from torchvision.models import maxvit
from torchvision.models import swin_transformer as swin

from prunecore import apply_plan, make_plan, trace
from prunecore.attention import (
    PrunedMultiheadAttention,
    PrunedRelativePositionalMultiHeadAttention,
    PrunedShiftedWindowAttention,
    PrunedShiftedWindowAttentionV2,
    window_attention,
)

TOL = dict(rtol=1e-5, atol=1e-5)


@pytest.fixture(autouse=True)
def _seeded_single_thread():
    """Fixed inputs; one thread, since thread start-up dominates on tensors this small."""
    torch.manual_seed(0)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def as_class(module: nn.Module, cls: type) -> nn.Module:
    """A copy of `module` with its class swapped (what apply_plan does to resized attention)."""
    new = copy.deepcopy(module)
    new.__class__ = cls
    return new


# -- nn.MultiheadAttention, dense: same results as the stock module --------------------------------
E, H = 16, 4
# id -> (constructor kwargs, key width, value width, self-attention?)
MHA_KINDS = {
    "self": (dict(), E, E, True),
    "cross": (dict(), E, E, False),
    "kvdim": (dict(kdim=12, vdim=10), 12, 10, False),  # _qkv_same_embed_dim=False
    "no_bias": (dict(bias=False), E, E, True),
    "no_bias_kvdim": (dict(bias=False, kdim=12, vdim=10), 12, 10, False),
}


def make_mha(kind: str, batch_first: bool, **kwargs) -> nn.MultiheadAttention:
    mha = nn.MultiheadAttention(E, H, batch_first=batch_first, **MHA_KINDS[kind][0], **kwargs)
    if mha.in_proj_bias is not None:  # stock init zeroes the biases: make them count
        with torch.no_grad():
            mha.in_proj_bias.normal_()
            mha.out_proj.bias.normal_()
    return mha.eval()


def make_inputs(kind: str, batch: tuple[int, ...], batch_first: bool, L: int = 5, S: int = 7):
    """(query, key, value); key is value, and for self-attention all three are one tensor."""
    _, kdim, vdim, self_attention = MHA_KINDS[kind]

    def seq(n: int, width: int) -> torch.Tensor:
        shape = (n, width) if not batch else (*batch, n, width) if batch_first else (n, *batch, width)
        return torch.randn(shape)

    q = seq(L, E)
    if self_attention:
        return q, q, q
    k = seq(S, kdim)
    return q, k, k if kdim == vdim else seq(S, vdim)


def _blocked(*shape: int) -> torch.Tensor:
    """A random bool mask (True = do not attend) that leaves key 0 open, so no row is all masked."""
    m = torch.rand(shape) > 0.6
    m[..., 0] = False
    return m


def _causal(L: int, S: int) -> torch.Tensor:
    return torch.ones(L, S, dtype=torch.bool).triu(1)


# id -> f(batch, heads, L, S) -> forward kwargs; `batch` is () for unbatched input
MASKS = {
    "none": lambda b, h, L, S: {},
    "kpm_bool": lambda b, h, L, S: dict(key_padding_mask=_blocked(*b, S)),
    "kpm_float": lambda b, h, L, S: dict(key_padding_mask=torch.randn(*b, S)),
    "attn2d_bool": lambda b, h, L, S: dict(attn_mask=_blocked(L, S)),
    "attn2d_float": lambda b, h, L, S: dict(attn_mask=torch.randn(L, S)),
    "attn3d_bool": lambda b, h, L, S: dict(attn_mask=_blocked(math.prod(b) * h, L, S)),
    "attn3d_float": lambda b, h, L, S: dict(attn_mask=torch.randn(math.prod(b) * h, L, S)),
    "kpm_attn_bool": lambda b, h, L, S: dict(key_padding_mask=_blocked(*b, S), attn_mask=_blocked(L, S)),
    "kpm_attn3d_float": lambda b, h, L, S: dict(
        key_padding_mask=torch.randn(*b, S), attn_mask=torch.randn(math.prod(b) * h, L, S)
    ),
    "causal": lambda b, h, L, S: dict(attn_mask=_causal(L, S), is_causal=True),
    "causal_kpm": lambda b, h, L, S: dict(attn_mask=_causal(L, S), is_causal=True, key_padding_mask=_blocked(*b, S)),
}
WEIGHTS = {
    "avg_weights": dict(need_weights=True, average_attn_weights=True),
    "head_weights": dict(need_weights=True, average_attn_weights=False),
    "no_weights": dict(need_weights=False),
}


def assert_same_calls(stock: nn.Module, pruned: nn.Module, args: tuple, kwargs: dict) -> None:
    """Both modules give the same output and attention weights, in every `WEIGHTS` mode."""
    for mode, weight_kwargs in WEIGHTS.items():
        out, weights = stock(*args, **kwargs, **weight_kwargs)
        out_p, weights_p = pruned(*args, **kwargs, **weight_kwargs)
        torch.testing.assert_close(out_p, out, **TOL, msg=lambda m: f"{mode}: {m}")
        if weights is None:
            assert weights_p is None
        else:
            torch.testing.assert_close(weights_p, weights, **TOL, msg=lambda m: f"{mode} weights: {m}")


@pytest.mark.parametrize("mask", MASKS)
@pytest.mark.parametrize("batch_first", [True, False], ids=["batch_first", "seq_first"])
@pytest.mark.parametrize("kind", MHA_KINDS)
def test_dense_mha_matches_stock(kind, batch_first, mask):
    stock = make_mha(kind, batch_first)
    q, k, v = make_inputs(kind, (2,), batch_first)
    L, S = 5, 5 if MHA_KINDS[kind][3] else 7
    assert_same_calls(stock, as_class(stock, PrunedMultiheadAttention), (q, k, v), MASKS[mask]((2,), H, L, S))


@pytest.mark.parametrize("mask", ["none", "kpm_bool", "attn2d_float", "attn3d_bool", "causal_kpm"])
@pytest.mark.parametrize("kind", ["self", "kvdim"])
def test_dense_mha_matches_stock_unbatched(kind, mask):
    stock = make_mha(kind, batch_first=True)
    q, k, v = make_inputs(kind, (), batch_first=True)
    L, S = q.shape[0], k.shape[0]
    assert_same_calls(stock, as_class(stock, PrunedMultiheadAttention), (q, k, v), MASKS[mask]((), H, L, S))


@pytest.mark.parametrize("mode", ["train_dropout0", "eval_no_grad"])
@pytest.mark.parametrize("batch_first", [True, False], ids=["batch_first", "seq_first"])
@pytest.mark.parametrize("kind", ["self", "kvdim"])
def test_dense_mha_matches_stock_in_train_and_inference_modes(kind, batch_first, mode):
    """Train mode with dropout 0, and eval under no_grad (where the stock module may take its fast path)."""
    stock = make_mha(kind, batch_first, dropout=0.0).train(mode == "train_dropout0")
    pruned = as_class(stock, PrunedMultiheadAttention)
    args = make_inputs(kind, (2,), batch_first)
    S = args[1].shape[1 if batch_first else 0]
    with torch.set_grad_enabled(mode == "train_dropout0"):
        assert_same_calls(stock, pruned, args, dict(key_padding_mask=_blocked(2, S)))


@pytest.mark.parametrize("kind", ["self", "kvdim", "no_bias"])
def test_dense_mha_gradients_match_stock(kind):
    stock = make_mha(kind, batch_first=True).train()
    pruned = as_class(stock, PrunedMultiheadAttention)
    args = make_inputs(kind, (2,), batch_first=True)
    attn_mask = torch.randn(5, args[1].shape[1])
    for module in (stock, pruned):
        module(*args, attn_mask=attn_mask)[0].square().sum().backward()
    for (name, p), p_pruned in zip(stock.named_parameters(), pruned.parameters()):
        torch.testing.assert_close(p_pruned.grad, p.grad, **TOL, msg=name)


@pytest.mark.parametrize("kpm", [False, True], ids=["no_kpm", "kpm"])
@pytest.mark.parametrize("kind", ["self", "cross"])
def test_is_causal_without_mask_applies_the_causal_mask(kind, kpm):
    """The stock module needs the causal attn_mask next to is_causal; the pruned one builds it."""
    stock = make_mha(kind, batch_first=True)
    q, k, v = make_inputs(kind, (2,), batch_first=True)
    L, S = q.shape[1], k.shape[1]
    extra = dict(key_padding_mask=_blocked(2, S)) if kpm else {}
    pruned = as_class(stock, PrunedMultiheadAttention)
    for mode, weight_kwargs in WEIGHTS.items():
        out, w = stock(q, k, v, attn_mask=_causal(L, S), is_causal=True, **extra, **weight_kwargs)
        out_p, w_p = pruned(q, k, v, is_causal=True, **extra, **weight_kwargs)
        torch.testing.assert_close(out_p, out, **TOL, msg=lambda m: f"{mode}: {m}")
        if w is not None:
            torch.testing.assert_close(w_p, w, **TOL, msg=lambda m: f"{mode} weights: {m}")


# -- nn.MultiheadAttention with heads / model-width channels removed by hand ------------------------
def _head_rows(heads: list[int], head_dim: int) -> torch.Tensor:
    return torch.cat([torch.arange(h * head_dim, (h + 1) * head_dim) for h in heads])


def _qkv_names(mha: nn.MultiheadAttention) -> list[str]:
    return ["in_proj_weight"] if mha._qkv_same_embed_dim else ["q_proj_weight", "k_proj_weight", "v_proj_weight"]


def pruned_by_hand(mha: nn.MultiheadAttention, heads: list[int], channels: torch.Tensor) -> nn.Module:
    """Keep `heads` and the query/output channels `channels`, slicing tensors like apply_plan does."""
    rows = _head_rows(heads, mha.head_dim)
    inner = mha.num_heads * mha.head_dim
    rows3 = torch.cat([rows, rows + inner, rows + 2 * inner])
    new = copy.deepcopy(mha)
    with torch.no_grad():
        for name in _qkv_names(mha):
            w = getattr(mha, name)
            w = w[rows3] if name == "in_proj_weight" else w[rows]
            if name in ("in_proj_weight", "q_proj_weight"):  # the query (model) width
                w = w[:, channels]
            setattr(new, name, nn.Parameter(w.clone()))
        if mha.in_proj_bias is not None:
            new.in_proj_bias = nn.Parameter(mha.in_proj_bias[rows3].clone())
            new.out_proj.bias = nn.Parameter(mha.out_proj.bias[channels].clone())
        new.out_proj.weight = nn.Parameter(mha.out_proj.weight[channels][:, rows].clone())
    new.num_heads, new.embed_dim = len(heads), len(channels)
    if mha._qkv_same_embed_dim:
        new.kdim = new.vdim = len(channels)
    new.__class__ = PrunedMultiheadAttention
    return new


def masked_by_hand(mha: nn.MultiheadAttention, heads: list[int]) -> nn.Module:
    """The stock module with the q/k/v rows, biases and out_proj columns of other heads zeroed."""
    gone = _head_rows([h for h in range(mha.num_heads) if h not in heads], mha.head_dim)
    inner = mha.num_heads * mha.head_dim
    new = copy.deepcopy(mha)
    with torch.no_grad():
        for name in _qkv_names(mha):
            w = getattr(new, name)
            for i in range(w.shape[0] // inner):
                w[gone + i * inner] = 0.0
        if mha.in_proj_bias is not None:
            for i in range(3):
                new.in_proj_bias[gone + i * inner] = 0.0
        new.out_proj.weight[:, gone] = 0.0
    return new


@pytest.mark.parametrize("mask", ["none", "kpm_bool", "attn2d_float", "attn3d_float", "causal"])
@pytest.mark.parametrize("drop_channels", [False, True], ids=["all_channels", "fewer_channels"])
@pytest.mark.parametrize(
    "kind, batch_first",
    [("self", True), ("kvdim", False), ("no_bias", True)],
    ids=["self", "kvdim-seq_first", "no_bias"],
)
def test_removed_heads_equal_zeroed_heads(kind, batch_first, drop_channels, mask):
    stock = make_mha(kind, batch_first)
    heads = [0, 2, 3]
    channels = torch.tensor([0, 1, 3, 4, 6, 8, 9, 10, 12, 15]) if drop_channels else torch.arange(E)
    pruned, masked = pruned_by_hand(stock, heads, channels), masked_by_hand(stock, heads)
    q, k, v = make_inputs(kind, (2,), batch_first)
    L, S = q.shape[-2 if batch_first else 0], k.shape[-2 if batch_first else 0]
    kwargs = MASKS[mask]((2,), H, L, S)
    kwargs_pruned = dict(kwargs)
    if kwargs.get("attn_mask") is not None and kwargs["attn_mask"].dim() == 3:  # (N*H, L, S): keep its heads
        kwargs_pruned["attn_mask"] = kwargs["attn_mask"].reshape(2, H, L, S)[:, heads].flatten(0, 1)
    q_zeroed = torch.zeros_like(q)
    q_zeroed[..., channels] = q[..., channels]  # the masked model sees removed channels as zeros
    self_attention = MHA_KINDS[kind][3]
    k_m, v_m = (q_zeroed, q_zeroed) if self_attention else (k, v)
    k_p, v_p = (q[..., channels],) * 2 if self_attention else (k, v)
    out, w = masked(q_zeroed, k_m, v_m, average_attn_weights=False, **kwargs)
    out_p, w_p = pruned(q[..., channels], k_p, v_p, average_attn_weights=False, **kwargs_pruned)
    assert isinstance(pruned, PrunedMultiheadAttention) and pruned.head_dim == stock.head_dim
    assert out_p.shape[-1] == len(channels)
    torch.testing.assert_close(out_p, out[..., channels], **TOL)
    torch.testing.assert_close(w_p, w[:, heads], **TOL)  # (N, heads, L, S): the kept heads' weights


# -- window attention (Swin): the function, dense --------------------------------------------------
def make_swin(v2: bool, window: tuple[int, int] = (7, 7), shift: tuple[int, int] = (3, 3)) -> nn.Module:
    """Swin (V2) window attention, width 32, 4 heads of 8, with non-trivial biases and scales."""
    cls = swin.ShiftedWindowAttentionV2 if v2 else swin.ShiftedWindowAttention
    m = cls(32, window_size=list(window), shift_size=list(shift), num_heads=4)
    with torch.no_grad():
        m.qkv.bias.normal_()  # V2's key bias must be ignored: make it non-zero
        m.proj.bias.normal_()
        if v2:
            m.logit_scale.add_(torch.randn_like(m.logit_scale))
        else:
            m.relative_position_bias_table.normal_()
    return m.eval()


def swin_args(m: swin.ShiftedWindowAttention) -> dict:
    v2 = isinstance(m, swin.ShiftedWindowAttentionV2)
    return dict(
        qkv_weight=m.qkv.weight, proj_weight=m.proj.weight, relative_position_bias=m.get_relative_position_bias(),
        window_size=m.window_size, num_heads=m.num_heads, shift_size=m.shift_size, qkv_bias=m.qkv.bias,
        proj_bias=m.proj.bias, logit_scale=m.logit_scale if v2 else None, training=False,
    )  # fmt: skip


SIZES = {"multiple": (14, 21), "padded": (10, 17), "smaller_than_window": (5, 6), "short": (5, 17)}
WINDOWS = {"7x7_shift3": ((7, 7), (3, 3)), "7x7_shift0": ((7, 7), (0, 0)), "4x6_shift2x3": ((4, 6), (2, 3))}


@pytest.mark.parametrize("v2", [False, True], ids=["v1", "v2"])
@pytest.mark.parametrize("window", WINDOWS)
@pytest.mark.parametrize("size", SIZES)
def test_window_attention_matches_torchvision(size, window, v2):
    m = make_swin(v2, window=WINDOWS[window][0], shift=WINDOWS[window][1])
    x = torch.randn(2, *SIZES[size], 32)  # (B, H, W, C)
    args = swin_args(m)
    with torch.no_grad():
        torch.testing.assert_close(window_attention(x, **args), swin.shifted_window_attention(x, **args), **TOL)


@pytest.mark.parametrize("v2", [False, True], ids=["v1", "v2"])
@pytest.mark.parametrize("size", ["padded", "short"])
def test_window_attention_with_removed_heads_and_channels_equals_zeroed(size, v2):
    m = make_swin(v2)
    args = swin_args(m)
    heads, channels = [1, 3], torch.tensor([0, 2, 3, 5, 7, 11, 13, 17, 19, 23, 29, 31])
    rows = _head_rows(heads, 8)
    gone = _head_rows([0, 2], 8)
    rows3, gone3 = (torch.cat([r, r + 32, r + 64]) for r in (rows, gone))
    with torch.no_grad():
        masked = {**args, **{n: args[n].clone() for n in ("qkv_weight", "qkv_bias", "proj_weight")}}
        masked["qkv_weight"][gone3] = 0.0
        masked["qkv_bias"][gone3] = 0.0
        masked["proj_weight"][:, gone] = 0.0
    pruned = dict(
        args, qkv_weight=args["qkv_weight"][rows3][:, channels], qkv_bias=args["qkv_bias"][rows3],
        proj_weight=args["proj_weight"][channels][:, rows], proj_bias=args["proj_bias"][channels],
        relative_position_bias=args["relative_position_bias"][:, heads], num_heads=len(heads),
        logit_scale=None if not v2 else args["logit_scale"][heads],
    )  # fmt: skip
    x = torch.randn(2, *SIZES[size], 32)
    x_zeroed = torch.zeros_like(x)
    x_zeroed[..., channels] = x[..., channels]
    with torch.no_grad():
        out = swin.shifted_window_attention(x_zeroed, **masked)
        out_p = window_attention(x[..., channels], **pruned)
    torch.testing.assert_close(out_p, out[..., channels], **TOL)


# -- the module subclasses, dense ------------------------------------------------------------------
@pytest.mark.parametrize("v2", [False, True], ids=["v1", "v2"])
@pytest.mark.parametrize("size", ["multiple", "padded", "smaller_than_window"])
def test_pruned_swin_modules_match_stock(size, v2):
    stock = make_swin(v2)
    pruned = as_class(stock, PrunedShiftedWindowAttentionV2 if v2 else PrunedShiftedWindowAttention)
    x = torch.randn(2, *SIZES[size], 32)
    with torch.no_grad():
        torch.testing.assert_close(pruned(x), stock(x), **TOL)


def test_pruned_maxvit_attention_matches_stock():
    stock = maxvit.RelativePositionalMultiHeadAttention(feat_dim=32, head_dim=8, max_seq_len=16).eval()
    with torch.no_grad():
        stock.relative_position_bias_table.normal_()
    pruned = as_class(stock, PrunedRelativePositionalMultiHeadAttention)
    x = torch.randn(2, 3, 16, 32)  # (B, G, P, D)
    with torch.no_grad():
        torch.testing.assert_close(pruned(x), stock(x), **TOL)


# -- end to end: trace, plan and apply on a model with nn.MultiheadAttention ------------------------
class AttentionBlock(nn.Module):
    """Self-attention with a residual and a LayerNorm (the model width is shared with the residual)."""

    def __init__(self, width: int = 16, heads: int = 4):
        super().__init__()
        self.attn = nn.MultiheadAttention(width, heads, batch_first=True)
        self.norm = nn.LayerNorm(width)
        with torch.no_grad():
            self.attn.in_proj_bias.normal_()
            self.attn.out_proj.bias.normal_()

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (N, L, E)
        return self.norm(x + self.attn(x, x, x, need_weights=False)[0])


def _block_and_plan(sparsity: float = 0.5):
    model = AttentionBlock().eval()
    x = torch.randn(2, 5, 16)
    graph = trace(model, x)
    return model, x, graph, make_plan(model, graph, {"attn": sparsity})


def test_apply_plan_removes_heads():
    model, x, graph, plan = _block_and_plan()
    assert graph["attn"].size == 4
    pruned = apply_plan(model, plan, graph=graph)
    masked = apply_plan(model, plan, mode="mask", graph=graph)
    attn = pruned.attn
    assert type(attn) is PrunedMultiheadAttention
    assert (attn.num_heads, attn.head_dim, attn.embed_dim) == (2, 4, 16)
    assert attn.in_proj_weight.shape == (3 * attn.num_heads * attn.head_dim, 16)
    assert attn.out_proj.weight.shape == (16, attn.num_heads * attn.head_dim)
    with torch.no_grad():
        torch.testing.assert_close(pruned(x), masked(x), **TOL)
    assert type(model.attn) is nn.MultiheadAttention  # the input model is untouched


def test_pruned_state_dict_loads_into_another_apply_plan_result():
    model, x, graph, plan = _block_and_plan()
    pruned = apply_plan(model, plan, graph=graph)
    other = apply_plan(AttentionBlock().eval(), plan)  # other weights, same structure
    other.load_state_dict(pruned.state_dict())
    with torch.no_grad():
        torch.testing.assert_close(other(x), pruned(x), **TOL)


def test_pruned_model_retraces_and_prunes_again():
    model, x, graph, plan = _block_and_plan()
    pruned = apply_plan(model, plan, graph=graph)
    graph2 = trace(pruned, x)
    assert graph2["attn"].size == 2 and graph2["attn"].prunable
    plan2 = make_plan(pruned, graph2, {"attn": 0.5})
    twice = apply_plan(pruned, plan2, graph=graph2)
    assert type(twice.attn) is PrunedMultiheadAttention and twice.attn.num_heads == 1
    with torch.no_grad():
        torch.testing.assert_close(twice(x), apply_plan(pruned, plan2, mode="mask", graph=graph2)(x), **TOL)


def test_plan_without_removals_keeps_stock_class():
    model, x, graph, plan = _block_and_plan(sparsity=0.0)
    assert len(plan.groups["attn"].keep) == 4
    kept = apply_plan(model, plan, graph=graph)
    assert type(kept.attn) is nn.MultiheadAttention
    with torch.no_grad():
        torch.testing.assert_close(kept(x), model(x))


class ProjectedAttention(nn.Module):
    """Attention between Linear projections, so the model width (and the key width) can be pruned too.

    `kdim=None`: self-attention (packed in_proj_weight); otherwise cross-attention to a second input.
    """

    def __init__(self, kdim: int | None = None):
        super().__init__()
        self.embed = nn.Linear(8, 16)
        self.kv = nn.Linear(6, kdim) if kdim else None
        self.attn = nn.MultiheadAttention(16, 4, batch_first=True, kdim=kdim, vdim=kdim)
        self.norm = nn.LayerNorm(16)
        self.head = nn.Linear(16, 3)
        with torch.no_grad():
            self.attn.in_proj_bias.normal_()
            self.attn.out_proj.bias.normal_()

    def forward(self, x: torch.Tensor, y: torch.Tensor | None = None) -> torch.Tensor:  # (N, L, 8), (N, S, 6)
        h = self.embed(x)  # (N, L, 16)
        kv = h if self.kv is None else self.kv(y)
        return self.head(self.norm(h + self.attn(h, kv, kv, need_weights=False)[0]))


# plan -> (embed_dim, num_heads, class) after apply_plan; removing both halves makes the shapes stock again
WIDTH_PLANS = {
    "heads": ({"attn": 0.5}, (16, 2, PrunedMultiheadAttention)),
    "width": ({"embed": 0.5}, (8, 4, PrunedMultiheadAttention)),
    "heads_and_width": ({"embed": 0.5, "attn": 0.5}, (8, 2, nn.MultiheadAttention)),
}


@pytest.mark.parametrize("plan_id", WIDTH_PLANS)
@pytest.mark.parametrize("kdim", [None, 12], ids=["self", "cross_kdim"])
def test_apply_plan_removes_heads_and_model_width(kdim, plan_id):
    model = ProjectedAttention(kdim).eval()
    x = (torch.randn(2, 5, 8),) if kdim is None else (torch.randn(2, 5, 8), torch.randn(2, 7, 6))
    graph = trace(model, x)
    sparsity, (embed_dim, num_heads, cls) = WIDTH_PLANS[plan_id]
    plan = make_plan(model, graph, sparsity)
    pruned = apply_plan(model, plan, graph=graph)
    attn = pruned.attn
    assert type(attn) is cls
    assert (attn.embed_dim, attn.num_heads, attn.head_dim) == (embed_dim, num_heads, 4)
    assert attn.out_proj.weight.shape == (embed_dim, num_heads * 4)
    if kdim is not None:
        assert attn.kdim == attn.vdim == attn.k_proj_weight.shape[1] == 12
    with torch.no_grad():
        torch.testing.assert_close(pruned(*x), apply_plan(model, plan, mode="mask", graph=graph)(*x), **TOL)
    assert {g.name: g.size for g in trace(pruned, x).groups}["attn"] == num_heads


def test_apply_plan_removes_key_and_value_width():
    model = ProjectedAttention(kdim=12).eval()
    x = (torch.randn(2, 5, 8), torch.randn(2, 7, 6))
    graph = trace(model, x)
    plan = make_plan(model, graph, {"kv": 0.5, "attn": 0.5})
    pruned = apply_plan(model, plan, graph=graph)
    attn = pruned.attn
    assert type(attn) is PrunedMultiheadAttention
    assert (attn.embed_dim, attn.kdim, attn.vdim, attn.num_heads) == (16, 6, 6, 2)
    assert attn.k_proj_weight.shape == attn.v_proj_weight.shape == (8, 6)
    with torch.no_grad():
        torch.testing.assert_close(pruned(*x), apply_plan(model, plan, mode="mask", graph=graph)(*x), **TOL)


@pytest.mark.parametrize("weights", WEIGHTS)
def test_dropout_matches_stock_under_the_same_seed(weights):
    """In training with dropout > 0, the same random mask drops the same weights as in the stock module."""
    stock = make_mha("self", batch_first=True, dropout=0.5).train()
    pruned = as_class(stock, PrunedMultiheadAttention)
    x = torch.randn(2, 5, E)
    torch.manual_seed(1)
    out, w = stock(x, x, x, **WEIGHTS[weights])
    torch.manual_seed(1)
    out_p, w_p = pruned(x, x, x, **WEIGHTS[weights])
    torch.testing.assert_close(out_p, out, **TOL)
    if w is not None:  # the stock module returns the weights after dropout
        torch.testing.assert_close(w_p, w, **TOL)
