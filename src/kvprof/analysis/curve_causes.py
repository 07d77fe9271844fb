"""Why a memory component changed slope: the per-run facts of a sweep, joined to its knots.

Each kind of component has its own candidates (KV: pool full, prefix sharing, batch not
filled, block rounding, context growth; activations: token budget, CUDA-graph padding;
allocator reserve), tried in that order against the facts on both sides of the knot.
An aggregate (total, EngineCore RSS) takes the cause of the contributing component whose
slope changed most like its own.
"""
from __future__ import annotations

import math
from typing import TYPE_CHECKING

import numpy as np

from kvprof.analysis.curve_fit import MIN_RELATIVE_CHANGE, Breakpoint, SeriesResult, design_matrix
from kvprof.analysis.curve_words import Units, at_batch_sizes, count_text

MIN_TOKEN_CHANGE = 0.10       # tokens held per sequence must move this much to explain a KV change
MIN_SHARING_CHANGE = 0.05     # kv_sharing must move this much to explain a KV change
AGGREGATES = ("total", "engine_process")
CONTRIBUTORS = ("kv_in_use_peak", "activation_workspace", "allocator_reserve", "non_torch",
                "weights", "kv_pool_reserved")
KV_COMPONENTS = ("kv_in_use_peak", "kv_in_use_mean")

if TYPE_CHECKING:
    from kvprof.analysis.curve import SweepPoint


class Evidence:
    """Per-run facts by batch size (mean over points that share a batch size)."""

    def __init__(self, points: list[SweepPoint]):
        grouped: dict[int, list[dict]] = {}
        for p in points:
            grouped.setdefault(int(p.batch_size), []).append(p.evidence or {})
        self.by_bs = {bs: _merge(evs) for bs, evs in grouped.items()}

    def values(self, key: str, bss) -> list[tuple[int, float]]:
        """(batch size, value) for the given batch sizes where the fact is known."""
        out = []
        for bs in bss:
            v = self.by_bs.get(int(bs), {}).get(key)
            if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v):
                out.append((int(bs), float(v)))
        return out

    def mean(self, key: str, bss) -> float | None:
        vals = [v for _, v in self.values(key, bss)]
        return float(np.mean(vals)) if vals else None

    def first(self, key: str):
        for bs in sorted(self.by_bs):
            v = self.by_bs[bs].get(key)
            if v is not None:
                return v
        return None


def _merge(evs: list[dict]) -> dict:
    out = {}
    for key in {k for e in evs for k in e}:
        vals = [e[key] for e in evs if e.get(key) is not None]
        numbers = [v for v in vals if isinstance(v, (int, float)) and not isinstance(v, bool)]
        out[key] = float(np.mean(numbers)) if numbers and len(numbers) == len(vals) else (
            vals[0] if vals else None)
    return out


def attribute(b: Breakpoint, r: SeriesResult, results: dict, ev: Evidence, u: Units) -> None:
    """Fill b.cause / b.reason from the component's kind and the per-run facts."""
    name = r.series.name
    if name in AGGREGATES:
        _attribute_aggregate(b, results, ev, u)
    elif name in KV_COMPONENTS:
        b.cause, b.reason = _kv_cause(b, r.series.x, ev, u)
    elif name == "activation_workspace":
        b.cause, b.reason = _activation_cause(b, r.series.x, ev)
    elif name == "allocator_reserve" and b.change_per_seq > 0:
        b.cause, b.reason = "allocator_reserve_growth", (
            f"torch's allocator keeps {u.auto(b.change_per_seq)} more per added sequence "
            f"in reserve (reserved - allocated) beyond batch size {b.bs}")


def _sides(x: np.ndarray, bs: int):
    return x[x <= bs], x[x > bs], x[x >= bs]


def _kv_cause(b: Breakpoint, x: np.ndarray, ev: Evidence, u: Units) -> tuple[str | None, str]:
    """Pool full, prefix sharing, batch not filled, then what the sequences held."""
    before, after, from_knot = _sides(x, b.bs)
    if b.change_per_seq < 0:
        facts = capacity_facts(from_knot, ev)
        if facts:
            return "kv_capacity_limit", "KV blocks in use reached the usable pool (" + "; ".join(facts) + ")"
    shared = _sharing_fact(b.bs, before, after, ev)
    if shared:
        return "prefix_sharing", shared
    if b.change_per_seq < 0:
        filled = _unfilled_facts(from_knot, ev)
        if filled:
            return "batch_not_filled", "; ".join(filled)
    bps_b, bps_a = ev.mean("mean_blocks_per_seq", before), ev.mean("mean_blocks_per_seq", after)
    tok_b, tok_a = ev.mean("mean_context_tokens", before), ev.mean("mean_context_tokens", after)
    if not (bps_b and bps_a and tok_b and tok_a):
        return None, "no per-run fact explains it"
    r_blocks, r_tokens = bps_a / bps_b, tok_a / tok_b
    held = (f"mean tokens held per sequence {count_text(tok_b)} \u2192 {count_text(tok_a)} "
            f"(x{r_tokens:.2f}), blocks per sequence {bps_b:.2f} \u2192 {bps_a:.2f} (x{r_blocks:.2f})")
    if abs(math.log(r_blocks / r_tokens)) > math.log(1 + MIN_RELATIVE_CHANGE):
        size = ev.first("block_size")
        return "block_rounding", (f"{held}: each sequence pays whole blocks"
                                  + (f" of {count_text(size)} tokens" if size else "")
                                  + ", so the blocks moved far more than the tokens")
    if abs(math.log(r_tokens)) >= math.log(1 + MIN_TOKEN_CHANGE):
        return "kv_context_growth", (f"{held}: KV memory follows the tokens held, linear in "
                                     f"tokens, not quadratic")
    return None, f"{held}: neither moved enough to explain it"


def _sharing_fact(bs: int, before, after, ev: Evidence) -> str:
    """Sequences sharing prefix blocks more on one side of the knot than on the other."""
    sh_b, sh_a = ev.mean("kv_sharing", before), ev.mean("kv_sharing", after)
    if sh_b is None or sh_a is None or abs(sh_a - sh_b) < MIN_SHARING_CHANGE:
        return ""
    bps_b, bps_a = ev.mean("mean_blocks_per_seq", before), ev.mean("mean_blocks_per_seq", after)
    return (f"sequences share prefix blocks (prefix caching): {100 * sh_a:.0f} % of the blocks "
            f"they would need alone are shared above batch size {bs}, {100 * sh_b:.0f} % up to it"
            + (f"; blocks in use per sequence {bps_b:.2f} \u2192 {bps_a:.2f}" if bps_b and bps_a else ""))


def capacity_facts(bss, ev: Evidence) -> list[str]:
    """Facts that the KV pool was full at these batch sizes (empty: it was not)."""
    usable = dict(ev.values("kv_blocks_usable", bss))
    full = [(bs, v) for bs, v in ev.values("kv_peak_blocks", bss)
            if usable.get(bs, 0) > 0 and v >= 0.9 * usable[bs]]
    preempted = [(bs, v) for bs, v in ev.values("preemptions", bss) if v > 0]
    if not (full or preempted):
        return []
    facts = []
    if full:
        share = min(v / usable[bs] for bs, v in full)
        facts.append(at_batch_sizes(full, "peak blocks in use") + f", at least {100 * share:.0f} % of the "
                     f"usable pool ({count_text(usable[full[0][0]])} blocks)")
    if preempted:
        facts.append(at_batch_sizes(preempted, "preemptions"))
    short = [(bs, v) for bs, v in ev.values("peak_running", bss) if v < bs]
    if short:
        facts.append("at most " + at_batch_sizes(short, "sequences ran") + ", below max_num_seqs")
    waiting = [(bs, v) for bs, v in ev.values("waiting_peak", bss) if v > 0]
    if waiting and (short or preempted):
        facts.append("up to " + at_batch_sizes(waiting, "requests waited"))
    return facts


def _unfilled_facts(bss, ev: Evidence) -> list[str]:
    short = [(bs, v) for bs, v in ev.values("peak_running", bss) if v < 0.9 * bs]
    return [f"at most {at_batch_sizes(short, 'sequences ran')} with the KV pool not full: too few "
            f"requests to fill the batch"] if short else []


def _activation_cause(b: Breakpoint, x: np.ndarray, ev: Evidence) -> tuple[str | None, str]:
    before, after, _ = _sides(x, b.bs)
    sat_b = ev.mean("budget_saturated_share", before) or 0.0
    sat_a = ev.mean("budget_saturated_share", after)
    budget = ev.first("token_budget")
    if b.change_per_seq < 0 and sat_a is not None and sat_a >= 0.5 and sat_a - sat_b >= 0.25:
        return "token_budget_saturated", (
            f"{100 * sat_a:.0f} % of steps scheduled the whole token budget"
            + (f" of {count_text(budget)} tokens" if budget else "")
            + f" above batch size {b.bs} ({100 * sat_b:.0f} % up to it): the forward stops "
              f"growing with the batch")
    padded = _padding_facts(x, b.bs, ev)
    if padded:
        return "cudagraph_padding", ("the batch is padded up to the next CUDA-graph capture "
                                     "size, so activation memory moves in steps: " + "; ".join(padded))
    if sat_a is not None and sat_a >= 0.5:
        return "token_budget_saturated", (f"{100 * sat_a:.0f} % of steps scheduled the whole "
                                          f"token budget above batch size {b.bs}")
    return None, "no per-run fact explains it"


def _padding_facts(x: np.ndarray, bs: int, ev: Evidence) -> list[str]:
    """Batch sizes near the knot whose forward ran padded to a larger capture size."""
    sizes = sorted({int(s) for v in ev.by_bs.values()
                    for s in (v.get("cudagraph_capture_sizes") or [])})
    if not sizes:
        return []
    k = int(np.flatnonzero(x == bs)[0]) if np.any(x == bs) else 0
    near = x[max(k - 1, 0):k + 2]
    running = dict(ev.values("peak_running", near))
    facts = []
    for b in near:
        n = int(running.get(int(b), b))
        pad = next((s for s in sizes if s >= n), None)
        if pad is not None and pad != n:
            facts.append(f"{n} sequences ran padded to {pad} at batch size {int(b)}")
    return facts


def _attribute_aggregate(b: Breakpoint, results: dict, ev: Evidence, u: Units) -> None:
    """The contributing component whose slope changed most like the aggregate's, and its cause."""
    best = None
    for name in CONTRIBUTORS:
        r = results.get(name)
        if r is None or r.fit is None:
            continue
        change = _local_change(r, b.bs)
        if change is None or change * b.change_per_seq <= 0:
            continue
        score = abs(change - b.change_per_seq)
        if best is None or score < best[0]:
            best = (score, name, change, r)
    if best is None:
        b.reason = "no measured component changed slope the same way here"
        return
    _, name, change, r = best
    own = [c for c in r.breakpoints if c.significant and abs(_index(r, c.bs) - _index(r, b.bs)) <= 1
           and c.change_per_seq * change > 0]
    cause = own[0].cause if own else None
    reason = own[0].reason if own else ""
    if cause is None and name != "non_torch":
        probe = Breakpoint(b.bs, 0.0, change, change, 1.0, True, None, None, 0, "", name)
        attribute(probe, r, results, ev, u)
        cause, reason = probe.cause, probe.reason
    b.component, b.cause = name, cause
    b.reason = f"{name} changed slope by {u.auto(change, True)} per sequence there"
    if own:
        b.reason += f" (see {name} below)"
    elif reason:
        b.reason += f" ({reason})"


def _index(r: SeriesResult, bs: int) -> int:
    hits = np.flatnonzero(r.series.x == bs)
    return int(hits[0]) if hits.size else -99


def _local_change(r: SeriesResult, bs: int) -> float | None:
    """A component's slope change around ``bs``: after - before, from its fitted pieces over
    the neighbouring batch sizes (so a knot one step away still counts)."""
    x = r.series.x
    k = _index(r, bs)
    if k < 1 or k > x.size - 2:
        return None
    fitted = design_matrix(x, r.fit.knots) @ r.fit.coef
    lo, hi = max(k - 2, 0), min(k + 2, x.size - 1)
    before = (fitted[k] - fitted[lo]) / (x[k] - x[lo])
    after = (fitted[hi] - fitted[k]) / (x[hi] - x[k])
    return float(after - before)
