"""Multi-task training: several tasks, one shared backbone, a head per task where heads differ.

Each task keeps its own objective instance, data, collator and metrics. The run's model is the
first task's (loaded, and given the method, as a single-task run would be); a task whose head
differs (a classification task with its own labels, an LM task on a classifier's backbone) gets
a transformers model of its own class whose backbone attribute is *the same module object* as
the first model's, so the backbone (and any LoRA or adapter layers inside it) is shared and
trained by every task, while each extra head is this objective's own parameters (they join the
optimizer, checkpoints and the saved artifact as `heads/<task>.safetensors`). Tasks with the
first task's head (an instruction mixture of SFT sources) use the first model itself.

With `multitask.shared: false` each task after the first also gets its own set of the method's
weights (a peft adapter, or bottleneck adapters) on the shared frozen base, made active while
its task's batches run and saved as `adapters/<task>/`.

Every micro-batch holds rows of one task, drawn by the sampler (sampling.task_batches), a pure
function of (seed, epoch): a resumed run draws the same batches. Evaluation runs each task's
own evaluation on its own validation rows: `eval_<task>/<metric>`, plus `eval_loss` (the mean of
the tasks' losses) and `eval_mean/<metric>` for metrics every task reports.
"""

from __future__ import annotations

import copy
import dataclasses
from contextlib import nullcontext
from pathlib import Path
from types import SimpleNamespace
from typing import TYPE_CHECKING, Callable

import torch
from torch import nn

from ..errors import ConfigError, TunesmithError
from .base import LossOutput, Objective, StepContext, TaskInfo

if TYPE_CHECKING:
    from ..config import RunConfig

HEADS = "heads"  # folder of the extra task heads inside the artifact
ADAPTERS = "adapters"  # folder of the per-task adapters (multitask.shared: false)


def _without_task(row: dict) -> dict:
    return {k: v for k, v in row.items() if k != "task"}


def backbone_of(model: nn.Module) -> tuple[nn.Module, str]:
    """(the transformers model's backbone module, its attribute name), through a peft wrapper."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    prefix = getattr(base, "base_model_prefix", "")
    backbone = getattr(base, prefix, None) if prefix else None
    if not isinstance(backbone, nn.Module):
        raise TypeError(f"{type(base).__name__} has no backbone attribute to share between task heads")
    return backbone, prefix


def head_model(primary: nn.Module, auto_class: str, kwargs: dict, seed: int) -> nn.Module:
    """A transformers model of `auto_class` whose backbone is `primary`'s (shared, not copied); its head is
    freshly initialised from `seed`, in fp32."""
    import transformers

    from ..quiet import held_load_report

    backbone, prefix = backbone_of(primary)
    base = primary.get_base_model() if hasattr(primary, "get_base_model") else primary
    config = copy.deepcopy(base.config)
    for key, value in kwargs.items():
        setattr(config, key, value)
    with torch.random.fork_rng(devices=[]), held_load_report():
        torch.manual_seed(seed)
        model = getattr(transformers, auto_class).from_config(config, dtype=torch.float32)
    if getattr(model, "base_model_prefix", None) != prefix:
        raise TypeError(f"{auto_class} keeps its backbone in '{model.base_model_prefix}', not '{prefix}'")
    setattr(model, prefix, backbone)
    if hasattr(model, "tie_weights"):
        model.tie_weights()  # an LM head tied to the input embeddings ties to the shared ones
    return model.to(next(backbone.parameters()).device)


def head_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """The head's own tensors: everything outside the shared backbone (tied ones excluded)."""
    backbone, prefix = backbone_of(model)
    shared = {t.data_ptr() for t in backbone.state_dict().values()}
    return {n: t for n, t in model.state_dict().items()
            if not n.startswith(prefix + ".") and t.data_ptr() not in shared}


def load_head(model: nn.Module, state: dict[str, torch.Tensor]) -> None:
    own = head_state(model)
    unknown = sorted(set(state) - set(own))
    missing = sorted(set(own) - set(state))
    if unknown or missing:
        raise ValueError(f"task head does not match: missing {missing[:3]}, unexpected {unknown[:3]}")
    model.load_state_dict(state, strict=False)


class MultiTask(Objective):
    """The objective of a run with `tasks:` — dispatches each batch to its task's own objective."""

    name = "multitask"

    def __init__(self, run: "RunConfig"):
        from . import build_objective

        super().__init__(run.objective)
        self.run = run
        self.names = [t.name for t in run.tasks]
        self.subs: list[Objective] = [build_objective(t.objective) for t in run.tasks]
        self.loss_weights = [t.loss_weight for t in run.tasks]
        primary = self.subs[0]
        self.auto_class, self.peft_task_type = primary.auto_class, primary.peft_task_type
        self.generative = primary.generative
        self.infos: list[TaskInfo] = []
        self.spans: list[tuple[int, int]] = []
        self.heads: dict[int, nn.Module] = {}  # task index -> its head model (sharing the backbone)
        self.adapter_ids: dict[int, str] = {}  # task index -> its own adapter (multitask.shared: false)
        self.method = None
        self.log_vars = (nn.Parameter(torch.zeros(len(self.subs))) if run.multitask.uncertainty_weighting
                         else None)

    # -- data ---------------------------------------------------------------------------------------------
    def build_data(self, tokenizer, seed: int):
        """Each task's rows built as its own run would build them, tagged with the task's index."""
        from ..data.pipeline import DataBundle, DataStats, build_data

        train, val, records, stats, formats = [], [], [], DataStats(), []
        for i, (spec, sub) in enumerate(zip(self.run.tasks, self.subs)):
            try:
                bundle = build_data(spec.data, tokenizer, seed=seed, packing=self.run.packs(spec.data, spec.objective),
                                    objective=sub, objective_cfg=sub.cfg)
            except TunesmithError as exc:  # the same error, saying which task's data it is about
                raise type(exc)(f"tasks[{i}] ({spec.name}): {exc}") from None
            self.infos.append(bundle.task)
            self.spans.append((len(train), len(train) + len(bundle.train)))
            train += [{**r, "task": i} for r in bundle.train]
            val += [{**r, "task": i} for r in bundle.val]
            records += bundle.val_records
            formats.append(f"{spec.name}={bundle.stats.format}")
            for f in dataclasses.fields(DataStats):
                value = getattr(bundle.stats, f.name)
                if isinstance(value, int) and not isinstance(value, bool):
                    setattr(stats, f.name, getattr(stats, f.name) + value)
            stats.used_fallback_template |= bundle.stats.used_fallback_template
        stats.format = ", ".join(formats)
        return DataBundle(train, val, stats, val_records=records, task=self.infos[0])

    @property
    def ddp_forward(self) -> bool:
        return not (self.heads or self.adapter_ids)  # heads run the backbone directly; adapters switch per batch

    def task_of(self, rows: list[dict]) -> int:
        tasks = {r["task"] for r in rows}
        if len(tasks) != 1:
            raise ValueError(f"a multi-task micro-batch must hold one task's rows, got tasks {sorted(tasks)}")
        return tasks.pop()

    def primary_view(self, data) -> tuple[Objective, "RunConfig", object]:
        """The first task as a single-task run (objective, config, data): what precision auto times."""
        spec = self.run.tasks[0]
        start, end = self.spans[0]
        run = self.run.model_copy(update={"tasks": None, "data": spec.data, "objective": spec.objective})
        view = dataclasses.replace(data, train=[_without_task(r) for r in data.train[start:end]],
                                   val=[_without_task(r) for r in data.val if r["task"] == 0], task=self.infos[0])
        return self.subs[0], run, view

    def epoch_batches(self, n_rows: int, batch_size: int, seed: int, epoch: int, shuffle: bool) -> list[list[int]]:
        from ..sampling import task_batches

        mt = self.run.multitask
        weights = [t.weight for t in self.run.tasks] if mt.sampling == "weights" else None
        return task_batches(self.spans, batch_size, seed, epoch, mt.sampling, mt.temperature, weights, shuffle)

    def batches_per_epoch(self, n_rows: int, batch_size: int) -> int:
        from ..sampling import epoch_length

        return epoch_length(self.spans, batch_size)

    def encode(self, tokenizer, record, data, task):
        raise NotImplementedError("multi-task rows are encoded by each task's objective (build_data)")

    def collator(self, tokenizer, cfg, task: TaskInfo, *, train: bool) -> Callable:
        own = [sub.collator(tokenizer, sub.cfg, info, train=train) for sub, info in zip(self.subs, self.infos)]

        def collate(rows: list[dict]) -> dict:
            t = self.task_of(rows)
            batch = own[t]([_without_task(r) for r in rows])
            batch["task"] = torch.tensor(t)
            return batch

        return collate

    def model_kwargs(self, cfg, task: TaskInfo, tokenizer) -> dict:
        return self.subs[0].model_kwargs(self.subs[0].cfg, self.infos[0], tokenizer)

    # -- model ----------------------------------------------------------------------------------------------
    def attach_tasks(self, model: nn.Module, method, tokenizer, seed: int,
                     echo: Callable[[str], None] = print) -> None:
        """Give every task whose head differs from the first task's a head model sharing `model`'s backbone
        and, with multitask.shared: false, every task after the first its own adapter."""
        self.attach_heads(model, tokenizer, seed, echo)
        if self.run.multitask.shared:
            return
        def trainable() -> int:
            return sum(p.numel() for p in model.parameters() if p.requires_grad)

        self.method, before = method, trainable()
        for i in range(1, len(self.subs)):
            self.adapter_ids[i] = f"task{i}"
            method.add_task_adapter(model, self.adapter_ids[i], seed + len(self.subs) + i, own_head=i in self.heads)
        echo(f"tasks: each has its own {method.name} adapter ({(trainable() - before) // (len(self.subs) - 1):,} "
             "trainable parameters per task after the first; multitask.shared: false)")

    def attach_heads(self, model: nn.Module, tokenizer, seed: int, echo: Callable[[str], None] = print) -> None:
        """Give every task whose head differs from the first task's a head model sharing `model`'s backbone."""
        first = (self.subs[0].auto_class, self.model_kwargs(None, self.infos[0], tokenizer))
        for i, (sub, info) in enumerate(zip(self.subs[1:], self.infos[1:]), start=1):
            kwargs = sub.model_kwargs(sub.cfg, info, tokenizer)
            if (sub.auto_class, kwargs) == first and not info.labels:
                continue  # the same head (an LM head): the task trains the first model itself
            try:
                self.heads[i] = head_model(model, sub.auto_class, kwargs, seed + i)
            except TypeError as exc:
                raise ConfigError(f"tasks[{i}] ({self.names[i]}): its {sub.auto_class} head cannot share the first "
                                  f"task's backbone: {exc}; put tasks with the same kind of head together") from None
            n = sum(p.numel() for p in head_state(self.heads[i]).values())
            echo(f"task {self.names[i]}: own {sub.auto_class.removeprefix('AutoModelFor')} head "
                 f"({n:,} parameters) on the shared backbone")

    def policy_for(self, policy: nn.Module, t: int) -> nn.Module:
        """The model that runs task t: its head on the shared backbone, its adapter made the active one."""
        if self.adapter_ids:
            from ..methods.base import FIRST_ADAPTER

            # Never DDP-wrapped: per-task adapters make ddp_forward False.
            self.method.use_task_adapter(policy, self.adapter_ids.get(t, FIRST_ADAPTER))
        head = self.heads.get(t)
        if head is None:
            return policy
        if head.training != policy.training:  # dropout in the head and the shared backbone follow the run
            head.train(policy.training)
        return head

    def head_parameters(self, policy: nn.Module) -> list[nn.Parameter]:
        """The extra heads' trainable parameters (the shared backbone's are the policy's)."""
        shared = {id(q) for q in policy.parameters()}
        return [p for head in self.heads.values() for p in head.parameters() if p.requires_grad and id(p) not in shared]

    def own_parameters(self, ctx: StepContext, device: torch.device) -> list[dict]:
        params = self.head_parameters(ctx.policy)
        if self.log_vars is not None:
            self.log_vars.data = self.log_vars.data.to(device)
            params.append(self.log_vars)
        return [{"params": params}] if params else []

    def state_dict(self) -> dict:
        state = {f"head.{self.names[t]}.{k}": v for t, h in self.heads.items() for k, v in head_state(h).items()}
        if self.log_vars is not None:
            state["log_vars"] = self.log_vars.detach().clone()
        return state

    def load_state_dict(self, state: dict) -> None:
        for t, head in self.heads.items():
            prefix = f"head.{self.names[t]}."
            load_head(head, {k.removeprefix(prefix): v for k, v in state.items() if k.startswith(prefix)})
        if self.log_vars is not None and "log_vars" in state:
            self.log_vars.data.copy_(state["log_vars"])

    def save_tasks(self, model: nn.Module, out: Path) -> list[dict]:
        """Each extra head as `heads/<task>.safetensors` and each task's own adapter as `adapters/<task>/` beside
        the first task's artifact; returns the tasks as the manifest lists them (name, objective and its
        section, head class, labels, head file or None, adapter folder and id or None)."""
        from safetensors.torch import save_file

        tasks = []
        for t, (spec, sub, info) in enumerate(zip(self.run.tasks, self.subs, self.infos)):
            path = adapter = None
            if t in self.heads:
                (out / HEADS).mkdir(parents=True, exist_ok=True)
                path = f"{HEADS}/{spec.name}.safetensors"
                save_file({k: v.detach().contiguous().cpu() for k, v in head_state(self.heads[t]).items()}, out / path)
            if t in self.adapter_ids:
                (out / ADAPTERS).mkdir(parents=True, exist_ok=True)
                adapter = f"{ADAPTERS}/{spec.name}"
                self.method.save_task_adapter(model, self.adapter_ids[t], out / adapter)
            tasks.append({"name": spec.name, "objective": spec.objective.type,
                          "objective_config": spec.objective.model_dump(mode="json"), "auto_class": sub.auto_class,
                          "labels": info.labels, "head": path, "adapter": adapter,
                          "adapter_id": self.adapter_ids.get(t)})
        return tasks

    # -- loss and evaluation -------------------------------------------------------------------------------
    def count(self, batch: dict[str, torch.Tensor]) -> int:
        return self.subs[int(batch["task"])].count(_without_task(batch))

    def loss(self, ctx: StepContext, batch: dict[str, torch.Tensor]) -> LossOutput:
        t = int(batch["task"])
        policy = self.policy_for(ctx.policy, t)
        out = self.subs[t].loss(dataclasses.replace(ctx, policy=policy), _without_task(batch))
        name = self.names[t]
        logs = {f"{name}/loss": (float(out.loss_sum.detach()), float(out.n_tokens)),
                **{f"{name}/{k}": v for k, v in out.logs.items()}}
        loss_sum = out.loss_sum * self.loss_weights[t]
        if self.log_vars is not None:
            s = self.log_vars[t]
            loss_sum = torch.exp(-s) * loss_sum + s * out.n_tokens
            logs[f"{name}/uncertainty_weight"] = (float(torch.exp(-s.detach())), 1.0)
        return LossOutput(loss_sum, out.n_tokens, logs=logs)

    def evaluate(self, ctx: StepContext, rows: list[dict], batch_size: int) -> dict[str, float] | None:
        from ..engine.loop import evaluate_loss

        policy = ctx.policy
        was_training = policy.training
        device = next(policy.parameters()).device
        shim = SimpleNamespace(device=device, autocast=nullcontext)  # evaluate() already runs under autocast
        tokenizer = ctx.tokenizer
        metrics: dict[str, float] = {}
        per_task: list[dict[str, float]] = []
        for t, (name, sub, info) in enumerate(zip(self.names, self.subs, self.infos)):
            mine = [_without_task(r) for r in rows if r["task"] == t]
            if not mine:
                continue
            model = self.policy_for(policy, t)
            own_ctx = dataclasses.replace(ctx, policy=model)
            scores = sub.evaluate(own_ctx, mine, batch_size)
            if scores is None:
                collate = sub.collator(tokenizer, sub.cfg, info, train=False)
                scores = evaluate_loss(model, sub, mine, collate, batch_size, shim, own_ctx)
            scores = {k.removeprefix("eval_"): v for k, v in scores.items()}
            per_task.append(scores)
            metrics.update({f"eval_{name}/{k}": v for k, v in scores.items()})
        self.policy_for(policy, 0)  # the first task's adapter active again (what the run saves and reports)
        policy.train(was_training)
        for head in self.heads.values():
            head.train(was_training)
        if not per_task:
            return {}
        metrics["eval_loss"] = sum(s["loss"] for s in per_task) / len(per_task)
        if len(per_task) > 1:
            shared = set.intersection(*(set(s) for s in per_task)) - {"loss", "tokens"}
            for key in sorted(shared):
                if all(isinstance(s[key], (int, float)) for s in per_task):
                    metrics[f"eval_mean/{key}"] = sum(s[key] for s in per_task) / len(per_task)
        return metrics

    def per_task(self, metrics: dict) -> dict[str, dict[str, float]]:
        """Final metrics split by task: {task: {metric: value}} (what the card and task_results.json show)."""
        out: dict[str, dict[str, float]] = {}
        for name in [*self.names, "mean"]:
            prefix = f"eval_{name}/"
            mine = {k.removeprefix(prefix): v for k, v in metrics.items() if k.startswith(prefix)}
            if mine:
                out[name] = mine
        return out
