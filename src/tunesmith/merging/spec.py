"""A merge recipe (MERGE.yaml): inputs, base, method and parameters, output, and optionally
evaluation tasks and a search over candidate settings. Pydantic, and no torch, so a bad recipe
fails with the key path before any model or tensor is read.

Parameter values follow mergekit's forms: a number; a list of numbers, a gradient interpolated
over the layers (`t: [0, 0.5, 1]`); or a list of `{filter, value}` where the first filter found
in the tensor's name applies (`[{filter: self_attn, value: 0.3}, {value: 0.7}]`).
"""

from __future__ import annotations

import itertools
import re
from pathlib import Path
from typing import Literal, Union

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from ..errors import ConfigError
from ..evaluation.spec import TaskSpec
from .registry import MERGE_METHODS, NEEDS_DENSITY, MergeMethod


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", protected_namespaces=())


Scalar = Union[bool, float, str]


class Conditional(_Section):
    filter: str | None = Field(None, description="Applies to tensors whose name contains this ('*' or none: all).")
    value: Union[Scalar, list[float]]


Setting = Union[Scalar, list[float], list[Conditional]]


def setting_values(setting: Setting) -> list:
    """Every plain value a setting can produce (each gradient point, each conditional's value)."""
    if isinstance(setting, list):
        out: list = []
        for item in setting:
            out += setting_values(item.value) if isinstance(item, Conditional) else [item]
        return out
    return [setting]


def evaluate_setting(setting: Setting, tensor: str, t: float):
    """The value for one tensor at relative depth t (0 = first layer, 1 = last); None if no filter matches."""
    if not isinstance(setting, list):
        return setting
    if setting and all(not isinstance(x, Conditional) for x in setting):
        scaled = t * (len(setting) - 1)
        i0 = int(scaled)
        i1 = min(len(setting) - 1, i0 + 1)
        frac = scaled - i0
        return (1 - frac) * setting[i0] + frac * setting[i1]
    for cond in setting:
        if cond.filter in (None, "*") or cond.filter in tensor:
            return evaluate_setting(cond.value, tensor, t)
    return None


class MergeInput(_Section):
    model: str = Field(description="Anything load_trained accepts: run or artifact folder, adapter, model "
                       "folder, hub id, .gguf or pkg:// file.")
    name: str | None = None
    parameters: dict[str, Setting] = Field(default_factory=dict, description="Per-model parameters (weight, density, "
                                           "gamma) for this input.")

    @property
    def label(self) -> str:
        if self.name:
            return self.name
        p = Path(self.model.rstrip("/"))
        if p.name in ("adapter", "model") and p.parent.name:
            p = p.parent
        return p.stem if p.suffix == ".gguf" else p.name  # Qwen2.5-7B keeps its ".5-7B"


class Candidate(_Section):
    """One setting to try in a search: a method, its parameters, and optional per-model ones."""

    method: str
    parameters: dict[str, Setting] = Field(default_factory=dict)
    models: dict[str, dict[str, Setting]] = Field(default_factory=dict,
                                                 description="Per-model parameters by input name.")
    name: str | None = None


class SearchSpec(_Section):
    candidates: list[Candidate] = Field(default_factory=list)
    grid: dict[str, list] = Field(default_factory=dict, description="Lists to combine: 'method' and any parameter; "
                                  "a per-model parameter's entry is a number (every model) or a list, one per model.")
    select: str = Field("mean", description="mean (of the tasks' primary metrics), min, or a task name.")
    keep: bool = Field(False, description="Keep every candidate's weights, not only the best's.")


class MergeSpec(_Section):
    models: list[MergeInput] = Field(min_length=1)
    base_model: str | None = Field(None, description="The model task vectors are taken against (t=0 for slerp).")
    method: str = "linear"
    parameters: dict[str, Setting] = Field(default_factory=dict)
    dtype: Literal["auto", "fp32", "bf16", "fp16"] = Field("auto", description="Output dtype (auto: the base's).")
    tokenizer_source: str | None = Field(None, description="'base' or an input's name: whose tokenizer the "
                                         "merged model gets (default: the base, else the first input).")
    seed: int = Field(0, description="Seeds DARE's random drop masks.")
    device: str = Field("cpu", description="Where tensors are merged (cuda for a GPU).")
    max_shard_mb: int = Field(4096, gt=0, description="Largest safetensors file written.")
    output: str = "runs/merged"
    overwrite: bool = False
    evaluate: list[TaskSpec] = Field(default_factory=list, description="Tasks every candidate (and input) is "
                                     "scored on, with the compare machinery.")
    eval_dtype: Literal["auto", "bf16", "fp16", "fp32"] = "fp32"
    search: SearchSpec | None = None

    @model_validator(mode="after")
    def _check(self) -> "MergeSpec":
        labels = [m.label for m in self.models]
        dup = sorted({x for x in labels if labels.count(x) > 1})
        if dup:
            raise ValueError(f"models: duplicate names {dup}; give each a distinct 'name'")
        labels = [m.label for m in self.inputs]  # a model that is the base is named 'base' here
        if self.tokenizer_source not in (None, "base", *labels):
            raise ValueError(f"tokenizer_source: '{self.tokenizer_source}' is neither 'base' nor an input's name "
                             f"({', '.join(labels)})")
        if self.tokenizer_source == "base" and not self.base_model:
            raise ValueError("tokenizer_source: 'base' but no base_model is given")
        tasks = [t.label for t in self.evaluate]
        dup = sorted({x for x in tasks if tasks.count(x) > 1})
        if dup:
            raise ValueError(f"evaluate: duplicate task names {dup}; give each a distinct 'name'")
        if self.search is not None:
            if not self.evaluate:
                raise ValueError("search: needs evaluate tasks to rank the candidates by")
            if self.search.select not in ("mean", "min", *tasks):
                raise ValueError(f"search.select: '{self.search.select}' is not mean, min or a task name "
                                 f"({', '.join(tasks)})")
        for c in self.candidates():
            check_candidate(self, c)
        return self

    @property
    def inputs(self) -> list[MergeInput]:
        """The models merged: a model listed that is the base itself (mergekit style) is not an input."""
        return [m for m in self.models if not (self.base_model and same_model(m.model, self.base_model))]

    def candidates(self) -> list[Candidate]:
        """The settings to build: the search's list and grid, or the recipe's one method."""
        if self.search is None:
            return [Candidate(method=self.method, parameters=self.parameters)]
        # A listed candidate starts from the recipe's parameters, as the grid's do.
        listed = [c.model_copy(update={"parameters": {**self.parameters, **c.parameters}})
                  for c in self.search.candidates]
        out = listed + grid_candidates(self.search.grid, self)
        if not out:
            raise ValueError("search: give candidates or a grid")
        return out


def same_model(a: str, b: str) -> bool:
    """Whether two spellings name one model: equal, or one existing folder or file (`./base`, `base/`)."""
    if a == b:
        return True
    pa, pb = Path(a).expanduser(), Path(b).expanduser()
    return pa.exists() and pb.exists() and pa.resolve() == pb.resolve()


def model_levels(spec: MergeSpec, candidate: Candidate, label: str) -> list[dict[str, Setting]]:
    """Where an input's per-model parameters are looked up, most specific first: the candidate's
    value for that model, the input's own, then the candidate's value for every model."""
    own = next(m.parameters for m in spec.inputs if m.label == label)
    return [candidate.models.get(label, {}), own, candidate.parameters]


def grid_candidates(grid: dict[str, list], spec: MergeSpec) -> list[Candidate]:
    if not grid:
        return []
    for key, values in grid.items():
        if not isinstance(values, list) or not values:
            raise ValueError(f"search.grid.{key}: expected a non-empty list of values")
    keys = list(grid)
    names = [m.label for m in spec.inputs]
    out: list[Candidate] = []
    seen: set[str] = set()
    for combo in itertools.product(*(grid[k] for k in keys)):
        chosen = dict(zip(keys, combo))
        method_name = chosen.pop("method", spec.method)
        method = MERGE_METHODS.get(method_name)
        if method is None:
            raise ValueError(f"search.grid.method: unknown merge method '{method_name}' "
                             f"(known: {', '.join(MERGE_METHODS)})")
        params = dict(spec.parameters)
        per_model: dict[str, dict] = {}
        for key, value in chosen.items():
            if key not in method.params:
                continue  # density means nothing to linear: that grid axis collapses for it
            if key in method.per_model and isinstance(value, list) and value and not isinstance(value[0], dict):
                if len(value) != len(names):
                    raise ValueError(f"search.grid.{key}: {value} has {len(value)} values for {len(names)} models")
                for n, v in zip(names, value):
                    per_model.setdefault(n, {})[key] = v
            elif key in method.per_model:  # one value for every model, over what the inputs set
                for n in names:
                    per_model.setdefault(n, {})[key] = value
            else:
                params[key] = value
        c = Candidate(method=method_name, parameters=params, models=per_model)
        key = c.model_dump_json()
        if key not in seen:
            seen.add(key)
            out.append(c)
    return out


_SAFE_NAME = re.compile(r"[A-Za-z0-9._=+-]+")


def candidate_name(c: Candidate) -> str:
    """A readable, file-safe name: the method and the values it was given."""
    if c.name:
        return c.name

    def fmt(v) -> str:
        if isinstance(v, list):
            return "_".join(fmt(x.value if isinstance(x, Conditional) else x) for x in v)
        return f"{v:g}" if isinstance(v, float) else str(v).lower()

    parts = [c.method] + [f"{k}{fmt(v)}" for k, v in sorted(c.parameters.items())]
    # Per-model values side by side, models in name order: "weight1.2_0.8", not one part per model.
    models = sorted(c.models)
    for key in sorted({k for params in c.models.values() for k in params}):
        parts.append(key + "_".join(fmt(c.models[m][key]) if key in c.models[m] else "x" for m in models))
    return re.sub(r"[^A-Za-z0-9._=+-]", "_", "-".join(parts))


def check_candidate(spec: MergeSpec, c: Candidate) -> None:
    """Method known, parameters known and in range, the right number of models and a base when needed."""
    method: MergeMethod | None = MERGE_METHODS.get(c.method)
    where = f"candidate '{candidate_name(c)}'" if spec.search is not None else "method"
    if method is None:
        raise ValueError(f"{where}: unknown merge method '{c.method}' (known: {', '.join(MERGE_METHODS)})")
    inputs = spec.inputs
    if method.uses_base(len(spec.inputs)) and not spec.base_model:
        why = "one model is interpolated from the base" if not method.needs_base else "it merges differences from a base"
        raise ValueError(f"{where}: {c.method} needs base_model ({why})")
    if len(inputs) < method.min_models or (method.max_models and len(inputs) > method.max_models):
        want = (f"exactly {method.max_models}" if method.max_models == method.min_models
                else f"at least {method.min_models}" if not method.max_models
                else f"{method.min_models} to {method.max_models}")
        raise ValueError(f"{where}: {c.method} merges {want} model(s) besides the base; got {len(inputs)}")
    if c.name is not None and (not _SAFE_NAME.fullmatch(c.name) or c.name in (".", "..")):
        raise ValueError(f"{where}: name '{c.name}' must be letters, digits, '.', '_', '-', '=' or '+' (it names a "
                         "folder)")
    names = {m.label for m in inputs}
    for name in c.models:
        if name not in names:
            raise ValueError(f"{where}: models.{name} is not an input (inputs: {', '.join(sorted(names))})")
    sources = [("parameters", c.parameters)] + [(f"models.{m.label}.parameters", m.parameters) for m in inputs] + \
        [(f"models.{n}", p) for n, p in c.models.items()]
    for key, params in sources:
        for pname, setting in params.items():
            inherited = key.endswith(".parameters") or (key == "parameters" and spec.parameters.get(pname) == setting)
            if pname not in method.params and spec.search is not None and inherited:
                continue  # the recipe's or an input's density means nothing to a linear candidate of the search
            if pname not in method.params:
                raise ValueError(f"{where}: {key}.{pname} is not a parameter of {c.method} "
                                 f"(its parameters: {', '.join(method.params) or 'none'})")
            if key != "parameters" and pname not in method.per_model:
                raise ValueError(f"{where}: {key}.{pname} is a global parameter of {c.method}; set it under "
                                 f"parameters")
            for value in setting_values(setting):
                why = method.params[pname].check(pname, value)
                if why:
                    raise ValueError(f"{where}: {key}.{pname}: {why}")
    for pname, p in method.globals.items():
        if p.required and pname not in c.parameters:
            raise ValueError(f"{where}: {c.method} needs parameters.{pname}")
    if method.low_rank:
        for key, params in sources:
            for pname, setting in params.items():
                if isinstance(setting, list):
                    raise ValueError(f"{where}: {key}.{pname}: {c.method} takes one value per parameter (peft "
                                     "combines whole adapters; no per-tensor filters or depth gradients)")
        combination = c.parameters.get("combination", method.globals["combination"].default)
        if combination in NEEDS_DENSITY and c.parameters.get("density") is None:
            raise ValueError(f"{where}: combination {combination} needs parameters.density")


def load_merge_spec(source: str | Path | dict | MergeSpec, overrides: list[str] | None = None) -> MergeSpec:
    """A validated recipe from a YAML path, a dict or a MergeSpec; `overrides` are key.sub=value strings."""
    from ..config import apply_overrides, read_yaml_mapping

    if isinstance(source, MergeSpec):
        if not overrides:
            return source
        source = source.model_dump(mode="json", exclude_unset=True)
    base_dir = None
    where = "merge recipe"
    if isinstance(source, (str, Path)):
        path = Path(source)
        data = read_yaml_mapping(path, "merge recipe", "a mapping with 'models' and 'method'")
        base_dir, where = path.parent, str(path)
    else:
        data = dict(source)
    data = apply_overrides(data, overrides or [])
    try:
        spec = MergeSpec.model_validate(data)
    except ValidationError as exc:
        lines = []
        for e in exc.errors():
            loc = ".".join(str(p) for p in e["loc"]) or "(root)"
            msg = str(e["msg"]).removeprefix("Value error, ")
            lines.append(msg if e["type"] == "value_error" and not e["loc"] else f"{loc}: {msg}")
        raise ConfigError(f"{where}: invalid:\n  " + "\n  ".join(dict.fromkeys(lines))) from None
    if base_dir is not None:
        _resolve_paths(spec, base_dir)
    return spec


def _resolve_paths(spec: MergeSpec, base: Path) -> None:
    """Paths relative to the YAML resolve against its folder when they exist there."""
    from ..config import resolve_against

    for m in spec.models:
        same_as_base = spec.base_model is not None and same_model(m.model, spec.base_model)
        m.model = resolve_against(m.model, base)
        if same_as_base:
            spec.base_model = m.model
    spec.base_model = resolve_against(spec.base_model, base)
    for t in spec.evaluate:
        t.data = resolve_against(t.data, base)
