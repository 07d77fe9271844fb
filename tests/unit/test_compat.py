"""The vLLM version gate: one supported range, named in every refusal."""
from __future__ import annotations

import pytest

from kvprof.errors import UnsupportedVllmVersion
from kvprof.hooks import compat
from kvprof.hooks.compat import SUPPORTED_RANGE, check, series_of


@pytest.mark.parametrize("version", ["0.31.0", "1.0.0", "0.34.0", "0.3.2"])
def test_unsupported_version_names_the_range(version):
    with pytest.raises(UnsupportedVllmVersion) as info:
        check(version)
    assert str(info.value) == (f"kvprof supports vLLM {SUPPORTED_RANGE}; this is vLLM {version}: "
                               "the engine runs untraced")
    assert info.value.exit_code == 3


def test_supported_range_matches_the_series():
    assert SUPPORTED_RANGE == ">=0.32,<0.34"
    assert compat.SUPPORTED_SERIES == ("0.32", "0.33")


@pytest.mark.parametrize("version, series", [
    ("0.32.0+cpu", "0.32"), ("0.32.0", "0.32"), ("0.33.1.dev7+g0abc", "0.33"), ("1.0", "1.0"),
])
def test_series_of(version, series):
    assert series_of(version) == series


def test_installed_vllm_passes():
    vllm = pytest.importorskip("vllm")
    report = check()
    assert report.vllm_version == vllm.__version__
    assert report.missing == () and report.ok


def test_a_missing_name_is_refused_with_the_range(monkeypatch):
    pytest.importorskip("vllm")
    names = (*compat.VLLM_NAMES, ("vllm.v1.core.block_pool", "BlockPool.no_such_method", "test"))
    monkeypatch.setattr(compat, "VLLM_NAMES", names)
    with pytest.raises(UnsupportedVllmVersion) as info:
        check("0.32.0")
    assert str(info.value) == ("vLLM 0.32.0 lacks vllm.v1.core.block_pool.BlockPool.no_such_method "
                               f"that kvprof hooks (supported: vLLM {SUPPORTED_RANGE}): "
                               "the engine runs untraced")
