"""The Python API: what the CLI (and anything else) calls."""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import shutil
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, Callable

from .config import RunConfig, dump_config, flat_keys, load_config
from .errors import ConfigError
from .faults import reach
from .files import write_text_atomic

if TYPE_CHECKING:  # torch is imported lazily; RunResult only names its dtype type
    import torch


@dataclass
class RunResult:
    run_dir: Path
    artifact_dir: Path | None
    metrics: dict = field(default_factory=dict)
    steps: int = 0
    trainable_params: int = 0
    total_params: int = 0
    stopped_early: bool = False
    throughput: dict = field(default_factory=dict)  # training-step time and tokens of this session
    forgetting: dict = field(default_factory=dict)  # reference sets before/after and their deltas
    precision: str = ""  # what training ran in, e.g. "bf16 autocast, bfloat16 weights"
    weight_dtype: torch.dtype | None = None  # the frozen base's dtype in training
    second_model_bytes: int = 0  # a teacher's or reward model's weights and buffers, held beside the trained model


def run_dir_of(cfg: RunConfig) -> Path:
    return Path(cfg.output.dir.format(name=cfg.run_name))


def _resume_point(run_dir: Path, resume: str | bool) -> Path:
    from .engine.checkpoint import list_checkpoints

    if isinstance(resume, str) and resume:
        path = Path(resume)
        if (path / "state.json").is_file():
            return path
        found = list_checkpoints(path / "checkpoints")
        if not found:
            raise ConfigError(f"--resume {path}: neither a checkpoint nor a run folder with checkpoints")
        return found[-1]
    found = list_checkpoints(run_dir / "checkpoints")
    if not found:
        raise ConfigError(f"--resume: no checkpoint in {run_dir / 'checkpoints'} (set training.save_every)")
    return found[-1]


def _holds_a_run(run_dir: Path) -> bool:
    return run_dir.exists() and any(run_dir.iterdir())


def _check_run_dir(run_dir: Path, cfg: RunConfig, resuming: bool) -> None:
    """Refuse to train into another run's folder, or where no folder can be made; only looks, so it
    can run early."""
    existing = next(p for p in [run_dir, *run_dir.parents] if p.exists() or p == Path(p.anchor))
    if existing.exists() and not existing.is_dir():
        raise ConfigError(f"output.dir: {run_dir} cannot be created: {existing} is a file")
    if existing.is_dir() and not os.access(existing, os.W_OK | os.X_OK):
        raise ConfigError(f"output.dir: {run_dir} cannot be created: {existing} is not writable")
    if not resuming and _holds_a_run(run_dir) and not cfg.output.overwrite:
        raise ConfigError(
            f"output.dir: {run_dir} already holds a run; pass --resume to continue it or "
            f"--set output.overwrite=true to replace it"
        )


# Keys a resumed run may change: where and how it reports, how often it saves, its time budget,
# and its length (extending a finished run to more steps or epochs).
RESUME_MAY_CHANGE = ("output.", "tracking.", "training.progress", "training.checkpoint_on_interrupt",
                     "training.keep_last", "training.save_every", "training.max_minutes", "training.max_steps",
                     "training.epochs")


def _check_same_config(run_dir: Path, cfg: RunConfig) -> None:
    """A resumed run must be the run that was interrupted: refuse changed keys, naming them."""
    import yaml

    saved_file = run_dir / "config.yaml"
    if not saved_file.is_file():
        return
    before = flat_keys(yaml.safe_load(saved_file.read_text()))
    now = flat_keys(yaml.safe_load(dump_config(cfg)))
    changed = [k for k in sorted(set(before) | set(now))
               if before.get(k) != now.get(k) and not k.startswith(RESUME_MAY_CHANGE)]
    if changed:
        shown = "; ".join(f"{k}: {before.get(k)!r} -> {now.get(k)!r}" for k in changed[:5])
        raise ConfigError(f"--resume: the config differs from the interrupted run's ({saved_file}): {shown}"
                          f"{' ...' if len(changed) > 5 else ''}; resume with the same config, or start a new "
                          "run in another output.dir")


def _prepare_run_dir(run_dir: Path, cfg: RunConfig, resuming: bool) -> None:
    _check_run_dir(run_dir, cfg, resuming)
    if resuming:
        return
    if _holds_a_run(run_dir):
        shutil.rmtree(run_dir)  # output.overwrite
    run_dir.mkdir(parents=True, exist_ok=True)


def train(
    config: str | Path | dict | RunConfig,
    overrides: list[str] | None = None,
    *,
    resume: str | bool | None = None,
    echo: Callable[[str], None] = print,
    on_eval: Callable[[int, dict], None] | None = None,
) -> RunResult:
    """Fine-tune as the config says; returns where everything went and the final metrics.

    `on_eval(step, metrics)` is called at every evaluation during training (how a sweep prunes)."""
    from accelerate import Accelerator, PartialState
    from accelerate.state import AcceleratorState
    from accelerate.utils import broadcast_object_list, set_seed

    from .hardware import TORCH_DTYPES, device_type, ensure_threads, keep_freed_memory

    from .card import render_card
    from .engine import fit
    from .artifacts import write_manifest
    from .methods import METHODS, MethodContext, trainable_summary
    from .models import load_model, load_tokenizer, materialize
    from .objectives import run_objective

    cfg = load_config(config, overrides)
    run_dir = run_dir_of(cfg)
    resume_from = _resume_point(run_dir, resume) if resume else None
    if resume_from is not None:
        from .engine.checkpoint import check_readable

        check_readable(resume_from)  # a damaged checkpoint fails now, not after the model loads
        run_dir = resume_from.parent.parent
    if cfg.training.precision == "fp16" and device_type() != "cuda":
        raise ConfigError("training.precision: fp16 needs a CUDA GPU; use bf16 or fp32 here")
    int8 = cfg.training.precision == "int8"
    if int8 and device_type() != "cpu":
        raise ConfigError(f"training.precision: int8 is for CPUs without fast bf16; on {device_type()} use bf16 "
                          "or auto")
    method, objective = METHODS[cfg.method.type], run_objective(cfg)
    if int8 and (objective.needs_reference or objective.online):
        # Forwards without gradient (the reference's, the sampling policy's) stay fp32, so the int8
        # policy's log-probs would differ from them by the quantization error, not by learning.
        compared = "a frozen reference's" if objective.needs_reference else "the sampling policy's"
        raise ConfigError(f"training.precision: int8 with objective.type {cfg.objective.type}: the policy's int8 "
                          f"log-probs would be compared with {compared} fp32 ones, biasing the loss by the "
                          "quantization error; use auto or fp32 (int8 works with objectives without a reference, "
                          "e.g. sft, orpo, simpo, reward, distill)")
    resuming = resume_from is not None
    _check_run_dir(run_dir, cfg, resuming)
    from .engine.trackers import check_available

    check_available(cfg)
    if resuming:
        _check_same_config(run_dir, cfg)
    # Under torchrun every process runs this function: the process group starts here, and every
    # process has checked the run folder before the main one creates or replaces it.
    # On a machine without an accelerator, accelerate reads torchrun's variables only with cpu=True.
    on_cpu = device_type() == "cpu"
    dist = PartialState(cpu=on_cpu)
    dist.wait_for_everyone()
    if not dist.is_main_process:
        echo = _silent  # one copy of the run log

    # Everything that can fail on bad input runs before the model is loaded.
    if cfg.eval.forgetting and objective.auto_class == "AutoModelForCausalLM":
        from .evaluation.forgetting import reference_jobs

        reference_jobs(cfg.eval.reference)  # a missing or malformed reference set fails now
    for second in ("teacher", "reward_model"):
        if getattr(cfg.objective, second, None):
            from .teacher import check_source

            check_source(getattr(cfg.objective, second), f"objective.{second}")
    with dist.main_process_first():  # one process converts a GGUF into the shared cache
        source = materialize(cfg.model)
    tokenizer = load_tokenizer(cfg.model, source)
    # The Arrow store is tokenized once, by the main process; the others then memory-map the same file
    # and each reads only the rows of its own micro-batches.
    with dist.main_process_first() if cfg.data.store == "arrow" else contextlib.nullcontext():
        data = _build_run_data(cfg, tokenizer, objective)
    objective.check_rows(data.train)
    st = data.stats
    echo(f"data: {st.format} format, {st.rows_read} rows read, {st.rows_skipped} skipped, "
         f"{st.train_examples} train"
         f"{f' ({st.unlabeled_examples} of them unlabeled, for the KD term)' if st.unlabeled_examples else ''}"
         f" / {st.val_examples} validation examples, {st.truncated} truncated, "
         f"{st.dropped} dropped; {st.train_rows} training rows{' (packed)' if cfg.packing_enabled else ''}")

    probe_head = None
    if cfg.model.head_from:
        from .head_init import read_probe_head

        probe_head = read_probe_head(cfg.model.head_from, objective=objective.name, labels=data.task.labels,
                                     base=(cfg.model.name_or_path, cfg.model.gguf_file), base_source=source,
                                     model_config=_model_config(cfg, source))
    model_kwargs = objective.model_kwargs(cfg.objective, data.task, tokenizer)
    # Before the precision proxy: it must time steps under the threads and allocator training gets
    # (and the thread count is part of its cache key).
    threads = ensure_threads()
    keep_freed_memory()
    chosen = None
    if dist.is_main_process:  # measured once; every process must train in the same precision
        chosen = _choose_precision(cfg, method, objective, tokenizer, source, model_kwargs, data, echo)
    if dist.num_processes > 1:
        chosen = broadcast_object_list([chosen], from_process=0)[0]
    precision = chosen.precision
    if chosen.timings:
        echo(f"precision auto: {precision} with {chosen.weights} frozen weights, {chosen.how} "
             f"(s per proxy step: {', '.join(f'{k} {v:.3f}' for k, v in chosen.timings.items())})")
    set_seed(cfg.training.seed)
    # Frozen base weights live in the measured dtype; weights that learn stay fp32.
    dtype = TORCH_DTYPES[cfg.model.dtype] if cfg.model.dtype != "auto" else chosen.weight_dtype
    load_kwargs = {**model_kwargs, **method.load_kwargs(cfg.method, precision)}
    teacher, thin = None, cfg.model.init_from_teacher_every
    if objective.needs_teacher:
        from .teacher import prepare_teacher

        # Loaded once, checked against the student's tokenizer and labels before the student loads; it
        # computes in the run's compute dtype (a student built from it copies its weights in its own dtype first).
        compute = TORCH_DTYPES[precision] if precision != "fp32" else dtype
        teacher = prepare_teacher(cfg.objective, auto_class=objective.auto_class, tokenizer=tokenizer,
                                  labels=data.task.labels, dtype=dtype if thin else compute,
                                  student_config=None if thin else _model_config(cfg, source), echo=echo)
    reward_model = None
    if getattr(cfg.objective, "reward_model", None):
        from .teacher import prepare_reward_model

        compute = TORCH_DTYPES[precision] if precision != "fp32" else dtype
        reward_model = prepare_reward_model(cfg.objective.reward_model, tokenizer=tokenizer, dtype=compute, echo=echo)
    if thin:
        from .models import kept_layers, student_from_teacher

        model = student_from_teacher(teacher, thin, dtype)
        teacher.to(compute)
        echo(f"student: teacher blocks {kept_layers(teacher.config.num_hidden_layers, thin)} of "
             f"{teacher.config.num_hidden_layers}, weights copied (model.init_from_teacher_every {thin})")
    else:
        model = load_model(cfg.model, dtype, source, auto_class=objective.auto_class, tokenizer=tokenizer,
                           init_seed=cfg.training.seed, echo=echo, **load_kwargs)
    if probe_head is not None:
        from .head_init import apply_probe_head

        echo(apply_probe_head(model, probe_head))
    reference_before = _reference_before(cfg, objective, model, tokenizer, run_dir, resuming, echo)
    model = method.apply(model, cfg.method, MethodContext(objective, tokenizer, source))
    if cfg.tasks:
        objective.attach_tasks(model, method, tokenizer, cfg.training.seed, echo)
    precision_label = precision
    if int8:
        from .methods.int8_base import use_int8_base

        # Before the run folder: a model whose adapted layers are not plain linear ones (GPT-2's
        # Conv1D, say) gets no int8 layers, and that is a config problem, not a slow run.
        layers = use_int8_base(model)
        if not layers:
            wrapped = sorted({type(m.get_base_layer()).__name__ for m in model.modules()
                              if hasattr(m, "lora_A") and hasattr(m, "get_base_layer")})
            raise ConfigError("training.precision: int8 needs LoRA on plain torch Linear layers; in this model "
                              f"method.target_modules {cfg.method.target_modules!r} put LoRA on "
                              f"{', '.join(wrapped) or 'no layer'}; use auto or fp32")
        precision_label = f"int8 ({layers} frozen base layers as int8 matmuls in training, fp32 otherwise)"
    trainable, total = trainable_summary(model)
    if cfg.tasks:  # the extra heads train too
        heads = sum(p.numel() for p in objective.head_parameters(model))
        trainable, total = trainable + heads, total + heads
    echo(f"method {method.name}: {trainable:,} trainable of {total:,} parameters "
         f"({100 * trainable / total:.3f}%); precision {precision_label}, weights {str(dtype).split('.')[-1]}; "
         f"{threads if device_type() == 'cpu' else device_type()}")
    # The run folder is created (or replaced, with output.overwrite) only now that the method
    # applied: a config the method rejects (a module pattern that matches nothing, say) must
    # not leave a folder behind that the corrected run then refuses as "already holds a run",
    # nor wipe the previous run.
    if dist.is_main_process:
        _prepare_run_dir(run_dir, cfg, resuming)
        # Atomic: a resume compares against config.yaml and reads the reference numbers back.
        write_text_atomic(run_dir / "config.yaml", dump_config(cfg))
        if reference_before is not None and not resuming:
            write_text_atomic(run_dir / REFERENCE_BEFORE, json.dumps(reference_before, indent=1))
    dist.wait_for_everyone()

    # accelerate keeps its settings (mixed precision among them) in a process-wide singleton
    # and refuses a second Accelerator with other settings; a Python caller may well run
    # several trainings in one process (sweeps, notebooks). Forget the previous run's
    # settings, as transformers' Trainer does; the distributed PartialState stays as is.
    AcceleratorState._reset_state()
    accelerator = Accelerator(mixed_precision={"fp32": "no"}.get(precision, precision), cpu=on_cpu)
    for frozen in (teacher, reward_model):
        if frozen is not None:
            frozen.to(accelerator.device)
    collate = objective.collator(tokenizer, cfg.objective, data.task, train=True)
    eval_collate = objective.collator(tokenizer, cfg.objective, data.task, train=False)
    extra_eval = (partial(_reference_now, cfg, tokenizer, reference_before)
                  if reference_before is not None and cfg.eval.reference_every_eval else None)
    from .engine.trackers import Trackers

    trackers = (Trackers.open(cfg, run_dir, cfg.run_name, yaml_config(cfg), resuming) if dist.is_main_process
                else Trackers({}))
    try:
        fitted = fit(cfg, model, objective, data.train, data.val, collate, run_dir, accelerator,
                     resume_from=resume_from, echo=echo, eval_collate=eval_collate, method=method,
                     extra_eval=extra_eval, tokenizer=tokenizer, teacher=teacher, reward_model=reward_model,
                     trackers=trackers, on_eval=on_eval)
    finally:
        if int8:
            # The model answers in fp32 from here, and a failed or pruned run (a sweep goes on to its
            # next trial) does not keep the int8 copies and scratch buffers.
            use_int8_base(model, on=False)
    forgetting = {}
    if reference_before is not None:
        after = _measure_reference(cfg, accelerator.unwrap_model(model), tokenizer)
        forgetting = {**{f"before/{k}": v for k, v in reference_before.items()},
                      **{f"after/{k}": v for k, v in after.items()}, **_deltas(reference_before, after)}
        if accelerator.is_main_process:
            from .engine.tracking import MetricsLog

            MetricsLog(run_dir / "metrics.jsonl", trackers=trackers).log(
                {"step": fitted.step, "forgetting": True, **forgetting})
        for key, value in _deltas(reference_before, after).items():
            if key.endswith("_change_pct"):
                echo(f"forgetting: {key.removeprefix('forgetting/').removesuffix('_change_pct')} "
                     f"{value:+.2f}% vs the base model")

    result = RunResult(run_dir, None, fitted.metrics, fitted.step, trainable, total, fitted.stopped_early,
                       fitted.throughput, forgetting, f"{precision_label}, {str(dtype).split('.')[-1]} weights", dtype,
                       sum(_tensor_bytes(m) for m in (teacher, reward_model) if m is not None))
    if accelerator.is_main_process:
        if cfg.tasks:  # each task's final metrics, and their mean
            write_text_atomic(run_dir / "task_results.json", json.dumps(objective.per_task(fitted.metrics), indent=1))
        if cfg.output.save_model:
            out = run_dir / method.artifact
            unwrapped = accelerator.unwrap_model(model)
            method.save(unwrapped, out)
            reach("artifact")
            tokenizer.save_pretrained(out)
            tasks = objective.save_tasks(unwrapped, out) if cfg.tasks else None
            write_manifest(out, cfg, base_source=source, labels=data.task.labels, tasks=tasks)
            result.artifact_dir = out
        if cfg.output.model_card:
            card = render_card(cfg, artifact=method.artifact, metrics=fitted.metrics, trainable=trainable,
                               total=total, data_stats=dataclasses.asdict(st), steps=fitted.step,
                               library=_library_of(result.artifact_dir, method.artifact),
                               forgetting=forgetting, processes=accelerator.num_processes)
            (run_dir / "README.md").write_text(card)
            if result.artifact_dir is not None:
                (result.artifact_dir / "README.md").write_text(card)
    trackers.finish({**{f"final/{k}": v for k, v in fitted.metrics.items() if isinstance(v, (int, float))},
                     "run_dir": str(run_dir),
                     **({"artifact_path": str(result.artifact_dir)} if result.artifact_dir is not None else {})})
    echo(f"done: {fitted.step} steps; run folder {run_dir}")
    return result


REFERENCE_BEFORE = "reference_base.json"


def yaml_config(cfg: RunConfig) -> dict:
    """The resolved config as plain data (what trackers record as the run's parameters)."""
    import yaml

    return yaml.safe_load(dump_config(cfg))


def _silent(message: str) -> None:
    pass


def _tensor_bytes(model) -> int:
    """Bytes of a model's parameters and buffers, tied tensors once."""
    seen = {}
    for t in (*model.parameters(), *model.buffers()):
        seen.setdefault(t.data_ptr(), t.numel() * t.element_size())
    return sum(seen.values())


def decide_precision(config: str | Path | dict | RunConfig, echo: Callable[[str], None] = _silent):
    """What `training.precision` resolves to for this run (timing `auto`'s candidates now, unless cached).

    Lets a caller pay for the timing race apart from the run: `tunesmith plan` does, so the race's
    proxy models are not part of the peak memory it measures."""
    from .hardware import ensure_threads, keep_freed_memory
    from .methods import METHODS
    from .models import load_tokenizer, materialize
    from .objectives import run_objective

    from .precision import choose

    cfg = load_config(config)
    method, objective = METHODS[cfg.method.type], run_objective(cfg)
    if cfg.training.precision != "auto":
        return choose(cfg.training.precision, method=method)
    source = materialize(cfg.model)
    tokenizer = load_tokenizer(cfg.model, source)
    data = _build_run_data(cfg, tokenizer, objective)
    ensure_threads()
    keep_freed_memory()
    return _choose_precision(cfg, method, objective, tokenizer, source,
                             objective.model_kwargs(cfg.objective, data.task, tokenizer), data, echo)


def _build_run_data(cfg: RunConfig, tokenizer, objective):
    """The run's rows: its data section's, or every task's (tagged with the task) for a multi-task run."""
    from .data.pipeline import build_data

    if cfg.tasks:
        return objective.build_data(tokenizer, cfg.training.seed)
    return build_data(cfg.data, tokenizer, seed=cfg.training.seed, packing=cfg.packing_enabled,
                      objective=objective, objective_cfg=cfg.objective)


def _choose_precision(cfg: RunConfig, method, objective, tokenizer, source: str, model_kwargs: dict, data,
                      echo: Callable[[str], None]):
    from .precision import PROXY_MAX_TOKENS, choose

    if cfg.tasks:  # a multi-task run is timed on its first task (the model the run loads)
        objective, cfg, data = objective.primary_view(data)
    return choose(cfg.training.precision, model_config=_model_config(cfg, source), method=method,
                  method_cfg=cfg.method,
                  build_proxy=partial(_proxy_step, cfg, method, objective, tokenizer, source, model_kwargs,
                                      _proxy_batch(cfg, objective, tokenizer, data)),
                  tokens=min(cfg.data.max_length, PROXY_MAX_TOKENS), echo=echo, objective=cfg.objective.type)


def _model_config(cfg: RunConfig, source: str):
    from transformers import AutoConfig

    return AutoConfig.from_pretrained(source, trust_remote_code=cfg.model.trust_remote_code,
                                      revision=cfg.model.revision)


def _proxy_batch(cfg: RunConfig, objective, tokenizer, data) -> dict | None:
    """The longest training row that fits the proxy's length, collated as training collates it.

    A real row carries the run's packing (segments), label share and padding, which decide how
    much of a step is attention, LM head and element-wise work; random tokens would not.
    """
    from .precision import PROXY_MAX_TOKENS

    if objective.online:
        return None  # prompts alone: a step needs completions first; random tokens are timed instead
    # A memory-mapped store reads its lengths from the Arrow offsets instead of converting every row.
    lengths = data.train.lengths() if hasattr(data.train, "lengths") else [_row_tokens(r) for r in data.train]
    fits = [i for i, n in enumerate(lengths) if 0 < n <= PROXY_MAX_TOKENS]
    if not fits:
        return None  # rows longer than the proxy times: random tokens of the proxy's length instead
    row = data.train[max(fits, key=lengths.__getitem__)]
    return objective.collator(tokenizer, cfg.objective, data.task, train=True)([row])


def _row_tokens(row: dict) -> int:
    """Token ids a row holds: input_ids, or a preference row's prompt and answers."""
    return sum(len(v) for k, v in row.items() if k.endswith("_ids") or k == "input_ids")


def _proxy_step(cfg: RunConfig, method, objective, tokenizer, source: str, model_kwargs: dict,
                batch: dict | None, weights):
    """One training step of a two-block copy of the run's model (random weights), for precision auto."""
    import torch
    import transformers

    from .attention import use_segment_attention
    from .engine.loop import reference_policy
    from .engine.optim import build_optimizer
    from .objectives import StepContext
    from .methods import MethodContext
    from .precision import PROXY_MAX_TOKENS, proxy_config

    if method.load_kwargs(cfg.method, "fp32"):
        raise ValueError(f"{method.name} loads a quantized base, which a random proxy cannot stand in for")
    config = proxy_config(_model_config(cfg, source))
    for key, value in model_kwargs.items():
        setattr(config, key, value)  # num_labels, id2label, ...: the head the run trains
    model = getattr(transformers, objective.auto_class).from_config(config, dtype=weights)
    if getattr(model.config, "pad_token_id", None) is None:
        model.config.pad_token_id = tokenizer.pad_token_id
    causal = objective.auto_class == "AutoModelForCausalLM"
    if causal:
        use_segment_attention(model)
    model = method.apply(model, cfg.method, MethodContext(objective, tokenizer, source))
    model.train()
    optimizer = build_optimizer(model, cfg.training)
    # A collated training row gets the objective's own loss; random tokens get it when that is a
    # next-token loss (pairs and unpaired answers cannot be made up: a plain forward is timed).
    own_loss = (batch is not None or (causal and objective.reports_perplexity)) and not objective.online
    if batch is None:  # no training row to borrow: random tokens of the run's length
        n = min(cfg.data.max_length, PROXY_MAX_TOKENS)
        ids = torch.randint(0, min(len(tokenizer), config.vocab_size), (1, n))
        batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
        if getattr(config, "is_encoder_decoder", False):
            batch["decoder_input_ids"] = ids[:, : max(1, n // 4)]
        if causal and own_loss:
            batch["labels"] = ids

    ctx = StepContext(policy=model, tokenizer=tokenizer,
                      reference=reference_policy(model, method) if objective.needs_reference else None)

    def step() -> None:
        if own_loss:
            out = objective.loss(ctx, batch)
            loss = out.loss_sum / max(out.n_tokens, 1)
        else:
            out = model(**batch)
            loss = (out.logits if hasattr(out, "logits") else out[0]).float().mean()
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return step


def _measure_reference(cfg: RunConfig, model, tokenizer) -> dict:
    from .evaluation.forgetting import measure_reference

    # A fixed window, the one `tunesmith compare` uses: perplexity depends on the window length.
    return measure_reference(model, tokenizer, cfg.eval.reference, batch_size=cfg.eval.batch_size or 8,
                             max_length=512)


def _deltas(before: dict, after: dict) -> dict:
    from .evaluation.forgetting import forgetting_deltas

    return forgetting_deltas(before, after)


def _reference_now(cfg: RunConfig, tokenizer, before: dict, model) -> dict:
    """Reference scores at an evaluation during training, with their change since the base."""
    now = _measure_reference(cfg, model, tokenizer)
    return {**now, **_deltas(before, now)}


def _reference_before(cfg: RunConfig, objective, model, tokenizer, run_dir: Path, resuming: bool,
                      echo: Callable[[str], None]) -> dict | None:
    """Reference-set scores of the base model, measured once before the method touches it.

    Only generative decoder objectives have a language-model head to score general text
    with; a resumed run reuses the numbers its first session measured.
    """
    if not (cfg.eval.forgetting and cfg.eval.reference and objective.auto_class == "AutoModelForCausalLM"):
        return None
    saved = run_dir / REFERENCE_BEFORE
    if resuming and saved.is_file():
        return json.loads(saved.read_text())
    before = _measure_reference(cfg, model, tokenizer)
    echo("reference sets on the base model: " + ", ".join(f"{k} {v:.4f}" for k, v in before.items()))
    return before


def _library_of(artifact_dir: Path | None, artifact: str) -> str:
    """What loads the artifact: peft (adapter_config.json), transformers (a full model) or tunesmith."""
    if artifact == "model":
        return "transformers"
    if artifact_dir is None or (artifact_dir / "adapter_config.json").is_file():
        return "peft"
    return "tunesmith"


def env_info() -> dict:
    """Versions, device and dtype support: what `tunesmith env` prints."""
    import platform
    from importlib.metadata import PackageNotFoundError, version

    import torch

    from . import __version__
    from .hardware import bf16_is_fast, device_type

    def installed(package: str) -> str:
        # Read from package metadata: importing peft would import bitsandbytes, which prints
        # kernel warnings of its own on CPU.
        try:
            return version(package)
        except PackageNotFoundError:
            return "not installed"

    info = {
        "tunesmith": __version__,
        "python": platform.python_version(),
        "torch": torch.__version__,
        **{name: installed(name) for name in ("transformers", "peft", "accelerate", "bitsandbytes")},
        "device": device_type(),
        "cpu threads": torch.get_num_threads(),
        "cpu capability": torch.backends.cpu.get_cpu_capability(),
        "bf16 fast here": bf16_is_fast(),
        "precision 'auto' means": "bf16 or fp32, whichever trains the model fastest here (timed once per "
                                  "model shape, cached)" if device_type() == "cpu" else
                                  ("bf16" if bf16_is_fast() else "fp32"),
    }
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
        info["fp16"] = True
    return info
