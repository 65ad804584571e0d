"""Crash recovery of the real CLI: `tunesmith train` killed with SIGKILL again and again — at
seeded points inside training steps, evaluations, checkpoint writes, metrics writes and the final
save, and at seeded random moments — then `--resume latest` each time, ends with the weights and
the whole metrics.jsonl of an uninterrupted run. SIGINT/SIGTERM checkpoint and exit non-zero.
Unwritable output fails with the path named and the previous checkpoint intact."""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from tunesmith.engine import checkpoint as ckpt
from tunesmith.engine.tracking import read_metrics

HERE = Path(__file__).resolve().parent


class Zygote:
    """tests/chaos_zygote.py: forks warm children that run the CLI."""

    def __init__(self):
        env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(HERE.parent / "src"), os.environ.get("PYTHONPATH", "")]),
               "OMP_NUM_THREADS": "1"}
        self.proc = subprocess.Popen([sys.executable, str(HERE / "chaos_zygote.py")], stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, text=True, env=env)
        assert json.loads(self.proc.stdout.readline()) == {"ready": True}

    def run(self, args: list[str], log: Path, env: dict | None = None, kill_after: float | None = None) -> dict:
        self.proc.stdin.write(json.dumps({"args": args, "env": env or {}, "log": str(log),
                                          "kill_after": kill_after}) + "\n")
        self.proc.stdin.flush()
        return json.loads(self.proc.stdout.readline())

    def close(self):
        self.proc.stdin.close()
        self.proc.wait(timeout=30)


@pytest.fixture(scope="module")
def zygote():
    z = Zygote()
    yield z
    z.close()


def _config(run_config, out: Path) -> dict:
    # 36 rows, 25 % validation, batch 4: 7 steps an epoch; 8 epochs = 56 steps, evaluation every
    # 4, a checkpoint every 3; LoRA dropout draws from the RNG, so every resume must restore it.
    # Long enough that the planned kills below (at most ~30 steps of progress together) all land
    # before the run's end.
    return run_config(data={"split": {"validation_ratio": 0.25}}, method={"dropout": 0.1},
                      training={"epochs": 8, "save_every": 3, "keep_last": 2, "log_every": 1},
                      eval={"every": 4}, output={"dir": str(out)})


def _comparable(run_dir: Path) -> list[dict]:
    return [{k: v for k, v in r.items() if k != "tokens_per_s"} for r in read_metrics(run_dir / "metrics.jsonl")]


def _checkpoints_load(run_dir: Path) -> None:
    """Every checkpoint --resume latest could pick is complete and readable."""
    for c in ckpt.list_checkpoints(run_dir / "checkpoints"):
        json.loads((c / "state.json").read_text())
        load_file(c / "trainable.safetensors")
        for name in ("optimizer.pt", "scheduler.pt", "rng.pt"):
            torch.load(c / name, weights_only=True)


def test_sigkill_chaos_ends_like_an_uninterrupted_run(zygote, run_config, tmp_path):
    ref_dir, chaos_dir = tmp_path / "reference", tmp_path / "chaos"
    ref_cfg = tmp_path / "reference.yaml"
    ref_cfg.write_text(yaml.safe_dump(_config(run_config, ref_dir)))
    cfg = tmp_path / "chaos.yaml"
    cfg.write_text(yaml.safe_dump(_config(run_config, chaos_dir)))
    log = tmp_path / "train.log"

    t = time.monotonic()
    done = zygote.run(["train", str(ref_cfg)], log)
    assert done == {"exit": 0, "seconds": done["seconds"]}, log.read_text()[-3000:]
    full_run = time.monotonic() - t

    rng = random.Random(2026)
    # (fault point, which reach of it in that process session); the kill lands exactly there.
    planned = [("checkpoint", 1), ("step", 2), ("eval", 1), ("metrics", 3), ("checkpoint", 2),
               ("eval", 2), ("step", 5), ("metrics", 1), ("checkpoint", 1), ("step", 3)]
    rng.shuffle(planned)
    planned.append(("artifact", 1))  # the final save: the whole run trains before this kill
    kills, phases = 0, []
    # Then random moments of whole resumed sessions (each may land anywhere, or after the end).
    attempts = [("fault", p) for p in planned] + [("time", rng.uniform(0.1, 1.0) * full_run) for _ in range(3)]
    for kind, what in attempts:
        args = ["train", str(cfg)]
        if ckpt.list_checkpoints(chaos_dir / "checkpoints"):
            args += ["--resume", "latest"]
        elif chaos_dir.exists():
            args += ["--set", "output.overwrite=true"]  # killed before its first checkpoint: start again
        if kind == "fault":
            result = zygote.run(args, log, env={"TUNESMITH_FAULT": f"{what[0]}:{what[1]}"})
        else:
            result = zygote.run(args, log, kill_after=what)
        if "signal" in result:
            assert result["signal"] == signal.SIGKILL
            kills += 1
            phases.append(what[0] if kind == "fault" else "time")
            _checkpoints_load(chaos_dir)
        else:
            assert kind == "time" and result["exit"] == 0, (what, log.read_text()[-3000:])
    assert kills >= 11 and {"checkpoint", "eval", "step", "metrics", "artifact"} <= set(phases), phases
    if "signal" in result:  # whatever state the last kill left, resuming finishes the run
        final = zygote.run(["train", str(cfg), "--resume", "latest"], log)
        assert final.get("exit") == 0, log.read_text()[-3000:]

    a = load_file(ref_dir / "adapter" / "adapter_model.safetensors")
    b = load_file(chaos_dir / "adapter" / "adapter_model.safetensors")
    assert a.keys() == b.keys() and a
    for name in a:
        assert torch.allclose(a[name], b[name], atol=1e-6, rtol=0), name
    ra, rb = _comparable(ref_dir), _comparable(chaos_dir)
    assert [r["step"] for r in ra] == [r["step"] for r in rb]
    for x, y in zip(ra, rb):
        assert x.keys() == y.keys()
        for k in x:
            assert x[k] == pytest.approx(y[k], abs=1e-6), (x["step"], k)
    assert not list((chaos_dir / "checkpoints").glob(".*"))  # no half-written checkpoint left over


@pytest.mark.parametrize("sig, code", [(signal.SIGINT, 130), (signal.SIGTERM, 143)])
def test_sigint_and_sigterm_checkpoint_and_say_how_to_resume(zygote, run_config, tmp_path, sig, code):
    out = tmp_path / "run"
    cfg = tmp_path / "run.yaml"
    cfg.write_text(yaml.safe_dump(run_config(training={"max_steps": 400, "save_every": 1000},
                                             output={"dir": str(out)})))
    log = tmp_path / "train.log"
    # The child signals itself from the first step's fault point (no kill: the handler must act).
    env = {"TUNESMITH_FAULT": "step:2", "TUNESMITH_FAULT_SIGNAL": str(int(sig))}
    result = zygote.run(["train", str(cfg)], log, env=env)
    text = " ".join(log.read_text().split())
    assert result.get("exit") == code, text[-2000:]
    assert f"{signal.Signals(sig).name}: training stopped after step 2" in text
    assert f"resume: tunesmith train {cfg} --resume latest" in text and "Traceback" not in text
    saved = ckpt.list_checkpoints(out / "checkpoints")
    assert [ckpt.step_of(c) for c in saved] == [2]
    resumed = zygote.run(["train", str(cfg), "--resume", "latest", "--set", "training.max_steps=3"], log)
    assert resumed.get("exit") == 0 and "resumed from" in log.read_text()


def test_a_full_disk_under_torch_save_is_reported_like_any_write_error(run_config, tmp_path, monkeypatch):
    """torch.save reports ENOSPC as a RuntimeError of its zip writer, not an OSError."""
    import tunesmith
    from tunesmith.errors import TrainingError

    cfg = run_config(training={"max_steps": 4, "save_every": 2}, output={"dir": str(tmp_path / "run")})
    real = ckpt.torch.save
    calls = {"n": 0}

    def full_disk(obj, path, *a, **k):
        calls["n"] += 1
        if calls["n"] == 4:  # step 2 saves optimizer, scheduler, rng; step 4's optimizer fails
            raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 1472 vs 1364")
        return real(obj, path, *a, **k)

    monkeypatch.setattr(ckpt.torch, "save", full_disk)
    with pytest.raises(TrainingError, match=r"could not write the checkpoint of step 4 .*unexpected pos.*"
                                            r"step-0000002 is intact"):
        tunesmith.train(cfg, echo=lambda m: None)
    kept = ckpt.list_checkpoints(tmp_path / "run" / "checkpoints")
    assert [ckpt.step_of(c) for c in kept] == [2]
    assert not list((tmp_path / "run" / "checkpoints").glob(".*"))


def test_unwritable_output_names_the_path_and_keeps_the_last_checkpoint(run_config, tmp_path, monkeypatch):
    import tunesmith
    from tunesmith.errors import TrainingError

    cfg = run_config(training={"max_steps": 4, "save_every": 2}, output={"dir": str(tmp_path / "run")})
    real = ckpt.save_file
    calls = {"n": 0}

    def full_disk(tensors, path, *a, **k):
        calls["n"] += 1
        if calls["n"] == 2:
            raise OSError(28, "No space left on device", str(path))
        return real(tensors, path, *a, **k)

    monkeypatch.setattr(ckpt, "save_file", full_disk)
    with pytest.raises(TrainingError, match=r"could not write the checkpoint of step 4 to .*checkpoints.*"
                                            r"No space left on device.*step-0000002 is intact"):
        tunesmith.train(cfg, echo=lambda m: None)
    kept = ckpt.list_checkpoints(tmp_path / "run" / "checkpoints")
    assert [ckpt.step_of(c) for c in kept] == [2]
    _checkpoints_load(tmp_path / "run")
    assert not list((tmp_path / "run" / "checkpoints").glob(".*"))
