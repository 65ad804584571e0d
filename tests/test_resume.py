"""Checkpoints and resuming: an interrupted run, resumed, ends exactly where an uninterrupted one does."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import tunesmith
from tunesmith.config import load_config
from tunesmith.engine import checkpoint as ckpt
from tunesmith.engine.tracking import read_metrics
from tunesmith.errors import ConfigError, TrainingError
from tunesmith.objectives import OBJECTIVES, Objective
from tunesmith.objectives.causal_lm import SFT


def quiet(_msg: str) -> None:
    pass


class SimulatedCrash(Exception):
    pass


class CrashesAt(SFT):
    """The sft objective, except that it dies on micro-batch `micro` of training step `step`
    (after the forward passes before it have drawn from the RNG, like a real crash).

    Finished steps are counted with a global optimizer-step hook, so the count is right
    however many micro-batches a step has (the last window of an epoch may be shorter)."""

    name = "sft"
    packs = True

    def __init__(self, step: int, micro: int = 0):
        super().__init__()
        self.inner, self.step, self.micro = OBJECTIVES["sft"](), step, micro
        self.steps_done = self.seen = 0

    def __call__(self, cfg=None):  # stands in for the registry's class: the run gets this instance
        return self

    def on_step(self, *_):
        self.steps_done += 1

    def loss(self, ctx, batch):
        out = self.inner.loss(ctx, batch)
        if ctx.policy.training and self.steps_done == self.step - 1:
            if self.seen == self.micro:
                raise SimulatedCrash(f"killed in step {self.step}, micro-batch {self.micro}")
            self.seen += 1
        return out


def train_until_crash(cfg: dict, crash: CrashesAt, monkeypatch) -> None:
    from torch.optim.optimizer import register_optimizer_step_post_hook

    handle = register_optimizer_step_post_hook(crash.on_step)
    try:
        with monkeypatch.context() as m:
            m.setitem(OBJECTIVES, "sft", crash)
            with pytest.raises(SimulatedCrash):
                tunesmith.train(cfg, echo=quiet)
    finally:
        handle.remove()


def final_weights(run_dir: Path) -> dict[str, torch.Tensor]:
    adapter = run_dir / "adapter" / "adapter_model.safetensors"
    return load_file(adapter if adapter.is_file() else run_dir / "model" / "model.safetensors")


def comparable(run_dir: Path) -> list[dict]:
    """metrics.jsonl without the wall-clock field."""
    return [{k: v for k, v in r.items() if k != "tokens_per_s"} for r in read_metrics(run_dir / "metrics.jsonl")]


CASES = {
    # LoRA dropout draws from the torch RNG every step: resuming must restore it.
    # 12 packed rows / batch 4 = 3 steps per epoch, 3 epochs, shuffled per epoch: the
    # checkpoint at step 4 is in the middle of epoch 2, so the data position must be restored.
    "lora-dropout-shuffle": dict(
        sections=dict(method={"dropout": 0.1}, training={"epochs": 3, "save_every": 2}),
        crash=dict(step=6), resume_from=4, steps=9,
    ),
    # The same with the base layers' matmuls in int8 (training.precision int8): the int8 copies are
    # rebuilt from the base weights on resume and must give the same steps.
    "lora-int8-dropout": dict(
        sections=dict(method={"dropout": 0.1}, training={"epochs": 3, "save_every": 2, "precision": "int8"}),
        crash=dict(step=6), resume_from=4, steps=9,
    ),
    # Full fine-tuning with accumulation and periodic evaluation: 9 packed rows / batch 2 =
    # 5 micro-batches = 3 steps (2+2+1) per epoch. The checkpoint at step 3 ends epoch 1;
    # the run dies on the second micro-batch of step 5, with step 4 already logged.
    "full-accum-eval": dict(
        sections=dict(method={"type": "full"}, data={"split": {"validation_ratio": 0.25}},
                      training={"epochs": 2, "batch_size": 2, "grad_accum": 2, "save_every": 3,
                                "learning_rate": 1e-3},
                      eval={"every": 2}),
        crash=dict(step=5, micro=1), resume_from=3, steps=6,
    ),
    # LoRA-FA's A matrices are frozen, so a checkpoint (trainable weights only) lacks them:
    # the resumed run rebuilds them from the seed and its saved adapter, A included, and its
    # optimizer (peft's LoRA-FA, which projects B's gradient through A) must match.
    "lora_fa-frozen-A": dict(
        sections=dict(method={"type": "lora_fa"}, training={"epochs": 2, "save_every": 3}),
        crash=dict(step=5), resume_from=3, steps=6,
    ),
    # Records every 2 steps, checkpoint at step 3: the record of step 4 averages steps 3 and
    # 4 across the interruption. With TensorBoard on, the resumed run must hide the events
    # the interrupted one logged after its checkpoint.
    "log-window-tensorboard": dict(
        sections=dict(training={"epochs": 2, "save_every": 3, "log_every": 2},
                      tracking={"tensorboard": True}),
        crash=dict(step=5), resume_from=3, steps=6,
    ),
}


@pytest.mark.parametrize("case", list(CASES))
def test_resume_matches_uninterrupted_run(run_config, tmp_path, monkeypatch, case):
    spec = CASES[case]
    cfg_a = run_config(**spec["sections"], output={"dir": str(tmp_path / "a")})
    cfg_b = run_config(**spec["sections"], output={"dir": str(tmp_path / "b")})

    a = tunesmith.train(cfg_a, echo=quiet)
    assert a.steps == spec["steps"]

    train_until_crash(cfg_b, CrashesAt(**spec["crash"]), monkeypatch)
    b_dir = tmp_path / "b"
    assert not (b_dir / "adapter").exists() and not (b_dir / "model").exists()
    latest = ckpt.list_checkpoints(b_dir / "checkpoints")[-1]
    assert ckpt.step_of(latest) == spec["resume_from"]
    # The interrupted run logged steps past its last checkpoint; resuming must drop them.
    logged = [r["step"] for r in read_metrics(b_dir / "metrics.jsonl") if "loss" in r]
    assert logged[-1] == spec["crash"]["step"] - 1 > spec["resume_from"]

    lines = []
    b = tunesmith.train(cfg_b, resume=True, echo=lines.append)
    assert any(f"resumed from {latest} at step {spec['resume_from']}" in line for line in lines)
    assert b.steps == a.steps and b.run_dir == b_dir

    wa, wb = final_weights(a.run_dir), final_weights(b.run_dir)
    assert wa.keys() == wb.keys() and wa
    for name in wa:
        assert torch.allclose(wa[name], wb[name], atol=1e-6, rtol=0), name

    ra, rb = comparable(a.run_dir), comparable(b.run_dir)
    assert [r["step"] for r in ra] == [r["step"] for r in rb]
    for x, y in zip(ra, rb):
        assert x.keys() == y.keys()
        for k in x:
            assert x[k] == pytest.approx(y[k], abs=1e-6), (x["step"], k)
    assert a.metrics == pytest.approx(b.metrics, abs=1e-6)

    if spec["sections"].get("tracking", {}).get("tensorboard"):
        from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

        acc = EventAccumulator(str(b_dir / "tensorboard"))
        acc.Reload()
        shown = [(e.step, e.value) for e in acc.Scalars("loss")]
        assert [s for s, _ in shown] == [r["step"] for r in rb if "loss" in r]  # each step once
        for (_, value), r in zip(shown, [r for r in rb if "loss" in r]):
            assert value == pytest.approx(r["loss"], rel=1e-6)


def test_resume_from_an_explicit_checkpoint(run_config, tmp_path):
    cfg = run_config(training={"max_steps": 4, "save_every": 2, "keep_last": 5})
    first = tunesmith.train(cfg, echo=quiet)
    early = first.run_dir / "checkpoints" / "step-0000002"
    assert json.loads((early / "state.json").read_text())["step"] == 2
    # Resuming from a checkpoint or from a run folder continues that run whatever output.dir says.
    elsewhere = run_config(training={"max_steps": 4, "save_every": 2, "keep_last": 5},
                           output={"dir": str(tmp_path / "unused")})
    again = tunesmith.train(elsewhere, resume=str(early), echo=quiet)
    assert again.run_dir == first.run_dir and again.steps == 4
    assert [r["step"] for r in read_metrics(first.run_dir / "metrics.jsonl") if "loss" in r] == [1, 2, 3, 4]
    done = tunesmith.train(elsewhere, resume=str(first.run_dir), echo=quiet)
    assert done.steps == 4  # the latest checkpoint is the end: nothing left to do
    assert not (tmp_path / "unused").exists()


def test_resume_with_another_method_is_refused(run_config, tmp_path):
    cfg = run_config(training={"max_steps": 2, "save_every": 2})
    run = tunesmith.train(cfg, echo=quiet)
    config_before = (run.run_dir / "config.yaml").read_text()
    cfg["method"] = {"type": "full"}
    with pytest.raises(ConfigError, match=r"the config differs from the interrupted run's .*method.type: 'lora' -> 'full'"):
        tunesmith.train(cfg, resume=True, echo=quiet)
    assert (run.run_dir / "config.yaml").read_text() == config_before
    # A checkpoint given to another model (by a caller of the engine) is refused as well.
    latest = ckpt.list_checkpoints(run.run_dir / "checkpoints")[-1]
    other = torch.nn.Linear(2, 2)
    opt = torch.optim.SGD(other.parameters(), lr=0.1)
    with pytest.raises(TrainingError, match="does not match this run's trainable parameters"):
        ckpt.load_checkpoint(latest, other, opt, torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0))


def test_resume_may_change_reporting_but_not_training(run_config):
    cfg = run_config(training={"max_steps": 2, "save_every": 1})
    tunesmith.train(cfg, echo=quiet)
    cfg["training"]["progress"] = True
    cfg["training"]["keep_last"] = 5
    tunesmith.train(cfg, resume=True, echo=quiet)  # reporting and saving settings may change
    cfg["training"]["learning_rate"] = 0.5
    cfg["data"]["max_length"] = 32
    with pytest.raises(ConfigError, match=r"data.max_length: 64 -> 32; training.learning_rate: 0.01 -> 0.5"):
        tunesmith.train(cfg, resume=True, echo=quiet)


# ---------------------------------------------------------------------------- checkpoints


def test_keep_last_keeps_the_newest_and_the_best(run_config):
    # Full fine-tuning at lr 0.1: validation loss is best after step 1, then worse.
    cfg = run_config(
        data={"split": {"validation_ratio": 0.25}},
        method={"type": "full"},
        training={"max_steps": 7, "save_every": 1, "keep_last": 2, "learning_rate": 0.1,
                  "scheduler": "constant"},
        eval={"every": 1},
    )
    result = tunesmith.train(cfg, echo=quiet)
    evals = [r for r in read_metrics(result.run_dir / "metrics.jsonl") if "eval_loss" in r and not r.get("final")]
    best = min(evals, key=lambda r: r["eval_loss"])["step"]
    assert best < 6, "the best step should be an old one for this test to mean something"

    folder = result.run_dir / "checkpoints"
    assert sorted(p.name for p in folder.iterdir()) == [f"step-{s:07d}" for s in (best, 6, 7)]
    for path in folder.iterdir():
        assert sorted(f.name for f in path.iterdir()) == [
            "optimizer.pt", "rng.pt", "scheduler.pt", "state.json", "trainable.safetensors"]
        state = json.loads((path / "state.json").read_text())
        assert state["step"] == ckpt.step_of(path) and state["best_step"] == best
    assert not [p for p in result.run_dir.rglob("*") if p.name.endswith(".tmp")]
    # config.yaml in the run folder is the resolved config and reloads as such.
    reloaded = load_config(result.run_dir / "config.yaml")
    assert reloaded.model_dump() == load_config(cfg).model_dump()


def test_crash_while_writing_a_checkpoint_keeps_the_previous_one(run_config, monkeypatch):
    cfg = run_config(training={"max_steps": 4, "save_every": 2})
    real = ckpt._rng_state
    with monkeypatch.context() as m:
        calls = []

        def dies_on_second_save():
            calls.append(1)
            if len(calls) == 2:
                raise SimulatedCrash("disk full")
            return real()

        m.setattr(ckpt, "_rng_state", dies_on_second_save)
        with pytest.raises(SimulatedCrash):
            tunesmith.train(cfg, echo=quiet)
    folder = Path(cfg["output"]["dir"]) / "checkpoints"
    # The half-written checkpoint stays a hidden temp folder and is never taken for a checkpoint.
    assert sorted(p.name for p in folder.iterdir()) == [".step-0000004.tmp", "step-0000002"]
    assert [p.name for p in ckpt.list_checkpoints(folder)] == ["step-0000002"]
    result = tunesmith.train(cfg, resume=True, echo=quiet)
    assert result.steps == 4
    assert sorted(p.name for p in folder.iterdir()) == ["step-0000002", "step-0000004"]


# ---------------------------------------------------------------------------- run folder


def test_existing_run_folder_needs_overwrite(run_config):
    cfg = run_config(training={"max_steps": 1})
    run_dir = tunesmith.train(cfg, echo=quiet).run_dir
    before = (run_dir / "metrics.jsonl").read_text()
    with pytest.raises(ConfigError, match="already holds a run.*--resume.*overwrite"):
        tunesmith.train(cfg, echo=quiet)
    assert (run_dir / "metrics.jsonl").read_text() == before  # nothing was touched

    (run_dir / "stale.txt").write_text("from an older run")
    cfg["output"]["overwrite"] = True
    tunesmith.train(cfg, echo=quiet)
    assert not (run_dir / "stale.txt").exists()
    assert len(read_metrics(run_dir / "metrics.jsonl")) == 1


def test_resume_without_checkpoint_is_a_config_error(run_config, tmp_path):
    cfg = run_config(training={"max_steps": 1})
    with pytest.raises(ConfigError, match="no checkpoint"):
        tunesmith.train(cfg, resume=True, echo=quiet)
    tunesmith.train(cfg, echo=quiet)  # a finished run, but save_every was not set
    with pytest.raises(ConfigError, match="no checkpoint .*save_every"):
        tunesmith.train(cfg, resume=True, echo=quiet)
    with pytest.raises(ConfigError, match="neither a checkpoint nor a run folder"):
        tunesmith.train(cfg, resume=str(tmp_path / "nowhere"), echo=quiet)


@pytest.mark.parametrize("method, message", [
    ({"type": "freeze", "trainable_modules": ["nrom"]}, "no module matches 'nrom'"),
    ({"type": "freeze", "train_last_n_layers": 0}, "leaves no parameter trainable"),
    ({"type": "freeze", "train_last_n_layers": 5}, "only 2 blocks"),
    ({"type": "lora", "target_modules": ["q_porj"]}, "target_modules=['q_porj']"),
])
def test_rejected_method_leaves_run_folders_alone(run_config, method, message):
    cfg = run_config(method=method, training={"max_steps": 1})
    run_dir = Path(cfg["output"]["dir"])
    with pytest.raises(ConfigError, match=message.replace("[", r"\[").replace("(", r"\(")):
        tunesmith.train(cfg, echo=quiet)
    assert not run_dir.exists()  # so the corrected config is not refused as "already a run"

    # With overwrite on, a rejected config does not wipe the run that is already there.
    good = run_config(training={"max_steps": 1})
    tunesmith.train(good, echo=quiet)
    cfg["output"]["overwrite"] = True
    with pytest.raises(ConfigError):
        tunesmith.train(cfg, echo=quiet)
    assert (run_dir / "adapter" / "adapter_model.safetensors").is_file()


def test_resuming_a_finished_run_keeps_one_final_evaluation(run_config):
    cfg = run_config(data={"split": {"validation_ratio": 0.25}}, training={"max_steps": 2, "save_every": 2})
    first = tunesmith.train(cfg, echo=quiet)
    again = tunesmith.train(cfg, resume=True, echo=quiet)
    assert again.steps == first.steps == 2
    records = read_metrics(first.run_dir / "metrics.jsonl")
    assert [r["step"] for r in records if "loss" in r] == [1, 2]
    finals = [r for r in records if r.get("final")]
    assert len(finals) == 1 and finals[0]["eval_loss"] == pytest.approx(first.metrics["eval_loss"], abs=1e-6)
