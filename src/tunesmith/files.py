"""Writing files and folders so that a kill or an error mid-write never leaves half of one."""

from __future__ import annotations

import os
import shutil
from contextlib import contextmanager
from pathlib import Path
from typing import Iterable, Iterator


def refuse_output_over_inputs(output: Path, inputs: Iterable[str | Path]) -> None:
    """Refuse an output folder that is one of the inputs or holds one: the output is replaced whole
    once written, which would delete what it was made from (a run exported into its own folder, a
    merge written over a source model, `--output runs` for a run inside it)."""
    from .errors import ConfigError

    out = Path(output).expanduser().resolve()
    for item in inputs:
        src = Path(str(item)).expanduser()
        if src.exists() and (src.resolve() == out or out in src.resolve().parents):
            raise ConfigError(f"output: {out} holds the input {item}; writing there would destroy it "
                              "(nothing was written)")


def write_text_atomic(path: Path, text: str) -> None:
    """`path` holds either its old content or all of `text`: written beside it, then renamed over it."""
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)


@contextmanager
def staged_folder(target: Path) -> Iterator[Path]:
    """A temporary sibling of `target` to fill; renamed over `target` when the block ends without
    an error, removed either way — so `target` appears only complete and stays as it was on failure."""
    tmp = target.with_name(f".{target.name}.tmp{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        yield tmp
        if target.exists():
            shutil.rmtree(target)
        target.parent.mkdir(parents=True, exist_ok=True)
        os.replace(tmp, target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
