"""Dashboard responsiveness: what one slider move on the Plan page recomputes, on a model with 120 groups.

A slider move re-prices the plan (`AllocationProblem.price`), re-predicts its metrics
(`AllocationProblem.predict`) and rebuilds the edited plan (`AllocationProblem.plan`: unit
selection, totals); none of it touches the model. The aim is under 100 ms per move for a model with
100 groups. Model: torchvision densenet121 (random init, 64x64 inputs, 120 prunable groups);
curves: an estimate-mode sweep over 64 seeded random images (the values do not change the cost of
the arithmetic). Each timing is the median over 200 random moves.

Run: `.venv/bin/python bench/bench_dashboard.py`.
"""

from __future__ import annotations

import statistics
import time

import numpy as np
import torch
import torchvision

import prunecore as pc


def main() -> None:
    torch.manual_seed(0)
    model = torchvision.models.densenet121().eval()
    example = torch.randn(1, 3, 64, 64)
    graph = pc.trace(model, example)
    gen = torch.Generator().manual_seed(0)
    data = [(torch.randn(32, 3, 64, 64, generator=gen), torch.randint(0, 1000, (32,), generator=gen)) for _ in range(2)]
    curves = pc.sweep(model, data, example, graph=graph, mode="estimate", progress=False)
    problem = pc.allocation_problem(curves, graph, model)
    names = list(problem.cost.groups)
    rng = np.random.default_rng(0)
    sparsities = {n: 0.3 for n in names}
    timings: dict[str, list[float]] = {"price + predict": [], "plan": []}
    for _ in range(200):
        sparsities[names[rng.integers(len(names))]] = float(rng.choice(np.arange(0.0, 0.9, 0.01)))
        start = time.perf_counter()
        problem.price(sparsities)
        problem.predict(sparsities)
        middle = time.perf_counter()
        problem.plan(sparsities)
        timings["price + predict"].append(middle - start)
        timings["plan"].append(time.perf_counter() - middle)
    print(f"densenet121: {len(names)} prunable groups")
    for what, values in timings.items():
        print(f"{what:16} median {statistics.median(values) * 1e3:6.1f} ms   max {max(values) * 1e3:6.1f} ms")
    total = [a + b for a, b in zip(*timings.values())]
    print(f"{'one slider move':16} median {statistics.median(total) * 1e3:6.1f} ms (aim: under 100 ms)")


if __name__ == "__main__":
    main()
