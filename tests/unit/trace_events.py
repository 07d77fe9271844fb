"""A checker of Chrome trace-event JSON, written from the format's description, not from kvprof.

Required fields per phase; X slices with a duration and, on one thread, never
overlapping (kvprof nests nothing on a thread track); B/E and async b/e balanced
as a stack with matching names; timestamps never going back on a track.
"""
from __future__ import annotations

import math
from collections import defaultdict

REQUIRED = {"X": ("name", "pid", "tid", "ts", "dur"), "B": ("name", "pid", "tid", "ts"),
            "E": ("pid", "tid", "ts"), "C": ("name", "pid", "ts", "args"),
            "b": ("name", "cat", "id", "pid", "ts"), "e": ("name", "cat", "id", "pid", "ts"),
            "n": ("name", "cat", "id", "pid", "ts"), "M": ("name", "pid", "args"),
            "i": ("name", "pid", "tid", "ts")}


def check(doc) -> dict[str, int]:
    """Raise AssertionError on any violation; return event counts per phase."""
    assert isinstance(doc, dict) and isinstance(doc.get("traceEvents"), list)
    counts: dict[str, int] = defaultdict(int)
    last_ts: dict[tuple, float] = {}
    slice_end: dict[tuple, float] = {}
    stacks: dict[tuple, list] = defaultdict(list)
    for ev in doc["traceEvents"]:
        ph = ev.get("ph")
        assert ph in REQUIRED, f"unknown phase {ph!r}: {ev}"
        for key in REQUIRED[ph]:
            assert key in ev, f"{ph} event without {key}: {ev}"
        counts[ph] += 1
        if ph == "M":
            assert ev["name"] in ("process_name", "thread_name", "process_sort_index", "thread_sort_index")
            continue
        assert isinstance(ev["ts"], (int, float)) and math.isfinite(ev["ts"])
        assert isinstance(ev["pid"], int)
        track = _track(ev)
        assert ev["ts"] >= last_ts.get(track, -math.inf), f"time goes back on {track}: {ev}"
        last_ts[track] = ev["ts"]
        if ph == "X":
            assert ev["dur"] >= 0
            assert ev["ts"] >= slice_end.get(track, -math.inf) - 1e-6, f"overlapping slices on {track}: {ev}"
            slice_end[track] = ev["ts"] + ev["dur"]
        elif ph == "C":
            assert ev["args"] and all(isinstance(v, (int, float)) for v in ev["args"].values()), ev
        elif ph in ("B", "b"):
            stacks[track].append(ev["name"])
        elif ph in ("E", "e"):
            assert stacks[track], f"end without begin on {track}: {ev}"
            begun = stacks[track].pop()
            assert ph == "E" or begun == ev["name"], f"{ev['name']!r} ends {begun!r} on {track}"
    open_tracks = {t: s for t, s in stacks.items() if s}
    assert not open_tracks, f"unbalanced slices: {open_tracks}"
    return dict(counts)


def _track(ev: dict) -> tuple:
    if ev["ph"] in ("b", "e", "n"):
        return ("async", ev["pid"], ev["cat"], ev["id"])
    if ev["ph"] == "C":
        return ("counter", ev["pid"], ev["name"])
    return ("thread", ev["pid"], ev["tid"])
