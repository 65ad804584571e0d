"""Bottleneck adapters (Houlsby, Pfeiffer): tunesmith's own, peft has none.

An adapter is down-projection -> activation -> up-projection, added to the output of a
block's projection (`out + adapter(out)`). Houlsby places one after the attention output
projection(s) and one after the feed-forward output projection of every block; Pfeiffer only
after the feed-forward output.

The projections are found by module names, not model types: inside each numbered block
(Llama `model.layers.N`, BERT `encoder.layer.N`, T5 `encoder.block.N`, GPT-2 `h.N`), an
attention output is a linear layer under an attention sub-module whose own name is one of
the usual output names (Llama `self_attn.o_proj`, BERT `attention.output.dense`, T5
`SelfAttention.o` / `EncDecAttention.o`, GPT-2 `attn.c_proj`, BART `out_proj`); the
feed-forward output is the last linear layer of the block outside attention (Llama
`mlp.down_proj`, BERT `output.dense`, T5 `DenseReluDense.wo`, GPT-2 `mlp.c_proj`, BART `fc2`).

Adapters are registered as sub-modules of their block (`<block>.bottleneck_adapters.<key>`)
and applied through forward hooks on the projections, so the base modules, their names and
their state-dict keys stay untouched.
"""

from __future__ import annotations

from contextlib import contextmanager

import json
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from ..method_config import MethodSection
from ..errors import ConfigError
from .base import FIRST_ADAPTER, Method, MethodContext, task_heads
from .lora import block_linears, is_attention

WEIGHTS = "bottleneck_adapter.safetensors"
SPEC = "bottleneck_adapter.json"
CONTAINER = "bottleneck_adapters"  # the ModuleDict each block holds its adapters in

# The last name component of an attention block's output projection across families.
ATTENTION_OUTPUT_NAMES = ("o_proj", "o", "out_proj", "c_proj", "dense", "out_lin", "wo")
ACTIVATIONS = {"relu": nn.ReLU, "gelu": nn.GELU, "silu": nn.SiLU, "tanh": nn.Tanh}


class Bottleneck(nn.Module):
    """down -> activation -> up; up starts at zero so the adapted model starts as the base."""

    def __init__(self, hidden: int, bottleneck: int, activation: str):
        super().__init__()
        self.down = nn.Linear(hidden, bottleneck)
        self.act = ACTIVATIONS[activation]()
        self.up = nn.Linear(bottleneck, hidden)
        nn.init.zeros_(self.up.weight)
        nn.init.zeros_(self.up.bias)
        self.bypassed = False  # True while the base model alone is asked for (a reference policy)
        self.adapter_id = FIRST_ADAPTER  # a multi-task run's per-task adapters sit beside the first set
        self.active = True  # False while another task's set runs

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.up(self.act(self.down(x)))


def _residual_hook(adapter: Bottleneck):
    def hook(module, inputs, out):
        if adapter.bypassed or not adapter.active:
            return out
        # The adapter keeps its own dtype (fp32 on a bf16 base) and hands back the base's.
        delta = adapter(out.to(adapter.up.weight.dtype))
        return out + delta.to(out.dtype)

    return hook


def _out_features(module: nn.Module) -> int:
    if isinstance(module, nn.Linear):
        return module.out_features
    if hasattr(module, "nf"):  # transformers' Conv1D (GPT-2)
        return module.nf
    raise ConfigError(f"method (adapter): cannot tell the output width of {type(module).__name__}")


def find_placements(model: nn.Module, style: str) -> list[tuple[str, str, str]]:
    """(block path, projection path in the block, "attention"|"feed_forward") for every adapter."""
    blocks: dict[str, list[str]] = {}
    for _, (stack, index, rel) in block_linears(model).items():
        blocks.setdefault(f"{stack}.{index}", []).append(rel)  # registration order
    placements = []
    for block, rels in blocks.items():
        feed_forward = [r for r in rels if not is_attention(r)]
        if style == "houlsby":
            placements += [(block, r, "attention") for r in rels
                           if is_attention(r) and r.split(".")[-1] in ATTENTION_OUTPUT_NAMES]
        if feed_forward:
            placements.append((block, feed_forward[-1], "feed_forward"))
    return placements


def _key(rel: str) -> str:
    return rel.replace(".", "_")  # module names may not hold dots


def inject(model: nn.Module, placements: list[tuple[str, str, str]], reduction_factor: int,
           activation: str, adapter_id: str = FIRST_ADAPTER) -> list[str]:
    """Add one adapter per placement to its block and hook it to the projection; returns their names.
    A task's own set (`adapter_id` other than the first) is keyed `<projection>__<id>` and starts inactive."""
    names = []
    for block_path, rel, _ in placements:
        block = model.get_submodule(block_path)
        projection = block.get_submodule(rel)
        hidden = _out_features(projection)
        weight = next(projection.parameters())
        adapter = Bottleneck(hidden, max(1, hidden // reduction_factor), activation)
        adapter.to(device=weight.device, dtype=torch.float32)
        adapter.adapter_id, adapter.active = adapter_id, adapter_id == FIRST_ADAPTER
        if not hasattr(block, CONTAINER):
            block.add_module(CONTAINER, nn.ModuleDict())
        key = _key(rel) if adapter_id == FIRST_ADAPTER else f"{_key(rel)}__{adapter_id}"
        getattr(block, CONTAINER)[key] = adapter
        projection.register_forward_hook(_residual_hook(adapter))
        names.append(f"{block_path}.{CONTAINER}.{key}")
    return names


def _freeze_base(model: nn.Module) -> None:
    """Everything frozen but the adapters and the task head."""
    for p in model.parameters():
        p.requires_grad_(False)
    for name, module in model.named_modules():
        if name.endswith(CONTAINER):
            module.requires_grad_(True)
    for _, head in task_heads(model):
        head.requires_grad_(True)


def _task_modules(model: nn.Module):
    """Modules that belong to one adapter set: the bottleneck adapters, and a task's own copies of the
    trainable modules inside the backbone (a BERT pooler) that per-task adapters add."""
    return [m for m in model.modules() if getattr(m, "adapter_id", None) is not None]


def _trained_state(model: nn.Module, adapter_id: str = FIRST_ADAPTER) -> dict[str, torch.Tensor]:
    """What learned, for one adapter set: its adapters, and with the first set the task head too."""
    other = {id(p) for m in _task_modules(model) if m.adapter_id != adapter_id for p in m.parameters()}
    mine = None if adapter_id == FIRST_ADAPTER else {
        id(p) for m in _task_modules(model) if m.adapter_id == adapter_id for p in m.parameters()}
    return {n: p.detach().to("cpu").contiguous().clone() for n, p in model.named_parameters()
            if p.requires_grad and id(p) not in other and (mine is None or id(p) in mine)}


TASK_COPIES = "task_copies"  # where a backbone module keeps each task's own copy of itself


def _run_task_copy(module, args, kwargs, out):
    """A module in the shared backbone that learns (a BERT pooler) answers with the active task's copy."""
    for copy_ in getattr(module, TASK_COPIES).values():
        if copy_.active:
            return copy_(*args, **kwargs)
    return out


def _backbone_trainables(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """(path, module) of the trainable task-head modules that sit inside the backbone every task runs."""
    paths = {id(m): n for n, m in model.named_modules()}
    heads = [m for _, m in task_heads(model)]
    base = getattr(model, "base_model", None)
    inside = {id(m) for m in base.modules()} if isinstance(base, nn.Module) and base is not model else set()
    return [(paths[id(m)], m) for m in heads if id(m) in inside]


def _add_task_copies(model: nn.Module, paths: list[str], adapter_id: str) -> None:
    """Give each module at `paths` an inactive copy of itself (its weights as they are now) for `adapter_id`."""
    import copy

    for path in paths:
        module = model.get_submodule(path)
        replica = copy.deepcopy(module)
        replica._modules.pop(TASK_COPIES, None)
        replica._forward_hooks.clear()
        replica.adapter_id, replica.active = adapter_id, False
        if not hasattr(module, TASK_COPIES):
            module.add_module(TASK_COPIES, nn.ModuleDict())
            module.register_forward_hook(_run_task_copy, with_kwargs=True)
        getattr(module, TASK_COPIES)[adapter_id] = replica


def _placements(spec: dict) -> list[tuple[str, str, str]]:
    return [(p["block"], p["projection"], p["kind"]) for p in spec["placements"]]


class BottleneckAdapter(Method):
    """Bottleneck adapters after attention and/or feed-forward outputs; the base stays frozen."""

    name = "adapter"

    def apply(self, model: nn.Module, cfg: MethodSection, ctx: MethodContext) -> nn.Module:
        placements = find_placements(model, cfg.adapter_style)
        if not placements:
            raise ConfigError(
                f"method (adapter): no attention or feed-forward output projection found in "
                f"{type(model).__name__}'s transformer blocks (looked for linear layers inside numbered blocks, "
                f"attention outputs named {', '.join(ATTENTION_OUTPUT_NAMES)}); use lora or freeze instead"
            )
        inject(model, placements, cfg.reduction_factor, cfg.adapter_activation)
        _freeze_base(model)
        model.tunesmith_adapter_spec = {
            "style": cfg.adapter_style, "reduction_factor": cfg.reduction_factor,
            "activation": cfg.adapter_activation,
            "placements": [{"block": b, "projection": r, "kind": k} for b, r, k in placements],
        }
        return model

    def reference_scope(self, model: nn.Module):
        @contextmanager
        def base_only():
            adapters = [m for m in model.modules() if isinstance(m, Bottleneck)]
            for a in adapters:
                a.bypassed = True
            try:
                yield model
            finally:
                for a in adapters:
                    a.bypassed = False

        return base_only

    def save(self, model: nn.Module, out: Path) -> None:
        spec = getattr(model, "tunesmith_adapter_spec", None)
        if spec is None:
            raise ConfigError("adapter: save needs a model prepared by BottleneckAdapter.apply")
        out.mkdir(parents=True, exist_ok=True)
        # Adapters and the fresh task head: the only weights that learned.
        save_file(_trained_state(model), out / WEIGHTS, metadata={"format": "pt"})
        (out / SPEC).write_text(json.dumps(spec, indent=1))

    def load(self, base: nn.Module, artifact: Path, cfg: MethodSection, ctx: MethodContext) -> nn.Module:
        spec = json.loads((artifact / SPEC).read_text())
        inject(base, _placements(spec), spec["reduction_factor"], spec["activation"])
        base.tunesmith_adapter_spec = spec
        _freeze_base(base)  # as trained, so a reloaded model can train on or be saved again
        load_partial(base, load_file(artifact / WEIGHTS), artifact / WEIGHTS)
        return base

    def add_task_adapter(self, model: nn.Module, adapter_id: str, seed: int, *, own_head: bool = False) -> None:
        spec = model.tunesmith_adapter_spec
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            inject(model, _placements(spec), spec["reduction_factor"], spec["activation"], adapter_id)
        # What learns inside the backbone besides the adapters (a BERT pooler feeding a classifier) is the
        # task's own too, or one task's batches would move what another task's adapters feed.
        _add_task_copies(model, [path for path, _ in _backbone_trainables(model)], adapter_id)

    def use_task_adapter(self, model: nn.Module, adapter_id: str) -> None:
        for m in _task_modules(model):
            m.active = m.adapter_id == adapter_id

    def save_task_adapter(self, model: nn.Module, adapter_id: str, folder: Path) -> None:
        folder.mkdir(parents=True, exist_ok=True)
        save_file(_trained_state(model, adapter_id), folder / WEIGHTS, metadata={"format": "pt"})
        copied = [n for n, m in model.named_modules() if hasattr(m, TASK_COPIES)]
        (folder / SPEC).write_text(json.dumps({**model.tunesmith_adapter_spec, "adapter_id": adapter_id,
                                               "task_copies": copied}, indent=1))

    def load_task_adapter(self, model: nn.Module, folder: Path, adapter_id: str) -> None:
        spec = json.loads((folder / SPEC).read_text())
        saved_as = spec.get("adapter_id", adapter_id)  # the saved names carry the id it trained under
        inject(model, _placements(spec), spec["reduction_factor"], spec["activation"], saved_as)
        _add_task_copies(model, spec.get("task_copies", []), saved_as)
        load_partial(model, load_file(folder / WEIGHTS), folder / WEIGHTS)
        self.use_task_adapter(model, saved_as)


def load_partial(model: nn.Module, weights: dict[str, torch.Tensor], source: Path) -> None:
    """Copy saved tensors onto the model's parameters of the same names; every name must exist."""
    params = dict(model.named_parameters())
    unknown = sorted(set(weights) - set(params))
    if unknown:
        raise ConfigError(f"{source}: tensors {unknown[:3]} are not parameters of {type(model).__name__}; "
                          f"was it saved from another base model?")
    with torch.no_grad():
        for name, tensor in weights.items():
            if params[name].shape != tensor.shape:
                raise ConfigError(f"{source}: {name} has shape {tuple(tensor.shape)}, the model expects "
                                  f"{tuple(params[name].shape)}")
            params[name].copy_(tensor)
