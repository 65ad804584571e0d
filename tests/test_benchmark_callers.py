"""Benchmark scripts run only by hand, so a helper's changed signature can break a caller unnoticed
(grpo_throughput and ppo_arithmetic passed `ops=1` after write_splits took a list). Each call of
grpo_arithmetic.write_splits in benchmarks/ is run here with the caller's own literal arguments."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[1] / "benchmarks"


def _calls():
    for script in sorted(BENCH.glob("*.py")):
        tree = ast.parse(script.read_text())
        imports = any(isinstance(n, ast.ImportFrom) and n.module == "grpo_arithmetic"
                      and any(a.name == "write_splits" for a in n.names) for n in ast.walk(tree))
        if script.name == "grpo_arithmetic.py" or imports:
            for node in ast.walk(tree):
                if isinstance(node, ast.Call) and getattr(node.func, "id", None) == "write_splits":
                    yield pytest.param(script.name, node, id=f"{script.name}:{node.lineno}")


@pytest.mark.parametrize(("script", "call"), list(_calls()))
def test_write_splits_callers_pass_what_it_takes(script, call, tmp_path, grpo_arithmetic):
    # Only `ops` changed type; the sizes are cut to a few rows. A variable (args.ops) gets what argparse gives.
    given = call.args[1] if len(call.args) > 1 else next(k.value for k in call.keywords if k.arg == "ops")
    try:
        ops = ast.literal_eval(given)
    except ValueError:
        ops = [1]
    paths = grpo_arithmetic.write_splits(tmp_path, ops=ops, train=4, heldout=2)
    assert all(Path(p).exists() for p in paths)
