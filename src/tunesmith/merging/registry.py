"""The merge methods by name, with their parameters, defaults and ranges (imports no torch, so a
merge recipe is validated before anything heavy loads). The tensor functions are in methods.py."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable


@dataclass(frozen=True)
class Param:
    default: float | bool | None  # None: required
    low: float | None = None
    high: float | None = None
    low_open: bool = False  # the range excludes `low` (density 0 would drop everything)
    kind: type = float
    choices: tuple[str, ...] = ()
    optional: bool = False  # None is a valid value (not required)

    @property
    def required(self) -> bool:
        return self.default is None and not self.optional

    def check(self, name: str, value) -> str | None:
        """Why `value` is not allowed, or None."""
        if self.kind is str:
            return None if value in self.choices else f"{name} must be one of {', '.join(self.choices)} (got {value!r})"
        if self.kind is bool:
            return None if isinstance(value, bool) else f"{name} must be true or false (got {value!r})"
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            return f"{name} must be a number (got {value!r})"
        if self.low is not None and (value < self.low or (self.low_open and value == self.low)):
            return f"{name} must be {'>' if self.low_open else '>='} {self.low} (got {value})"
        if self.high is not None and value > self.high:
            return f"{name} must be <= {self.high} (got {value})"
        return None

    def describe(self) -> str:
        if self.kind is str:
            return " | ".join(self.choices)
        if self.kind is bool:
            return "true/false"
        if self.low is not None and self.high is not None:
            return f"{'(' if self.low_open else '['}{self.low:g}, {self.high:g}]"
        if self.low is not None:
            return f"{'>' if self.low_open else '>='} {self.low:g}"
        return "any number"


@dataclass(frozen=True)
class MergeMethod:
    name: str
    summary: str
    needs_base: bool
    min_models: int = 1
    max_models: int | None = None
    per_model: dict[str, Param] = field(default_factory=dict)  # one value per input model
    globals: dict[str, Param] = field(default_factory=dict)
    random: bool = False  # draws masks from the seeded RNG: parity with mergekit is statistical
    pair_without_base: bool = False  # two models interpolate between themselves; one needs the base
    low_rank: bool = False  # combines LoRA adapters as adapters (low_rank.py), not tensors
    # (tensor name, its resolved arguments) -> why they cannot be merged, or None; every tensor is checked
    # before any is read.
    check_arguments: Callable[[str, dict], str | None] | None = None

    def uses_base(self, n_inputs: int) -> bool:
        return self.needs_base or (self.pair_without_base and n_inputs == 1)

    @property
    def fn(self) -> Callable:
        from . import methods

        return getattr(methods, self.name)

    @property
    def params(self) -> dict[str, Param]:
        return {**self.per_model, **self.globals}


WEIGHT = Param(1.0)
DENSITY = Param(1.0, low=0.0, high=1.0, low_open=True)
LAMBDA = Param(1.0, low=0.0, low_open=True)
GAMMA = Param(0.01, low=0.0, high=1.0)
FLAG_OFF, FLAG_ON = Param(False, kind=bool), Param(True, kind=bool)
TASK_VECTOR = {"lambda": LAMBDA, "normalize": FLAG_OFF}
LORA_COMBINATIONS = ("cat", "svd", "linear", "ties", "ties_svd", "dare_linear", "dare_ties", "dare_linear_svd",
                     "dare_ties_svd", "magnitude_prune", "magnitude_prune_svd")
NEEDS_DENSITY = ("ties", "ties_svd", "dare_linear", "dare_ties", "dare_linear_svd", "dare_ties_svd", "magnitude_prune",
                 "magnitude_prune_svd")

def _weights_sum_to_zero(tensor: str, arguments: dict) -> str | None:
    """linear divides by the weights' sum when it normalizes: a sum of 0 would write inf / NaN weights."""
    if arguments.get("normalize", True) and abs(sum(arguments["weight"])) < 1e-8:
        return (f"the models' weights sum to 0 for tensor {tensor} ({arguments['weight']}), and normalize divides "
                "by that sum; change the weights or set normalize: false")
    return None


MERGE_METHODS: dict[str, MergeMethod] = {m.name: m for m in (
    MergeMethod("linear", "weighted average of the models (no base)", needs_base=False,
                per_model={"weight": WEIGHT}, globals={"normalize": FLAG_ON}, check_arguments=_weights_sum_to_zero),
    MergeMethod("task_arithmetic", "base + lambda x weighted sum of task vectors", needs_base=True,
                per_model={"weight": WEIGHT}, globals=TASK_VECTOR),
    MergeMethod("ties", "task vectors trimmed to the top density by magnitude, sign election, disjoint mean",
                needs_base=True, per_model={"weight": WEIGHT, "density": DENSITY},
                globals={**TASK_VECTOR, "normalize": FLAG_ON}),
    MergeMethod("dare_linear", "task vectors randomly dropped (keep = density), rescaled to their L1 norm, "
                "summed", needs_base=True, per_model={"weight": WEIGHT, "density": DENSITY},
                globals={**TASK_VECTOR, "rescale": FLAG_ON}, random=True),
    MergeMethod("dare_ties", "DARE drop and rescale, then TIES sign election", needs_base=True,
                per_model={"weight": WEIGHT, "density": DENSITY},
                globals={**TASK_VECTOR, "rescale": FLAG_ON}, random=True),
    MergeMethod("breadcrumbs", "task vectors without their largest (gamma) and smallest entries, summed",
                needs_base=True, per_model={"weight": WEIGHT, "density": DENSITY, "gamma": GAMMA},
                globals=TASK_VECTOR),
    MergeMethod("breadcrumbs_ties", "breadcrumbs with TIES sign election", needs_base=True,
                per_model={"weight": WEIGHT, "density": DENSITY, "gamma": GAMMA}, globals=TASK_VECTOR),
    MergeMethod("slerp", "spherical interpolation from the first model (t=0) to the second (t=1); one model "
                "is interpolated from the base", needs_base=False, max_models=2, pair_without_base=True,
                globals={"t": Param(None, low=0.0, high=1.0)}),
    MergeMethod("lora_combine", "LoRA adapters of one base combined into one LoRA adapter (peft's "
                "add_weighted_adapter; cat is exact task arithmetic in low rank)", needs_base=False,
                per_model={"weight": Param(1.0)}, low_rank=True,
                globals={"combination": Param("cat", kind=str, choices=LORA_COMBINATIONS),
                         "svd_rank": Param(None, low=1.0, optional=True),
                         "density": Param(None, low=0.0, high=1.0, low_open=True, optional=True),
                         "majority_sign_method": Param("total", kind=str, choices=("total", "frequency"))}),
    MergeMethod("model_stock", "base-to-average interpolation set by the task vectors' angle", needs_base=True,
                min_models=2, globals={"filter_wise": FLAG_OFF}),
)}
