"""The one training loop. Every method and objective runs through `fit`."""

from __future__ import annotations

import copy
import dataclasses
import math
import signal
import threading
import time
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Callable

import torch
from torch import nn

from ..config import RunConfig
from ..errors import TrainingError, TunesmithError
from ..faults import reach
from ..generation import generate_ids
from ..hardware import HeapGuard
from ..objectives import Objective, StepContext
from . import checkpoint as ckpt
from .optim import build_optimizer, build_scheduler
from .progress import Progress
from .tracking import MetricsLog


@dataclass
class FitResult:
    step: int
    metrics: dict = field(default_factory=dict)
    best_metric: float | None = None
    best_step: int | None = None
    stopped_early: bool = False
    out_of_time: bool = False  # training.max_minutes was spent
    throughput: dict = field(default_factory=dict)


@torch.no_grad()
def evaluate_loss(model, objective: Objective, rows: list[dict], collate, batch_size: int, accelerator,
                  ctx: StepContext | None = None) -> dict:
    """Mean loss over the rows, perplexity for token objectives, the objective's logs and metrics."""
    ctx = StepContext(policy=model) if ctx is None else dataclasses.replace(ctx, policy=model)
    was_training = model.training
    model.eval()
    total, items = 0.0, 0
    predictions, references = [], []
    logs: dict[str, list[float]] = {}
    for idx in range(0, len(rows), batch_size):
        batch = {k: v.to(accelerator.device) for k, v in collate(rows[idx : idx + batch_size]).items()}
        with accelerator.autocast():
            out = objective.loss(ctx, batch)
        total += float(out.loss_sum)
        items += out.n_tokens
        reach("eval")
        add_logs(logs, out.logs)
        if out.predictions is not None:
            predictions.append(out.predictions.detach().cpu())
            references.append(out.references.detach().cpu())
    model.train(was_training)
    loss = total / max(items, 1)
    metrics = {"eval_loss": loss, **{f"eval_{k}": v for k, v in mean_logs(logs).items()}}
    if objective.reports_perplexity:
        metrics["eval_perplexity"] = math.exp(min(loss, 50.0))
        metrics["eval_tokens"] = items
    if predictions:
        scores = objective.metrics(torch.cat(predictions), torch.cat(references), _label_names(model))
        metrics.update({f"eval_{k}": v for k, v in scores.items()})
    return metrics


def evaluate(model, objective: Objective, rows: list[dict], collate, batch_size: int, accelerator,
             ctx: StepContext) -> dict:
    """The objective's own evaluation when it has one (online RL: generate and score), else the loss-based one."""
    with accelerator.autocast():
        own = objective.evaluate(dataclasses.replace(ctx, policy=model), rows, batch_size)
    if own is not None:
        return own
    return evaluate_loss(model, objective, rows, collate, batch_size, accelerator, ctx)


def add_logs(into: dict[str, list[float]], logs: dict[str, tuple[float, float]]) -> None:
    """Accumulate an objective's (sum, count) logs."""
    for name, (value, count) in logs.items():
        acc = into.setdefault(name, [0.0, 0.0])
        acc[0] += float(value)
        acc[1] += float(count)


def mean_logs(logs: dict[str, list[float]]) -> dict[str, float]:
    return {name: value / count for name, (value, count) in logs.items() if count}


def shard(batches: list[list[int]], rank: int, world: int) -> list[list[int]]:
    """This process's micro-batches: every world-th one. The list is first padded with its own
    first batches to a multiple of world (as torch's DistributedSampler pads), so that every
    process takes the same number of steps and none waits for a collective that never comes."""
    if world == 1:
        return batches
    batches = batches + batches[: -len(batches) % world]
    return batches[rank::world]


def average_gradients(params: list[torch.Tensor], accelerator) -> None:
    """Every parameter's gradient averaged over processes, as DDP would (a process that did not touch a
    parameter contributes zeros); a parameter no process touched keeps no gradient, so the optimizer
    skips it as a one-process run would."""
    touched = torch.tensor([p.grad is not None for p in params], dtype=torch.float32, device=accelerator.device)
    touched = accelerator.reduce(touched, "sum")
    by_dtype: dict[torch.dtype, list[torch.Tensor]] = {}
    for p, t in zip(params, touched.tolist()):
        if t:
            if p.grad is None:
                p.grad = torch.zeros_like(p)
            by_dtype.setdefault(p.grad.dtype, []).append(p)
    world = accelerator.num_processes
    for group in by_dtype.values():
        flat = torch.cat([p.grad.reshape(-1) for p in group])
        flat = accelerator.reduce(flat, "sum") / world
        offset = 0
        for p in group:
            p.grad.copy_(flat[offset: offset + p.numel()].view_as(p.grad))
            offset += p.numel()


def reduce_sum(values: list[float], accelerator) -> list[float]:
    """Sums over processes (as they are with one process)."""
    if accelerator.num_processes == 1:
        return values
    total = accelerator.reduce(torch.tensor(values, dtype=torch.float64, device=accelerator.device), "sum")
    return total.tolist()


def merge_step(loss: float, tokens: int, logs: dict[str, list[float]], into: dict[str, list[float]],
               accelerator) -> tuple[float, int]:
    """One step's loss, token count and objective logs summed over processes (one collective);
    the logs are added to `into`. The logged numbers of a multi-process run are then those of a
    one-process run with the same global batch."""
    names = sorted(logs)
    if accelerator.num_processes > 1:  # a multi-task step logs the tasks each process drew: take them all
        from accelerate.utils import gather_object

        names = sorted(set().union(*gather_object([names])))
    flat = reduce_sum([loss, tokens, *(x for n in names for x in logs.get(n, (0.0, 0.0)))], accelerator)
    for i, name in enumerate(names):
        acc = into.setdefault(name, [0.0, 0.0])
        acc[0] += flat[2 + 2 * i]
        acc[1] += flat[3 + 2 * i]
    return flat[0], int(flat[1])


def reference_policy(model: nn.Module, method) -> Callable:
    """The frozen reference policy: the method's base-only view of the model, else a frozen copy
    of the model as it is now (before training, before a checkpoint is loaded)."""
    scope = method.reference_scope(model) if method is not None else None
    if scope is not None:
        return scope
    frozen = copy.deepcopy(model).eval().requires_grad_(False)

    @contextmanager
    def copy_scope():
        yield frozen

    return copy_scope


def batch_tokens(batch: dict[str, torch.Tensor]) -> int:
    """Non-padding input tokens of a collated batch (rows of any objective: pairs, rollouts, ...)."""
    if "attention_mask" in batch:
        return int(batch["attention_mask"].sum())
    return int(batch["input_ids"].numel())


def _label_names(model) -> list[str] | None:
    """Class names by id from the model's config (peft and probe wrappers expose it too)."""
    config = getattr(getattr(model, "module", model), "config", None)  # DDP keeps the model in .module
    id2label = getattr(config, "id2label", None)
    if not id2label:
        return None
    return [id2label[i] for i in sorted(id2label, key=int)]


class Interrupted(TunesmithError):
    """SIGINT or SIGTERM stopped the run after a whole step (and, unless disabled, a checkpoint).

    Not a TrainingError: training could go on, someone asked it to stop (a sweep counts TrainingErrors
    as failed trials and goes on; a stop must end it)."""

    def __init__(self, signal_name: str, step: int, checkpoint: Path | None):
        self.signal_name, self.step, self.checkpoint = signal_name, step, checkpoint
        where = (f"a checkpoint of step {step} is in {checkpoint}; continue with --resume latest"
                 if checkpoint is not None else
                 "no checkpoint was written (training.checkpoint_on_interrupt is false)")
        super().__init__(f"{signal_name}: training stopped after step {step}; {where}")


class _InterruptFlag:
    """SIGINT/SIGTERM set a flag the loop reads after each step, instead of killing it mid-step;
    a second signal of the same kind acts at once (the handlers in place before are restored)."""

    def __init__(self):
        self.signum: int | None = None
        self.previous: dict[int, object] = {}
        if threading.current_thread() is not threading.main_thread():
            return  # signal handlers can only be set from the main thread
        for sig in (signal.SIGINT, signal.SIGTERM):
            self.previous[sig] = signal.signal(sig, self._handle)

    def _handle(self, signum, frame):
        if self.signum is not None:  # asked twice: stop now
            self.restore()
            signal.raise_signal(signum)
            return
        self.signum = signum

    @property
    def name(self) -> str:
        return signal.Signals(self.signum).name if self.signum is not None else ""

    def restore(self) -> None:
        for sig, handler in self.previous.items():
            signal.signal(sig, handler)
        self.previous = {}


def _better(value: float, best: float | None, greater: bool) -> bool:
    return best is None or (value > best if greater else value < best)


def fit(
    cfg: RunConfig,
    model: nn.Module,
    objective: Objective,
    train_rows: list[dict],
    val_rows: list[dict],
    collate: Callable,
    run_dir: Path,
    accelerator,
    *,
    resume_from: Path | None = None,
    echo: Callable[[str], None] = print,
    eval_collate: Callable | None = None,
    method=None,
    extra_eval: Callable[[nn.Module], dict] | None = None,
    tokenizer=None,
    teacher: nn.Module | None = None,
    reward_model: nn.Module | None = None,
    trackers=None,
    on_eval: Callable[[int, dict], None] | None = None,
) -> FitResult:
    """Train `model` on `train_rows`.

    `method` may supply its own optimizer (LoRA+, LoRA-FA) and the reference policy an
    objective asks for; `extra_eval` adds metrics at every evaluation (reference sets for
    forgetting); `teacher` and `reward_model` (frozen, on the device) reach the objective through the
    step context. `on_eval(step, metrics)` sees every evaluation during training (a sweep's pruner);
    an exception it raises ends the run there.
    """
    eval_collate = eval_collate or collate
    t = cfg.training
    ev = cfg.eval
    rank, world = accelerator.process_index, accelerator.num_processes
    # Each process takes every world-th micro-batch, so a process sees 1/world of an epoch.
    micro_per_epoch = math.ceil(objective.batches_per_epoch(len(train_rows), t.batch_size) / world)
    steps_per_epoch = math.ceil(micro_per_epoch / t.grad_accum) * objective.steps_per_window
    total_steps = t.max_steps or max(1, math.ceil(t.epochs * steps_per_epoch))

    if t.gradient_checkpointing:
        target = model.get_base_model() if hasattr(model, "get_base_model") else model
        kwargs = {"use_reentrant": False}
        if hasattr(target, "activation_checkpointing_enable"):  # transformers >= 5.x name
            target.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
        else:
            target.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
        target.config.use_cache = False
    model.train()
    reference = reference_policy(model, method) if objective.needs_reference else None
    optimizer = ((method.build_optimizer(model, t, cfg.method) if method is not None else None)
                 or build_optimizer(model, t, accelerator.device.type))
    # The objective's own trainable parameters (PPO's value head) join the optimizer before the
    # schedule is built, so they follow it too.
    own_groups = objective.own_parameters(StepContext(policy=model, tokenizer=tokenizer, teacher=teacher,
                                                      reward_model=reward_model), accelerator.device)
    for group in own_groups:
        if "scaling_factors" in optimizer.param_groups[0]:  # peft's LoRA-FA keys its state by name and scales
            n = len(group["params"])
            group = {**group, "names": [f"objective.{len(optimizer.param_groups)}.{i}" for i in range(n)],
                     "scaling_factors": [1.0] * n}
        optimizer.add_param_group(group)
    own_params = [p for g in own_groups for p in g["params"]]
    scheduler = build_scheduler(optimizer, t, total_steps)
    # DDP averages gradients in its backward hooks, which need every forward to go through its wrapper;
    # otherwise the model stays unwrapped and the window's gradients are averaged below.
    ddp = world > 1 and objective.ddp_forward
    if world == 1 or ddp:
        model, optimizer = accelerator.prepare(model, optimizer)
    else:
        model.to(accelerator.device)
        optimizer = accelerator.prepare(optimizer)
    params = [p for p in model.parameters() if p.requires_grad] + own_params
    generate = partial(generate_ids, model, tokenizer) if tokenizer is not None else None
    ctx = StepContext(policy=model, tokenizer=tokenizer, reference=reference, teacher=teacher, generate=generate,
                      reward_model=reward_model)
    reference = None  # the context holds it; released with it once an objective no longer needs it

    ckpt_dir = run_dir / "checkpoints"
    # log_loss / log_steps: the training loss summed over the steps since the last metrics
    # record. They are part of the state so that a run resumed between two records logs the
    # same averages as an uninterrupted one.
    # log_extra: the objective's (sum, count) logs since the last record, for the same reason.
    # window_uses: optimizer steps already taken on the current window of rows (objectives that reuse one).
    state = {"step": 0, "epoch": 0, "micro": 0, "window_uses": 0, "best_metric": None, "best_step": None,
             "bad_evals": 0, "tokens_seen": 0, "log_loss": 0.0, "log_steps": 0, "log_extra": {}}
    if resume_from is not None:
        state |= ckpt.load_checkpoint(resume_from, accelerator.unwrap_model(model), optimizer, scheduler,
                                      objective)
    # Under the step's autocast: what setup computes for the loss (DPO's precomputed reference log-probs)
    # must come from the precision the loss runs in, or it is off by the precision's rounding all run long.
    with accelerator.autocast():
        objective.setup(ctx, train_rows, val_rows)
    if not objective.needs_reference:
        ctx.reference = None  # e.g. reference log-probs precomputed in setup: the copy can go
    # On resume, TensorBoard hides what the interrupted run logged after the checkpoint
    # (purge_step), as metrics.jsonl drops it below; otherwise those steps would show twice.
    log = MetricsLog(run_dir / "metrics.jsonl", run_dir / "tensorboard" if cfg.tracking.tensorboard else None,
                     purge_step=state["step"] + 1 if resume_from is not None else None, trackers=trackers)
    if resume_from is not None:
        if accelerator.is_main_process:  # one process owns the run's files
            log.truncate_after(state["step"])
        accelerator.wait_for_everyone()
        echo(f"resumed from {resume_from} at step {state['step']}")

    eval_bs = ev.batch_size or t.batch_size

    def checkpoint() -> Path:
        path = ckpt.save_checkpoint(ckpt_dir, state["step"], accelerator.unwrap_model(model), optimizer,
                                    scheduler, state, objective)
        ckpt.prune(ckpt_dir, t.keep_last, state["best_step"])
        return path

    def last_good() -> str:
        found = ckpt.list_checkpoints(ckpt_dir)
        return f"the last good checkpoint is {found[-1]}" if found else "no checkpoint had been written yet"

    progress = Progress(t.progress and accelerator.is_main_process, total_steps, state["step"])
    # Throughput counts time in training steps only (no eval, no checkpoints) and non-padding
    # tokens; it is measured per process session, so it is not part of the resumable state.
    window_tokens, window_seconds = 0, 0.0
    # Time spent in training steps only (no eval, no checkpoints) and the non-padding tokens
    # all processes processed in them.
    train_seconds, train_tokens = 0.0, 0
    result = FitResult(step=state["step"])
    started = time.perf_counter()
    interrupt = _InterruptFlag()
    heap = HeapGuard()
    try:
        while state["step"] < total_steps:
            batches = shard(objective.epoch_batches(len(train_rows), t.batch_size, t.seed, state["epoch"],
                                                    cfg.data.shuffle), rank, world)
            while state["micro"] < len(batches) and state["step"] < total_steps:
                window = batches[state["micro"] : state["micro"] + t.grad_accum]
                step_start = time.perf_counter()
                rows = [[train_rows[i] for i in b] for b in window]
                # Collate the whole window first: the loss is normalised by its item count.
                # Under the step's autocast: an online objective generates and scores the old / reference
                # log-probs here, in the precision its loss will use (and bf16 frozen weights are not
                # converted to fp32 for every generated token).
                with accelerator.autocast():
                    batches_now = objective.window(ctx, rows, collate)
                # The loss is normalised by the item count of the whole window across processes;
                # DDP averages gradients over processes, hence the factor world.
                n_loss = max(int(reduce_sum([sum(objective.count(b) for b in batches_now)], accelerator)[0]), 1)
                step_loss, step_tokens, step_logs = 0.0, 0, {}
                for k, cpu_batch in enumerate(batches_now):
                    batch = {key: v.to(accelerator.device) for key, v in cpu_batch.items()}
                    sync = nullcontext() if k == len(batches_now) - 1 else accelerator.no_sync(model)
                    with sync, accelerator.autocast():
                        out = objective.loss(ctx, batch)
                        loss = out.loss_sum * world / n_loss
                    if not torch.isfinite(loss):
                        raise TrainingError(
                            f"loss became {float(loss.detach())} at step {state['step'] + 1} (epoch {state['epoch']}, "
                            f"micro-batch {state['micro'] + k}); training stopped and {last_good()}. "
                            f"Try a lower training.learning_rate, training.max_grad_norm, or fp32/bf16 precision."
                        )
                    accelerator.backward(loss)
                    heap.after_micro_batch()
                    step_loss += float(loss.detach()) / world
                    add_logs(step_logs, out.logs)
                    step_tokens += batch_tokens(cpu_batch)
                step_loss, step_tokens = merge_step(step_loss, step_tokens, step_logs, state["log_extra"], accelerator)
                if ddp:  # DDP averages the model's gradients; the objective's own are averaged here
                    for p in own_params:
                        if p.grad is not None:
                            p.grad = accelerator.reduce(p.grad, "mean")
                elif world > 1:
                    average_gradients(params, accelerator)
                window_tokens += step_tokens
                train_tokens += step_tokens
                grad_norm = None
                if t.max_grad_norm:
                    grad_norm = float(accelerator.clip_grad_norm_(params, t.max_grad_norm))
                    # Under fp16's loss scaler an overflow is routine: the scaler skips that update and
                    # lowers its scale (below); only without one is a non-finite norm a diverged run.
                    if not math.isfinite(grad_norm) and getattr(accelerator, "scaler", None) is None:
                        raise TrainingError(
                            f"gradient norm became {grad_norm} at step {state['step'] + 1}; training stopped "
                            f"and {last_good()}. Try a lower training.learning_rate."
                        )
                optimizer.step()
                if not getattr(accelerator, "optimizer_step_was_skipped", False):
                    scheduler.step()  # a step the loss scaler skipped does not advance the schedule
                optimizer.zero_grad(set_to_none=True)
                heap.after_step()
                window_seconds += time.perf_counter() - step_start
                train_seconds += time.perf_counter() - step_start
                state["step"] += 1
                state["window_uses"] += 1
                if state["window_uses"] >= objective.steps_per_window:
                    state["micro"] += len(window)
                    state["window_uses"] = 0
                state["tokens_seen"] += n_loss
                state["log_loss"] += step_loss
                state["log_steps"] += 1
                step = state["step"]
                reach("step")

                if step % t.log_every == 0 or step == total_steps:
                    record = {
                        "step": step,
                        "epoch": round(state["epoch"] + state["micro"] / len(batches), 4),
                        "loss": state["log_loss"] / state["log_steps"],
                        "lr": scheduler.get_last_lr()[0],
                        "tokens_per_s": window_tokens / max(window_seconds, 1e-9),
                        **mean_logs(state["log_extra"]),
                    }
                    if grad_norm is not None:
                        record["grad_norm"] = grad_norm
                    if accelerator.is_main_process:
                        log.log(record)
                    progress.update(record, total_steps)
                    result.metrics.update({k: record[k] for k in ("loss", "lr")})
                    state["log_loss"], state["log_steps"], state["log_extra"] = 0.0, 0, {}
                    window_tokens, window_seconds = 0, 0.0
                else:
                    progress.advance(step, total_steps)

                # Roll over before any checkpoint below, so one written at the end of an epoch
                # resumes at the start of the next.
                epoch_done = state["micro"] >= len(batches)
                if epoch_done:
                    state["epoch"] += 1
                    state["micro"] = 0

                stop = False
                saved_now = False
                if ev.every and val_rows and step % ev.every == 0 and step != total_steps:
                    metrics = evaluate(model, objective, val_rows, eval_collate, eval_bs, accelerator, ctx)
                    if extra_eval is not None:
                        metrics.update(extra_eval(accelerator.unwrap_model(model)))
                    metrics["step"] = step
                    if accelerator.is_main_process:
                        log.log(metrics)
                    progress.note(f"step {step}: " + "  ".join(
                        f"{k} {v:.4f}" for k, v in metrics.items() if k != "step" and isinstance(v, float)))
                    result.metrics.update({k: v for k, v in metrics.items() if k != "step"})
                    value = metrics.get(ev.metric)
                    if value is None:
                        raise TrainingError(f"eval.metric '{ev.metric}' is not among {sorted(metrics)}")
                    if on_eval is not None:
                        on_eval(step, metrics)
                    if _better(value, state["best_metric"], ev.greater_is_better):
                        state["best_metric"], state["best_step"], state["bad_evals"] = value, step, 0
                        if ev.early_stopping_patience and accelerator.is_main_process:
                            checkpoint()  # early stopping restores the best weights from here
                            saved_now = True
                    else:
                        state["bad_evals"] += 1
                        if ev.early_stopping_patience and state["bad_evals"] >= ev.early_stopping_patience:
                            echo(f"early stopping at step {step}: {ev.metric} did not improve for "
                                 f"{state['bad_evals']} evaluations (best {state['best_metric']:.4f} "
                                 f"at step {state['best_step']})")
                            stop = result.stopped_early = True
                if t.save_every and step % t.save_every == 0 and not saved_now and accelerator.is_main_process:
                    checkpoint()
                    saved_now = True
                # Every process stops at the same step on SIGINT/SIGTERM: one collective decides (a signal
                # read after the step's own collective must still stop this step, hence a second one).
                if (reduce_sum([float(interrupt.signum is not None)], accelerator)[0] if world > 1
                        else interrupt.signum is not None):
                    saved = ckpt_dir / f"{ckpt.PREFIX}{step:07d}" if t.checkpoint_on_interrupt else None
                    if saved is not None and not saved_now and accelerator.is_main_process:
                        checkpoint()  # one process writes it; every process names it
                    accelerator.wait_for_everyone()
                    raise Interrupted(interrupt.name, step, saved)
                if t.max_minutes and step < total_steps:
                    spent = time.perf_counter() - started >= t.max_minutes * 60
                    # Every process stops at the same step (their clocks differ): one collective decides.
                    if reduce_sum([float(spent)], accelerator)[0] > 0:
                        echo(f"time budget spent: stopping after step {step} of {total_steps} "
                             f"(training.max_minutes {t.max_minutes:g}); --resume latest continues it")
                        stop = result.out_of_time = True
                        if not saved_now and accelerator.is_main_process:
                            checkpoint()  # what a resumed run (with a new budget) continues from
                            saved_now = True
                if stop or epoch_done:
                    # A new epoch needs its own shuffled order: leave this epoch's batch list
                    # (resetting `micro` alone would replay it, and a resumed run, which draws
                    # the order for its epoch afresh, would then diverge from the original).
                    break
            if result.stopped_early or result.out_of_time:
                break
    finally:
        interrupt.restore()
        progress.close()
        log.close()

    result.step = state["step"]
    # Kept apart from metrics: wall-clock numbers of this session, not results of the run.
    result.throughput = {"train_runtime_s": train_seconds, "train_tokens": train_tokens,
                         "train_tokens_per_s": train_tokens / max(train_seconds, 1e-9)}
    result.best_metric, result.best_step = state["best_metric"], state["best_step"]
    unwrapped = accelerator.unwrap_model(model)
    if result.stopped_early and result.best_step is not None:
        best = ckpt_dir / f"{ckpt.PREFIX}{result.best_step:07d}"
        if best.is_dir():
            ckpt.restore_weights(best, unwrapped, objective)
            echo(f"restored the best weights (step {result.best_step})")
    if ev.at_end and val_rows:
        metrics = evaluate(model, objective, val_rows, eval_collate, eval_bs, accelerator, ctx)
        metrics["step"] = result.step
        if accelerator.is_main_process:
            MetricsLog(run_dir / "metrics.jsonl", trackers=trackers).log({**metrics, "final": True})
        result.metrics.update({k: v for k, v in metrics.items() if k != "step"})
    return result
