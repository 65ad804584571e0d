"""Which method can train which objective: derived from the registries, printed by `tunesmith methods`.

A method lists the objectives it cannot train, with the reason, in `Method.unsupported`;
every other cell is supported and has a test (tests/test_matrix.py).
"""

from __future__ import annotations


def support(method: str, objective: str) -> str | None:
    """None when the method can train the objective, else the reason it cannot."""
    from . import METHODS

    return METHODS[method].unsupported.get(objective)


def matrix() -> dict[str, dict[str, str | None]]:
    from ..objectives import OBJECTIVES
    from . import METHODS

    return {m: {o: support(m, o) for o in OBJECTIVES} for m in METHODS}


def supported_cells() -> list[tuple[str, str]]:
    return [(m, o) for m, row in matrix().items() for o, why in row.items() if why is None]
