"""`predict`: a plan's metrics from the sensitivity curves, corrected by a few measured plans, with a band.

Adding up each group's change from its own curve (what `AllocationProblem.predict` does) is badly
optimistic where a plan cuts many groups deeply: on the sample ResNet-20 twelve groups that each
cost 0.016 nats alone cost 0.92 nats together. Loss is about quadratic in a perturbation of the
network's output, so a group that alone costs dL_i perturbs it by about sqrt(dL_i), and
perturbations of stacked layers add up coherently. The predictor keeps that shape with fitted
exponents and one weight per group:

    Z = sum_i t_i(f_i),   t_i(f) = u_i * D_i(f) ** q        (one term per group; separable)
    loss = L0 + c * (1 - exp(-Z ** p / c))                  (the link: monotone, saturating at L0 + c)
    accuracy = m(loss)                                       (monotone map fitted on measured plans)

`D_i` is group i's loss curve above the dense loss, made non-decreasing; `q`, `p`, the ceiling `c`
(a multiple of the deepest measured rise, or none: loss = L0 + Z ** p) and the `u_i` are fitted on
plans measured on the calibration data right after the sweep (`calibrate`), `m` on the same plans'
(loss, accuracy) pairs or, where cross-validation prefers it, on (fitted loss, accuracy): plans of
one loss scatter in accuracy (on the sample MobileNetV2 plans at loss 1.45-1.46 measure 50-63 %),
and then the accuracy expected at a *predicted* loss, which is what a prediction looks up, is the
better guess. `m` is continued past the deepest plan along a line in log-odds (so accuracy keeps
falling towards chance instead of going flat).
The ceiling keeps plans deeper than any measured one from being predicted far past it (a loss
saturates near chance). A group's weight is pulled towards the shared weight the harder, the
fewer calibration plans cut it.
Every prediction is monotone in Z, so minimising the separable sum Z is exactly maximising the predicted accuracy:
allocation stays a multiple-choice knapsack over the terms `t_i` (`objective_problem`).

The band comes from split-conformal residuals: each calibration plan is predicted by a fit that
did not see it (K folds), and the band is the 90 % quantile of those residuals (accuracy scaled by
its binomial spread, loss as a log ratio), each divided by a scale 1 + s * rise fitted to how the
residuals grow with the predicted rise of the base metric, so deeper plans get wider bands.
Predictions are for the calibration data unless a
`reference` (the dense model's metrics on the target data) is given: then the dense gap is carried
over (loss additively, bounded metrics by their ratio).

    >>> predictor = calibrate(model, problem, calibration, bn_recalibration=4,
    ...                       reference={"accuracy": 0.985, "loss": 0.089})  # ~45 plans measured
    >>> predictor.predict({"layer1.0.conv1": 0.5})["accuracy"]
    Prediction(value=0.981, low=0.972, high=0.99)
"""

from __future__ import annotations

import dataclasses
import itertools
import math
from dataclasses import dataclass
from types import MappingProxyType
from typing import TYPE_CHECKING, Any, Callable, Iterable, Mapping, Sequence

import numpy as np

from prunecore.errors import UserError
from prunecore.evaluate import get_metric
from prunecore.plan import kept_units

if TYPE_CHECKING:
    import torch
    from torch import nn

    from prunecore.allocate import AllocationProblem
    from prunecore.graph import ChannelGraph

__all__ = [
    "CALIBRATION_METHODS",
    "FORMAT",
    "Measurement",
    "Prediction",
    "PredictionError",
    "Predictor",
    "calibrate",
    "calibration_plans",
    "fit",
    "objective_problem",
]

FORMAT = "prunecore.predictor/3"
MIN_PLANS = 10  # below this the 90 % conformal quantile is not finite and the folds too small
_BASES = ("loss", "kl")  # unbounded, lower-is-better metrics the terms are built from
_EXPONENTS = (0.4, 0.5, 0.6, 0.7, 0.85, 1.0)  # q
_POWERS = (1.0, 1.25, 1.5, 1.75, 2.0, 2.5)  # p
_RIDGES = (0.03, 0.3, 3.0, math.inf)  # pull of the group weights towards one shared weight; inf: shared
_MAP_ON_FIT = (False, True)  # the maps' x: each plan's measured base metric, or the fit's own value for it
_CEILINGS = (math.inf, 3.0, 2.0, 1.5, 1.25)  # the link's saturation, as a multiple of the deepest measured rise
_ALPHA = 0.1  # 1 - band coverage
_SHAPE_METHODS = ("uniform", "global")  # methods whose plans do not depend on the curves
CALIBRATION_METHODS: Mapping[str, tuple[float, ...]] = MappingProxyType({
    "dp": (0.85, 0.65, 0.45, 0.32), "threshold": (0.85, 0.65, 0.45, 0.32), "uniform": (0.55, 0.32),
    "global": (0.55, 0.32),
})  # method -> FLOPs budgets of the calibration plans: off the usual 0.9 ... 0.3, down to the deepest
_ACCURACY_POINT = 5.0  # in the model choice, one accuracy point weighs as much as 5 % of loss error
_TAIL = (0.25, 0.5, 1.0, 2.0, 4.0, 8.0)  # extrapolated map knots, in multiples of the measured loss range


class PredictionError(UserError, ValueError):
    """The predictor cannot be fitted or used as asked: too few plans, unknown groups, a bad dict."""


@dataclass(frozen=True)
class Measurement:
    """One calibration plan: its sparsity per group, and the metrics measured on the calibration data."""

    sparsities: Mapping[str, float]
    metrics: Mapping[str, float]


@dataclass(frozen=True)
class Prediction:
    """A predicted metric and its band (about 90 % of plans measure inside [low, high])."""

    value: float
    low: float
    high: float


@dataclass(frozen=True)
class GroupTerm:
    """One group's transformed damage t(f) = weight * D(f) ** q at its curve's fractions (interpolated)."""

    size: int
    fractions: tuple[float, ...]  # increasing, first 0
    terms: tuple[float, ...]  # non-decreasing, first 0

    def at(self, fraction: float | np.ndarray) -> np.ndarray:
        return np.interp(fraction, self.fractions, self.terms)


@dataclass(frozen=True)
class Predictor:
    """The fitted predictor: plain values only, so it serialises (`to_dict`) into the run store and plans.

    `base` is the metric the terms come from (loss or kl), `dense` the metrics of the dense model on
    the calibration data, `maps[m]` the monotone map base -> m as knots (extrapolated past the
    deepest plan, linearly in log-odds), `bands[m]` the conformal quantile of residuals divided by
    their scale 1 + `scales[m]` * rise (rise: the predicted base metric above dense, so deeper
    plans get wider bands), `shift[m]` what turns a calibration value into one on the target data.
    """

    base: str
    groups: Mapping[str, GroupTerm]
    round_to: int
    exponent: float  # q
    power: float  # p
    ceiling: float  # c, the most the base metric can rise (inf: no saturation)
    dense: Mapping[str, float]
    maps: Mapping[str, tuple[tuple[float, ...], tuple[float, ...]]]
    bands: Mapping[str, float]
    scales: Mapping[str, float]
    shift: Mapping[str, float]
    plans: int  # how many measured plans it was fitted on

    # -- what allocation needs -------------------------------------------------------------------
    def fractions(self, sparsities: Mapping[str, float]) -> dict[str, float]:
        """Pruned fraction of each named group under the one rounding rule (what the model really loses).

        Groups without a term are fine left dense (a plan names every group, swept or not).
        """
        unknown = sorted(n for n, s in sparsities.items() if n not in self.groups and float(s) > 0.0)
        if unknown:
            raise PredictionError(
                f"the predictor has no curve for group(s) {', '.join(map(repr, unknown[:5]))}; sweep them and refit"
            )
        out = {}
        for name, s in sparsities.items():
            if name not in self.groups:
                continue
            size = self.groups[name].size
            out[name] = 1.0 - kept_units(size, float(s), self.round_to) / size
        return out

    def term(self, name: str, fraction: float | np.ndarray) -> np.ndarray:
        """Group `name`'s transformed damage at `fraction` pruned: what allocation adds up and minimises."""
        return self.groups[name].at(fraction)

    def score(self, sparsities: Mapping[str, float]) -> float:
        """Z, the separable inner sum: every predicted metric is a monotone function of it."""
        return float(sum(self.term(n, f) for n, f in self.fractions(sparsities).items()))

    # -- predictions -----------------------------------------------------------------------------
    def predict(self, sparsities: Mapping[str, float]) -> dict[str, Prediction]:
        """Predicted metrics (value and band) of the model pruned to `sparsities`, other groups dense."""
        return self.predict_score(self.score(sparsities))

    def predict_score(self, z: float) -> dict[str, Prediction]:
        """Predictions from Z (see `score`)."""
        rise = float(_link(np.asarray(max(z, 0.0)), self.power, self.ceiling))
        base = self.dense[self.base] + rise
        values = {self.base: base, **{m: float(np.interp(base, *self.maps[m])) for m in self.maps}}
        out = {}
        for m, v in values.items():
            bounded = m != self.base
            low, high = _band(v, self.bands[m] * (1.0 + self.scales.get(m, 0.0) * rise), bounded)
            out[m] = Prediction(*(self._shifted(m, x, bounded) for x in (v, low, high)))
        return out

    def _shifted(self, metric: str, value: float, bounded: bool) -> float:
        low, high = get_metric(metric).bounds
        shifted = value * self.shift.get(metric, 1.0) if bounded else value + self.shift.get(metric, 0.0)
        return float(min(max(shifted, low), high))

    # -- plain values ----------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        """JSON-safe dict (lists and floats), tagged with `FORMAT`."""
        return {
            "format": FORMAT, "base": self.base, "round_to": self.round_to, "exponent": self.exponent,
            "power": self.power, "ceiling": None if math.isinf(self.ceiling) else self.ceiling,
            "dense": dict(self.dense), "bands": dict(self.bands), "scales": dict(self.scales),
            "shift": dict(self.shift), "plans": self.plans,
            "maps": {m: [list(x), list(y)] for m, (x, y) in self.maps.items()},
            "groups": {n: {"size": g.size, "fractions": list(g.fractions), "terms": list(g.terms)}
                       for n, g in self.groups.items()},
        }  # fmt: skip

    @classmethod
    def from_dict(cls, data: Any) -> Predictor:
        """Inverse of `to_dict`; a dict of another format or with missing fields raises `PredictionError`."""
        if not isinstance(data, Mapping) or data.get("format") != FORMAT:
            raise PredictionError(f"not a predictor of format {FORMAT!r}")
        try:
            groups = {str(n): GroupTerm(int(g["size"]), _floats(g["fractions"]), _floats(g["terms"]))
                      for n, g in data["groups"].items()}  # fmt: skip
            maps = {str(m): (_floats(x), _floats(y)) for m, (x, y) in data["maps"].items()}
            ceiling = math.inf if data["ceiling"] is None else float(data["ceiling"])
            return cls(
                str(data["base"]), groups, int(data["round_to"]), float(data["exponent"]), float(data["power"]),
                ceiling, _metrics(data["dense"]), maps, _metrics(data["bands"]), _metrics(data["scales"]),
                _metrics(data["shift"]), int(data["plans"]),
            )  # fmt: skip
        except (KeyError, TypeError, ValueError, AttributeError) as exc:
            raise PredictionError(f"malformed predictor dict: {type(exc).__name__}: {exc}") from exc


def _floats(values: Any) -> tuple[float, ...]:
    return tuple(float(v) for v in values)


def _metrics(values: Any) -> dict[str, float]:
    return {str(k): float(v) for k, v in values.items()}


def _band(value: float, width: float, bounded: bool) -> tuple[float, float]:
    """Band around a calibration-space value: loss as a log ratio, bounded metrics in binomial-spread units."""
    if not bounded:
        return value * math.exp(-width), value * math.exp(width)
    spread = _spread(value)
    return value - width * spread, value + width * spread


def _spread(value: float | np.ndarray) -> np.ndarray:
    """Scale of a bounded metric's error: binomial sd, floored so that near 1 the band does not vanish."""
    v = np.clip(value, 0.0, 1.0)
    return np.sqrt(v * (1.0 - v)) + 0.02


# -- fitting --------------------------------------------------------------------------------------
def fit(
    problem: AllocationProblem,
    measured: Sequence[Measurement],
    reference: Mapping[str, float] | None = None,
    folds: int = 5,
) -> Predictor:
    """Fit the predictor of `problem`'s curves on `measured` calibration plans (at least `MIN_PLANS`).

    Plans must be measured on the data the curves were swept on, and carry the base metric (loss
    or kl) and every other curve metric. `reference`: the dense model's metrics on the data the
    predictions are for (e.g. held-out); without it predictions are for the calibration data.
    (q, p, ridge, ceiling, and what the maps are fitted on) are chosen by K-fold error, and the band
    is the conformal quantile of the same out-of-fold residuals.
    """
    base = next((m for m in _BASES if m in problem.dense), None)
    if base is None:
        have = ", ".join(problem.dense)
        raise PredictionError(f"the curves need a loss or kl column to predict from; they have {have}")
    linked = [m for m in problem.dense if m != base and m not in _BASES]
    if len(measured) < MIN_PLANS:
        raise PredictionError(f"fitting a predictor needs at least {MIN_PLANS} measured plans, got {len(measured)}")
    for i, m in enumerate(measured):
        missing = [k for k in (base, *linked) if k not in m.metrics]
        if missing:
            raise PredictionError(f"measured plan {i} lacks metric(s) {', '.join(missing)}")
    curves = {n: _damage(c.fractions, c.values[base], problem.dense[base]) for n, c in problem.curves.items()}
    shape = Predictor(base, {n: GroupTerm(problem.graph[n].size, f, d) for n, (f, d) in curves.items()},
                      problem.round_to, 1.0, 1.0, math.inf, dict(problem.dense), {}, {}, {}, {}, 0)  # fmt: skip
    names = list(curves)
    fractions = np.array([[shape.fractions(m.sparsities).get(n, 0.0) for n in names] for m in measured])  # (N, G)
    features = {q: _features(curves, names, fractions, q) for q in _EXPONENTS}  # q -> (N, G)
    y = {k: np.array([float(m.metrics[k]) for m in measured]) for k in (base, *linked)}  # metric -> (N,)
    dense = {k: float(problem.dense[k]) for k in (base, *linked)}
    split = np.arange(len(measured)) % max(2, min(folds, len(measured)))  # (N,) fold of each plan
    data = _Folds.of(y, dense, base, linked, split)

    best: tuple[float, float, _Params] | None = None  # (error, q, params): the first of the least errors
    for q in _EXPONENTS:
        for p, ridge, c in itertools.product(_POWERS, _RIDGES, _CEILINGS):
            shared = _Params(p, ridge, c, False)
            for on_fit, error in _cv_errors(features[q], data, shared, _MAP_ON_FIT).items():
                if best is None or error < best[0]:
                    best = (error, q, dataclasses.replace(shared, map_on_fit=on_fit))
    assert best is not None  # the grids are not empty
    _, q, params = best
    oof = _out_of_fold(features[q], data, params)  # metric -> (N,)
    p, ceiling = params.power, params.ceiling * _deepest(y[base] - dense[base])
    weights = _weights(features[q], y[base] - dense[base], p, params.ridge, ceiling)  # (G,)
    x_map = dense[base] + _link(features[q] @ weights, p, ceiling) if params.map_on_fit else y[base]  # (N,)
    depth = oof[base] - dense[base]  # (N,) predicted rise of each plan, out of fold
    residuals = {base: np.abs(np.log(np.maximum(y[base], 1e-12) / np.maximum(oof[base], 1e-12)))}
    residuals.update({k: np.abs(y[k] - oof[k]) / _spread(oof[k]) for k in linked})  # metric -> (N,)
    scales = {k: _scale(r, depth) for k, r in residuals.items()}
    bands = {k: _quantile(r / (1.0 + scales[k] * np.maximum(depth, 0.0))) for k, r in residuals.items()}
    shift = {}
    for k in (base, *linked):
        if reference is not None and k in reference:
            shift[k] = float(reference[k]) - dense[k] if k == base else float(reference[k]) / max(dense[k], 1e-12)
    groups = {
        n: GroupTerm(problem.graph[n].size, curves[n][0], tuple(float(weights[i] * d**q) for d in curves[n][1]))
        for i, n in enumerate(names)
    }  # fmt: skip
    maps = {k: _map_of(k, x_map, y[k], dense[base], dense[k]) for k in linked}
    return Predictor(base, groups, problem.round_to, q, p, ceiling, dense, maps, bands, scales, shift, len(measured))


def _link(z: np.ndarray, p: float, ceiling: float) -> np.ndarray:
    """The base metric's rise at score Z: Z ** p, saturating at `ceiling` (c (1 - exp(-Z ** p / c)))."""
    rise = np.maximum(z, 0.0) ** p
    return rise if math.isinf(ceiling) else ceiling * -np.expm1(-rise / ceiling)


def _unlink(rise: np.ndarray, p: float, ceiling: float) -> np.ndarray:
    """Inverse of `_link`: the score Z that rises by `rise` (kept below the ceiling)."""
    rise = np.maximum(rise, 0.0)
    if not math.isinf(ceiling):
        rise = -ceiling * np.log1p(-np.minimum(rise / ceiling, 1.0 - 1e-6))
    return rise ** (1.0 / p)


def _deepest(rise: np.ndarray) -> float:
    return max(float(np.max(rise)), 1e-6)


def _damage(fractions: np.ndarray, values: np.ndarray, dense: float) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """A curve's rise above the dense value, clipped at 0 and made non-decreasing (noise is not a gain)."""
    rise = np.maximum.accumulate(np.maximum(np.asarray(values, dtype=float) - dense, 0.0))  # (L,)
    return _floats(fractions), _floats(rise)


def _features(
    curves: Mapping[str, tuple[tuple[float, ...], tuple[float, ...]]], names: Sequence[str], fractions: np.ndarray,
    q: float,
) -> np.ndarray:
    """Unweighted terms D_i ** q of each plan (rows of `fractions`, (N, G)), interpolated as `GroupTerm` does."""
    cols = [np.interp(fractions[:, i], curves[n][0], np.asarray(curves[n][1]) ** q) for i, n in enumerate(names)]
    return np.stack(cols, axis=1)  # (N, G)


def _weights(x: np.ndarray, rise: np.ndarray, p: float, ridge: float, ceiling: float) -> np.ndarray:
    """Group weights u (G,) so that link(sum_i u_i x_i) fits the measured rise, in relative error.

    Linear in u once the rise is mapped back through the link (`_unlink`): weighted least squares,
    with each group's weight pulled towards one shared weight by `ridge` (inf: a single shared weight).
    """
    target = _unlink(rise, p, ceiling)  # (N,)
    scale = 1.0 / (target + 0.1 * max(float(np.median(target)), 1e-6))  # (N,) relative error
    shared_x = x.sum(axis=1)  # (N,)
    shared = float(np.dot(scale * shared_x, scale * target) / max(np.dot(scale * shared_x, scale * shared_x), 1e-18))
    shared = max(shared, 1e-9)
    if math.isinf(ridge):
        return np.full(x.shape[1], shared)
    seen = np.count_nonzero(x > 0.0, axis=0)  # (G,) plans that cut each group
    pull = np.sqrt(ridge * len(x) / (seen + 1.0))  # (G,) groups seen in few plans stay near the shared weight
    a = np.vstack([scale[:, None] * x, np.diag(pull) / shared])  # (N + G, G)
    b = np.concatenate([scale * target, pull])  # (N + G,)
    u, *_ = np.linalg.lstsq(a, b, rcond=None)
    return np.maximum(u, 0.2 * shared)  # (G,) no group near free: allocation would exploit it


def _monotone_map(
    x: np.ndarray, y: np.ndarray, x0: float, y0: float, decreasing: bool
) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Isotonic fit of y on x (pool adjacent violators), anchored at the dense point, as interpolation knots."""
    order = np.argsort(np.concatenate([[x0], x]), kind="stable")
    xs, ys = np.concatenate([[x0], x])[order], np.concatenate([[y0], y])[order]  # (N + 1,)
    sign = -1.0 if decreasing else 1.0
    blocks: list[list[float]] = []  # [sum x, sum y, count], y in increasing orientation
    for xi, yi in zip(xs, sign * ys):
        blocks.append([xi, yi, 1.0])
        while len(blocks) > 1 and blocks[-2][1] / blocks[-2][2] > blocks[-1][1] / blocks[-1][2]:
            last = blocks.pop()
            blocks[-1] = [blocks[-1][0] + last[0], blocks[-1][1] + last[1], blocks[-1][2] + last[2]]
    knots_x = [b[0] / b[2] for b in blocks]
    knots_y = [sign * b[1] / b[2] for b in blocks]
    return _floats(knots_x), _floats(knots_y)


def _map_of(
    metric: str, x: np.ndarray, y: np.ndarray, x0: float, y0: float
) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """The map base -> `metric`: isotonic over the measured plans, extrapolated past the deepest in log-odds."""
    info = get_metric(metric)
    knots = _monotone_map(x, y, x0, y0, info.higher_is_better)
    return _extrapolated(knots, x, y, info.bounds, info.higher_is_better)


def _extrapolated(
    knots: tuple[tuple[float, ...], tuple[float, ...]], x: np.ndarray, y: np.ndarray, bounds: tuple[float, float],
    decreasing: bool,
) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """`knots` continued past the last one along a line in log-odds (of y within `bounds`) vs x.

    The slope is fitted on the deeper half of the plans (x above its median), so a map does not go
    flat beyond the deepest measured plan but keeps falling towards the bound, as accuracy falls
    towards chance. An unbounded metric, or a slope of the wrong sign, keeps the map flat there.
    """
    lo, hi = bounds
    if math.isinf(hi) or math.isinf(lo) or len(x) < 4:
        return knots
    deep = x >= np.median(x)  # (N,)
    odds = _logit((np.asarray(y)[deep] - lo) / (hi - lo))  # (D,)
    xs = np.asarray(x)[deep]
    spread = float(np.var(xs))
    slope = float(np.mean((xs - xs.mean()) * (odds - odds.mean())) / spread) if spread > 0 else 0.0
    slope = min(slope, 0.0) if decreasing else max(slope, 0.0)
    if slope == 0.0:
        return knots
    kx, ky = knots
    span = max(kx[-1] - kx[0], 1e-6)
    start = _logit(np.asarray((ky[-1] - lo) / (hi - lo)))
    tail_x = kx[-1] + span * np.asarray(_TAIL)  # (T,)
    tail_y = lo + (hi - lo) / (1.0 + np.exp(-(start + slope * (tail_x - kx[-1]))))  # (T,)
    return _floats((*kx, *tail_x)), _floats((*ky, *tail_y))


def _logit(v: np.ndarray) -> np.ndarray:
    v = np.clip(v, 1e-3, 1.0 - 1e-3)
    return np.log(v / (1.0 - v))


def _scale(residuals: np.ndarray, depth: np.ndarray) -> float:
    """How fast residuals grow with depth: b / a of the least-squares line a + b * depth (b >= 0).

    The intercept is floored at a quarter of the mean residual, so shallow plans keep a band.
    """
    d = np.maximum(depth, 0.0)  # (N,)
    if float(np.var(d)) <= 0.0:
        return 0.0
    b = float(np.mean((d - d.mean()) * (residuals - residuals.mean())) / np.var(d))
    a = max(float(residuals.mean()) - b * float(d.mean()), 0.25 * float(residuals.mean()), 1e-12)
    return max(b, 0.0) / a


@dataclass(frozen=True)
class _Folds:
    """The measured plans as arrays, split into K folds, with the monotone maps fitted without each fold."""

    y: Mapping[str, np.ndarray]  # metric -> (N,)
    dense: Mapping[str, float]
    base: str
    linked: tuple[str, ...]
    split: np.ndarray  # (N,) fold of each plan
    maps: Mapping[int, Mapping[str, tuple[tuple[float, ...], tuple[float, ...]]]]  # fold -> metric -> knots

    @classmethod
    def of(cls, y: Mapping[str, np.ndarray], dense: Mapping[str, float], base: str, linked: Sequence[str],
           split: np.ndarray) -> _Folds:  # fmt: skip
        maps = {int(f): {k: _map_of(k, y[base][split != f], y[k][split != f], dense[base], dense[k]) for k in linked}
                for f in np.unique(split)}  # fmt: skip
        return cls(y, dense, base, tuple(linked), split, maps)


@dataclass(frozen=True)
class _Params:
    """One model choice that cross-validation picks among (beside the exponent q, which picks the features)."""

    power: float  # p
    ridge: float
    ceiling: float  # as a multiple of the deepest rise among the plans fitted on
    map_on_fit: bool  # maps from the fit's own value of each plan's base metric, not the measured one


def _out_of_fold(x: np.ndarray, folds: _Folds, params: _Params) -> dict[str, np.ndarray]:
    """Each plan predicted by the fit on the other folds (features `x` (N, G)): metric -> (N,).

    With `map_on_fit` each fold's maps are fitted to what that fold's fit says of its own plans
    (the accuracy expected at a predicted loss), not to their measured loss.
    """
    return _out_of_fold_by_map(x, folds, params, (params.map_on_fit,))[params.map_on_fit]


def _out_of_fold_by_map(x: np.ndarray, folds: _Folds, params: _Params,
                        choices: Sequence[bool]) -> dict[bool, dict[str, np.ndarray]]:  # fmt: skip
    """`_out_of_fold` for each `map_on_fit` in `choices` (`params.map_on_fit` unused): the choices share
    each fold's fit of the base metric and differ only in the maps, so the fit is done once."""
    base, y, l0 = folds.base, folds.y, folds.dense[folds.base]
    out = {c: {k: np.zeros(len(folds.split)) for k in (base, *folds.linked)} for c in choices}
    for fold, measured_maps in folds.maps.items():
        train, test = folds.split != fold, folds.split == fold
        rise = y[base][train] - l0  # (T,)
        ceiling = params.ceiling * _deepest(rise)
        u = _weights(x[train], rise, params.power, params.ridge, ceiling)  # (G,)
        predicted = l0 + _link(x[test] @ u, params.power, ceiling)  # (F,)
        for on_fit in choices:
            maps = measured_maps
            if on_fit:
                fitted = l0 + _link(x[train] @ u, params.power, ceiling)  # (T,)
                maps = {k: _map_of(k, fitted, y[k][train], l0, folds.dense[k]) for k in folds.linked}
            out[on_fit][base][test] = predicted
            for k in folds.linked:
                out[on_fit][k][test] = np.interp(predicted, *maps[k])
    return out


def _cv_errors(x: np.ndarray, folds: _Folds, params: _Params, choices: Sequence[bool]) -> dict[bool, float]:
    """Out-of-fold error of each map choice: mean |log ratio| of the base metric, plus accuracy-like metrics'
    mean error."""
    y, by_map = folds.y, _out_of_fold_by_map(x, folds, params, choices)
    predicted = next(iter(by_map.values()))[folds.base]  # (N,) the same for every map choice
    error = float(np.mean(np.abs(np.log(np.maximum(y[folds.base], 1e-12) / np.maximum(predicted, 1e-12)))))
    return {on_fit: error + sum(_ACCURACY_POINT * float(np.mean(np.abs(y[k] - oof[k]))) for k in folds.linked)
            for on_fit, oof in by_map.items()}  # fmt: skip


def _quantile(residuals: np.ndarray) -> float:
    """Split-conformal quantile: the ceil((n + 1)(1 - alpha))-th smallest residual."""
    r = np.sort(residuals)
    rank = min(math.ceil((len(r) + 1) * (1 - _ALPHA)), len(r))
    return float(r[rank - 1])


# -- calibration plans and allocation -------------------------------------------------------------
def calibration_plans(
    problem: AllocationProblem,
    n: int,
    seed: int = 0,
    methods: Mapping[str, Sequence[float]] | None = None,
    predictor: Predictor | None = None,
    kept: tuple[float, float] = (0.3, 0.9),
) -> list[dict[str, float]]:
    """`n` random slider plans plus each method's plans at its budgets: what to measure right after a sweep.

    A random plan prunes a random share of the curve groups, each to a random sparsity within its
    measured range scaled by a random depth, and is kept only if it keeps `kept` of the FLOPs, so
    the fit sees shallow and deep, narrow and broad plans, as users make them by hand. Method plans
    (`methods`: name -> FLOPs budgets, default `CALIBRATION_METHODS`, off the budgets users usually
    pick) cover the corners allocation seeks out, down to the deepest budget, so the fit seldom
    extrapolates; with a `predictor` they are solved on its objective, which shows the fit where the
    corrected allocation goes. Plans that keep the same units are listed once.
    """
    from prunecore.allocate import AllocationError, solve
    from prunecore.plan import Budget

    rng = np.random.default_rng(seed)
    names = list(problem.curves)
    dense_flops = problem.cost.dense[1]
    plans: list[dict[str, float]] = []
    seen = set()  # kept units of each listed plan
    for _ in range(n * 200):
        if len(plans) == n:
            break
        depth, share = rng.uniform(0.1, 1.0), rng.uniform(0.3, 1.0)
        plan = {}
        for name in names:
            top = min(float(problem.curves[name].fractions[-1]), 0.9)
            plan[name] = float(rng.uniform(0.0, depth * top)) if rng.random() < share else 0.0
        key = tuple(sorted(problem.kept(plan).items()))
        if kept[0] <= problem.price(plan)[1] / dense_flops <= kept[1] and key not in seen:
            seen.add(key)
            plans.append(plan)
    target = problem if predictor is None else objective_problem(problem, predictor)
    unswept = [n for n in problem.cost.groups if n not in problem.curves]  # uniform and global would cut them
    for method, budgets in (CALIBRATION_METHODS if methods is None else methods).items():
        for b in budgets:
            try:
                plan = solve(target, Budget(flops=b), method, exclude=unswept).sparsities
            except AllocationError:
                continue
            key = tuple(sorted(problem.kept(plan).items()))
            if key not in seen:
                seen.add(key)
                plans.append(plan)
    return plans


def calibrate(
    model: nn.Module,
    problem: AllocationProblem,
    calibration_data: Iterable[Any],
    bn_recalibration: bool | int = True,
    graph: ChannelGraph | None = None,
    reference: Mapping[str, float] | None = None,
    n: int = 24,
    seed: int = 0,
    progress: Callable[[int, int], None] | None = None,
    measure: Callable[[Mapping[str, float]], Mapping[str, float]] | None = None,
    bn_data: Iterable[Any] | None = None,
    device: str | torch.device | None = None,
    autocast: str | None = None,
    channels_last: bool = False,
) -> Predictor:
    """Pick calibration plans, measure them on `calibration_data` (the data the curves were swept on), fit.

    Two rounds: `n` random plans and `CALIBRATION_METHODS`' plans on the curves, a first fit, then
    the curve methods again on that fit's objective (where corrected allocation goes), and the final
    fit on all of them (about n + 20 plans). Each plan is measured with `prunecore.evaluate_plan`
    (BatchNorm re-estimated as `bn_recalibration` says on `bn_data`, default `calibration_data`: as
    the sweep did, so plans are measured the way the curves were), or with `measure`
    (sparsities -> metrics) where given, e.g. a cache. `progress(done, total)` is called after each
    measured plan; `reference` is as in `fit`. `device`, `autocast` and `channels_last` are passed to
    `evaluate_plan`: give the sweep's, so the plans are measured as its points were.
    """
    if measure is None:
        from prunecore.evaluate import evaluate_plan

        metrics = list(problem.dense)

        def measure(sparsities: Mapping[str, float]) -> Mapping[str, float]:
            plan = problem.plan(dict(sparsities))
            return evaluate_plan(model, plan, calibration_data, metrics, bn_recalibration=bn_recalibration,
                                 calibration=calibration_data if bn_data is None else bn_data, graph=graph,
                                 device=device, autocast=autocast, channels_last=channels_last)  # fmt: skip

    curve_methods = {m: b for m, b in CALIBRATION_METHODS.items() if m not in _SHAPE_METHODS}
    first = calibration_plans(problem, n, seed)
    total = len(first) + sum(len(b) for b in curve_methods.values())
    measured: list[Measurement] = []
    for plan in first:
        measured.append(Measurement(plan, dict(measure(plan))))
        if progress is not None:
            progress(len(measured), total)
    predictor = fit(problem, measured, reference)
    seen = {tuple(sorted(problem.kept(m.sparsities).items())) for m in measured}
    second = [s for s in calibration_plans(problem, 0, seed, curve_methods, predictor)
              if tuple(sorted(problem.kept(s).items())) not in seen]  # fmt: skip
    total = len(measured) + len(second)
    for plan in second:
        measured.append(Measurement(plan, dict(measure(plan))))
        if progress is not None:
            progress(len(measured), total)
    return fit(problem, measured, reference)


def objective_problem(problem: AllocationProblem, predictor: Predictor) -> AllocationProblem:
    """`problem` allocating and predicting with `predictor` (`allocate.with_predictor`).

    Its score is what every predicted metric is monotone in, so the least score within a budget is
    the plan with the best predicted accuracy and loss: dp, greedy and threshold run unchanged.
    """
    from prunecore.allocate import with_predictor

    return with_predictor(problem, predictor)
