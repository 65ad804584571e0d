"""Each method's own config section: a light pydantic class per method, no torch.

`RunConfig.method` is the union of these, told apart by `type` (lora when absent), so a key
that belongs to another method is refused, naming the methods it does belong to. What config
validation must know about a method lives here too — which objectives it cannot train and why,
whether its rows may pack, what its artifact holds, the run settings it refuses — so that
validating a config never loads torch; the method classes (methods/) read it from here.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Annotated, Any, ClassVar, Literal, Union

from pydantic import BaseModel, ConfigDict, Discriminator, Field, Tag, TypeAdapter

if TYPE_CHECKING:
    from .config import RunConfig


class MethodSection(BaseModel):
    model_config = ConfigDict(extra="forbid", protected_namespaces=())
    type: str

    # Said in messages about keys of this family's sections.
    family: ClassVar[str] = ""
    # What the final artifact folder holds: "adapter" (weights that learned + config, loaded on
    # top of the base) or "model" (a complete transformers model).
    artifact: ClassVar[str] = "model"
    # Whether rows may hold several packed examples.
    packs: ClassVar[bool] = True
    # objective name -> why this method cannot train it. Every other cell is supported.
    unsupported: ClassVar[dict[str, str]] = {}
    # Multi-task runs: why the method cannot share its model's backbone with a second task's head (None:
    # it can), and why it cannot give each task its own set of weights (multitask.shared: false; None: it can).
    no_multitask: ClassVar[str | None] = None
    no_task_adapters: ClassVar[str | None] = "it adds no adapter (its weights are the model's own)"
    # Whether training.precision int8 applies: the method puts fused LoRA layers on a frozen fp32 base.
    int8_base: ClassVar[bool] = False

    def check(self, run: "RunConfig") -> list[str]:
        """Run settings this method refuses (engine features it cannot work with)."""
        return []


class FullSection(MethodSection):
    type: Literal["full"] = "full"


class FreezeSection(MethodSection):
    type: Literal["freeze"] = "freeze"
    train_last_n_layers: int | None = Field(None, ge=0)
    trainable_modules: list[str] = Field(default_factory=list)

    def check(self, run: "RunConfig") -> list[str]:
        if self.train_last_n_layers is None and not self.trainable_modules:
            return ["method: 'freeze' needs method.train_last_n_layers and/or method.trainable_modules"]
        return []


_NO_HEAD = ("a linear probe trains a new head on frozen features; {what}, so there is no separate "
            "head to put on them — use method.type freeze with method.trainable_modules: [{head}]")
_GENERATIVE = "{} is generative (the output is the language-model head over the vocabulary)"


class LinearProbeSection(MethodSection):
    type: Literal["linear_probe"] = "linear_probe"
    probe_head: Literal["linear", "mlp"] = "linear"
    probe_hidden: int = Field(256, gt=0)
    pooling: Literal["auto", "mean", "cls", "last"] = "auto"

    artifact: ClassVar[str] = "adapter"  # the head only, rebuilt on a freshly loaded base
    no_multitask: ClassVar[str | None] = "replaces the model by a frozen-feature probe with one head"
    unsupported: ClassVar[dict[str, str]] = {
        "sft": _NO_HEAD.format(what=_GENERATIVE.format("instruction tuning"), head="lm_head"),
        "causal_lm": _NO_HEAD.format(what=_GENERATIVE.format("next-token prediction"), head="lm_head"),
        "masked_lm": _NO_HEAD.format(what="masked-token prediction trains the pretrained MLM head over the "
                                          "vocabulary", head="cls"),
        "seq2seq": _NO_HEAD.format(what="sequence-to-sequence generation needs the whole decoder, not features "
                                        "of the input", head="lm_head"),
        **{name: _NO_HEAD.format(what="preference optimisation changes the language-model head's distribution "
                                      "over answers", head="lm_head") for name in ("dpo", "kto", "orpo", "simpo")},
        **{name: _NO_HEAD.format(what="online RL samples answers from the language-model head and changes its "
                                      "distribution", head="lm_head") for name in ("grpo", "rloo", "ppo")},
        "distill": _NO_HEAD.format(what="distillation matches the teacher's output distribution (the language-model "
                                        "head for its default sft task)", head="lm_head"),
    }

    def check(self, run: "RunConfig") -> list[str]:
        if run.training.gradient_checkpointing:
            return ["training.gradient_checkpointing: linear_probe sends no gradient through the frozen backbone, "
                    "so there is nothing to checkpoint; leave it off"]
        return []


class _Targeted(MethodSection):
    """Methods that place weights on chosen linear layers."""

    target_modules: str | list[str] = Field(
        "all-linear", description="'all-linear', 'attention', 'mlp', or module names."
    )
    layers_to_transform: list[int] | None = Field(None, description="Only these block indices get adapters.")
    artifact: ClassVar[str] = "adapter"
    no_task_adapters: ClassVar[str | None] = None


class LoraSection(_Targeted):
    type: Literal["lora"] = "lora"
    r: int = Field(16, gt=0)
    alpha: float = 32
    dropout: float = Field(0.05, ge=0.0, lt=1.0)
    loraplus_lr_ratio: float | None = Field(
        None, gt=0, description="LoRA+: B matrices learn this many times faster than A (e.g. 16)."
    )
    family: ClassVar[str] = "the LoRA family"
    int8_base: ClassVar[bool] = True


class DoraSection(LoraSection):
    type: Literal["dora"] = "dora"
    int8_base: ClassVar[bool] = False  # peft's DoRA layer, not the fused one


class RsLoraSection(LoraSection):
    type: Literal["rslora"] = "rslora"


class LoraFASection(LoraSection):
    type: Literal["lora_fa"] = "lora_fa"
    no_task_adapters: ClassVar[str | None] = ("peft's LoRA-FA optimizer updates every B matrix at every step and fails on "
                                       "the adapter of a task the step did not draw")

    def check(self, run: "RunConfig") -> list[str]:
        if self.loraplus_lr_ratio is not None:
            return ["method.loraplus_lr_ratio: lora_fa brings its own optimizer (A frozen, B projected); "
                    "LoRA+ learning-rate ratios do not apply — use method.type lora with loraplus_lr_ratio"]
        return []


class QLoraSection(LoraSection):
    type: Literal["qlora"] = "qlora"
    bits: Literal[4, 8] = 4
    quant_type: Literal["nf4", "fp4"] = "nf4"
    double_quant: bool = True
    compute_dtype: Literal["auto", "bf16", "fp16", "fp32"] = "auto"
    int8_base: ClassVar[bool] = False  # the base is already quantized, by bitsandbytes

    def check(self, run: "RunConfig") -> list[str]:
        if self.bits == 8 and ({"quant_type", "double_quant"} & self.model_fields_set):
            return ["method.quant_type / method.double_quant apply to 4-bit QLoRA only (method.bits: 4)"]
        return []


class IA3Section(_Targeted):
    type: Literal["ia3"] = "ia3"
    feedforward_modules: list[str] | None = None


class BitFitSection(MethodSection):
    type: Literal["bitfit"] = "bitfit"
    artifact: ClassVar[str] = "adapter"  # a partial artifact: the trained biases and head, loaded onto the base


class AdapterSection(MethodSection):
    type: Literal["adapter"] = "adapter"
    adapter_style: Literal["houlsby", "pfeiffer"] = "houlsby"
    reduction_factor: int = Field(16, gt=0)
    adapter_activation: Literal["relu", "gelu", "silu", "tanh"] = "relu"
    artifact: ClassVar[str] = "adapter"
    no_task_adapters: ClassVar[str | None] = None


# peft builds prompt-learning models per task type; masked LM has none (peft raises KeyError).
NO_MASKED_LM = ("peft has no masked-LM task type, and prompt learning needs one to prepend virtual "
                "tokens; use lora, ia3 or another weight-based method for masked_lm")
# Soft prompts as embeddings: a decoder's scalar head reads each row's last real token, found
# from input_ids, so it would read padding (prefix tuning keeps input_ids and is fine).
_NO_REWARD = ("a reward model's head reads each row's last real token, which peft's soft prompts "
              "(passed as embeddings) hide; use prefix_tuning, lora or ia3")


class _PromptFamily(MethodSection):
    num_virtual_tokens: int = Field(20, gt=0)
    family: ClassVar[str] = "the prompt family"
    artifact: ClassVar[str] = "adapter"
    packs: ClassVar[bool] = False  # virtual tokens are prepended per row
    unsupported: ClassVar[dict[str, str]] = {"masked_lm": NO_MASKED_LM}
    no_multitask: ClassVar[str | None] = ("rewrites the inputs inside peft's forward, which a second task's head "
                                          "does not run through")

    def check(self, run: "RunConfig") -> list[str]:
        if run.data.packing:
            return [f"data.packing: true cannot be used with method.type {self.type}: its virtual tokens are "
                    f"prepended once per row and would be shared by every example packed into it; "
                    f"leave data.packing unset or false"]
        return []


class PrefixTuningSection(_PromptFamily):
    type: Literal["prefix_tuning"] = "prefix_tuning"
    prefix_projection: bool = False
    encoder_hidden_size: int | None = Field(None, gt=0, description="Width of the prefix projection MLP.")

    def check(self, run: "RunConfig") -> list[str]:
        problems = super().check(run)
        if run.training.gradient_checkpointing:
            problems.append(
                "training.gradient_checkpointing cannot be used with method.type prefix_tuning: the prefixes "
                "enter every layer as a key/value cache, which checkpointed recomputation does not carry "
                "(peft refuses the combination); turn it off or use prompt_tuning / p_tuning"
            )
        return problems


class PromptTuningSection(_PromptFamily):
    type: Literal["prompt_tuning"] = "prompt_tuning"
    prompt_init: Literal["random", "text"] = "random"
    prompt_init_text: str | None = None
    unsupported: ClassVar[dict[str, str]] = {**_PromptFamily.unsupported, "reward": _NO_REWARD}

    def check(self, run: "RunConfig") -> list[str]:
        problems = super().check(run)
        if self.prompt_init == "text" and not self.prompt_init_text:
            problems.append("method.prompt_init: text needs method.prompt_init_text (the words that seed the prompt)")
        return problems


class PTuningSection(_PromptFamily):
    type: Literal["p_tuning"] = "p_tuning"
    encoder_hidden_size: int | None = Field(None, gt=0, description="p_tuning prompt encoder width.")
    unsupported: ClassVar[dict[str, str]] = {**_PromptFamily.unsupported, "reward": _NO_REWARD}


SECTIONS: dict[str, type[MethodSection]] = {
    s.model_fields["type"].default: s
    for s in (FullSection, FreezeSection, LinearProbeSection, LoraSection, DoraSection, RsLoraSection,
              LoraFASection, QLoraSection, IA3Section, BitFitSection, AdapterSection, PrefixTuningSection,
              PromptTuningSection, PTuningSection)
}
DEFAULT = "lora"


def _tag(value: Any) -> str:
    if isinstance(value, dict):
        return value.get("type", DEFAULT)
    return getattr(value, "type", DEFAULT)


MethodConfigUnion = Annotated[
    Union[tuple(Annotated[s, Tag(name)] for name, s in SECTIONS.items())],  # noqa: UP007
    Discriminator(_tag),
]
_ADAPTER = TypeAdapter(MethodConfigUnion)


def method_config(**fields: Any) -> MethodSection:
    """The section of `fields["type"]` (lora when absent), validated."""
    return _ADAPTER.validate_python(fields)


def support(method: str, objective: str) -> str | None:
    """None when the method can train the objective, else the reason it cannot."""
    return SECTIONS[method].unsupported.get(objective)


def lenient_method_config(fields: dict[str, Any]) -> MethodSection:
    """A section from a saved manifest: keys of the older flat schema that this method does not
    have are dropped (artifacts written before the sections were split stay loadable)."""
    section = SECTIONS[fields.get("type", DEFAULT)]
    return section(**{k: v for k, v in fields.items() if k in section.model_fields})
