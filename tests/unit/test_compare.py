"""``kvprof compare`` against planted differences with known answers.

Synthetic traces (``synthetic.py``) differ in one thing at a time: the step-time model
(slower steps), prefix hits, preemptions, the engine configuration or the workload.
Each comparison must find the planted change with the right sign and size, computed
here from the simulation's ground truth, and a trace compared with itself must show
no significant change.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from kvprof.analysis.compare import RunInput, compare, ks_distance
from kvprof.cli.main import main
from kvprof.format.reader import read_trace

from .synthetic import Engine, Spec, build, mixed_specs

GOLDEN = Path(__file__).resolve().parents[1] / "data" / "golden-1.0" / "trace.arrow"
SLOW = (6e6, 50e3, 4e3, 100.0)          # three times the default fixed cost per step


def specs(n=24, cached=0, prompt_extra=0, preempt=()) -> list[Spec]:
    """n requests at step 0 (and a few later), prompts 100..560 tokens, 20 outputs each."""
    return [Spec(100 + 20 * i + prompt_extra, 20, arrival_step=i % 3, cached=cached,
                 preempt_at=preempt if i < 3 else ()) for i in range(n)]


def run(tmp_path, name, spec_list, engine=None):
    path = tmp_path / f"{name}.arrow"
    truth = build(path, spec_list, engine or Engine())
    return RunInput(name, str(path), [read_trace(str(path))]), truth


def duration_s(truth) -> float:
    return (truth.steps["t_update_end_ns"][-1] - truth.steps["t_schedule_start_ns"][0]) / 1e9


def mean_tpot_ms(truth) -> float:
    return float(np.mean([(r.emissions[-1][1] - r.emissions[0][1]) / 1e6 / (len(r.emissions) - 1)
                          for r in truth.finished() if len(r.emissions) > 1]))


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    return run(tmp_path_factory.mktemp("base"), "base", specs())


def test_a_trace_compared_with_itself_shows_no_significant_change(tmp_path):
    trace = read_trace(str(GOLDEN))
    c = compare([RunInput("a", str(GOLDEN), [trace]), RunInput("b", str(GOLDEN), [trace])])
    assert c.noise.method == "bootstrap" and c.config_differences == [] and c.warnings == []
    tested = [m for m in c.metrics if m.significant[1] is not None]
    assert len(tested) >= 30
    for m in c.metrics:
        assert m.significant[1] is not True, m.name
        if m.values[0] is not None:
            assert m.values[0] == m.values[1] and m.change[1]["absolute"] == 0, m.name


def test_slower_steps_are_found_with_their_sign_and_size(tmp_path, base):
    slow, slow_truth = run(tmp_path, "slow", specs(), Engine(model_ns=SLOW))
    base_run, base_truth = base
    c = compare([base_run, slow])
    tokens = sum(r.emitted for r in base_truth.requests)
    assert sum(r.emitted for r in slow_truth.requests) == tokens
    out = c.metric("output_tokens_per_s")
    assert out.values == pytest.approx([tokens / duration_s(base_truth), tokens / duration_s(slow_truth)])
    assert out.change[1]["relative"] == pytest.approx(duration_s(base_truth) / duration_s(slow_truth) - 1)
    assert out.change[1]["relative"] < -0.3 and out.significant[1] is True
    tpot = c.metric("tpot_mean_ms")
    assert tpot.values == pytest.approx([mean_tpot_ms(base_truth), mean_tpot_ms(slow_truth)])
    assert tpot.change[1]["absolute"] > 0 and tpot.significant[1] is True
    fixed = c.metric("step_model_fixed_ns")
    assert fixed.change[1]["absolute"] == pytest.approx(SLOW[0] - Engine().model_ns[0], rel=1e-4)
    assert fixed.significant[1] is None          # a fitted term: nothing to resample
    decode = c.metric("step_model_per_decode_request_ns")
    assert decode.values == pytest.approx([50e3, 50e3], rel=1e-3)
    # the batch is the same: the scheduler saw the same requests in the same steps
    assert c.metric("mean_running").change[1]["absolute"] == 0
    assert c.metric("mean_running").significant[1] is False
    assert c.config_differences == [] and c.warnings == []


def test_prefix_hits_and_preemptions_planted(tmp_path, base):
    cached, cached_truth = run(tmp_path, "cached", specs(cached=64, preempt=(8,)))
    c = compare([base[0], cached])
    hit = c.metric("prefix_hit_rate")
    expected = sum(r.spec.cached for r in cached_truth.requests) / sum(
        r.spec.prompt for r in cached_truth.requests)
    assert hit.values == pytest.approx([0.0, expected])
    assert hit.change[1]["absolute"] == pytest.approx(expected) and hit.change[1]["relative"] is None
    assert hit.significant[1] is True
    pre = c.metric("preemptions")
    planted = int(cached_truth.steps["preemptions"].sum())
    assert planted >= 1 and pre.values == [0.0, planted] and pre.change[1]["absolute"] == planted
    assert c.metric("preempted_tokens").values[1] == cached_truth.preempted_tokens > 0
    assert c.metric("ttft_mean_ms").change[1]["absolute"] < 0     # less prefill to do
    assert c.warnings == []                   # same prompts: the cache does not change the workload


def test_configuration_differences_are_listed(tmp_path, base):
    other, _ = run(tmp_path, "four", specs(), Engine(max_num_seqs=4))
    c = compare([base[0], other])
    assert c.config_differences == [{"key": "engine.max_num_seqs", "values": [8, 4]}]
    running = c.metric("mean_running")
    assert running.change[1]["absolute"] < 0 and running.significant[1] is True
    assert c.metric("max_running").values == [8.0, 4.0]


def test_a_different_workload_is_warned_about(tmp_path, base):
    longer, _ = run(tmp_path, "longer", specs(prompt_extra=200))
    fewer, _ = run(tmp_path, "fewer", specs(n=12))
    c = compare([base[0], longer, fewer])
    assert len(c.runs) == 3 and all(len(m.values) == 3 for m in c.metrics)
    text = "\n".join(c.warnings)
    assert "longer vs base: the workloads differ: prompt lengths mean 330.0 vs 530.0" in text
    assert "fewer vs base: the workloads differ: 24 vs 12 requests" in text
    assert "longer vs base: the workloads differ: 24" not in text


def test_ks_distance():
    assert ks_distance(np.array([1.0, 2, 3]), np.array([1.0, 2, 3])) == 0
    assert ks_distance(np.array([1.0, 2]), np.array([3.0, 4])) == 1
    assert ks_distance(np.array([1.0, 2, 3, 4]), np.array([1.0, 2, 3, 5])) == pytest.approx(0.25)


def test_rounds_decide_significance_when_every_run_has_several(tmp_path):
    def rounds(name, fixed_costs):
        paths = []
        for i, fixed in enumerate(fixed_costs):
            path = tmp_path / f"{name}-{i}.arrow"
            build(path, specs(), Engine(model_ns=(fixed, 50e3, 4e3, 100.0)))
            paths.append(read_trace(str(path)))
        return RunInput(name, name, paths)

    a, a2, b = rounds("a", (2e6, 2.1e6)), rounds("a2", (2.1e6, 2e6)), rounds("b", (4e6, 4.1e6))
    c = compare([a, a2, b])
    assert c.noise.method == "rounds"
    out = c.metric("output_tokens_per_s")
    spread = max(abs(out.rounds[0][0] - out.rounds[0][1]), abs(out.rounds[2][0] - out.rounds[2][1]))
    assert out.significant == [None, False, True]
    assert out.interval[2] == pytest.approx([-spread, spread])
    assert out.values[0] == pytest.approx(np.mean(out.rounds[0]))
    fixed = c.metric("step_model_fixed_ns")        # rounds test the fitted terms too
    assert fixed.significant == [None, False, True]
    assert fixed.change[2]["absolute"] == pytest.approx(2e6, rel=1e-3)


def test_the_bootstrap_is_seeded(base, tmp_path):
    slow, _ = run(tmp_path, "slow", specs(), Engine(model_ns=SLOW))
    one = compare([base[0], slow], seed=3).to_dict()
    assert one == compare([base[0], slow], seed=3).to_dict()
    assert one["noise"] == {**one["noise"], "method": "bootstrap", "seed": 3, "resamples": 400}


# ------------------------------------------------------------------ the command
def test_cli_json_keys_and_html(tmp_path, capsys, base):
    slow, _ = run(tmp_path, "slow", specs(), Engine(model_ns=SLOW))
    html = tmp_path / "c.html"
    assert main(["compare", base[0].source, slow.source, "--json", "--html", str(html),
                 "--labels", "fast,slow"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert {"runs", "metrics", "config_differences", "warnings", "noise"} <= set(report)
    assert [r["label"] for r in report["runs"]] == ["fast", "slow"]
    assert report["runs"][0]["configuration"]["engine.max_num_seqs"] == 8
    names = {m["name"] for m in report["metrics"]}
    assert {"output_tokens_per_s", "ttft_p99_ms", "itl_p50_ms", "queue_mean_ms", "mean_running",
            "mean_kv_blocks_used", "prefix_hit_rate", "preemptions", "step_model_fixed_ns",
            "memory_kv_in_use_peak_bytes"} <= names
    for m in report["metrics"]:
        assert {"name", "values", "change", "significant"} <= set(m)
    page = html.read_text()
    assert page.startswith("<!DOCTYPE html>") and "data:image/png;base64" in page


def test_cli_text_report(capsys, base):
    assert main(["compare", base[0].source, base[0].source]) == 0
    out = capsys.readouterr().out
    assert "baseline base#1" in out and "Configuration differences" in out
    assert "ttft_p99_ms" in out and "(noise)" in out


def sweep_folder(root: Path, name: str, fixed_costs, batch_size=8) -> Path:
    folder = root / name
    folder.mkdir()
    rounds = []
    for i, fixed in enumerate(fixed_costs):
        trace = f"bs{batch_size:03d}-r{i}.arrow"
        build(folder / trace, specs(), Engine(model_ns=(fixed, 50e3, 4e3, 100.0)))
        rounds.append({"batch_size": batch_size, "round": i, "trace": trace})
    (folder / "manifest.json").write_text(json.dumps({"plan": {}, "rounds": rounds}))
    return folder


def test_cli_on_sweep_folders_uses_their_rounds(tmp_path, capsys):
    a = sweep_folder(tmp_path, "a", (2e6, 2.1e6))
    b = sweep_folder(tmp_path, "b", (4e6, 4.1e6))
    assert main(["compare", str(a), str(b), "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["noise"]["method"] == "rounds"
    assert [r["rounds"] for r in report["runs"]] == [2, 2]
    out = next(m for m in report["metrics"] if m["name"] == "output_tokens_per_s")
    assert out["significant"] == [None, True] and out["change"][1]["relative"] < 0
    assert main(["compare", str(a), str(b), "--batch-size", "4"]) == 2
    assert "not run by every sweep folder" in capsys.readouterr().err


@pytest.mark.parametrize("argv, fragment", [
    (["compare", str(GOLDEN)], "at least two"),
    (["compare", str(GOLDEN), str(GOLDEN), "--labels", "x"], "--labels"),
    (["compare", str(GOLDEN), str(GOLDEN), "--resamples", "0"], "--resamples"),
    (["compare", str(GOLDEN), "/nonexistent.arrow"], "nonexistent"),
    (["compare", str(GOLDEN), str(GOLDEN), "--html", "/nonexistent/x.html"], "cannot write"),
])
def test_cli_refuses_bad_input_in_one_line(capsys, argv, fragment):
    assert main(argv) == 2
    out, err = capsys.readouterr()
    assert err.startswith("kvprof: error: ") and err.count("\n") == 1 and fragment in err, err


def test_mixed_workload_against_itself_with_another_seed(tmp_path):
    """Two different draws of one workload: the warning names the distributions."""
    a, _ = run(tmp_path, "s1", mixed_specs(40, seed=1))
    b, _ = run(tmp_path, "s2", mixed_specs(40, seed=2))
    c = compare([a, b])
    assert any("Kolmogorov-Smirnov" in w for w in c.warnings)
