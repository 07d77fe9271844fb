"""The JSON report: ``Analysis.to_dict()`` made strict JSON (no NaN / infinity, plain types).

The layout is an interface, documented in docs/analyses.md: keys are only ever added.
"""
from __future__ import annotations

import json
import math

import numpy as np


def clean(value):
    """Plain JSON types; NaN and infinities become null (strict JSON has neither)."""
    if isinstance(value, dict):
        return {str(k): clean(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [clean(v) for v in value]
    if isinstance(value, np.generic):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def render(analysis) -> str:
    return json.dumps(clean(analysis.to_dict()), indent=2, allow_nan=False)
