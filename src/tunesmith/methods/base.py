"""What a method is: it decides which parameters learn and how the result is saved and reloaded."""

from __future__ import annotations

from abc import ABC, abstractmethod
from contextlib import AbstractContextManager, contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

import torch
from torch import nn

from ..method_config import SECTIONS as METHOD_SECTIONS
from ..method_config import MethodSection

if TYPE_CHECKING:
    from ..config import TrainingConfig
    from ..objectives.base import Objective


@dataclass
class MethodContext:
    """What a method may need besides its own config."""

    objective: "Objective"
    tokenizer: Any = None
    model_source: str | None = None  # where the base weights came from (folder or hub id)


class Method(ABC):
    name: str = ""
    # True when the base weights stay frozen, so they may be loaded in a low-precision dtype.
    frozen_base: bool = True

    # What config validation needs (artifact kind, packing, unsupported objectives, refused
    # settings) lives in the method's torch-free section (method_config.py).
    @property
    def section(self) -> type[MethodSection]:
        return METHOD_SECTIONS[self.name]

    @property
    def artifact(self) -> str:
        return self.section.artifact

    @property
    def packs(self) -> bool:
        return self.section.packs

    @property
    def unsupported(self) -> dict[str, str]:
        return self.section.unsupported

    @abstractmethod
    def apply(self, model: nn.Module, cfg: MethodSection, ctx: MethodContext) -> nn.Module:
        """Set requires_grad (or wrap the model) so that exactly the method's weights learn."""

    def load_kwargs(self, cfg: MethodSection, precision: str) -> dict:
        """Extra from_pretrained arguments for the base model (quantization)."""
        return {}

    def build_optimizer(self, model: nn.Module, cfg: "TrainingConfig",
                        method_cfg: MethodSection) -> torch.optim.Optimizer | None:
        """A method-specific optimizer (LoRA+, LoRA-FA); None means the engine's AdamW."""
        return None

    def reference_scope(self, model: nn.Module) -> Callable[[], AbstractContextManager[nn.Module]] | None:
        """How to run the frozen base inside the trained model (adapter switched off), so an
        objective's reference policy needs no second copy; None when the method cannot, and
        the engine keeps a frozen copy instead."""
        return None

    def save(self, model: nn.Module, out: Path) -> None:
        configs = getattr(model, "peft_config", None)
        if isinstance(configs, dict) and len(configs) > 1:
            # The first adapter only: a multi-task run's other tasks' adapters are saved by their task.
            model.save_pretrained(out, selected_adapters=[FIRST_ADAPTER])
        else:
            model.save_pretrained(out)

    def load(self, base: nn.Module, artifact: Path, cfg: MethodSection, ctx: MethodContext) -> nn.Module:
        """The trained model from its base and a saved artifact (artifact == 'adapter')."""
        raise NotImplementedError(f"method {self.name} saves complete models; load them directly")

    # Per-task adapters (a multi-task run with multitask.shared: false; methods whose section has no
    # no_task_adapters reason). The weights `apply` added are the adapter FIRST_ADAPTER, the first task's;
    # the one `save` writes. Every other task gets its own set beside them, active only while its task runs.
    def add_task_adapter(self, model: nn.Module, adapter_id: str, seed: int, *, own_head: bool = False) -> None:
        """Another set of this method's weights, initialised from `seed` as the first set was, learning
        what the first set learns; inactive until use_task_adapter. `own_head`: the task runs a head of its
        own, so a copy of the first model's head made for this adapter would never train."""
        raise NotImplementedError(f"method {self.name} has no per-task adapters")

    def use_task_adapter(self, model: nn.Module, adapter_id: str) -> None:
        """Make `adapter_id`'s weights the ones the forward pass runs (which weights learn is unchanged)."""
        raise NotImplementedError(f"method {self.name} has no per-task adapters")

    def save_task_adapter(self, model: nn.Module, adapter_id: str, folder: Path) -> None:
        raise NotImplementedError(f"method {self.name} has no per-task adapters")

    def load_task_adapter(self, model: nn.Module, folder: Path, adapter_id: str) -> None:
        """Add the adapter saved in `folder` to a loaded artifact's model and make it the active one."""
        raise NotImplementedError(f"method {self.name} has no per-task adapters")


FIRST_ADAPTER = "default"  # peft's name for the adapter get_peft_model adds


def keep_grad_flags(model: nn.Module):
    """A context restoring every parameter's requires_grad on exit (peft's adapter switches change them)."""
    flags = [(p, p.requires_grad) for p in model.parameters()]

    @contextmanager
    def restore():
        try:
            yield
        finally:
            for p, flag in flags:
                p.requires_grad_(flag)

    return restore()


class PeftMethod(Method):
    """A method peft implements: its artifact is a peft adapter folder (PeftModel.from_pretrained loads it)."""

    def add_task_adapter(self, model: nn.Module, adapter_id: str, seed: int, *, own_head: bool = False) -> None:
        import copy

        flags = {n: p.requires_grad for n, p in model.named_parameters()}
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            model.add_adapter(adapter_id, copy.deepcopy(model.peft_config[FIRST_ADAPTER]))
        # peft marks trainable what it likes while adding; each new tensor learns when its first-adapter
        # twin does, and every other tensor keeps its flag.
        mine, first = f".{adapter_id}.", f".{FIRST_ADAPTER}."
        for name, p in model.named_parameters():
            p.requires_grad_(flags.get(name.replace(mine, first), False) if mine in name else flags.get(name, False))
        if own_head:  # peft copies the first model's head (modules_to_save) for every adapter
            for _, module in head_modules(model):
                for name, p in module.named_parameters():
                    if mine in f".{name}.":
                        p.requires_grad_(False)

    def use_task_adapter(self, model: nn.Module, adapter_id: str) -> None:
        if model.active_adapter == adapter_id:
            return
        with keep_grad_flags(model):  # peft's set_adapter freezes the other adapters, which learn too
            model.set_adapter(adapter_id)

    def save_task_adapter(self, model: nn.Module, adapter_id: str, folder: Path) -> None:
        import shutil

        # peft writes a named adapter into <dir>/<name>/: write it beside the target, then move it there.
        staging = folder.parent / f".{folder.name}.saving"
        shutil.rmtree(staging, ignore_errors=True)
        model.save_pretrained(str(staging), selected_adapters=[adapter_id])
        shutil.rmtree(folder, ignore_errors=True)
        (staging / adapter_id).rename(folder)
        shutil.rmtree(staging)

    def load_task_adapter(self, model: nn.Module, folder: Path, adapter_id: str) -> None:
        model.load_adapter(str(folder), adapter_name=adapter_id)
        model.set_adapter(adapter_id)

    def load(self, base: nn.Module, artifact: Path, cfg: MethodSection, ctx: MethodContext) -> nn.Module:
        from peft import PeftModel

        return PeftModel.from_pretrained(base, str(artifact))

    def reference_scope(self, model: nn.Module) -> Callable[[], AbstractContextManager[nn.Module]] | None:
        if not hasattr(model, "disable_adapter"):
            return None

        @contextmanager
        def base_only():
            with model.disable_adapter():
                yield model

        return base_only


def trainable_summary(model: nn.Module) -> tuple[int, int]:
    """(trainable, total) parameter counts; shared (tied) tensors count once."""
    seen, trainable, total = set(), 0, 0
    for p in model.parameters():
        if id(p) in seen:
            continue
        seen.add(id(p))
        # bitsandbytes packs two 4-bit weights per byte: count the weights, not the bytes.
        quant = getattr(p, "quant_state", None)
        n = quant.shape.numel() if quant is not None and hasattr(quant, "shape") else p.numel()
        total += n
        if p.requires_grad:
            trainable += n
    return trainable, total


def decoder_layers(model: nn.Module) -> tuple[str, nn.ModuleList]:
    """The stack of transformer blocks: the longest ModuleList matching num_hidden_layers."""
    n = getattr(getattr(model, "config", None), "num_hidden_layers", None)
    best = None
    for name, module in model.named_modules():
        if isinstance(module, nn.ModuleList) and len(module) > 0:
            if (n is None or len(module) == n) and (best is None or len(module) > len(best[1])):
                best = (name, module)
    if best is None:
        raise ValueError("could not find the model's stack of transformer blocks")
    return best


# Names of task heads across transformers families: they learn whenever the objective adds
# a fresh head (classification), whatever the method.
HEAD_NAMES = ("classifier", "score", "qa_outputs")


def head_modules(model: nn.Module) -> list[tuple[str, nn.Module]]:
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    return [(n, m) for n, m in base.named_children() if n in HEAD_NAMES]


def task_heads(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """The fresh task head, plus the pooler a BERT-style sequence classifier feeds it from.

    The pooler belongs to the classification head (dense + tanh before `classifier`) and is
    freshly initialised when the checkpoint has none (an MLM checkpoint); sentence-embedding
    encoders never trained it for classification. It learns and is saved with the head.
    """
    heads = head_modules(model)
    # On the transformers model, also under a peft wrapper (whose own base_model is peft's tuner).
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    pooler = getattr(getattr(base, "base_model", None), "pooler", None)
    if heads and isinstance(pooler, nn.Module):
        heads.append(("pooler", pooler))
    return heads


def backbone_heads(model: nn.Module) -> list[str] | None:
    """What of the task head lives in the backbone (a BERT pooler), for a peft config's modules_to_save:
    peft saves the classifier of a sequence-classification model itself, not the pooler feeding it."""
    return [n for n, _ in task_heads(model) if n not in HEAD_NAMES] or None
