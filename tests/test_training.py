"""The training loop on a tiny Llama: does it learn, freeze, accumulate, stop and log as it says?"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file

import tunesmith
from tunesmith.engine.tracking import read_metrics
from tunesmith.errors import TrainingError
from tunesmith.objectives import OBJECTIVES, LossOutput, Objective
from tunesmith.objectives.causal_lm import SFT


def losses(run_dir) -> list[tuple[int, float]]:
    return [(r["step"], r["loss"]) for r in read_metrics(run_dir / "metrics.jsonl") if "loss" in r]


def state_of(folder) -> dict[str, torch.Tensor]:
    """Every weight of a saved transformers model folder, as loaded by plain transformers."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


# ---------------------------------------------------------------------------- learning

# batch_size 12 holds all 12 packed rows, so every step sees the same batch and the loss
# curve is a clean overfitting curve (deterministic: fixed seed, fixed tiny model).
METHODS = {
    "lora": ({"type": "lora", "r": 8, "alpha": 32, "dropout": 0.0}, 2e-2, 0.4),
    "full": ({"type": "full"}, 1e-2, 2.0),
    "freeze": ({"type": "freeze", "train_last_n_layers": 1, "trainable_modules": ["norm"]}, 6e-2, 0.4),
}


@pytest.mark.parametrize("name", list(METHODS))
def test_loss_decreases(run_config, name):
    method, lr, drop = METHODS[name]
    cfg = run_config(method=method, training={"batch_size": 12, "max_steps": 10, "learning_rate": lr})
    result = tunesmith.train(cfg, echo=lambda m: None)
    curve = losses(result.run_dir)
    assert [s for s, _ in curve] == list(range(1, 11))
    first, last = curve[0][1], curve[-1][1]
    # Step 1 runs on the untouched base model: about log(vocab) for a random tiny model.
    assert 5.5 < first < 6.5
    assert last < first - drop, curve
    assert all(math.isfinite(v) for _, v in curve)
    assert result.steps == 10 and result.metrics["loss"] == pytest.approx(last)


def test_freeze_trains_only_the_chosen_blocks(run_config, tiny_model_dir):
    cfg = run_config(
        method={"type": "freeze", "train_last_n_layers": 1, "trainable_modules": ["norm"]},
        training={"max_steps": 3, "save_every": 3, "learning_rate": 5e-2},
    )
    lines = []
    result = tunesmith.train(cfg, echo=lines.append)

    base = state_of(tiny_model_dir)
    tuned = state_of(result.run_dir / "model")
    assert tuned.keys() == base.keys()
    chosen = {k for k in base if k.startswith("model.layers.1.") or k == "model.norm.weight"}
    assert len(chosen) == 10  # 7 linear weights + 2 block norms in block 1, plus the final norm
    for name in base:
        if name in chosen:
            assert not torch.equal(tuned[name], base[name]), f"{name} should have learned"
        else:
            assert torch.equal(tuned[name], base[name]), f"{name} should be frozen (bit-identical)"

    # The counts: block 1 plus the final norm, against every distinct tensor (the tied
    # embedding / LM head counts once).
    expected = sum(base[k].numel() for k in chosen)
    total = sum(v.numel() for k, v in base.items() if k != "lm_head.weight")
    assert (result.trainable_params, result.total_params) == (expected, total)
    assert any(f"{expected:,} trainable of {total:,} parameters" in line for line in lines), lines
    # The checkpoint holds exactly the parameters that learn.
    ckpt = load_file(result.run_dir / "checkpoints" / "step-0000003" / "trainable.safetensors")
    assert set(ckpt) == chosen


class RecordsBatches(SFT):
    """The sft objective, noting which rows (token tuples, padding cut) each training forward saw."""

    name = "sft"
    packs = True

    def __init__(self, pad_id: int):
        super().__init__()
        self.inner, self.pad_id, self.seen = OBJECTIVES["sft"](), pad_id, []

    def __call__(self, cfg=None):  # stands in for the registry's class: the run gets this instance
        return self

    def loss(self, ctx, batch):
        if ctx.policy.training:
            rows = []
            for ids in batch["input_ids"].tolist():
                while ids and ids[-1] == self.pad_id:
                    ids.pop()
                rows.append(tuple(ids))
            self.seen.append(rows)
        return self.inner.loss(ctx, batch)


@pytest.mark.parametrize("shuffle", [True, False])
def test_every_epoch_sees_every_row_once(run_config, monkeypatch, tiny_tokenizer, shuffle):
    from tunesmith.config import load_config
    from tunesmith.data.pipeline import build_data

    recorder = RecordsBatches(tiny_tokenizer.pad_token_id)
    monkeypatch.setitem(OBJECTIVES, "sft", recorder)
    # 12 packed rows / batch 4 = 3 steps per epoch; 2 epochs.
    cfg = run_config(method={"type": "full"}, data={"shuffle": shuffle}, training={"epochs": 2})
    assert tunesmith.train(cfg, echo=lambda m: None).steps == 6
    rows = build_data(load_config(cfg).data, tiny_tokenizer, seed=42, packing=True).train
    everything = sorted(tuple(r["input_ids"]) for r in rows)
    assert len(everything) == 12
    epochs = [sum(recorder.seen[:3], []), sum(recorder.seen[3:], [])]
    assert sorted(epochs[0]) == sorted(epochs[1]) == everything
    # Shuffling draws a new order each epoch; without it the order repeats.
    assert (epochs[0] != epochs[1]) == shuffle


# ---------------------------------------------------------------------------- accumulation

# Answers of very different lengths: micro-batches then hold different numbers of label
# tokens, so averaging per micro-batch would weigh tokens unequally and give other numbers.
ACCUM_ROWS = [
    ("what is the capital of france", "paris"),
    ("what color is the sky", "the sky is blue and the water is blue and the sky is blue"),
    ("is this movie good", "positive"),
    ("is this movie bad", "negative because the movie was bad and it was not good at all"),
    ("what is one and one", "two"),
    ("call the water", "blue water"),
    ("what is the color of the sky", "blue"),
    ("is this a good movie", "it is a good movie and it was great"),
]


def _token_mean_loss(model_dir, rows: list[dict]) -> tuple[float, float]:
    """(loss averaged over all label tokens, mean of the two half-batches' own averages),
    computed with plain transformers on the base model."""
    from transformers import AutoModelForCausalLM

    from tunesmith.data.collate import Collator

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()

    def sums(part):
        batch = Collator(pad_token_id=3)(part)
        with torch.no_grad():
            logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        labels = batch["labels"][:, 1:]
        mask = labels != -100
        return float(F.cross_entropy(logits[:, :-1][mask], labels[mask], reduction="sum")), int(mask.sum())

    (s1, n1), (s2, n2) = sums(rows[:2]), sums(rows[2:])
    assert n1 != n2  # the test only means something when the halves differ
    return (s1 + s2) / (n1 + n2), (s1 / n1 + s2 / n2) / 2


def test_grad_accum_matches_one_big_batch(run_config, tmp_path, tiny_model_dir, tiny_tokenizer):
    from tunesmith.config import load_config
    from tunesmith.data.pipeline import build_data

    data = tmp_path / "accum.jsonl"
    data.write_text("".join(json.dumps({"instruction": q, "input": "", "output": a}) + "\n"
                            for q, a in ACCUM_ROWS))
    runs = {}
    for bs, accum in ((4, 1), (2, 2)):
        cfg = run_config(
            data={"train": str(data), "packing": False, "shuffle": False},
            method={"type": "full"},
            training={"batch_size": bs, "grad_accum": accum, "max_steps": 2, "scheduler": "constant"},
            output={"dir": str(tmp_path / f"run-{bs}x{accum}")},
        )
        runs[bs, accum] = tunesmith.train(cfg, echo=lambda m: None).run_dir

    big, small = (read_metrics(runs[k] / "metrics.jsonl") for k in ((4, 1), (2, 2)))
    assert [r["step"] for r in big] == [r["step"] for r in small] == [1, 2]
    for a, b in zip(big, small):
        assert a["loss"] == pytest.approx(b["loss"], abs=1e-5)
        # Adam hides a constant scale of the gradient; the norm before clipping does not.
        assert a["grad_norm"] == pytest.approx(b["grad_norm"], rel=1e-5)
    wa, wb = state_of(runs[4, 1] / "model"), state_of(runs[2, 2] / "model")
    # Adam divides by sqrt(v): where a gradient is near zero, summation-order noise of the two
    # batchings moves that element's update by up to ~1e-5 (seen on an AVX2 EPYC), 0.1 % of one
    # step at lr 1e-2; a real accumulation error moves whole tensors by a share of lr.
    for name in wa:
        torch.testing.assert_close(wa[name], wb[name], atol=5e-5, rtol=0)

    # Step 1's logged loss is the base model's mean over every label token of rows 0-3,
    # computed independently; the per-micro-batch average would be a different number.
    cfg = load_config(run_config(data={"train": str(data), "packing": False, "shuffle": False}))
    rows = build_data(cfg.data, tiny_tokenizer, seed=42, packing=False).train[:4]
    token_mean, micro_mean = _token_mean_loss(tiny_model_dir, rows)
    assert abs(token_mean - micro_mean) > 1e-4  # 10x the tolerance used below
    assert big[0]["loss"] == pytest.approx(token_mean, abs=1e-5)


def test_gradient_checkpointing_changes_nothing_but_memory(run_config, tmp_path):
    weights = []
    for gc in (False, True):
        cfg = run_config(method={"dropout": 0.1},
                         training={"max_steps": 2, "gradient_checkpointing": gc},
                         output={"dir": str(tmp_path / f"gc-{gc}")})
        result = tunesmith.train(cfg, echo=lambda m: None)
        weights.append(load_file(result.artifact_dir / "adapter_model.safetensors"))
    for name in weights[0]:
        torch.testing.assert_close(weights[0][name], weights[1][name], atol=1e-6, rtol=0)


def test_runs_with_different_precisions_in_one_process(run_config, tmp_path):
    # accelerate's settings are process-wide; each train() call must get its own precision.
    for i, precision in enumerate(("fp32", "bf16", "fp32")):
        lines = []
        cfg = run_config(training={"max_steps": 2, "precision": precision},
                         output={"dir": str(tmp_path / f"run-{i}")})
        result = tunesmith.train(cfg, echo=lines.append)
        weights = "bfloat16" if precision == "bf16" else "float32"
        assert any(f"precision {precision}, weights {weights}" in line for line in lines), lines
        assert all(math.isfinite(v) for _, v in losses(result.run_dir))
        # LoRA on a bf16 base: the adapter itself learns and is saved in fp32.
        saved = load_file(result.artifact_dir / "adapter_model.safetensors")
        assert {w.dtype for w in saved.values()} == {torch.float32}


# ---------------------------------------------------------------------------- non-finite


class _NanGrad(torch.autograd.Function):
    """Identity forward, NaN gradient backward: a finite loss whose gradient is not."""

    @staticmethod
    def forward(ctx, x):
        return x.clone()

    @staticmethod
    def backward(ctx, grad):
        return grad * float("nan")


class BreaksAtStep(SFT):
    """The sft objective, except that training step `step` yields a NaN loss or NaN gradient."""

    name = "sft"
    packs = True

    def __init__(self, step: int, kind: str, grad_accum: int = 1):
        super().__init__()
        self.inner, self.step, self.kind, self.grad_accum = OBJECTIVES["sft"](), step, kind, grad_accum
        self.calls = 0

    def __call__(self, cfg=None):  # stands in for the registry's class: the run gets this instance
        return self

    def loss(self, ctx, batch):
        out = self.inner.loss(ctx, batch)
        if not ctx.policy.training:
            return out
        self.calls += 1
        if (self.calls - 1) // self.grad_accum + 1 == self.step:
            bad = out.loss_sum * float("nan") if self.kind == "loss" else _NanGrad.apply(out.loss_sum)
            return LossOutput(bad, out.n_tokens)
        return out


@pytest.mark.parametrize("kind, message", [("loss", "loss became nan at step 3"),
                                           ("grad", "gradient norm became nan at step 3")])
def test_non_finite_stops_with_last_good_checkpoint(run_config, monkeypatch, kind, message):
    cfg = run_config(training={"max_steps": 5, "save_every": 2})
    with monkeypatch.context() as m:
        m.setitem(OBJECTIVES, "sft", BreaksAtStep(3, kind))
        with pytest.raises(TrainingError) as err:
            tunesmith.train(cfg, echo=lambda m: None)
    run_dir = Path(cfg["output"]["dir"])
    assert message in str(err.value)
    assert f"the last good checkpoint is {run_dir / 'checkpoints' / 'step-0000002'}" in str(err.value)
    assert not (run_dir / "adapter").exists() and not (run_dir / "README.md").exists()
    assert [s for s, _ in losses(run_dir)] == [1, 2]
    # The checkpoint loads: training continues from it with the real objective to the end.
    result = tunesmith.train(cfg, resume=True, echo=lambda m: None)
    assert result.steps == 5 and (run_dir / "adapter" / "adapter_model.safetensors").is_file()
    assert [s for s, _ in losses(run_dir)] == [1, 2, 3, 4, 5]


def test_nan_before_any_checkpoint_says_so(run_config, monkeypatch):
    cfg = run_config(training={"max_steps": 3})
    monkeypatch.setitem(OBJECTIVES, "sft", BreaksAtStep(1, "loss"))
    with pytest.raises(TrainingError, match="at step 1 .*no checkpoint had been written yet"):
        tunesmith.train(cfg, echo=lambda m: None)


# ---------------------------------------------------------------------------- early stopping


def test_early_stopping_restores_best_weights(run_config):
    # lr 0.05 with full fine-tuning: validation loss improves at step 2, then gets worse.
    cfg = run_config(
        data={"split": {"validation_ratio": 0.25}},
        method={"type": "full"},
        training={"max_steps": 20, "learning_rate": 5e-2, "scheduler": "constant"},
        eval={"every": 1, "early_stopping_patience": 1},
    )
    lines = []
    result = tunesmith.train(cfg, echo=lines.append)
    assert result.stopped_early and result.steps < 20
    records = read_metrics(result.run_dir / "metrics.jsonl")
    evals = [r for r in records if "eval_loss" in r and not r.get("final")]
    best = min(evals, key=lambda r: r["eval_loss"])
    assert evals[-1]["eval_loss"] > best["eval_loss"]  # why it stopped
    assert evals[-1]["step"] == result.steps
    assert any(f"restored the best weights (step {best['step']})" in line for line in lines)
    # Best weights restored: the saved model is the best checkpoint, and the final
    # evaluation (run on the restored weights) reproduces the best validation loss.
    final = [r for r in records if r.get("final")]
    assert len(final) == 1 and final[0]["eval_loss"] == pytest.approx(best["eval_loss"], abs=1e-6)
    assert result.metrics["eval_loss"] == pytest.approx(best["eval_loss"], abs=1e-6)
    saved = state_of(result.run_dir / "model")
    ckpt = load_file(result.run_dir / "checkpoints" / f"step-{best['step']:07d}" / "trainable.safetensors")
    for name, weight in ckpt.items():
        assert torch.equal(saved[name], weight), name


def test_a_time_budget_stops_after_the_step_that_spends_it(run_config):
    import tunesmith

    cfg = run_config(data={"split": {"validation_ratio": 0.25}},
                     training={"max_steps": 50, "max_minutes": 1e-6, "scheduler": "constant"})
    lines = []
    result = tunesmith.train(cfg, echo=lines.append)
    assert result.steps == 1
    assert any("time budget spent: stopping after step 1 of 50 (training.max_minutes 1e-06)" in line
               for line in lines), lines
    records = read_metrics(result.run_dir / "metrics.jsonl")
    assert [r["step"] for r in records if "lr" in r] == [1]
    assert any(r.get("final") for r in records)  # the run still ends with its evaluation and saved model
    assert (result.run_dir / "adapter").is_dir()
    # It leaves a checkpoint of its last step, and a resume with a new budget finishes the run.
    from tunesmith.engine import checkpoint as ckpt

    assert [ckpt.step_of(c) for c in ckpt.list_checkpoints(result.run_dir / "checkpoints")] == [1]
    cfg["training"]["max_minutes"] = None
    cfg["training"]["max_steps"] = 3
    resumed = tunesmith.train(cfg, resume=True, echo=lines.append)
    assert resumed.steps == 3
    assert [r["step"] for r in read_metrics(result.run_dir / "metrics.jsonl") if "lr" in r] == [1, 2, 3]


# ---------------------------------------------------------------------------- tracking


def test_tensorboard_event_files(run_config):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    cfg = run_config(training={"max_steps": 3}, tracking={"tensorboard": True})
    result = tunesmith.train(cfg, echo=lambda m: None)
    events = list((result.run_dir / "tensorboard").glob("events.out.tfevents.*"))
    assert events, "no TensorBoard event file written"
    acc = EventAccumulator(str(result.run_dir / "tensorboard"))
    acc.Reload()
    assert {"loss", "lr", "grad_norm"} <= set(acc.Tags()["scalars"])
    scalars = [(e.step, e.value) for e in acc.Scalars("loss")]
    expected = losses(result.run_dir)
    assert [s for s, _ in scalars] == [s for s, _ in expected] == [1, 2, 3]
    for (_, got), (_, want) in zip(scalars, expected):
        assert got == pytest.approx(want, rel=1e-6)
