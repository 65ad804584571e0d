"""A trained run as a plain transformers model: the adapter (LoRA family, IA3, QLoRA onto the
full-precision base, BitFit biases) folded into its base, saved with the tokenizer and chat
template, loadable with no peft and no tunesmith. Merging (`merging/sources.py`) folds its
adapter inputs with the same function."""

from __future__ import annotations

import math
import shutil
from pathlib import Path
from typing import Callable

from ..errors import ConfigError
from ..files import refuse_output_over_inputs, staged_folder

# Methods whose trained weights become the base's own tensors; the others add modules
# (bottleneck adapters, virtual tokens, a probe head) the architecture has no place for.
FOLDABLE = ("full", "freeze", "lora", "dora", "rslora", "lora_fa", "qlora", "ia3", "bitfit")


def check_foldable(source: str | Path, label: str = "export") -> Path | None:
    """The artifact folder of a tunesmith run/artifact (None for anything else), refusing methods
    that cannot be folded into the weights; nothing is loaded."""
    from ..artifacts import _artifact_in, read_manifest

    path = Path(str(source)).expanduser()
    if str(source).startswith(("/", ".", "~")) and not path.exists():
        raise ConfigError(f"{label}: not found: {source}")
    found = _artifact_in(path) if path.is_dir() else None
    if found is not None:
        method = read_manifest(found).get("method")
        if method not in FOLDABLE and method != "merge":
            raise ConfigError(f"{label}: {source} is a '{method}' run; its weights are modules the base architecture "
                              f"has no place for (only {', '.join(FOLDABLE)} runs fold into plain weights)")
    return found


def fold_fp32(source: str | Path, staging: Path, echo: Callable[[str], None]) -> tuple[Path, dict]:
    """`source` folded in fp32 into a hidden folder inside `staging` (the exports that convert it
    further delete it before their folder is renamed into place); returns (folder, manifest)."""
    import torch

    folded = staging / ".merged"
    echo(f"folding {source} into its base")
    return folded, fold_into(source, folded, dtype=torch.float32)


def fold_into(source: str | Path, folder: Path, *, dtype=None) -> dict:
    """Write `source` folded into its base as a transformers model folder; returns its manifest (or {})."""
    from ..artifacts import load_trained
    from ..quiet import held_load_report, no_progress_bars

    with no_progress_bars(), held_load_report():
        loaded = load_trained(source, full_precision_base=True)
        model = loaded.model
        if hasattr(model, "merge_and_unload"):
            model = model.merge_and_unload()
        if dtype is not None:
            model = model.to(dtype)
        model.save_pretrained(folder)
        loaded.tokenizer.save_pretrained(folder)
    return dict(loaded.manifest)


def card(manifest: dict, source: str, kind: str = "merged", extra: str | None = None) -> str:
    """The exported folder's model card; the training run's card follows when there is one."""
    base = manifest.get("base_model") or "unknown"
    method = manifest.get("method") or "full"
    lines = ["---", f"base_model: {base}", "library_name: transformers", "tags:", "- tunesmith", f"- {kind}",
             f"- {method}", "---", "", f"# {Path(source).name} ({kind})", "",
             f"The `{method}` run `{source}` folded into its base `{base}`: a plain transformers model.", "",
             *([extra, ""] if extra else []),
             "```python", f"from transformers import {manifest.get('auto_class') or 'AutoModelForCausalLM'}",
             f"model = {manifest.get('auto_class') or 'AutoModelForCausalLM'}.from_pretrained('path/to/this/folder')",
             "```"]
    trained_card = Path(source) / "README.md"
    if trained_card.is_file():
        body = trained_card.read_text().split("---", 2)[-1]
        lines += ["", "## The training run's card", "", body.strip()]
    return "\n".join(lines) + "\n"


def export_merged(source: str | Path, output: Path, *, dtype: str = "auto", overwrite: bool = False,
                  echo: Callable[[str], None] = print) -> Path:
    """`source` (a run, an artifact, a peft adapter folder) as a merged model folder at `output`."""
    import torch

    found = check_foldable(source)
    check_output(output, overwrite, source, found)
    _check_disk(source, found, output, dtype)
    dtypes = {"auto": None, "fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
    with staged_folder(output) as tmp:
        echo(f"folding {source} into its base")
        manifest = fold_into(source, tmp, dtype=dtypes[dtype])
        (tmp / "README.md").write_text(card(manifest, str(source)))
    echo(f"merged model: {output}")
    return output


def check_output(output: Path, overwrite: bool, source: str | Path, found: Path | None) -> None:
    """Refuse an output that exists (without overwrite) or that holds the source or the run's base model."""
    from ..artifacts import read_manifest

    base = read_manifest(found).get("base_model") if found is not None else None
    refuse_output_over_inputs(output, [source, *([base] if base else [])])
    if output.exists() and (not output.is_dir() or any(output.iterdir())) and not overwrite:
        raise ConfigError(f"output: {output} already exists and is not empty; choose another folder or pass "
                          "--overwrite (nothing was written)")


def source_folder(source: str | Path, found: Path | None) -> Path | None:
    """The local folder whose config.json and weights describe what `source` exports: the base of a
    run (the artifact itself for a full run), or `source` when it is a model folder."""
    from ..artifacts import _base_config, read_manifest
    from ..models import materialize

    folder = None
    if found is not None:
        manifest = read_manifest(found)
        folder = Path(found if manifest.get("artifact") == "model" else materialize(_base_config(manifest)))
    elif Path(str(source)).is_dir() and (Path(str(source)) / "config.json").is_file():
        folder = Path(str(source))
    return folder if folder is not None and folder.is_dir() else None


def free_space(output: Path) -> tuple[Path, int]:
    """(the nearest existing folder of `output`, its free bytes)."""
    probe = output if output.exists() else next(p for p in [output, *output.parents] if p.exists())
    return probe, shutil.disk_usage(probe).free


def _check_disk(source: str | Path, found: Path | None, output: Path, dtype: str) -> None:
    """Refuse before writing when the merged weights would not fit where they go."""
    folder = source_folder(source, found)
    if folder is None:
        return
    if not any(folder.glob("*.safetensors")):
        return
    from ..merging.sources import read_headers

    # The fold loads the base in fp32 and saves it so unless a half dtype is asked for: a bf16 base
    # takes twice its own size on disk with --dtype auto or fp32.
    tensors, _ = read_headers(folder)
    size = sum(math.prod(shape) for _, shape, _ in tensors.values()) * (2 if dtype in ("bf16", "fp16") else 4)
    probe, free = free_space(output)
    if size > free:
        raise ConfigError(f"output: the merged weights need about {size / 2**30:.2f} GiB but {probe} has "
                          f"{free / 2**30:.2f} GiB free (nothing was written)")
