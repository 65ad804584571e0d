"""benchmarks/gpu_wheels.py pins the GPU machine's wheels to this environment's versions."""

from __future__ import annotations

import importlib.metadata as metadata
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import gpu_wheels  # noqa: E402


def test_pins_are_the_installed_versions():
    pins = gpu_wheels.pins()
    assert len(pins) == len(gpu_wheels.DISTRIBUTIONS)
    assert f"transformers=={metadata.version('transformers')}" in pins and f"trl=={metadata.version('trl')}" in pins


def test_a_distribution_missing_here_is_named_before_any_download(monkeypatch):
    monkeypatch.setattr(gpu_wheels, "DISTRIBUTIONS", ["pydantic", "no-such-dist-tunesmith"])
    with pytest.raises(SystemExit, match="not installed in this environment: no-such-dist-tunesmith"):
        gpu_wheels.pins()
