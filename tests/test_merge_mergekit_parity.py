"""Parity with mergekit 0.1.5 (LGPL: in its own venv, never a dependency) on tiny saved Llamas.

Deterministic methods must match tensor by tensor to 1e-6; DARE draws random masks, so its
two implementations are compared by what the masks must preserve (../shared/reference/merging.md):
the share of entries moved from the base and the L1 norm of the move. Skipped, with the
reason, where the mergekit venv cannot be made (no package index).
"""

from __future__ import annotations

import subprocess

import pytest

import tunesmith
from mergekit_parity import RANDOM, RECIPES, dare_statistics, ensure_venv, max_abs_difference, mergekit_config, \
    run_mergekit, save_models, tunesmith_recipe


@pytest.fixture(scope="module")
def mergekit_python():
    try:
        return ensure_venv()
    except subprocess.CalledProcessError as exc:  # venv or pip failed: no package index, or it lacks mergekit
        pytest.skip(f"mergekit venv could not be made ({exc.cmd[2:5]}): {(exc.stderr or '')[-300:]}")


def test_every_method_matches_mergekit(mergekit_python, tmp_path, monkeypatch):
    monkeypatch.setenv("TUNESMITH_CACHE", str(tmp_path / "cache"))
    folders = save_models(tmp_path / "models")
    jobs = []
    for method in RECIPES:
        tunesmith.merge(tunesmith_recipe(method, folders, tmp_path / f"ours-{method}"), echo=lambda m: None)
        jobs.append((mergekit_config(method, folders), tmp_path / f"theirs-{method}"))
    run_mergekit(mergekit_python, jobs, tmp_path)
    for method in RECIPES:
        ours, theirs = tmp_path / f"ours-{method}", tmp_path / f"theirs-{method}"
        if method in RANDOM:
            a, b = dare_statistics(ours, folders["base"]), dare_statistics(theirs, folders["base"])
            # Two models at density 0.5 each: 1 - 0.5^2 of the entries move.
            assert abs(a["moved_share"] - 0.75) < 0.01 and abs(b["moved_share"] - 0.75) < 0.01, (method, a, b)
            assert abs(a["l1"] / b["l1"] - 1) < 0.01, (method, a, b)
        else:
            worst, n = max_abs_difference(ours, theirs)
            assert n >= 20 and worst <= 1e-6, (method, worst)
