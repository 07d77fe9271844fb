"""The memory-curve analysis (``kvprof.analysis.curve``) and ``kvprof curve``.

Synthetic sweeps plant one cause (or two) at a known batch size, noise-free and with
seeded noise over 3 rounds; the analysis must find a real slope change within one
grid step of it, in the right component, with the right cause id, and nothing else.
Straight lines must give no real breakpoint. The published study (DESIGN.md section
5) goes through the command line."""
from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest

from kvprof.analysis.curve import CAUSES, SweepPoint, explain_points, explain_sweep
from kvprof.analysis.curve_fit import t_two_sided_p
from kvprof.cli.main import main

GRID = (1, 4, 8, 16, 32, 64)
MIB = 2.0**20
BLOCK_SIZE = 16
BYTES_PER_BLOCK = 128 * 1024          # 8 KiB per token
EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "published_study.csv"
BASELINE_CAUSES = {"kv_context_growth", "spacing_artifact"}   # any sweep with growing KV
EXPECTED_COMPONENTS = {
    "kv_context_growth": {"kv_in_use_peak", "kv_in_use_mean"},
    "block_rounding": {"kv_in_use_peak", "kv_in_use_mean"},
    "kv_capacity_limit": {"kv_in_use_peak", "kv_in_use_mean"},
    "prefix_sharing": {"kv_in_use_peak", "kv_in_use_mean"},
    "token_budget_saturated": {"activation_workspace"},
    "cudagraph_padding": {"activation_workspace"},
    "allocator_reserve_growth": {"allocator_reserve"},
}
PLANTED = list(EXPECTED_COMPONENTS)


# ------------------------------------------------------------------ synthetic sweeps
def planted_run(bs: int, plant: dict[str, int]) -> tuple[dict, dict]:
    """Components (bytes) and evidence of one batch size, with causes planted at batch sizes."""
    tokens = 100.0
    if "kv_context_growth" in plant and bs >= plant["kv_context_growth"]:
        tokens = 200.0                                   # each sequence holds twice the tokens
    if "block_rounding" in plant:
        tokens = 16.0 if bs < plant["block_rounding"] else 17.0   # 1 block -> 2 blocks
    blocks_per_seq = math.ceil(tokens / BLOCK_SIZE)
    running, usable, preemptions = bs, 4000, 0
    if "kv_capacity_limit" in plant:
        usable = plant["kv_capacity_limit"] * blocks_per_seq     # the pool holds that many
        running = min(bs, usable // blocks_per_seq)
        preemptions = 3 * (bs - running)
    sharing = 0.0
    if "prefix_sharing" in plant and bs >= plant["prefix_sharing"]:
        sharing = 0.3                                    # 30 % of the blocks are shared prefixes
    peak_blocks = running * blocks_per_seq * (1 - sharing)
    workers, saturated, capture = bs, 0.0, []
    if "token_budget_saturated" in plant:
        at = plant["token_budget_saturated"]
        workers, saturated = min(bs, at), (0.9 if bs > at else 0.0)
    if "cudagraph_padding" in plant:
        capture = [1, 2, 4, 8, 64]                       # 16 and 32 run padded to 64
        workers = next(c for c in capture if c >= bs)
    reserve = 2 * MIB
    if "allocator_reserve_growth" in plant and bs > plant["allocator_reserve_growth"]:
        reserve += (bs - plant["allocator_reserve_growth"]) * 0.5 * MIB
    parts = {"weights": 60 * MIB, "kv_pool_reserved": usable * BYTES_PER_BLOCK,
             "kv_in_use_peak": peak_blocks * BYTES_PER_BLOCK,
             "kv_in_use_mean": 0.7 * peak_blocks * BYTES_PER_BLOCK,
             "activation_workspace": 5 * MIB + workers * 0.25 * MIB,
             "allocator_reserve": reserve, "non_torch": 30 * MIB}
    parts["total"] = sum(parts[n] for n in ("weights", "kv_in_use_peak", "activation_workspace",
                                            "allocator_reserve", "non_torch"))
    parts["engine_process"] = 400 * MIB
    evidence = {"peak_running": running, "mean_running": 0.9 * running, "preemptions": preemptions,
                "kv_blocks_usable": usable, "kv_peak_blocks": peak_blocks,
                "bytes_per_block": BYTES_PER_BLOCK, "block_size": BLOCK_SIZE,
                "mean_context_tokens": tokens, "mean_blocks_per_seq": blocks_per_seq * (1 - sharing),
                "kv_sharing": sharing,
                "token_budget": 2048, "budget_saturated_share": saturated,
                "cudagraph_capture_sizes": capture, "waiting_peak": 10 if preemptions else 0,
                "device": "cuda"}
    return parts, evidence


def sweep(plant: dict[str, int] | None = None, rounds: int = 1, noise: float = 0.0,
          seed: int = 0, grid=GRID) -> list[SweepPoint]:
    """SweepPoints on the grid; noise: relative sd of each round (weights and pool exact)."""
    rng = np.random.default_rng(seed)
    points = []
    for bs in grid:
        parts, evidence = planted_run(bs, plant or {})
        components = {name: [float(v * (1 + rng.normal(0, noise)))
                             if noise and name not in ("weights", "kv_pool_reserved") else float(v)
                             for _ in range(rounds)] for name, v in parts.items()}
        points.append(SweepPoint(bs, components, evidence))
    return points


def real_changes(report: dict) -> list[tuple[str, str, int, str]]:
    """(series, component, bs, cause) of every significant breakpoint in the report."""
    return [(series, b["component"], b["bs"], b["cause"])
            for series, c in report["components"].items() for b in c["breakpoints"]
            if b["significant"]]


def within_one_step(bs: int, planted: int) -> bool:
    return abs(GRID.index(bs) - GRID.index(planted)) <= 1


# ------------------------------------------------------------------ straight lines
@pytest.mark.parametrize("rounds, noise, seed", [(1, 0.0, 0), (1, 0.01, 1), (1, 0.01, 2),
                                                 (3, 0.01, 3), (3, 0.01, 4), (3, 0.002, 5)])
def test_a_straight_line_has_no_real_breakpoint(rounds, noise, seed):
    rng = np.random.default_rng(seed)
    truth = [2e9 + 50e6 * bs for bs in GRID]
    reps = [[t * (1 + rng.normal(0, noise)) for _ in range(rounds)] for t in truth]
    report = explain_points(GRID, [float(np.mean(r)) for r in reps], replicates=reps).to_dict()
    assert not any(b["significant"] for b in report["breakpoints"])
    assert report["fit"]["noise"] == ("rounds" if rounds > 1 else "residual")
    assert report["causes"] == ["spacing_artifact"]      # rows of 3, 4, 8, 16, 32 sequences
    if noise == 0:
        assert report["breakpoints"] == []
        assert [s["slope_per_seq"] for s in report["segments"]] == pytest.approx([50e6] * 5, rel=1e-12)
        assert "stays about the same" in report["explanation"]


def test_spacing_artifact_is_named_with_its_per_sequence_numbers():
    """Row increments 3, 4, 8, 16, 32 MiB: they grow, the slope is 1 MiB per sequence throughout."""
    mem = [(100 + bs) * MIB for bs in GRID]
    report = explain_points(GRID, mem, unit="MiB").to_dict()
    assert [s["delta_bytes"] / MIB for s in report["segments"]] == pytest.approx([3, 4, 8, 16, 32])
    assert [s["added_seqs"] for s in report["segments"]] == [3, 4, 8, 16, 32]
    assert report["breakpoints"] == []
    assert report["causes"] == ["spacing_artifact"]
    finding = report["findings"][0]
    assert finding["cause"] == "spacing_artifact"
    assert ("+3.00 MiB, +4.00 MiB, +8.00 MiB, +16.0 MiB, +32.0 MiB" in finding["text"]
            and "(3, 4, 8, 16, 32)" in finding["text"])
    assert "1.00 MiB \u2192 1.00 MiB" in finding["text"] and "not an acceleration" in finding["text"]


def test_even_spacing_is_no_artifact():
    xs = (8, 16, 24, 32, 40, 48)
    report = explain_points(xs, [(100 + x) * MIB for x in xs]).to_dict()
    assert report["causes"] == [] and report["breakpoints"] == []


def test_a_real_rise_is_found_and_not_called_an_artifact():
    """1 MiB per sequence up to 16, 3 MiB per sequence beyond (3 rounds, 0.2 % noise)."""
    rng = np.random.default_rng(7)
    truth = [(100 + bs + 2 * max(bs - 16, 0)) * MIB for bs in GRID]
    reps = [[t * (1 + rng.normal(0, 0.002)) for _ in range(3)] for t in truth]
    report = explain_points(GRID, [float(np.mean(r)) for r in reps], replicates=reps).to_dict()
    real = [b for b in report["breakpoints"] if b["significant"]]
    assert [b["bs"] for b in real] == [16]
    assert real[0]["change_per_seq"] / MIB == pytest.approx(2.0, rel=0.1)
    assert real[0]["noise"] == "rounds" and real[0]["df"] == 12
    # rows 4->8, 8->16 and 32->64 grow at a constant slope (artifacts); 16->32 is the real rise
    spacing = report["findings"][0]["text"]
    assert "where the rows grow (4\u21928, 8\u219216, 32\u219264:" in spacing


# ------------------------------------------------------------------ planted causes
@pytest.mark.parametrize("cause", PLANTED)
def test_planted_cause_alone_noise_free(cause):
    report = explain_sweep(sweep({cause: 16})).to_dict()
    changes = real_changes(report)
    assert changes, report["explanation"]
    assert {c[3] for c in changes} == {cause}
    assert {c[1] for c in changes} <= EXPECTED_COMPONENTS[cause]
    assert all(within_one_step(c[2], 16) for c in changes)
    assert set(report["causes"]) == BASELINE_CAUSES | {cause}
    # the top level is the total's, each of its real changes given to the component
    top = [b for b in report["breakpoints"] if b["significant"]]
    assert top and {(b["component"], b["cause"]) for b in top} <= {
        (c, cause) for c in EXPECTED_COMPONENTS[cause]}
    assert cause in report["explanation"]


@pytest.mark.parametrize("seed", [11, 12])
@pytest.mark.parametrize("cause", PLANTED)
def test_planted_cause_with_noise_over_three_rounds(cause, seed):
    report = explain_sweep(sweep({cause: 16}, rounds=3, noise=0.003, seed=seed)).to_dict()
    changes = real_changes(report)
    planted = [c for c in changes if c[0] in EXPECTED_COMPONENTS[cause]]
    assert planted and all(c[3] == cause for c in planted), report["explanation"]
    assert any(within_one_step(c[2], 16) for c in planted)
    assert {c[3] for c in changes} == {cause}              # nothing else called real
    assert set(report["causes"]) == BASELINE_CAUSES | {cause}
    noise = {b["noise"] for c in report["components"].values() for b in c["breakpoints"]}
    assert noise <= {"rounds"}


def test_two_causes_mixed_with_noise():
    plant = {"kv_capacity_limit": 16, "token_budget_saturated": 32}
    report = explain_sweep(sweep(plant, rounds=3, noise=0.003, seed=21)).to_dict()
    by_series = {(c[0], c[3]) for c in real_changes(report)}
    assert ("kv_in_use_peak", "kv_capacity_limit") in by_series
    assert ("activation_workspace", "token_budget_saturated") in by_series
    kv = [b for b in report["components"]["kv_in_use_peak"]["breakpoints"] if b["significant"]]
    act = [b for b in report["components"]["activation_workspace"]["breakpoints"] if b["significant"]]
    assert [b["bs"] for b in kv] == [16] and [b["bs"] for b in act] == [32]
    # KV: 7 blocks x 128 KiB per sequence before the pool fills, nothing after
    assert kv[0]["slope_before"] / MIB == pytest.approx(7 * 0.125, rel=0.05)
    assert abs(kv[0]["slope_after"]) / MIB < 0.05
    assert act[0]["slope_before"] / MIB == pytest.approx(0.25, rel=0.1)
    assert set(report["causes"]) == BASELINE_CAUSES | set(plant)


def test_capacity_limit_explanation_gives_the_numbers():
    report = explain_sweep(sweep({"kv_capacity_limit": 16})).to_dict()
    text = report["explanation"]
    assert "At batch size 16 the slope of kv_in_use_peak falls from 896 KiB to 0" in text
    assert "48, 144 preemptions at batch sizes 32, 64" in text      # 3 x (bs - 16) per run
    assert "at most 16 sequences ran at batch sizes 32, 64" in text
    assert "112 peak blocks in use at batch sizes 16, 32, 64" in text


def test_a_full_pool_is_named_even_when_three_points_cannot_test_a_knot():
    """1, 4, 16 sequences, one round: no residual left to test a knot, but the runs' facts
    say the pool was full at 16 (the pool holds 4 sequences of 7 blocks)."""
    report = explain_sweep(sweep({"kv_capacity_limit": 4}, grid=(1, 4, 16))).to_dict()
    assert all(c["fit"]["knots_bs"] == [] for c in report["components"].values())
    assert real_changes(report) == []
    assert "kv_capacity_limit" in report["causes"]
    finding = next(f for f in report["findings"] if f["cause"] == "kv_capacity_limit")
    assert finding["component"] == "kv_in_use_peak"
    assert finding["text"].startswith("The KV pool was full from batch size 4 (28 peak blocks in use "
                                      "at batch sizes 4, 16")
    assert "36 preemptions at batch size 16" in finding["text"]
    assert "896 KiB (1\u21924), 0 bytes (4\u219216)" in finding["text"]
    assert finding["text"] in report["explanation"]


def test_healthy_sweep_states_linear_kv_growth():
    """No planted cause: no real change anywhere; KV grows by 7 blocks x 128 KiB per sequence."""
    report = explain_sweep(sweep(rounds=3, noise=0.003, seed=3)).to_dict()
    assert real_changes(report) == []
    assert report["causes"] == ["kv_context_growth", "spacing_artifact"]
    kv = next(f for f in report["findings"] if f["cause"] == "kv_context_growth")
    assert "7.00 blocks of 128 KiB (100 tokens, 8.00 KiB per token) = 896 KiB per sequence" in kv["text"]
    assert "not quadratic" in kv["text"]
    assert set(report["components"]) == {"weights", "kv_pool_reserved", "kv_in_use_peak",
                                         "kv_in_use_mean", "activation_workspace",
                                         "allocator_reserve", "non_torch", "engine_process", "total"}
    for c in report["components"].values():
        assert c["unit_note"]


def test_cpu_sweep_without_allocator_reserve():
    points = sweep({"kv_capacity_limit": 32})
    for p in points:
        p.components["allocator_reserve"] = [None]
        p.evidence["device"] = "cpu"
    report = explain_sweep(points).to_dict()
    assert "allocator_reserve" not in report["components"]
    assert report["device"] == "cpu"
    assert {c[3] for c in real_changes(report)} == {"kv_capacity_limit"}
    assert "on the CPU backend" in report["explanation"]


def test_every_cause_id_is_documented():
    docs = (Path(__file__).resolve().parents[2] / "docs" / "analyses.md").read_text()
    for cause in CAUSES:
        assert f"`{cause}`" in docs, cause


# ------------------------------------------------------------------ statistics
@pytest.mark.parametrize("t, df, p", [(2.5706, 5, 0.05), (12.706, 1, 0.05), (4.3027, 2, 0.05),
                                      (2.1788, 12, 0.05), (3.0545, 12, 0.01), (0.0, 7, 1.0)])
def test_t_test_p_values(t, df, p):
    assert t_two_sided_p(t, df) == pytest.approx(p, abs=2e-5)
    assert t_two_sided_p(-t, df) == pytest.approx(p, abs=2e-5)


# ------------------------------------------------------------------ kvprof curve
def curve_json(capsys, *argv) -> dict:
    assert main(["curve", *map(str, argv), "--json"]) == 0
    out, err = capsys.readouterr()
    assert err == ""
    return json.loads(out)


def test_published_study_through_the_command(capsys):
    report = curve_json(capsys, EXAMPLE, "--params", "40e9", "--dtype-bytes", "2")
    slopes = [s["slope_per_seq"] / 1e9 for s in report["segments"]]
    assert [round(s, 3) for s in slopes] == [0.600, 0.425, 0.300, 0.231, 0.116]
    assert all(b < a for a, b in zip(slopes, slopes[1:]))          # falls at every step
    assert [round(s["delta_bytes"] / 1e9, 2) for s in report["segments"]] == [1.8, 1.7, 2.4, 3.7, 3.7]
    assert not any(b["significant"] and b["change_per_seq"] > 0 for b in report["breakpoints"])
    assert not any(b["bs"] == 32 and b["significant"] for b in report["breakpoints"])
    assert report["causes"] == ["spacing_artifact"]
    assert report["unit"] == {"name": "GB", "bytes": 1e9}
    assert report["source"]["column"] == "memory_gb"
    weights = [w for w in report["warnings"] if "of weights" in w]
    assert weights == ["40e9 parameters x 2 bytes = 80.0 GB of weights, more than every reading "
                       "(max 41.6 GB): the readings cannot include the weights of a 40B model in "
                       "16-bit (FP16/BF16) on one device \u2014 quantised, sharded across devices, "
                       "or not the same measurement."]
    assert any("reserves its KV pool at start-up" in w and "13.3 GB (47 %)" in w
               for w in report["warnings"])
    text = report["explanation"]
    assert "falls at every step: 0.600 GB (1\u21924), 0.425 GB (4\u21928), 0.300 GB (8\u219216), " \
           "0.231 GB (16\u219232), 0.116 GB (32\u219264) per sequence" in text
    assert "not an acceleration" in text and "linear in the tokens held" in text
    assert weights[0] in text


def test_published_study_text_report(capsys):
    assert main(["curve", str(EXAMPLE), "--params", "40e9", "--dtype-bytes", "2"]) == 0
    out, err = capsys.readouterr()
    assert err == ""
    flat = " ".join(out.split())
    for fragment in ("Memory by batch size (GB)", "0.600", "0.425", "0.300", "0.231", "0.116",
                     "not an acceleration", "80.0 GB of weights", "warning:"):
        assert fragment in flat, fragment


def test_rounds_in_the_csv_give_pure_error_noise(tmp_path, capsys):
    path = tmp_path / "points.csv"
    rows = ["batch_size,memory_mib,gpu"]
    rng = np.random.default_rng(0)
    for bs in GRID:
        for _ in range(2):
            rows.append(f"{bs},{1000 + 2 * bs + rng.normal(0, 0.5):.3f},A100")
    path.write_text("\n".join(rows) + "\n")
    report = curve_json(capsys, path)
    assert [p["batch_size"] for p in report["points"]] == list(GRID)
    assert all(len(p["rounds"]) == 2 for p in report["points"])
    assert report["fit"]["noise"] == "rounds" and report["fit"]["df"] == 6
    assert report["unit"]["name"] == "MiB"
    assert not any(b["significant"] for b in report["breakpoints"])
    assert [round(s["slope_per_seq"] / MIB) for s in report["segments"]] == [2] * 5


BAD_CSV = {
    "no-header": ("1,28.3\n4,30.1\n8,31.8\n", "no header row with a batch_size column"),
    "no-memory-column": ("batch_size,throughput\n1,2\n4,5\n8,9\n", "no memory column"),
    "two-memory-columns": ("batch_size,memory_gb,memory_mib\n1,1,1\n4,2,2\n8,3,3\n",
                           "more than one memory column"),
    "not-a-number": ("batch_size,memory_gb\n1,28.3\n4,lots\n8,31.8\n",
                     "line 3: memory_gb is not a number ('lots')"),
    "empty-cell": ("batch_size,memory_gb\n1,28.3\n4,\n8,31.8\n", "line 3: memory_gb is empty"),
    "negative": ("batch_size,memory_gb\n1,28.3\n4,-30.1\n8,31.8\n", "line 3: memory_gb is negative"),
    "bad-batch-size": ("batch_size,memory_gb\n1,28.3\n2.5,30.1\n8,31.8\n",
                       "batch_size must be a positive whole number, got '2.5'"),
    "two-batch-sizes": ("batch_size,memory_gb\n1,28.3\n1,28.4\n4,30.1\n", "2 distinct batch sizes"),
    "empty-file": ("", "empty file"),
    "not-utf8": (b"\xff\xfe\x00batch", "not a text CSV file"),
    "infinite": ("batch_size,memory_gb\n1,inf\n4,30.1\n8,31.8\n", "memory_gb is not finite"),
}


def assert_refused(capsys, argv, fragment: str) -> None:
    assert main(argv) == 2
    out, err = capsys.readouterr()
    assert out == ""
    assert err.startswith("kvprof: error: ") and err.count("\n") == 1, err
    assert "Traceback" not in err and fragment in err, err


@pytest.mark.parametrize("case", list(BAD_CSV))
def test_bad_csv_is_one_line_and_exit_2(case, tmp_path, capsys):
    content, fragment = BAD_CSV[case]
    path = tmp_path / "points.csv"
    path.write_bytes(content if isinstance(content, bytes) else content.encode())
    assert_refused(capsys, ["curve", str(path)], fragment)


def test_missing_file_folder_and_bad_options(tmp_path, capsys):
    assert_refused(capsys, ["curve", str(tmp_path / "nope.csv")], "no such file")
    assert_refused(capsys, ["curve", str(tmp_path)], "is a folder")
    assert_refused(capsys, ["curve", str(EXAMPLE), "--params", "40e9"],
                   "--params and --dtype-bytes go together")
    assert_refused(capsys, ["curve", str(EXAMPLE), "--params", "-3", "--dtype-bytes", "2"],
                   "expected a positive number")


# ------------------------------------------------------------------ throughput and latency columns
def test_published_throughput_and_latency_explained(capsys):
    """TPOT = latency / 512; per added sequence it stays near 0.11 ms (no saturation above
    32), while throughput x TPOT shows the batch far from full (13.6 of 64 running)."""
    report = curve_json(capsys, EXAMPLE, "--output-tokens", "512")
    perf = report["performance"]
    rows = {r["batch_size"]: r for r in perf["rows"]}
    published = {1: (148, 3420), 4: (392, 3680), 8: (587, 3910), 16: (803, 4250),
                 32: (961, 5120), 64: (1008, 6890)}
    sizes = sorted(published)
    for b, (tps, lat) in published.items():
        assert rows[b]["tpot_ms"] == pytest.approx(lat / 512)
        assert rows[b]["implied_running"] == pytest.approx(tps * lat / 512 / 1e3)
    for a, b in zip(sizes, sizes[1:]):
        assert rows[b]["gain_per_added_sequence"] == pytest.approx(
            (published[b][0] - published[a][0]) / (b - a))
        assert rows[b]["tpot_per_added_sequence_ms"] == pytest.approx(
            (published[b][1] - published[a][1]) / 512 / (b - a))
    assert round(rows[64]["tpot_per_added_sequence_ms"], 3) == 0.108     # (6890-5120)/512/32
    b = np.array(sizes, float)
    t = np.array([published[s][1] / 512 for s in sizes])
    slope, intercept = np.polyfit(b, t, 1)         # both positive: NNLS is least squares here
    assert perf["fit"]["per_sequence_ms"] == pytest.approx(slope)
    assert perf["fit"]["fixed_ms"] == pytest.approx(intercept)
    text = " ".join(perf["explanation"])
    assert "does not rise in the last interval" in text and "not saturating" in text
    assert "64: 13.6" in text and "64: 4,756" in text        # 64 / 13.457 ms
    assert main(["curve", str(EXAMPLE), "--output-tokens", "512"]) == 0
    flat = " ".join(capsys.readouterr().out.split())
    assert "Throughput and latency per added sequence" in flat and "+0.108" in flat


def test_a_rising_step_time_per_sequence_is_called_saturation():
    from kvprof.analysis.curve_perf import explain_performance
    sizes = [1, 2, 4, 8, 16]
    tpot = [10.0, 10.1, 10.3, 10.7, 13.9]            # +0.1 per sequence, then +0.4
    perf = explain_performance(sizes, [1e3 * b / t for b, t in zip(sizes, tpot)],
                               [t * 100 for t in tpot], 100)
    text = " ".join(perf["explanation"])
    assert "rises to 0.400 ms from about 0.100 ms" in text and "saturating" in text
    assert "fewer ran than the batch allowed" not in text   # full batches throughout


def test_latency_without_output_tokens_asks_for_them(capsys):
    report = curve_json(capsys, EXAMPLE)
    perf = report["performance"]
    assert perf["rows"][1]["tpot_ms"] is None
    assert any("--output-tokens" in line for line in perf["explanation"])
