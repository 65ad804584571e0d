"""The public evaluation API: `evaluate` (one run or model) and `compare` (several models)."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any, Callable

from ..config import ReferenceSet, RunConfig
from ..errors import ConfigError
from .cache import EvalCache
from .compare import CompareResult, PreparedTask, prepare_task, run_compare, write_outputs
from .evaluator import check_records
from .pairs import pair_settings, wants_pairs
from .spec import CompareSpec, EvalSettings, ModelSpec, TaskSpec, load_compare_spec, validate_spec


def _settings(settings: EvalSettings | dict | None, **defaults: Any) -> EvalSettings:
    if isinstance(settings, EvalSettings):
        return settings
    data = {**defaults, **(settings or {})}
    try:
        return EvalSettings.model_validate(data)
    except Exception as exc:  # pydantic's message already names the field
        raise ConfigError(f"eval settings: {exc}") from None


def _finish(result: CompareResult, output: str | Path | None, show_examples: int,
            console, echo: Callable[[str], None]) -> CompareResult:
    if output is not None:
        paths = write_outputs(result, Path(output), show_examples=show_examples)
        echo(f"wrote {paths['markdown']}, {paths['html']} and {paths['results']}")
    if console is not None:
        from .report import print_table

        print_table(result, console)
    return result


def compare(
    spec: CompareSpec | dict | str | Path | None = None,
    *,
    models: list[str | ModelSpec | dict] | None = None,
    tasks: list[TaskSpec | dict] | None = None,
    reference: list[ReferenceSet | dict] | None = None,
    forgetting: bool | None = None,
    output: str | Path | None = None,
    use_cache: bool | None = None,
    cache_dir: str | Path | None = None,
    console=None,
    echo: Callable[[str], None] = print,
) -> CompareResult:
    """Evaluate every model on every task with the same settings; write the reports to `output`.

    `spec` is a compare YAML path, a dict or a CompareSpec; keyword arguments override it.
    Models are `[NAME=]SOURCE[::ADAPTER]` strings or {name, model, adapter} dicts; the first
    model (or `baseline`) is what forgetting deltas are measured against.
    """
    if isinstance(spec, (str, Path)):
        cs = load_compare_spec(spec)
        data = cs.model_dump(mode="json")
    elif isinstance(spec, CompareSpec):
        data = spec.model_dump(mode="json")
    else:
        data = dict(spec or {})
    if models is not None:
        data["models"] = [ModelSpec.parse(m).model_dump() if isinstance(m, str)
                          else (m.model_dump() if isinstance(m, ModelSpec) else m) for m in models]
    if tasks is not None:
        data["tasks"] = [t.model_dump() if isinstance(t, TaskSpec) else t for t in tasks]
    if reference is not None:
        data["reference"] = [r.model_dump() if isinstance(r, ReferenceSet) else r for r in reference]
    if forgetting is not None:
        data["forgetting"] = forgetting
    if use_cache is not None:
        data["cache"] = use_cache
    if output is not None:
        data["output"] = str(output)
    cs = validate_spec(data)
    out = cs.output or "runs/compare"
    cache = EvalCache(Path(cache_dir) if cache_dir else None, enabled=cs.cache)
    result = run_compare(cs, cache=cache, echo=echo)
    return _finish(result, out, cs.show_examples, console, echo)


def _run_tasks(cfg: RunConfig, data: str | None, settings: EvalSettings, fmt: str,
               columns: dict[str, str] | None, max_samples: int | None) -> list[PreparedTask]:
    """The data a run is judged on: an explicit file, else the run's own validation split."""
    if data is not None:
        return [prepare_task(TaskSpec(data=data, format=fmt, columns=columns or {}, max_samples=max_samples,
                                      system_prompt=cfg.data.system_prompt, settings=settings))]
    if not cfg.has_validation:
        raise ConfigError("the run has no validation data (data.split.validation_file or "
                          "data.split.validation_ratio); pass --data FILE to evaluate on")
    from ..data.pipeline import load_records, split_records

    # The same records the run held out: same loader, same seed, same split.
    records, _, _, _ = load_records(cfg.data)
    _, val = split_records(records, cfg.data, cfg.training.seed)
    if max_samples:
        val = val[:max_samples]
    source = cfg.data.split.validation_file or f"{cfg.data.train} (validation split)"
    settings = pair_settings(settings, val)
    check_records(val, settings, str(source))
    return [PreparedTask("validation", TaskSpec(name="validation", data=str(source), settings=settings),
                         val, str(source))]


def _multitask_jobs(cfg: RunConfig, run_dir: Path, settings: EvalSettings, fmt: str,
                    columns: dict[str, str] | None, max_samples: int | None):
    """A multi-task run judged on each language-model task's validation split: with an adapter per task,
    every task's model on every split (how much each adapter transfers to the other sources); with shared
    weights, the one model on each split. Classification tasks are scored during training."""
    from ..objectives import OBJECTIVES

    lm = [t for t in cfg.tasks if OBJECTIVES[t.objective.type].generative]
    if not lm:
        raise ConfigError(f"tunesmith eval scores generative tasks; the tasks of {run_dir} "
                          f"({', '.join(f'{t.name}: {t.objective.type}' for t in cfg.tasks)}) are scored during "
                          f"training, their final scores in {run_dir / 'task_results.json'}")
    tasks = []
    for t in lm:
        alone = cfg.model_copy(update={"tasks": None, "data": t.data, "objective": t.objective})
        try:
            (prepared,) = _run_tasks(alone, None, settings.model_copy(update={"max_length": t.data.max_length}),
                                     fmt, columns, max_samples)
        except ConfigError as exc:
            raise ConfigError(f"tasks ({t.name}): {exc}") from None
        tasks.append(dataclasses.replace(prepared, label=t.name, spec=prepared.spec.model_copy(update={"name": t.name})))
    if cfg.multitask.shared:
        return tasks, [ModelSpec(name=cfg.run_name, model=str(run_dir))]
    return tasks, [ModelSpec(name=f"{cfg.run_name}/{t.name}", model=str(run_dir), task=t.name) for t in lm]


def evaluate(
    config: str | Path | dict | RunConfig | None = None,
    *,
    model: str | None = None,
    adapter: str | None = None,
    task: str | None = None,
    data: str | None = None,
    format: str = "auto",
    columns: dict[str, str] | None = None,
    max_samples: int | None = None,
    settings: EvalSettings | dict | None = None,
    reference: list[ReferenceSet | dict] | None = None,
    forgetting: bool | None = None,
    include_base: bool = True,
    output: str | Path | None = None,
    use_cache: bool = True,
    cache_dir: str | Path | None = None,
    dtype: str = "fp32",
    overrides: list[str] | None = None,
    console=None,
    echo: Callable[[str], None] = print,
) -> CompareResult:
    """Evaluate one trained run (from its config) or one model (ad hoc) and write the reports.

    With a run config: the run's artifact on its validation data (or `data`), next to the base
    model (`include_base`) so the table shows whether tuning helped; forgetting uses the
    config's `eval.reference` sets. Ad hoc: `model` (+ `adapter`) on `data`; when the model is
    an adapter or a tunesmith run, its base is measured on the reference sets for the deltas. `task` picks one
    task of a multi-task run (its head on the shared backbone).
    """
    from .loading import base_of

    if config is None and model is None:
        raise ConfigError("give a run config, or --model and --data")
    if config is not None and model is not None:
        raise ConfigError("give either a run config or --model, not both")
    if config is not None:
        from ..api import run_dir_of
        from ..config import load_config

        cfg = load_config(config, overrides)
        run_dir = run_dir_of(cfg)
        if not run_dir.is_dir():
            raise ConfigError(f"run folder {run_dir} does not exist; train it first (tunesmith train)")
        s = _settings(settings, metrics=["perplexity"], max_length=cfg.data.max_length,
                      batch_size=cfg.eval.batch_size or 8)
        if cfg.tasks and data is None:
            tasks, specs = _multitask_jobs(cfg, run_dir, s, format, columns, max_samples)
        else:
            tasks = _run_tasks(cfg, data, s, format, columns, max_samples)
            specs = [ModelSpec(name=cfg.run_name, model=str(run_dir))]
        base = ModelSpec(name="base", model=cfg.model.name_or_path if not cfg.model.gguf_file
                         else str(Path(cfg.model.name_or_path) / cfg.model.gguf_file))
        ref_sets = reference if reference is not None else [r.model_dump() for r in cfg.eval.reference]
        use_forgetting = cfg.eval.forgetting if forgetting is None else forgetting
        name = cfg.run_name
    else:
        s = _settings(settings)
        tasks = [prepare_task(TaskSpec(data=data, format=format, columns=columns or {}, max_samples=max_samples,
                                       settings=s))] if data is not None else []
        specs = [ModelSpec(model=model, adapter=adapter, task=task)]
        base_src = base_of(model, adapter)
        base = ModelSpec(name="base", model=base_src) if base_src else None
        ref_sets = reference if reference is not None else [ReferenceSet().model_dump()]
        use_forgetting = True if forgetting is None else forgetting
        name = specs[0].label
    if tasks and all(wants_pairs(t.settings) for t in tasks):
        # Preference pairs are scored by a reward model, which has no language-model head for the
        # reference sets' perplexity; its base model has no reward head to score pairs with.
        base = None
        use_forgetting = False if forgetting is None else forgetting
    reference_only: list[str] = []
    if base is not None:
        if include_base and config is not None:
            specs.insert(0, base)
        elif use_forgetting:
            specs.insert(0, base)
            reference_only = ["base"]
    if not tasks and not use_forgetting:
        raise ConfigError("nothing to evaluate: no data and forgetting is off")
    cs = validate_spec({
        "models": [m.model_dump() for m in specs],
        "reference": [r.model_dump() if isinstance(r, ReferenceSet) else r for r in ref_sets],
        "forgetting": use_forgetting,
        "dtype": dtype,
        "cache": use_cache,
    }, where="eval")
    out = Path(output) if output is not None else Path("runs/eval") / name
    cache = EvalCache(Path(cache_dir) if cache_dir else None, enabled=use_cache)
    result = run_compare(cs, tasks=tasks, reference_only=reference_only, cache=cache, echo=echo)
    return _finish(result, out, cs.show_examples, console, echo)
