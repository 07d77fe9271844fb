"""A step-time model with non-negative costs, its uncertainty, and what the data cannot tell.

cycle_ns = fixed + per_decode_request * decode requests + per_prefill_token * prefill tokens
           + per_context_token * context tokens (computed + scheduled, summed over the step's requests)

The time is a step's *cycle*: from its schedule start to the next step's (the last step: to
its update end), so that the model's steps add up to the run's duration, front-end work
between steps included. Every cost is a physical time and cannot be negative: the fit is
non-negative least squares (Lawson–Hanson, in numpy). The interval comes from a moving-block
bootstrap of the steps (consecutive steps are alike, so blocks keep that correlation in each
draw), refitted each time. A term the data cannot separate from the others (it never varied,
or it moved in step with another) is named, and every model that fits the data as well as
the best one is kept beside it: predictions carry their spread (docs/analyses.md).
"""
from __future__ import annotations

from dataclasses import dataclass, field
import numpy as np

from kvprof.analysis.arrays import masked_diff

COEFFICIENTS = ("fixed_ns", "per_decode_request_ns", "per_prefill_token_ns", "per_context_token_ns")
TERM_NAMES = ("fixed per step", "per decode request", "per prefill token", "per context token")
MIN_STEPS = 8
BOOTSTRAP_DRAWS = 200
COLLINEAR_R2 = 0.995       # a column explained this well by the others cannot be told apart
F99 = 6.63                 # 99 % point of chi2(1): "fits as well" (see alternatives)
CHUNK = 1 << 16            # steps whose design matrix is built at once
STARTS_AT_ONCE = 1 << 20   # bootstrap block starts drawn at once


def nnls(a: np.ndarray, b: np.ndarray, max_iter: int | None = None) -> np.ndarray:
    """argmin ||a x - b|| subject to x >= 0 (Lawson & Hanson 1974, active-set)."""
    m, n = a.shape
    x = np.zeros(n)
    passive = np.zeros(n, bool)
    gradient = a.T @ (b - a @ x)
    tol = 10 * np.finfo(float).eps * np.linalg.norm(a, 1) * max(m, n)
    for _ in range(max_iter or 3 * n + 10):
        if passive.all() or (gradient[~passive] <= tol).all():
            break
        candidates = np.where(~passive, gradient, -np.inf)
        passive[int(np.argmax(candidates))] = True
        while True:
            z = np.zeros(n)
            z[passive] = np.linalg.lstsq(a[:, passive], b, rcond=None)[0]
            if (z[passive] > 0).all():
                break
            blocking = passive & (z <= 0)
            alpha = np.min(x[blocking] / (x[blocking] - z[blocking]))
            x = x + alpha * (z - x)
            passive &= x > tol
            x[~passive] = 0.0
        x = z
        gradient = a.T @ (b - a @ x)
    return x


@dataclass
class StepSamples:
    """The fitted steps: cycle time and composition (integers from a trace, float64 once
    joined), and which source each came from."""

    cycle_ns: np.ndarray
    decode: np.ndarray
    prefill: np.ndarray
    context: np.ndarray
    max_running: int = 0

    def design(self) -> np.ndarray:
        return design_matrix(self.decode, self.prefill, self.context)

    @staticmethod
    def join(parts: list["StepSamples"]) -> "StepSamples":
        cat = lambda name: np.concatenate([getattr(p, name) for p in parts]).astype(np.float64)  # noqa: E731
        return StepSamples(cat("cycle_ns"), cat("decode"), cat("prefill"), cat("context"),
                           max((p.max_running for p in parts), default=0))


def step_samples(start_ns, busy, decode, prefill, context, max_running: int) -> StepSamples:
    """The busy steps that have a next step (the last one's cycle is unknown), with their
    cycle: schedule start to the next schedule start."""
    keep = np.asarray(busy, bool).copy()
    keep[-1:] = False
    start_ns = np.asarray(start_ns, np.int64)
    columns = [np.asarray(v) for v in (decode, prefill, context)]
    if keep[:-1].all():      # a loaded engine: every step but the last, as views (no copies)
        return StepSamples(np.diff(start_ns), *(v[:-1] for v in columns), max_running)
    return StepSamples(masked_diff(start_ns, keep[:-1]), *(v[keep] for v in columns), max_running)


def design_matrix(decode, prefill, context) -> np.ndarray:
    ones = np.ones(len(decode))
    return np.column_stack([ones, decode, prefill, context]).astype(np.float64)


@dataclass
class Fit:
    coefficients: dict[str, float] | None
    r2: float | None
    rmse_ms: float | None
    steps: int
    max_running: int = 0
    draws: np.ndarray | None = None            # bootstrap coefficient vectors (draws x 4)
    unseparable: dict[str, str] = field(default_factory=dict)   # term -> why
    alternatives: list[np.ndarray] = field(default_factory=list)  # models that fit as well

    @property
    def vector(self) -> np.ndarray:
        return np.array([self.coefficients[name] for name in COEFFICIENTS])

    @property
    def degenerate(self) -> bool:
        return bool(self.unseparable)

    def absent(self) -> list[int]:
        """Columns that were always 0: the data says nothing of their cost."""
        return [COEFFICIENTS.index(name) for name, why in self.unseparable.items()
                if why.startswith("no ")]

    def intervals(self) -> dict[str, list[float]] | None:
        """2.5 and 97.5 percentiles of each cost over the bootstrap and the alternatives."""
        if self.draws is None:
            return None
        low, high = np.percentile(self.draws, [2.5, 97.5], axis=0)
        if self.alternatives:
            stack = np.vstack(self.alternatives)
            low, high = np.minimum(low, stack.min(axis=0)), np.maximum(high, stack.max(axis=0))
        return {name: [float(lo), float(hi)] for name, lo, hi in zip(COEFFICIENTS, low, high)}

    def to_dict(self) -> dict:
        return {"coefficients": self.coefficients, "intervals": self.intervals(), "r2": self.r2,
                "rmse_ms": self.rmse_ms, "steps": self.steps, "max_running": self.max_running,
                "unseparable": dict(self.unseparable),
                "alternatives": [dict(zip(COEFFICIENTS, map(float, v))) for v in self.alternatives]}


@dataclass
class Moments:
    """The design's sums, gathered chunk by chunk: the fit never builds the steps x 4 matrix."""

    gram: np.ndarray        # xᵀx
    xy: np.ndarray          # xᵀy
    yy: float
    n: int
    low: np.ndarray         # per column
    high: np.ndarray
    scale: np.ndarray       # max |x| per column (1 where 0): columns scaled to [0, 1]

    @property
    def scaled_gram(self) -> np.ndarray:
        return self.gram / np.outer(self.scale, self.scale)


def chunks(samples: StepSamples):
    """(design, cycle) of consecutive pieces of the samples, CHUNK steps at most."""
    n = len(samples.cycle_ns)
    for lo in range(0, n, CHUNK):
        hi = min(lo + CHUNK, n)
        yield (design_matrix(samples.decode[lo:hi], samples.prefill[lo:hi], samples.context[lo:hi]),
               np.asarray(samples.cycle_ns[lo:hi], np.float64))


def moments(samples: StepSamples) -> Moments:
    p = len(COEFFICIENTS)
    gram, xy, yy = np.zeros((p, p)), np.zeros(p), 0.0
    low, high = np.full(p, np.inf), np.full(p, -np.inf)
    for x, y in chunks(samples):
        gram += x.T @ x
        xy += x.T @ y
        yy += float(y @ y)
        low, high = np.minimum(low, x.min(axis=0)), np.maximum(high, x.max(axis=0))
    scale = np.maximum(np.abs(low), np.abs(high))
    scale[scale == 0] = 1.0
    return Moments(gram, xy, yy, len(samples.cycle_ns), low, high, scale)


def solve(m: Moments, samples: StepSamples) -> np.ndarray:
    """NNLS from the normal equations of the columns scaled to [0, 1] (conditioning);
    coefficients in ns. The active-set loop runs on the 4 x 4 Cholesky factor. The
    normal equations square the design's condition number: one step of iterative
    refinement on the residual, summed chunk by chunk, wins back the lost digits."""
    coef = solve_normal(m.scaled_gram, m.xy / m.scale) / m.scale
    free = coef > 0
    if not free.any():
        return coef
    gradient = sum(x.T @ (y - x @ coef) for x, y in chunks(samples)) / m.scale
    g = m.scaled_gram[np.ix_(free, free)]
    refined = coef.copy()
    refined[free] += np.linalg.lstsq(g, gradient[free], rcond=None)[0] / m.scale[free]
    return refined if (refined[free] > 0).all() else coef


def fit(samples: StepSamples, draws: int = BOOTSTRAP_DRAWS, seed: int = 0) -> Fit:
    """Fit, bootstrap, and name what the design cannot separate; no model on too few steps."""
    n = len(samples.cycle_ns)
    columns = (samples.cycle_ns, samples.decode, samples.prefill, samples.context)
    if n < MIN_STEPS or not all(np.isfinite(v).all() for v in columns if v.dtype.kind == "f"):
        return Fit(None, None, None, n, samples.max_running)
    m = moments(samples)
    coef = solve(m, samples)
    rss = sum(float(((y - x @ coef) ** 2).sum()) for x, y in chunks(samples))
    mean_y = m.xy[0] / n
    total = sum(float(((y - mean_y) ** 2).sum()) for _, y in chunks(samples))
    unseparable = separability(m)
    return Fit(dict(zip(COEFFICIENTS, map(float, coef))),
               1.0 - rss / total if total > 0 else 1.0, float(np.sqrt(rss / n) / 1e6), n,
               samples.max_running, bootstrap(samples, m.scale, draws, seed), unseparable,
               alternatives(m, rss, coef, unseparable))


def _regressed(m: Moments, j: int) -> tuple[list[int], np.ndarray, float, float]:
    """Column j regressed on the others, from the scaled normal equations: (the others,
    weights in scaled units, residual and total sums of squares of the scaled column)."""
    g = m.scaled_gram
    others = [k for k in range(g.shape[0]) if k != j]
    w = np.linalg.lstsq(g[np.ix_(others, others)], g[others, j], rcond=None)[0]
    residual = float(g[j, j] - 2 * w @ g[others, j] + w @ g[np.ix_(others, others)] @ w)
    total = float(g[j, j] - g[0, j] ** 2 / g[0, 0])
    return others, w, max(residual, 0.0), total


def separability(m: Moments) -> dict[str, str]:
    """Terms whose column never varied or is (nearly) a combination of the others."""
    out = {}
    for j in range(1, len(COEFFICIENTS)):
        if m.low[j] == m.high[j]:
            what = TERM_NAMES[j].removeprefix("per ")
            out[COEFFICIENTS[j]] = (f"no {what}s in the data" if m.low[j] == 0 else
                                    f"{what}s never varied (always {m.low[j]:g})")
            continue
        _, _, residual, total = _regressed(m, j)
        r2 = 1 - residual / total if total > 0 else 1.0
        if r2 >= COLLINEAR_R2:
            out[COEFFICIENTS[j]] = (f"{TERM_NAMES[j].removeprefix('per ')} moved in step with the "
                                    f"other terms (R² {r2:.4f})")
    return out


def alternatives(m: Moments, best_rss: float, best: np.ndarray,
                 unseparable: dict[str, str]) -> list[np.ndarray]:
    """For each unseparable term, the two ends of the costs that fit the data as well as the
    best: move along the direction that trades the term for the combination of the others
    it follows, as far as costs stay non-negative and the residual sum of squares grows by
    less than the 99 % point of chi2(1) times the noise variance."""
    n, p = m.n, len(COEFFICIENTS)
    sigma2 = max(best_rss / max(n - p, 1), 1e-12 * m.yy / n)
    out = []
    for name in unseparable:
        j = COEFFICIENTS.index(name)
        if m.low[j] == 0 and m.high[j] == 0:
            continue
        others, w_scaled, off_scaled, _ = _regressed(m, j)
        direction = np.zeros(p)      # in ns units: x_j - x_others w
        direction[j], direction[others] = 1.0, -w_scaled * m.scale[j] / m.scale[others]
        off = off_scaled * m.scale[j] ** 2
        reach = np.sqrt(F99 * sigma2 / off) if off > 0 else np.inf
        for sign in (1.0, -1.0):
            d = sign * direction
            shrinking = d < 0
            t = min(reach, float(np.min(best[shrinking] / -d[shrinking])) if shrinking.any() else np.inf)
            if 0 < t < np.inf:
                out.append(np.maximum(best + t * d, 0.0))
    return out


def bootstrap(samples: StepSamples, scale: np.ndarray, draws: int, seed: int) -> np.ndarray:
    """Coefficients refitted on moving-block resamples of the steps. A draw's normal
    equations are sums of its blocks' (prefix sums of each step's x xᵀ and x y), so a draw
    costs its number of blocks, not its number of steps (summed by a numba kernel).

    Blocks start on multiples of a stride of 1/8 of a block (1 below 8-step blocks, i.e.
    below 4,096 steps), so the prefix sums are kept per stride, not per step: a long trace's
    bootstrap needs 14 x 8 bytes per stride instead of per step."""
    from kvprof.analysis._kernels import block_sums

    n, p = len(samples.cycle_ns), len(COEFFICIENTS)
    block = max(1, min(n // 4, int(round(n ** (1 / 3)))))
    stride = max(1, block // 8)
    per_block = max(1, block // stride)                 # a block is a whole number of strides
    prefix = _stride_prefix(samples, scale, stride)
    rng, blocks = np.random.default_rng(seed), -(-n // (per_block * stride))
    # the draws' block starts a few draws at a time (the same numbers as all at once: the
    # generator's stream does not depend on how it is cut): 100 MB for 200 draws of a day
    at_once = max(1, STARTS_AT_ONCE // blocks)
    sums = np.vstack([block_sums(prefix, rng.integers(0, prefix.shape[0] - per_block,
                                                      size=(min(at_once, draws - lo), blocks)),
                                 per_block)
                      for lo in range(0, draws, at_once)])
    upper = np.triu_indices(p)
    out = np.empty((draws, p))
    g = np.empty((p, p))
    for d in range(draws):
        g[upper] = sums[d, :upper[0].size]
        g.T[upper] = g[upper]
        out[d] = solve_normal(g, sums[d, upper[0].size:]) / scale
    return out


def _stride_prefix(samples: StepSamples, scale: np.ndarray, stride: int) -> np.ndarray:
    """Prefix sums, every ``stride`` steps, of each step's scaled x xᵀ (its upper half: it
    is symmetric) and x y; steps after the last whole stride are left out. Built a chunk
    of whole strides at a time."""
    p = len(COEFFICIENTS)
    m = len(samples.cycle_ns) // stride
    upper = np.triu_indices(p)
    prefix = np.zeros((m + 1, upper[0].size + p))
    per_chunk = max(1, CHUNK // stride) * stride
    for lo in range(0, m * stride, per_chunk):
        hi = min(lo + per_chunk, m * stride)
        xs = design_matrix(samples.decode[lo:hi], samples.prefill[lo:hi], samples.context[lo:hi]) / scale
        y = np.asarray(samples.cycle_ns[lo:hi], np.float64)
        products = [(xs[:, i], xs[:, j]) for i, j in zip(*upper)] + [(xs[:, j], y) for j in range(p)]
        rows = slice(1 + lo // stride, 1 + hi // stride)
        for k, (a, b) in enumerate(products):
            per_step = a * b
            prefix[rows, k] = per_step.reshape(-1, stride).sum(axis=1) if stride > 1 else per_step
    np.cumsum(prefix[1:], axis=0, out=prefix[1:])
    return prefix


def solve_normal(g: np.ndarray, h: np.ndarray) -> np.ndarray:
    """NNLS from the normal equations g = xᵀx, h = xᵀy (through g's Cholesky factor)."""
    ridge = 1e-12 * max(float(np.trace(g)), 1e-300)
    r = np.linalg.cholesky(g + ridge * np.eye(len(g))).T
    return nnls(r, np.linalg.solve(r.T, h))


def term_times(coef: np.ndarray, decode, prefill, context) -> np.ndarray:
    """Time of each term summed over the given steps (ns), in COEFFICIENTS order."""
    totals = np.array([len(decode), np.sum(decode), np.sum(prefill), np.sum(context)], np.float64)
    return coef * totals
