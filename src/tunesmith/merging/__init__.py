"""Model merging: methods over tensors (methods.py, registry.py), a streaming engine
(sources.py, streaming.py), and merge → evaluate → select (pipeline.py, card.py)."""

from __future__ import annotations

from pathlib import Path
from typing import Callable

from .registry import MERGE_METHODS
from .spec import MergeSpec, load_merge_spec


def merge(recipe: str | Path | dict | MergeSpec | None = None, *, overrides: list[str] | None = None,
          output: str | Path | None = None, device: str | None = None, overwrite: bool | None = None,
          use_cache: bool = True, echo: Callable[[str], None] = print, **fields):
    """Merge models as a recipe says (a MERGE.yaml path, a dict or a MergeSpec) and write the result.

    Keyword fields (models=[...], method=..., base_model=..., parameters={...}, evaluate=[...],
    search={...}) build or override the recipe; `output`, `device` and `overwrite` override
    theirs. Returns a `MergeResult` (output folder, best candidate, every candidate's scores).
    """
    from .pipeline import run_merge

    fields.update({k: v for k, v in (("output", None if output is None else str(output)), ("device", device),
                                     ("overwrite", overwrite)) if v is not None})
    if fields:
        if isinstance(recipe, (str, Path, MergeSpec)):  # a YAML's relative paths resolve before the update
            # The overrides go in with the file (they may be what makes it valid, and their relative
            # paths resolve against its folder too), once.
            recipe = load_merge_spec(recipe, overrides).model_dump(mode="json", exclude_unset=True)
            overrides = None
        recipe = {**(recipe or {}), **fields}
    return run_merge(load_merge_spec(recipe, overrides), echo=echo, use_cache=use_cache)

__all__ = ["MERGE_METHODS", "MergeSpec", "load_merge_spec", "merge"]
