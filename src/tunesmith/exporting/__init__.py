"""Export what was trained: `merged` (a plain transformers model). GGUF comes next."""

from __future__ import annotations

from pathlib import Path
from typing import Callable

from ..errors import ConfigError

FORMATS = ("merged",)


def export(source: str | Path, *, format: str = "merged", output: str | Path | None = None, dtype: str = "auto",
           overwrite: bool = False, echo: Callable[[str], None] = print) -> Path:
    """Write `source` (a run or artifact folder, a peft adapter folder) in `format`; returns the output path.

    The default output is `<run folder>/export-<format>`.
    """
    from .merged import export_merged

    if format not in FORMATS:
        raise ConfigError(f"--format: unknown format '{format}' (known: {', '.join(FORMATS)})")
    if dtype not in ("auto", "fp32", "bf16", "fp16"):
        raise ConfigError(f"--dtype: unknown dtype '{dtype}' (auto, fp32, bf16, fp16)")
    out = Path(output).expanduser() if output is not None else Path(str(source)).expanduser() / f"export-{format}"
    return export_merged(source, out, dtype=dtype, overwrite=overwrite, echo=echo)


__all__ = ["FORMATS", "export"]
