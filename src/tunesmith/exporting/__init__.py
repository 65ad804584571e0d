"""Export what was trained: `merged` (a plain transformers model), `gguf` (llama.cpp / Ollama,
checked by loading it back) and `bnb-4bit` (NF4 safetensors for GPU serving)."""

from __future__ import annotations

from pathlib import Path
from typing import Callable, Sequence

from ..errors import ConfigError

FORMATS = ("merged", "gguf", "bnb-4bit")


def export(source: str | Path, *, format: str = "merged", output: str | Path | None = None, dtype: str = "auto",
           types: Sequence[str] = ("f16",), verify: bool = True, overwrite: bool = False,
           echo: Callable[[str], None] = print) -> Path:
    """Write `source` (a run or artifact folder, a peft adapter folder, a model folder) in `format`;
    returns the output folder (default `<source>/export-<format>`).

    `dtype` applies to `merged`; `types` (f32, f16, bf16, q8_0, q4_0, ...) and `verify` to `gguf`.
    """
    if format not in FORMATS:
        raise ConfigError(f"--format: unknown format '{format}' (known: {', '.join(FORMATS)})")
    if dtype not in ("auto", "fp32", "bf16", "fp16"):
        raise ConfigError(f"--dtype: unknown dtype '{dtype}' (auto, fp32, bf16, fp16)")
    if dtype != "auto" and format != "merged":
        raise ConfigError(f"--dtype applies to --format merged; {format} has its own storage types")
    if isinstance(types, str):
        types = (types,)
    if tuple(types) != ("f16",) and format != "gguf":
        raise ConfigError("--type applies to --format gguf")
    out = Path(output).expanduser() if output is not None else Path(str(source)).expanduser() / f"export-{format}"
    if format == "gguf":
        from .gguf_export import export_gguf

        return export_gguf(source, out, types=tuple(types), verify=verify, overwrite=overwrite, echo=echo)
    if format == "bnb-4bit":
        from .bnb4 import export_bnb4

        return export_bnb4(source, out, overwrite=overwrite, echo=echo)
    from .merged import export_merged

    return export_merged(source, out, dtype=dtype, overwrite=overwrite, echo=echo)


__all__ = ["FORMATS", "export"]
