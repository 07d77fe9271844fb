"""Check a published batch-size study's memory claim with kvprof's curve analysis.

The study (DESIGN.md section 5) claimed memory "grows faster above bs=32 because
attention cache grows quadratically". Per added sequence its own numbers say the
opposite, and 40B FP16 weights alone (80 GB) exceed every reading.

    python examples/check_published_study.py [CSV]
"""
import csv
import sys
from pathlib import Path

from kvprof.analysis.curve import explain_points


def main(path: str) -> dict:
    with open(path) as f:
        rows = list(csv.DictReader(f))
    batch_sizes = [int(r["batch_size"]) for r in rows]
    memory = [float(r["memory_gb"]) * 1e9 for r in rows]
    report = explain_points(batch_sizes, memory, params=40e9, dtype_bytes=2, unit="GB").to_dict()
    for s in report["segments"]:
        print(f"bs {s['from_bs']:>2} -> {s['to_bs']:>2}: {s['slope_per_seq'] / 1e9:.3f} GB per added sequence")
    print(report["explanation"])
    for warning in report["warnings"]:
        print("warning:", warning)
    return report


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else str(Path(__file__).with_name("published_study.csv")))
