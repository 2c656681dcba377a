"""Latency: one measurement (interleaved rounds, median and spread) behind the CLI and the dashboard.

Timing tests run on a fake clock (`FakeClock`): every forward pass of a `Ticking` model advances it
by a fixed step (multiples of `TICK`, exact in binary), so repetitions, medians and spreads are exact
and nothing depends on the machine.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import torch
from torch import nn

import toy_models as toys
from prunecore import cost
from prunecore.cli import main
from prunecore.cost import Latency, compare_latency, format_latency, format_speedup, measure_latency, speedup
from prunecore.errors import ArgumentError


class FakeClock:
    """`time.perf_counter` stand-in that moves only when a `Ticking` model runs; `log` names each pass.

    Copies are the clock itself: latency times working copies of the models, which must tick it.
    """

    def __init__(self) -> None:
        self.now = 0.0
        self.log: list[str] = []

    def __call__(self) -> float:
        return self.now

    def __deepcopy__(self, memo: dict) -> FakeClock:
        return self


class Ticking(nn.Module):
    """A Linear whose i-th pass takes `steps[i % len(steps)]` seconds of fake time."""

    def __init__(self, name: str, clock: FakeClock, steps: list[float]) -> None:
        super().__init__()
        self.name, self.clock, self.steps = name, clock, steps
        self.fc = nn.Linear(4, 4)

    @property
    def calls(self) -> int:
        return self.clock.log.count(self.name)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.clock.now += self.steps[self.calls % len(self.steps)]
        self.clock.log.append(self.name)
        return self.fc(x)


@pytest.fixture
def clock(monkeypatch) -> FakeClock:
    fake = FakeClock()
    monkeypatch.setattr(cost.time, "perf_counter", fake)
    return fake


TICK = 2.0**-10  # about 1 ms


def record(median_s: float, spread: float = 0.02, rounds: int = 7, threads: int = 2, batch: int = 1) -> Latency:
    return Latency(median_s=median_s, spread=spread, rounds=rounds, threads=threads, batch=batch)


# -- measuring ----------------------------------------------------------------------------------------
def test_record_fields(clock):
    model = Ticking("a", clock, [2 * TICK])
    t = measure_latency(model, torch.randn(3, 4), rounds=5, warmup=1, min_seconds=0.0)
    assert t == Latency(median_s=2 * TICK, spread=0.0, rounds=5, threads=torch.get_num_threads(), batch=3)
    with pytest.raises(dataclasses.FrozenInstanceError):
        t.median_s = 1.0  # type: ignore[misc]


def test_each_round_lasts_min_seconds(clock):
    """A 1-tick model with min_seconds of 10 ticks runs 10 passes per round; the record is per pass."""
    model = Ticking("a", clock, [TICK])
    t = measure_latency(model, torch.randn(1, 4), rounds=3, warmup=2, min_seconds=10 * TICK)
    assert model.calls == 2 + 3 * 10
    assert t.median_s == TICK and t.rounds == 3


def test_spread_is_half_the_interquartile_range_over_the_median(clock):
    """Rounds of 1, 2, 3, 4, 5 ticks: quartiles 2 and 4, median 3, spread (4 - 2) / (2 * 3)."""
    model = Ticking("a", clock, [TICK, 2 * TICK, 3 * TICK, 4 * TICK, 5 * TICK])
    t = measure_latency(model, torch.randn(1, 4), rounds=5, warmup=0, min_seconds=0.0)
    assert t.median_s == 3 * TICK and t.spread == pytest.approx(1 / 3)


def test_compare_latency_alternates_rounds(clock):
    """Dense and pruned rounds interleave (ABBA...), so a slow spell of the machine hits both."""
    a, b = Ticking("A", clock, [2 * TICK]), Ticking("B", clock, [TICK])
    before, after = compare_latency(a, b, torch.randn(1, 4), rounds=4, warmup=1, min_seconds=0.0)
    assert clock.log == ["A", "B"] + ["A", "B", "B", "A", "A", "B", "B", "A"]  # warm-up, then the rounds
    assert (before.median_s, after.median_s, before.spread, after.spread) == (2 * TICK, TICK, 0.0, 0.0)
    assert speedup(before, after) == 2.0


def test_the_model_is_unchanged():
    model = toys.TwoResiduals()
    model.train()
    model.stem.eval()  # mixed flags must come back exactly
    flags = {name: m.training for name, m in model.named_modules()}
    state = {k: v.clone() for k, v in model.state_dict().items()}  # BatchNorm running stats included
    grads = {name: p.requires_grad for name, p in model.named_parameters()}
    measure_latency(model, model.example(), rounds=3, warmup=1, min_seconds=0.0)
    compare_latency(model, toys.TwoResiduals(), model.example(), rounds=3, warmup=1, min_seconds=0.0)
    assert {name: m.training for name, m in model.named_modules()} == flags
    assert {name: p.requires_grad for name, p in model.named_parameters()} == grads
    for k, v in model.state_dict().items():
        torch.testing.assert_close(v, state[k], rtol=0, atol=0)
    assert torch.is_grad_enabled() and not torch.is_inference_mode_enabled()


def test_timed_in_eval_and_inference_mode():
    seen: list[tuple[bool, bool]] = []

    class Probe(nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            seen.append((self.training, torch.is_inference_mode_enabled()))
            return x

    measure_latency(Probe().train(), torch.randn(1, 2), rounds=3, warmup=1, min_seconds=0.0)
    assert seen == [(False, True)] * 4


def test_latency_wrapper_is_the_median_of_single_passes(clock):
    model = Ticking("a", clock, [3 * TICK, TICK, 2 * TICK])
    assert cost.latency(model, torch.randn(1, 4), reps=3, warmup=0) == 2 * TICK
    assert model.calls == 3


@pytest.mark.parametrize("kwargs", [{"rounds": 0}, {"warmup": -1}, {"min_seconds": -0.1}])
def test_bad_settings_are_argument_errors(kwargs):
    with pytest.raises(ArgumentError, match="latency needs rounds >= 1"):
        measure_latency(nn.Linear(2, 2), torch.randn(1, 2), **kwargs)


# -- the rule for a ratio ------------------------------------------------------------------------------
def test_speedup_of_clearly_separated_timings():
    assert speedup(record(0.010, 0.03), record(0.005, 0.04)) == pytest.approx(2.0)
    assert speedup(record(0.005), record(0.010)) == pytest.approx(0.5)  # slower is a ratio too


@pytest.mark.parametrize(
    "before, after, why",
    [
        (record(0.010, rounds=1), record(0.005, rounds=1), "a single round has no spread"),
        (record(0.010, rounds=2), record(0.005), "fewer than 3 rounds"),
        (record(0.010, 0.20), record(0.008, 0.10), "bands overlap: 8 ms * 1.1 > 10 ms * 0.8"),
        (record(0.010, 0.02), record(0.0099, 0.02), "a 1 % difference within ±2 % bands"),
        (record(0.030, 0.45), record(0.005, 0.10), "separated, but the ratio is uncertain by ±55 %"),
        (record(0.010, threads=2), record(0.005, threads=1), "different thread counts"),
        (record(0.010, batch=8), record(0.005, batch=1), "different batch sizes"),
    ],
)
def test_speedup_is_none_where_the_timings_cannot_carry_a_ratio(before, after, why):
    assert speedup(before, after) is None, why


def test_equal_noiseless_timings_are_a_ratio_of_one():
    assert speedup(record(0.004, 0.0), record(0.004, 0.0)) == 1.0


# -- the words both the CLI and the dashboard show ----------------------------------------------------------
@pytest.mark.parametrize(
    "before, after, text",
    [
        (record(0.0231, 0.02), record(0.010, 0.02), "2.31x faster (median of 7 rounds, ±4 %, 2 threads, batch 1)"),
        (record(0.010, 0.01, threads=1, batch=8), record(0.020, 0.01, threads=1, batch=8),
         "2.00x slower (median of 7 rounds, ±2 %, 1 thread, batch 8)"),
        (record(0.030, 0.30), record(0.010, 0.05), "3.00x faster (median of 7 rounds, ±35 %, 2 threads, batch 1)"),
        (record(0.030, 0.45), record(0.010, 0.10), "no reliable speed-up: timings too noisy (±55 %)"),
        (record(0.0108, 0.05), record(0.010, 0.05), "no reliable speed-up: the 1.08x faster measured is within the "
         "timing noise (±10 %)"),
        (record(0.010, rounds=1), record(0.005, rounds=1), "no reliable speed-up: 1 round(s) of timing, 3 needed"),
        (record(0.010, threads=2), record(0.005, threads=4),
         "no reliable speed-up: the two were timed with different thread counts or batch sizes"),
    ],
)  # fmt: skip
def test_format_speedup(before, after, text):
    assert format_speedup(before, after) == text


def test_format_latency():
    assert format_latency(record(0.00241, 0.031)) == "2.41 ms ±3 %"
    assert format_latency(record(1.5, 0.0)) == "1.5 s ±0 %"
    assert format_latency(record(4.2e-5, 0.1)) == "42 µs ±10 %"


# -- one routine behind the CLI and the dashboard ------------------------------------------------------------
FIXED = (record(0.0123, 0.02), record(0.0041, 0.03))


@pytest.fixture
def fixed_timing(monkeypatch) -> list[tuple]:
    """`prunecore.cost.compare_latency` replaced by a recorder returning `FIXED`."""
    calls: list[tuple] = []

    def fake(before, after, example_inputs, *args, **kwargs):
        calls.append((before, after, example_inputs))
        return FIXED

    monkeypatch.setattr(cost, "compare_latency", fake)
    return calls


def test_the_cli_reports_compare_latency(fixed_timing, capsys):
    args = ["prune", "--model", "toy_models:TwoResiduals", "--input", "2,3,8,8", "--sparsity", "0.5"]
    assert main(args) == 0
    [(dense, pruned, example)] = fixed_timing
    assert isinstance(dense, toys.TwoResiduals) and dense is not pruned
    assert example[0].shape == (2, 3, 8, 8)
    line = next(line for line in capsys.readouterr().out.splitlines() if line.startswith("latency"))
    assert line.split()[1:3] == ["12.3ms", "4.1ms"]
    assert line.endswith(format_speedup(*FIXED)) and "3.00x faster" in line


def test_the_dashboard_shows_what_the_measurement_job_timed(fixed_timing, tmp_path, monkeypatch):
    """The Validate page shows the measurement job's `compare_latency` result, through the same formatter.

    The job's worker is another process, so the test writes the result a worker would have written
    (`measure_plan` with the recorder in place) where the page's job key says, then opens the page.
    """
    import json

    from streamlit.testing.v1 import AppTest

    import prunecore as pc
    from prunecore.datasets import load_data
    from prunecore.measure import measure_plan

    monkeypatch.setenv("PRUNECORE_STORE", str(tmp_path / "runs.db"))
    model = pc.load_model("sample:resnet20")
    plan = pc.make_plan(model, pc.trace(model, torch.randn(1, 1, 28, 28)), 0.3)
    at = AppTest.from_file(str(Path(__file__).resolve().parent.parent / "dashboard" / "app.py"), default_timeout=600)
    at.session_state["data_limit"] = 64
    at.session_state["edited_plan"] = plan
    at.run()
    at.switch_page("views/validate.py").run()
    at.number_input(key="validate_bn").set_value(0).run()
    assert [b.key for b in at.button] == ["validate_run"] and not at.metric  # not measured yet
    folder = tmp_path / "jobs" / at.session_state["measure_job"]
    folder.mkdir(parents=True)
    measured = measure_plan(model, plan, load_data("sample", input_shape=(1, 1, 28, 28), limit=64))
    (folder / "result.json").write_text(json.dumps(measured.to_dict()))
    (folder / "status.json").write_text(json.dumps({"state": "done"}))
    at.run()
    assert not at.exception, [e.value for e in at.exception]
    shown = next(m for m in at.metric if m.label == "CPU latency")
    assert len(fixed_timing) == 1
    full = format_speedup(*FIXED)  # the card shows the ratio; its help has the whole line
    assert shown.value == format_latency(FIXED[1]) and full.startswith(shown.delta) and full in shown.help
