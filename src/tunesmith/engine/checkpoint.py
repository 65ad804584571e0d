"""Checkpoints that survive crashes: written to a temp folder, then renamed into place.

A checkpoint holds only what learns (trainable parameters), plus optimizer, scheduler,
RNG states, the loop position and the objective's own state (adaptive coefficients, buffers),
which is everything needed to continue bit-for-bit.
"""

from __future__ import annotations

import json
import os
import random
import shutil
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from ..errors import TrainingError
from ..faults import reach

PREFIX = "step-"


def _rng_state() -> dict:
    state = {"python": random.getstate(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def trainable_state(model: nn.Module) -> dict[str, torch.Tensor]:
    return {
        n: p.detach().to("cpu", copy=True).contiguous()
        for n, p in model.named_parameters()
        if p.requires_grad
    }


def save_checkpoint(folder: Path, step: int, model: nn.Module, optimizer, scheduler, state: dict,
                    objective=None) -> Path:
    """Write step `step` into a hidden temporary folder, then rename it into place: a kill or a
    full disk mid-write never leaves a checkpoint that `--resume latest` would pick."""
    target = folder / f"{PREFIX}{step:07d}"
    tmp = folder / f".{target.name}.tmp"
    try:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        save_file(trainable_state(model), tmp / "trainable.safetensors")
        reach("checkpoint")  # a kill here leaves only the hidden temporary folder
        torch.save(optimizer.state_dict(), tmp / "optimizer.pt")
        torch.save(scheduler.state_dict(), tmp / "scheduler.pt")
        torch.save(_rng_state(), tmp / "rng.pt")
        objective_state = objective.state_dict() if objective is not None else {}
        if objective_state:
            torch.save(objective_state, tmp / "objective.pt")
        (tmp / "state.json").write_text(json.dumps(state, indent=1))
    except (OSError, RuntimeError) as exc:  # torch.save reports a full disk as a RuntimeError of its writer
        shutil.rmtree(tmp, ignore_errors=True)
        kept = list_checkpoints(folder)
        why = getattr(exc, "strerror", None) or str(exc)
        where = getattr(exc, "filename", None)
        raise TrainingError(
            f"could not write the checkpoint of step {step} to {folder}: {why}"
            f"{f' ({where})' if where else ''}; "
            + (f"the previous checkpoint {kept[-1]} is intact" if kept else "no earlier checkpoint exists")
            + " (free space or fix permissions, then --resume latest)") from exc
    if target.exists():  # the same step saved again (a resumed run): keep the old one until the new is in place
        aside = folder / f".{target.name}.old"
        shutil.rmtree(aside, ignore_errors=True)
        os.replace(target, aside)
        os.replace(tmp, target)
        shutil.rmtree(aside, ignore_errors=True)
    else:
        os.replace(tmp, target)
    return target


def check_readable(path: Path) -> None:
    """Cheap checks that a checkpoint can be loaded (run before the model is): every file there,
    state.json parses, the safetensors header reads."""
    from safetensors import safe_open

    if not (path / "state.json").is_file():
        raise TrainingError(f"{path} is not a tunesmith checkpoint (no state.json)")
    missing = [n for n in ("trainable.safetensors", "optimizer.pt", "scheduler.pt", "rng.pt") if not (path / n).is_file()]
    try:
        if missing:
            raise ValueError(f"missing {', '.join(missing)}")
        json.loads((path / "state.json").read_text())
        with safe_open(str(path / "trainable.safetensors"), framework="pt") as f:
            list(f.keys())
    except Exception as exc:  # any unreadable part: say which, and how to go on
        raise TrainingError(f"checkpoint {path} is damaged ({type(exc).__name__}: {exc}); resume from an earlier "
                            f"one with --resume {path.parent}/<step-folder>, or delete it") from None


def load_checkpoint(path: Path, model: nn.Module, optimizer, scheduler, objective=None) -> dict:
    check_readable(path)
    weights = load_file(path / "trainable.safetensors")
    params = dict(model.named_parameters())
    missing = [n for n, p in params.items() if p.requires_grad and n not in weights]
    unknown = [n for n in weights if n not in params]
    if missing or unknown:
        raise TrainingError(
            f"checkpoint {path} does not match this run's trainable parameters "
            f"(missing {missing[:3]}, unexpected {unknown[:3]}); was the method or model changed?"
        )
    restore_weights(path, model, objective, weights)
    optimizer.load_state_dict(torch.load(path / "optimizer.pt", weights_only=True))
    scheduler.load_state_dict(torch.load(path / "scheduler.pt", weights_only=True))
    _set_rng_state(torch.load(path / "rng.pt", weights_only=True))
    return json.loads((path / "state.json").read_text())


def restore_weights(path: Path, model: nn.Module, objective=None, weights: dict | None = None) -> None:
    """The weights a checkpoint holds (`weights` when already read), and the objective's own state (a
    multi-task run's extra heads, PPO's value head and coefficients)."""
    params = dict(model.named_parameters())
    with torch.no_grad():
        for n, w in (weights if weights is not None else load_file(path / "trainable.safetensors")).items():
            params[n].copy_(w)
    if objective is not None and (path / "objective.pt").is_file():
        objective.load_state_dict(torch.load(path / "objective.pt", weights_only=True))


def list_checkpoints(folder: Path) -> list[Path]:
    """Complete checkpoints, oldest first. One moved aside by a save killed before its
    replacement landed is put back first."""
    if not folder.is_dir():
        return []
    for aside in folder.glob(f".{PREFIX}*.old"):
        target = folder / aside.name[1:-len(".old")]
        if not target.exists():
            os.replace(aside, target)
    return sorted(p for p in folder.iterdir() if p.is_dir() and p.name.startswith(PREFIX)
                  and (p / "state.json").is_file())


def step_of(path: Path) -> int:
    return int(path.name[len(PREFIX):])


def prune(folder: Path, keep_last: int, keep_step: int | None) -> None:
    """Keep the newest `keep_last` checkpoints plus the best one."""
    ckpts = list_checkpoints(folder)
    for old in ckpts[:-keep_last]:
        if keep_step is None or step_of(old) != keep_step:
            shutil.rmtree(old, ignore_errors=True)
