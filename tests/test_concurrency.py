"""The engine from several threads at once, as the dashboard's sessions call it.

torch.fx patches `nn.Module.__call__` process-wide while it traces (sweeps use it); a forward pass
in another thread in that window used to fail with "module is not installed as a submodule".
"""

import threading

import torch

import prunecore as pc
from prunecore._concurrency import forward_pass, fx_tracing
from prunecore.suffix import symbolic_trace


def _in_threads(*jobs):
    """Run each job in its own thread; the exceptions they raised."""
    errors: list[BaseException] = []

    def wrap(job):
        try:
            job()
        except BaseException as exc:  # collected and asserted on by the caller
            errors.append(exc)

    threads = [threading.Thread(target=wrap, args=(job,)) for job in jobs]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return errors


def test_trace_sweep_and_apply_at_once_match_one_at_a_time():
    torch.manual_seed(0)
    sample = pc.load_sample("resnet20")
    x = torch.randn(1, 1, 28, 28)
    data = [(torch.randn(8, 1, 28, 28), torch.randint(0, 10, (8,))) for _ in range(2)]
    other = pc.load_model("torchvision:resnet18")
    y = torch.randn(1, 3, 64, 64)
    plan = pc.make_plan(other, pc.trace(other, y), 0.5)

    expected_curves = pc.sweep(sample.model, data, x, levels=[0.5], progress=False)
    expected_fp = pc.trace(other, y).fingerprint
    expected_out = pc.apply_plan(other, plan)(y)

    curves, fingerprints, outputs = [], [], []
    errors = _in_threads(
        lambda: curves.extend(pc.sweep(sample.model, data, x, levels=[0.5], progress=False) for _ in range(4)),
        lambda: fingerprints.extend(pc.trace(other, y).fingerprint for _ in range(12)),
        lambda: outputs.extend(pc.apply_plan(other, plan)(y) for _ in range(6)),
    )
    assert errors == []
    for frame in curves:
        assert frame.drop(columns=["seconds"], errors="ignore").equals(
            expected_curves.drop(columns=["seconds"], errors="ignore"))  # fmt: skip
    assert set(fingerprints) == {expected_fp}
    for out in outputs:
        torch.testing.assert_close(out, expected_out, rtol=0, atol=0)


def test_an_fx_trace_waits_for_running_forward_passes_and_holds_new_ones():
    inside, traced, release = threading.Event(), threading.Event(), threading.Event()

    def forward():
        with forward_pass():
            inside.set()
            release.wait()

    def fx():
        inside.wait()
        with fx_tracing():
            traced.set()

    a, b = threading.Thread(target=forward), threading.Thread(target=fx)
    a.start()
    b.start()
    inside.wait()
    assert not traced.wait(0.2)  # the trace is held while the forward pass runs
    release.set()
    a.join()
    b.join()
    assert traced.is_set()


def test_forward_passes_nest_and_fx_refuses_to_trace_inside_one():
    model = torch.nn.Sequential(torch.nn.Linear(2, 2))
    with forward_pass(), forward_pass():  # re-entrant within a thread
        model(torch.randn(1, 2))
    assert isinstance(symbolic_trace(model), torch.fx.GraphModule)
    try:
        with forward_pass(), fx_tracing():
            raise AssertionError("fx_tracing inside a forward pass must refuse")
    except RuntimeError as exc:
        assert "would deadlock" in str(exc)


def test_a_model_run_by_another_thread_while_fx_traces_runs_as_usual():
    """Mid-trace (fx has patched nn.Module.__call__ process-wide), a plain forward elsewhere is unaffected."""
    entered, release = threading.Event(), threading.Event()

    class Paused(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = torch.nn.Linear(3, 3)

        def forward(self, x):
            entered.set()  # plain Python: runs while fx traces, with its patches in place
            release.wait()
            return self.fc(x)

    other = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.ReLU())
    x = torch.randn(2, 4)
    expected = other(x)
    graphs, outputs = [], []
    tracing = threading.Thread(target=lambda: graphs.append(symbolic_trace(Paused())))
    tracing.start()
    entered.wait()
    try:
        outputs.append(other(x))  # in this thread, during the trace
    finally:
        release.set()
        tracing.join()
    torch.testing.assert_close(outputs[0], expected, rtol=0, atol=0)
    assert [n.target for n in graphs[0].graph.nodes if n.op == "call_module"] == ["fc"]
