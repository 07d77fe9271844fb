"""A data-parallel deployment (one trace per replica) analysed whole: merged latencies equal
the simulation's over both replicas, tokens add up, the balance is what was sent where."""
from __future__ import annotations

import json

import numpy as np
import pytest

from kvprof.analysis import analyze
from kvprof.analysis.deployment import deployment
from kvprof.cli.main import main
from kvprof.format.reader import read_trace

from .synthetic import build, mixed_specs
from .test_analysis import assert_summary, attach_arrivals, ref_summary


def latency_values(truth) -> dict[str, list[float]]:
    """Each finished request's latencies straight from the simulation (ms)."""
    out = {"ttft": [], "e2e": [], "tpot": [], "itl": [], "queue": []}
    for r in truth.finished():
        times = [t for _, t in r.emissions]
        out["ttft"].append((times[0] - r.spec_arrival_ns) / 1e6)
        out["e2e"].append((times[-1] - r.spec_arrival_ns) / 1e6)
        out["queue"].append((r.first_scheduled_ns - (r.spec_arrival_ns + 200_000)) / 1e6)
        if len(times) >= 2:
            out["tpot"].append((times[-1] - times[0]) / 1e6 / (len(times) - 1))
        out["itl"] += list(np.diff(times) / 1e6)
    return out


def simulated(folder, name: str, sizes) -> list[tuple]:
    """(path, simulation) of one synthetic trace per (requests, seed), at ``name.format(i)``."""
    out = []
    for i, (n, seed) in enumerate(sizes):
        path = folder / name.format(i)
        truth = build(path, mixed_specs(n, seed=seed))
        attach_arrivals(truth, path)
        out.append((path, truth))
    return out


@pytest.fixture(scope="module")
def replicas(tmp_path_factory):
    """Two replicas given unequal work: 30 and 10 requests."""
    folder = tmp_path_factory.mktemp("dp")
    traces = simulated(folder, "serve.dp{}.arrow", [(30, 1), (10, 2)])
    return folder / "serve.arrow", [truth for _, truth in traces]


def test_merged_latency_equals_all_requests_of_both_replicas(replicas):
    path, truths = replicas
    parts = [analyze(read_trace(str(path).replace(".arrow", f".dp{r}.arrow"))) for r in (0, 1)]
    dep = deployment(list(enumerate(parts)))
    values = [latency_values(t) for t in truths]
    for kind in ("ttft", "tpot", "itl", "e2e", "queue"):
        expected = ref_summary(values[0][kind] + values[1][kind])
        assert_summary(getattr(dep.latency, kind).to_dict(), expected)
    assert dep.requests_finished == sum(len(t.finished()) for t in truths) == 40
    assert dep.output_tokens == parts[0].tokens.output + parts[1].tokens.output
    start = min(a.span_ns[0] for a in parts)
    end = max(a.span_ns[1] for a in parts)
    assert dep.span_s == pytest.approx((end - start) / 1e9)
    assert dep.output_tokens_per_s == pytest.approx(dep.output_tokens / dep.span_s)
    assert [r.requests_finished for r in dep.replicas] == [30, 10]
    assert dep.balance.requests_max_over_mean == pytest.approx(30 / 20)
    assert dep.balance.busiest_rank == int(np.argmax([a.tokens.output for a in parts]))
    assert sum(r.request_share for r in dep.replicas) == pytest.approx(1)


def test_analyze_names_the_deployment(replicas, capsys):
    path, _ = replicas
    assert main(["analyze", str(path), "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert [r["trace"] for r in report["replicas"]] == [
        str(path).replace(".arrow", f".dp{r}.arrow") for r in (0, 1)]
    whole = report["deployment"]
    assert whole["requests_finished"] == 40 and whole["latency_ms"]["ttft"]["count"] == 40
    assert [r["rank"] for r in whole["replicas"]] == [0, 1]
    assert main(["analyze", str(path)]) == 0
    text = " ".join(capsys.readouterr().out.split())
    assert "Data-parallel deployment, 2 replicas" in text and "busiest replica" in text


def test_html_of_a_deployment_is_refused_in_one_line(replicas, capsys, tmp_path):
    path, _ = replicas
    assert main(["analyze", str(path), "--html", str(tmp_path / "x.html")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("kvprof: error: --html takes one trace") and err.count("\n") == 1


def test_a_deployments_summary_is_its_replicas_over_its_span(replicas, tmp_path, capsys):
    """Replicas run at once: merged, their summary's duration is the deployment's span."""
    from kvprof.format.summary_file import read_summary

    path, truths = replicas
    out = str(tmp_path / "dep.kvsum")
    assert main(["analyze", str(path), "--json", "--summary", out]) == 0
    dep = json.loads(capsys.readouterr().out)["deployment"]
    summary = read_summary(out)
    assert summary.duration_s == pytest.approx(dep["span_s"])
    assert summary.requests_finished == 40 and len(summary.traces) == 2
    values = [latency_values(t) for t in truths]
    for kind in ("ttft", "itl"):
        assert_summary(summary.to_dict()["latency_ms"][kind],
                       ref_summary(values[0][kind] + values[1][kind]))
