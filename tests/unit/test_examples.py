"""The examples that need no engine, run as a user would run them."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"


def test_check_published_study_prints_falling_slopes_and_the_weights_warning():
    out = subprocess.run([sys.executable, str(EXAMPLES / "check_published_study.py")],
                         capture_output=True, text=True, check=True).stdout
    slopes = [float(line.split(": ")[1].split()[0]) for line in out.splitlines()
              if line.startswith("bs ")]
    assert slopes == [0.600, 0.425, 0.300, 0.231, 0.116]     # (41.6-37.9)/32 = 0.1156...
    assert "Per added sequence the slope falls at every step" in out
    assert "80.0 GB of weights, more than every reading (max 41.6 GB)" in out
