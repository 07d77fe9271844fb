"""The step-time model of a whole sweep: one joint fit over every batch size, each batch
size predicted from the others (leave one batch size out), and the throughput and latency
curves explained per added sequence with the fitted costs.

In decode a step with B sequences costs about fixed + B x (cost per sequence), so output
tokens/s ~ B / (fixed + B x per_sequence): it grows almost linearly while the fixed cost
dominates, reaches half its ceiling 1 / per_sequence at B = fixed / per_sequence, and then
each added sequence adds less and less. The cost per sequence is the decode request's own
cost, plus its context (attention) and its share of prefill.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from kvprof.analysis.predict import Prediction, Source, predict
from kvprof.analysis.step_model import Fit, StepSamples, fit


@dataclass
class HeldOut:
    """One batch size predicted from the others, against what it measured."""

    batch_size: int
    measured_output_tokens_per_s: float
    predicted: Prediction
    measured_e2e_ms: float
    interior: bool                    # between the smallest and largest batch sizes kept
    measured_range: list[float]       # lowest and highest round: the noise the error is set against
    step_time_ratio: float | None = None   # its steps' time / the others' model's, median
    matched: dict | None = None            # same-composition steps here and at another size
    round_ratios: list[float] | None = None   # the same ratio, round by round
    fresh_engines: bool = False            # each round ran on an engine of its own

    @property
    def speed(self) -> str | None:
        """Why its steps ran off the others' model, from its rounds (None: they did not).
        'setting' when every round, each on a fresh engine, ran off the model the same way
        (by at least half the threshold); 'noise' when a round ran on the model or on its
        other side; 'setting or spell' when one engine ran every round back to back (a slow
        spell of the machine looks the same)."""
        if self.step_time_ratio is None or abs(self.step_time_ratio - 1) < SLOWER:
            return None
        ratios = [r for r in self.round_ratios or [] if r is not None]
        if len(ratios) < 2:
            return "unknown"
        side = 1 if self.step_time_ratio > 1 else -1
        if min(side * (r - 1) for r in ratios) < SLOWER / 2:
            return "noise"
        return "setting" if self.fresh_engines else "setting or spell"

    def to_dict(self) -> dict:
        p = self.predicted
        tps = p.output_tokens_per_s
        return {"batch_size": self.batch_size, "interior": self.interior,
                "step_time_ratio": self.step_time_ratio, "round_ratios": self.round_ratios,
                "fresh_engines": self.fresh_engines, "speed": self.speed,
                "matched": self.matched,
                "measured_output_tokens_per_s": self.measured_output_tokens_per_s,
                "measured_range": self.measured_range,
                "predicted_output_tokens_per_s": tps, "interval": p.interval,
                "error": None if tps is None else tps / self.measured_output_tokens_per_s - 1,
                "measured_e2e_ms": self.measured_e2e_ms, "predicted_e2e_ms": p.mean_e2e_ms,
                "e2e_error": None if p.mean_e2e_ms is None
                else p.mean_e2e_ms / self.measured_e2e_ms - 1,
                "extrapolated": p.extrapolated, "refused": p.refused}


@dataclass
class SweepModel:
    fit: Fit
    per_sequence_ns: float | None     # decode + its context + its share of prefill
    predictions: list[Prediction]     # at each batch size run, from the joint fit
    leave_one_out: list[HeldOut]
    notes: list[str]
    engine_spread: float | None = None   # rounds of one setting on fresh engines: max/min - 1

    def to_dict(self) -> dict:
        return {**self.fit.to_dict(), "per_sequence_ns": self.per_sequence_ns,
                "predictions": [p.to_dict() for p in self.predictions],
                "leave_one_out": [h.to_dict() for h in self.leave_one_out],
                "engine_spread": self.engine_spread, "notes": self.notes}


def by_batch_size(sources: list[Source]) -> dict[int, list[Source]]:
    out: dict[int, list[Source]] = {}
    for s in sorted(sources, key=lambda s: s.batch_size):
        out.setdefault(s.batch_size, []).append(s)
    return out


def joint_fit(sources: list[Source]) -> Fit:
    return fit(StepSamples.join([s.samples for s in sources]))


def predict_for(f: Fit, workload: Source, batch_size: int) -> Prediction:
    return predict(f, workload.requests, batch_size, workload.token_budget, workload.block_size,
                   workload.blocks_total)


def sweep_model(sources: list[Source], fresh_engines: bool = False) -> SweepModel | None:
    """Joint fit, leave-one-batch-size-out, and the words; None without a usable fit.
    ``fresh_engines``: every round ran on an engine of its own (``--engine-per-round``)."""
    groups = by_batch_size(sources)
    f = joint_fit(sources)
    if f.coefficients is None:
        return None
    predictions = [predict_for(f, runs[0], b) for b, runs in groups.items()]
    held = leave_one_out(groups, fresh_engines)
    per_seq = per_sequence_ns(f, sources[0])
    spread = engine_spread(f, groups) if fresh_engines else None
    notes = explain(f, per_seq, groups, predictions, held)
    return SweepModel(f, per_seq, predictions, held,
                      notes + ([spread_note(spread, groups)] if spread is not None else []), spread)


def engine_spread(f: Fit, groups: dict[int, list[Source]]) -> float | None:
    """Engine-to-engine noise at one setting: the median over batch sizes of how far apart
    (max / min - 1) their rounds' step times lie against the joint model, each round having
    run on a fresh engine. Leave-one-out errors below it are within what the machine repeats."""
    spreads = []
    for runs in groups.values():
        ratios = [r for r in (step_time_ratio(f, s.samples) for s in runs) if r is not None]
        if len(ratios) > 1:
            spreads.append(max(ratios) / min(ratios) - 1)
    return float(np.median(spreads)) if spreads else None


def spread_note(spread: float, groups: dict[int, list[Source]]) -> str:
    rounds = min(len(runs) for runs in groups.values())
    return (f"Engine-to-engine noise: {rounds}+ rounds per batch size, each on a fresh engine, "
            f"ran the same work {spread:.0%} apart (median over batch sizes of slowest / fastest "
            f"round against the joint model). A leave-one-out error of that order is the "
            f"machine's, not the model's. A batch size whose rounds all ran off the model the "
            f"same way is marked `setting`: it repeated within this sweep, and only a sweep "
            f"repeated later shows whether it repeats beyond it.")


def leave_one_out(groups: dict[int, list[Source]], fresh_engines: bool = False) -> list[HeldOut]:
    """Each batch size predicted by a model fitted on the other batch sizes' steps, for the
    workload of the nearest other batch size (in a sweep every round runs the same prompts)."""
    sizes = list(groups)
    out = []
    for b in sizes:
        others = [s for size in sizes if size != b for s in groups[size]]
        f = joint_fit(others)
        if f.coefficients is None:
            continue
        nearest = min((s for s in others), key=lambda s: abs(s.batch_size - b))
        kept = [size for size in sizes if size != b]
        rates = [s.output_tokens_per_s for s in groups[b]]
        own = StepSamples.join([s.samples for s in groups[b]])
        out.append(HeldOut(b, _mean(rates), predict_for(f, nearest, b),
                           _mean(s.mean_e2e_ms for s in groups[b]), min(kept) < b < max(kept),
                           [min(rates), max(rates)], step_time_ratio(f, own),
                           matched_steps(b, own, {size: StepSamples.join([s.samples for s in runs])
                                                  for size, runs in groups.items() if size != b}),
                           [step_time_ratio(f, s.samples) for s in groups[b]], fresh_engines))
    return out


MIN_MATCHED = 5          # steps of one composition, at each of the two batch sizes compared
SLOWER = 0.10            # a batch size whose steps ran this much off the others' model


def step_time_ratio(f: Fit, samples: StepSamples) -> float | None:
    """Median of measured / modelled step time over a batch size's own steps, with the model
    fitted on the other batch sizes: 1 when the engine ran the same composition at the same
    speed; above 1 when it ran slower at this setting than the others predict."""
    if not samples.cycle_ns.size:
        return None
    modelled = samples.design() @ f.vector
    ok = modelled > 0
    return float(np.median(samples.cycle_ns[ok] / modelled[ok])) if ok.any() else None


def matched_steps(b: int, own: StepSamples, others: dict[int, StepSamples]) -> dict | None:
    """Evidence without a model: pure decode steps of one size (no prefill, the same number of
    decodes) at batch size ``b`` and at another batch size, their median step times and
    context per sequence. The decode count most common at ``b`` that another size also ran."""
    values, counts = np.unique(own.decode[own.prefill == 0], return_counts=True)
    for d in values[np.argsort(-counts)]:
        here = (own.prefill == 0) & (own.decode == d)
        if here.sum() < MIN_MATCHED:
            break
        for size, other in sorted(others.items(), key=lambda item: abs(item[0] - b)):
            there = (other.prefill == 0) & (other.decode == d)
            if there.sum() >= MIN_MATCHED:
                return {"decodes": int(d), "batch_size": b, "step_ms": _median_ms(own, here),
                        "context_per_sequence": float(np.median(own.context[here]) / d),
                        "steps": int(here.sum()), "other_batch_size": size,
                        "other_step_ms": _median_ms(other, there),
                        "other_context_per_sequence": float(np.median(other.context[there]) / d),
                        "other_steps": int(there.sum())}
    return None


def _median_ms(samples: StepSamples, mask: np.ndarray) -> float:
    return float(np.median(samples.cycle_ns[mask]) / 1e6)


def off_model_note(h: HeldOut) -> str | None:
    """A held-out batch size whose engine ran the same work at another speed: the part of the
    prediction error that no model of step composition can remove, and whether its rounds
    agree (a steady effect) or not (run-to-run speed)."""
    if h.step_time_ratio is None or abs(h.step_time_ratio - 1) < SLOWER:
        return None
    m = h.matched
    evidence = "" if m is None else (
        f" (steps of {m['decodes']} decodes and no prefill: {m['step_ms']:.1f} ms here, "
        f"{m['other_step_ms']:.1f} ms at batch size {m['other_batch_size']}, context "
        f"{m['context_per_sequence']:.0f} and {m['other_context_per_sequence']:.0f} tokens per "
        f"sequence)")
    predicted = h.predicted.output_tokens_per_s
    scaled = "" if predicted is None else (
        f" The prediction from the others, {predicted:,.0f} output tokens/s, divided by that "
        f"ratio is {predicted / h.step_time_ratio:,.0f} against {h.measured_output_tokens_per_s:,.0f} "
        f"measured: the error comes from the engine's speed at this batch size, not from the "
        f"workload's composition.")
    ratios = [r for r in h.round_ratios or [] if r is not None]
    rounds = ""
    if len(ratios) > 1:
        rounds = f" Its rounds ran at {', '.join(f'{r:.2f}x' for r in ratios)}: " + SPEED_WORDS[h.speed]
    return (f"bs {h.batch_size}: its steps took {h.step_time_ratio:.2f}x the time the other batch "
            f"sizes' model gives for the same composition{evidence}. The engine ran the same "
            f"work {'slower' if h.step_time_ratio > 1 else 'faster'} here than in the other "
            f"batch sizes' runs, which no model of step composition can predict from them."
            f"{rounds}{scaled}")


SPEED_WORDS = {
    "setting": "every one ran off the model the same way, each on a fresh engine at another "
               "time: an effect that repeats at this setting (of the setting itself, or a cost "
               "the model does not have), not noise.",
    "setting or spell": "every one ran off the model the same way, all on one engine back to "
                        "back (an effect of the setting, or a slow or fast spell of the machine: "
                        "`kvprof sweep --engine-per-round` tells them apart).",
    "noise": "some ran on the model or on its other side: the engine's (or the machine's) "
             "speed varied from run to run, so the error is noise, not an effect of the "
             "setting.",
}


def per_sequence_ns(f: Fit, workload: Source) -> float:
    """What one more sequence adds to a step: its decode, its context, its prefill per token out."""
    c = f.coefficients
    r = workload.requests
    out = np.maximum(r.output, 1).astype(np.float64)
    context = float(((r.prompt + r.output / 2) * out).sum() / out.sum())
    prefill = float(np.maximum(r.prompt - r.cached, 1).sum() / out.sum())
    return (c["per_decode_request_ns"] + c["per_context_token_ns"] * context
            + c["per_prefill_token_ns"] * prefill)


def explain(f: Fit, per_seq: float, groups: dict[int, list[Source]],
            predictions: list[Prediction], held: list[HeldOut] = ()) -> list[str]:
    """Where throughput stops scaling and why, and what each added sequence costs in latency."""
    c = f.coefficients
    notes = []
    if f.unseparable:
        notes.append("The data cannot separate: " + "; ".join(f.unseparable.values())
                     + " (predictions that lean on these terms carry a wider interval).")
    if per_seq > 0:
        half = c["fixed_ns"] / per_seq
        notes.append(
            f"Each added sequence costs {per_seq / 1e6:.3f} ms per step (decode "
            f"{c['per_decode_request_ns'] / 1e6:.3f} ms, its context and its share of prefill "
            f"the rest) against a fixed {c['fixed_ns'] / 1e6:.3f} ms per step: output tokens/s "
            f"tends to {1e9 / per_seq:,.0f} and reaches half of it at {half:.1f} sequences, "
            f"80 % at {4 * half:.1f}; beyond that each added sequence adds less throughput "
            f"and about {per_seq / 1e6:.3f} ms to every token's time.")
    sizes = list(groups)
    for a, b, pa_, pb in zip(sizes, sizes[1:], predictions, predictions[1:]):
        notes.append(step_note(a, b, groups, pa_, pb))
    notes += [off_model_note(h) for h in held]
    return [n for n in notes if n]


def step_note(a: int, b: int, groups: dict[int, list[Source]], pa_: Prediction,
              pb: Prediction) -> str | None:
    """One grid step: throughput and latency per added sequence, measured and modelled, the
    term through which the step time rose, and the limits met."""
    added = pb.mean_running - pa_.mean_running
    if added <= 0 or pa_.step_ms is None or pb.step_ms is None:
        return None
    ra, rb = (_mean(s.output_tokens_per_s for s in groups[x]) for x in (a, b))
    ta, tb = (_mean(s.mean_tpot_ms for s in groups[x]) for x in (a, b))
    ea, eb = (_mean(s.mean_e2e_ms for s in groups[x]) for x in (a, b))
    rise = {name: (pb.term_shares[name] * pb.step_ms - pa_.term_shares[name] * pa_.step_ms) / added
            for name in pb.term_shares}
    top = max(rise, key=rise.get)
    return (f"bs {a}→{b} (+{added:.1f} sequences running on average): output tokens/s "
            f"{ra:,.0f}→{rb:,.0f}, {(rb - ra) / added:+,.1f} per added sequence (model "
            f"{(pb.output_tokens_per_s - pa_.output_tokens_per_s) / added:+,.1f}); TPOT "
            f"{ta:.1f}→{tb:.1f} ms, {(tb - ta) / added:+.2f} ms per added sequence; model step "
            f"time {pa_.step_ms:.1f}→{pb.step_ms:.1f} ms, {(pb.step_ms - pa_.step_ms) / added:+.2f} "
            f"ms per added sequence, most of it {TERM_WORDS[top]} ({rise[top] * 1e3:+.0f} µs); "
            f"end-to-end {ea:,.0f}→{eb:,.0f} ms, {(eb - ea) / added:+,.1f} ms per added sequence"
            + _limits(groups[b], pb) + ".")


TERM_WORDS = {"fixed_ns": "the fixed cost", "per_decode_request_ns": "decode requests",
              "per_prefill_token_ns": "prefill tokens", "per_context_token_ns": "context attended"}


def _limits(runs: list[Source], p: Prediction) -> str:
    """Capacity and budget limits met at this batch size (measured), and a batch not kept full."""
    out = []
    preempted = sum(s.preemptions for s in runs)
    if preempted:
        out.append(f"the KV pool filled ({preempted} preemptions)")
    elif p.fits_kv is False:
        out.append(f"needs {p.kv_blocks_needed} KV blocks of {runs[0].blocks_total}")
    budget = _mean(s.budget_share for s in runs)
    if budget > 0.05:
        out.append(f"{budget:.0%} of steps used the whole token budget ({runs[0].token_budget})")
    if p.mean_running < 0.85 * p.batch_size:
        out.append(f"the batch is not kept full ({p.mean_running:.1f} of {p.batch_size} on "
                   f"average: ramp-up and drain of {len(runs[0].requests.prompt)} requests)")
    return "; " + "; ".join(out) if out else ""


def _mean(values) -> float:
    values = [v for v in values if v is not None]
    return float(np.mean(values)) if values else float("nan")
