"""Fault injection for the crash tests: with `TUNESMITH_FAULT=POINT:N` set, the process kills
itself with SIGKILL the N-th time it reaches POINT (`step`, `eval`, `checkpoint`, `metrics`,
`artifact`) — or sends it the signal `TUNESMITH_FAULT_SIGNAL` names — so a test can stop a real `tunesmith train` exactly inside a checkpoint write or an
evaluation. Unset, `reach` is one environment lookup."""

from __future__ import annotations

import os
import signal

POINTS = ("step", "eval", "checkpoint", "metrics", "artifact")
_counts: dict[str, int] = {}


def armed(point: str) -> bool:
    """Whether this is the reach of `point` the fault names (counting it)."""
    spec = os.environ.get("TUNESMITH_FAULT")
    if not spec:
        return False
    name, _, nth = spec.partition(":")
    if name != point:
        return False
    _counts[point] = _counts.get(point, 0) + 1
    return _counts[point] == int(nth or 1)


def die() -> None:
    """SIGKILL, or the signal `TUNESMITH_FAULT_SIGNAL` names (to test the SIGINT/SIGTERM handlers)."""
    os.kill(os.getpid(), int(os.environ.get("TUNESMITH_FAULT_SIGNAL") or signal.SIGKILL))


def reach(point: str) -> None:
    if armed(point):
        die()
