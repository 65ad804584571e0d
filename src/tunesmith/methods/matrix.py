"""Which method can train which objective: derived from the registries, printed by `tunesmith methods`.

A method's section lists the objectives it cannot train, with the reason (`unsupported` in
method_config.py, where `support` is: config validation asks it without loading torch); every
other cell is supported and has a test (tests/test_matrix.py).
"""

from __future__ import annotations

from ..method_config import support


def matrix() -> dict[str, dict[str, str | None]]:
    from ..method_config import SECTIONS as METHODS
    from ..objective_config import SECTIONS as OBJECTIVES

    return {m: {o: support(m, o) for o in OBJECTIVES} for m in METHODS}


def supported_cells() -> list[tuple[str, str]]:
    return [(m, o) for m, row in matrix().items() for o, why in row.items() if why is None]
