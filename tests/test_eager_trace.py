"""The eager tracer: what torch.fx could not follow, and sizes that remember their channels."""

import pytest
import torch

import toy_models as toys
from prunecore.graph import trace
from prunecore.prune import make_plan
from prunecore.surgery import apply_plan


def pruned_and_masked(model, x, sparsity=0.5):
    graph = trace(model, x)
    plan = make_plan(model, graph, sparsity)
    pruned, masked = apply_plan(model, plan, graph=graph), apply_plan(model, plan, mode="mask", graph=graph)
    with torch.no_grad():
        return graph, pruned, pruned(x), masked(x)


def test_control_flow_on_shapes_traces_and_prunes():
    model = toys.randomize_norms_(toys.ShapeBranch()).eval()
    graph, pruned, out, ref = pruned_and_masked(model, model.example())
    assert {g.name for g in graph.prunable} == {"a.0", "b.0"}
    torch.testing.assert_close(out, ref)
    assert pruned.b[0].in_channels == 4


def test_norm_subclass_calling_functionals_is_followed_by_its_parameters():
    model = toys.randomize_norms_(toys.FunctionalNorm()).eval()
    graph, pruned, out, ref = pruned_and_masked(model, model.example())
    paths = {m.path for m in graph["conv"].members}
    assert {"bn.weight", "bn.bias", "bn.running_mean", "bn.running_var", "conv2.weight"} <= paths
    torch.testing.assert_close(out, ref)
    assert pruned.bn.num_features == 4 and pruned.bn.running_var.shape == (4,)


def test_reshape_to_another_tensors_size_keeps_both_channel_sets():
    model = toys.ForeignSize().eval()
    graph = trace(model, model.example())
    for name in ("width", "inner"):
        assert not graph[name].prunable
        assert graph[name].reason.startswith("is reshaped by reshape in ForeignSize (toy_models.py:")
        assert graph[name].reason.endswith(") to a size read from other channels")
    assert graph["mlp.0"].prunable  # the MLP inside is unaffected
    graph, pruned, out, ref = pruned_and_masked(model, model.example())
    torch.testing.assert_close(out, ref)


def test_a_size_read_from_the_reshaped_tensor_follows_its_channels():
    """`x.view(b, c, -1)` with `c = x.shape[1]`: the channels stay prunable."""
    model = toys.randomize_norms_(toys.TwoResiduals()).eval()

    class Flat(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.body, self.head = model, torch.nn.Linear(8, 4)

        def forward(self, x):
            x = self.body.stem(x)
            b, c, h, w = x.shape
            return self.head(x.view(b, c, h * w).mean(-1))

    flat = Flat().eval()
    x = toys.TwoResiduals().example()
    graph, pruned, out, ref = pruned_and_masked(flat, x)
    assert graph["body.stem.0"].prunable
    torch.testing.assert_close(out, ref)


def test_trace_leaves_no_hooks_and_no_mode_behind():
    model = toys.FunctionalNorm().eval()
    trace(model, model.example())
    assert all(not m._forward_hooks and not m._forward_pre_hooks for m in model.modules())
    assert not torch.overrides._get_current_function_mode_stack()


def test_trace_error_names_the_module_that_failed():
    model = toys.Concat().eval()
    with pytest.raises(Exception, match=r"failed at Conv2d module 'a.0'"):
        trace(model, torch.randn(2, 5, 8, 8))
    assert all(not m._forward_hooks for m in model.modules())


def test_a_registered_handler_is_used_by_trace_surgery_and_count(monkeypatch):
    """One record gives a custom layer its label rule, its shape fix and its FLOP formula."""
    from prunecore import ops
    from prunecore.cost import count

    monkeypatch.setattr(ops, "_REGISTERED", [])

    class Gate(torch.nn.Module):  # per-channel scale written with a loop the generic rules cannot follow
        def __init__(self, n):
            super().__init__()
            self.scale = torch.nn.Parameter(torch.randn(n))
            self.n = n

        def forward(self, x):
            return torch.stack([x[:, i] * self.scale[i] for i in range(self.n)], 1)

    def gate_rule(c):
        ids = c.st.channel_vector(c.labels[0], 1, c.args[0].shape[1], c.where)
        c.st.record((c.name, "scale", 0), ids)
        return c.labels[0]

    def fix_gate(m):
        m.n = m.scale.shape[0]

    def gate_flops(module, args, kwargs, out):
        return [ops.FlopTerm("", "", "scale", (0,), out.numel() // out.shape[1])]

    model = torch.nn.Sequential(torch.nn.Conv2d(3, 6, 3), Gate(6), torch.nn.Conv2d(6, 4, 3)).eval()
    x = torch.randn(2, 3, 8, 8)
    assert not trace(model, x)["0"].prunable  # x[:, i] slices the channels
    ops.register(ops.Handler((Gate,), rule=gate_rule, fix=fix_gate, flops=gate_flops))
    graph, pruned, out, ref = pruned_and_masked(model, x)
    assert graph["0"].prunable and ("1", "scale", 0) in {(m.module, m.tensor, m.dim) for m in graph["0"].members}
    torch.testing.assert_close(out, ref)
    assert pruned[1].n == 3
    assert count(pruned, x).modules["1"].flops == 3 * 6 * 6


def test_fused_transformer_layers_keep_their_channels():
    """The eval-mode fast path of nn.TransformerEncoderLayer would crash on pruned attention."""
    layer = torch.nn.TransformerEncoderLayer(16, 4, 32, batch_first=True)
    model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.TransformerEncoder(layer, 2), torch.nn.Linear(16, 3))
    x = torch.randn(2, 5, 8)
    graph = trace(model.eval(), x)
    assert not graph["0"].prunable and "fused eval-mode fast path" in graph["0"].reason
    assert not any(g.prunable for g in graph)
