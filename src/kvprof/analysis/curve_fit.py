"""The fit behind the memory curve: piecewise-linear models and the test of a slope change.

Pure NumPy. Continuous piecewise-linear models with their knots at interior batch
sizes (0, 1 or 2 knots) are chosen by BIC; each knot of the chosen model is then
tested: a t-test of its slope change against the round-to-round spread (pure error)
when rounds were repeated, else against the residual variance, Bonferroni-corrected
for every slope change the search examined, and kept only if it is material.
Student's t tail is computed here (a continued fraction of the incomplete beta
function) rather than pulling in SciPy for one function.
"""
from __future__ import annotations

import itertools
import math
from dataclasses import dataclass

import numpy as np

ALPHA = 0.05                  # family level of the slope-change test, split over knot positions
MIN_RELATIVE_CHANGE = 0.15    # of the larger of the two slopes
MIN_MATERIAL = 0.01           # change x batch-size range, as a share of the series' largest value
MAX_KNOTS = 2


@dataclass
class Series:
    """One memory series: distinct batch sizes (sorted), the rounds at each, their means."""

    name: str
    x: np.ndarray
    rounds: list[list[float]]

    @property
    def means(self) -> np.ndarray:
        return np.array([float(np.mean(r)) for r in self.rounds])

    @property
    def counts(self) -> np.ndarray:
        return np.array([len(r) for r in self.rounds], float)


@dataclass
class Segment:
    """Between two consecutive batch sizes: what one listed row adds, and per sequence."""

    from_bs: int
    to_bs: int
    added_seqs: int
    delta_bytes: float
    slope_per_seq: float

    def to_dict(self) -> dict:
        return dict(self.__dict__)


@dataclass
class Breakpoint:
    bs: int
    slope_before: float
    slope_after: float
    change_per_seq: float
    relative_change: float
    significant: bool
    statistic: float | None          # t of the slope change
    p_value: float | None
    df: int
    noise: str                       # "rounds", "residual" or "none"
    component: str
    cause: str | None = None
    reason: str = ""

    def to_dict(self) -> dict:
        return dict(self.__dict__)


@dataclass
class Fit:
    """The chosen continuous piecewise-linear model."""

    x: np.ndarray
    knots: tuple[int, ...]           # indices into x
    coef: np.ndarray                 # intercept, first slope, one slope change per knot
    unscaled_cov: np.ndarray
    sigma2: float | None
    df: int
    noise: str
    bic: float
    max_knots: int

    def slopes(self) -> list[float]:
        """Slope of each piece, first to last."""
        return list(self.coef[1] + np.concatenate([[0.0], np.cumsum(self.coef[2:])]))

    def pieces(self) -> list[dict]:
        edges = [0, *self.knots, len(self.x) - 1]
        return [{"from_bs": int(self.x[a]), "to_bs": int(self.x[b]), "slope_per_seq": float(s)}
                for a, b, s in zip(edges, edges[1:], self.slopes())]

    def to_dict(self) -> dict:
        return {"knots_bs": [int(self.x[k]) for k in self.knots], "pieces": self.pieces(),
                "noise": self.noise, "noise_sd_bytes": _sqrt(self.sigma2), "df": self.df,
                "bic": float(self.bic)}


@dataclass
class SeriesResult:
    series: Series
    segments: list[Segment]
    fit: Fit | None
    breakpoints: list[Breakpoint]

    def overall_slope(self) -> float | None:
        x, y = self.series.x, self.series.means
        return float((y[-1] - y[0]) / (x[-1] - x[0])) if x.size > 1 else None

    def to_dict(self) -> dict:
        return {
            "points": [{"batch_size": int(b), "mean_bytes": float(m), "rounds": list(r)}
                       for b, m, r in zip(self.series.x, self.series.means, self.series.rounds)],
            "segments": [s.to_dict() for s in self.segments],
            "breakpoints": [b.to_dict() for b in self.breakpoints],
            "fit": self.fit.to_dict() if self.fit else None,
            "overall_slope_per_seq": self.overall_slope(),
        }


def make_series(name: str, pairs) -> Series:
    """(batch size, bytes) pairs -> a Series; repeated batch sizes are rounds."""
    grouped: dict[int, list[float]] = {}
    for bs, value in pairs:
        if value is not None and math.isfinite(value):
            grouped.setdefault(int(bs), []).append(float(value))
    xs = sorted(grouped)
    return Series(name, np.array(xs, float), [grouped[b] for b in xs])


def segments(series: Series) -> list[Segment]:
    x, y = series.x, series.means
    return [Segment(int(x[i]), int(x[i + 1]), int(x[i + 1] - x[i]), float(y[i + 1] - y[i]),
                    float((y[i + 1] - y[i]) / (x[i + 1] - x[i]))) for i in range(x.size - 1)]


def pure_error(series: Series) -> tuple[float, int]:
    """Round-to-round variance of one reading (pooled over batch sizes) and its df."""
    df = int(sum(len(r) - 1 for r in series.rounds))
    if df == 0:
        return 0.0, 0
    ss = sum(float(np.sum((np.array(r) - np.mean(r)) ** 2)) for r in series.rounds)
    return ss / df, df


def design_matrix(x: np.ndarray, knots) -> np.ndarray:
    return np.column_stack([np.ones_like(x), x, *[np.maximum(x - x[k], 0.0) for k in knots]])


def fit_series(series: Series) -> Fit | None:
    """Choose 0-2 knots by BIC; None with fewer than 3 batch sizes."""
    x, y, w = series.x, series.means, series.counts
    n = x.size
    if n < 3:
        return None
    pe, pe_df = pure_error(series)
    floor = (1e-9 * max(float(np.max(np.abs(y))), 1e-300)) ** 2
    max_knots = min(MAX_KNOTS, n - 2 if pe_df else n - 3)
    best = None
    for k in range(max_knots + 1):
        for knots in itertools.combinations(range(1, n - 1), k):
            X = design_matrix(x, knots)
            sw = np.sqrt(w)
            coef, *_ = np.linalg.lstsq(X * sw[:, None], y * sw, rcond=None)
            rss = float(np.sum(w * (y - X @ coef) ** 2))
            p = X.shape[1]
            if pe_df:
                bic = rss / max(pe, floor) + p * math.log(n)
            else:
                bic = n * math.log(max(rss, n * floor) / n) + p * math.log(n)
            if best is None or bic < best[0] - 1e-9:
                best = (bic, knots, coef, rss, X)
    bic, knots, coef, rss, X = best
    unscaled = np.linalg.pinv(X.T @ (X * w[:, None]))
    if pe_df:
        sigma2, df, noise = max(pe, floor), pe_df, "rounds"
    elif n - X.shape[1] > 0:
        df = n - X.shape[1]
        sigma2, noise = max(rss / df, floor), "residual"
    else:
        sigma2, df, noise = None, 0, "none"
    return Fit(x, tuple(knots), coef, unscaled, sigma2, df, noise, bic, max_knots)


def judge_knots(fit: Fit, series: Series) -> list[Breakpoint]:
    """Each knot of the chosen model: is its slope change real?"""
    out = []
    slopes = fit.slopes()
    y = series.means
    size = max(float(np.max(np.abs(y))), 1e-300)
    span = float(series.x[-1] - series.x[0])
    candidates = slope_changes_examined(series.x.size, fit.max_knots)
    for j, k in enumerate(fit.knots):
        change = float(fit.coef[2 + j])
        before, after = float(slopes[j]), float(slopes[j + 1])
        larger = max(abs(before), abs(after))
        relative = abs(change) / larger if larger > 0 else 0.0
        stat = p = None
        if fit.sigma2 is not None:
            se = math.sqrt(fit.sigma2 * max(fit.unscaled_cov[2 + j, 2 + j], 0.0))
            stat = change / se if se > 0 else math.copysign(1e300, change)
            p = t_two_sided_p(stat, fit.df)
        material = abs(change) * span >= MIN_MATERIAL * size
        significant = bool(p is not None and p < ALPHA / candidates
                           and relative >= MIN_RELATIVE_CHANGE and material)
        out.append(Breakpoint(int(fit.x[k]), before, after, change, relative, significant,
                              stat, p, fit.df, fit.noise, series.name))
    return out


def slope_changes_examined(n: int, max_knots: int) -> int:
    """Every slope change the knot search looked at (the Bonferroni divisor): k per k-knot model."""
    return max(sum(k * math.comb(n - 2, k) for k in range(1, max_knots + 1)), 1)


def analyse_series(series: Series) -> SeriesResult:
    fit = fit_series(series)
    return SeriesResult(series, segments(series), fit, judge_knots(fit, series) if fit else [])


def t_two_sided_p(t: float, df: int) -> float:
    """P(|T| >= |t|) for Student's t with df degrees of freedom."""
    if df <= 0:
        return 1.0
    if not math.isfinite(t) or abs(t) > 1e150:
        return 0.0
    return _betainc(df / 2.0, 0.5, df / (df + t * t))


def _betainc(a: float, b: float, x: float) -> float:
    """Regularised incomplete beta I_x(a, b) (continued fraction, Numerical Recipes 6.4)."""
    if x <= 0.0:
        return 0.0
    if x >= 1.0:
        return 1.0
    front = math.exp(math.lgamma(a + b) - math.lgamma(a) - math.lgamma(b)
                     + a * math.log(x) + b * math.log1p(-x))
    if x < (a + 1.0) / (a + b + 2.0):
        return front * _betacf(a, b, x) / a
    return 1.0 - front * _betacf(b, a, 1.0 - x) / b


def _betacf(a: float, b: float, x: float) -> float:
    tiny = 1e-300

    def nz(v):
        return tiny if abs(v) < tiny else v

    c, d = 1.0, 1.0 / nz(1.0 - (a + b) * x / (a + 1.0))
    h = d
    for m in range(1, 500):
        for aa in (m * (b - m) * x / ((a - 1.0 + 2 * m) * (a + 2 * m)),
                   -(a + m) * (a + b + m) * x / ((a + 2 * m) * (a + 1.0 + 2 * m))):
            d = 1.0 / nz(1.0 + aa * d)
            c = nz(1.0 + aa / c)
            h *= d * c
        if abs(d * c - 1.0) < 1e-15:
            break
    return h


def _sqrt(value):
    return math.sqrt(value) if value is not None else None
