"""`tunesmith sweep SWEEP.yaml`: hyperparameter search over any config key, through Optuna.

Every trial is a normal run (its own run folder, metrics.jsonl, model) of the base config with the
trial's values set by dotted key. Trials report each evaluation to Optuna while they train, so a
pruner (median or Hyperband) can stop a poor one early. The study lives in SQLite in the sweep's
folder: a sweep that is killed resumes when the same command runs again, the trial that was
running re-queued with the same values. After every trial the report (report.md, report.html)
and the best config (best.yaml) are rewritten.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from .config import apply_overrides, dump_config, load_config, read_yaml_mapping, resolve_against
from .errors import ConfigError, TrainingError

STUDY_DB = "study.db"
_EXTRA = "pip install 'tunesmith[sweep]'"


class Range(BaseModel):
    """A numeric range: integers when low and high are written as integers (`{low: 4, high: 32}`) or type
    says int, else floats (`{low: 0.0, high: 0.3}`)."""

    model_config = ConfigDict(extra="forbid")
    low: int | float
    high: int | float
    log: bool = False
    step: int | float | None = Field(None, gt=0)
    type: Literal["float", "int"] | None = None

    @model_validator(mode="after")
    def _order(self) -> "Range":
        if self.high <= self.low:
            raise ValueError(f"high ({self.high}) must be above low ({self.low})")
        if self.log and self.low <= 0:
            raise ValueError("log: true needs low > 0")
        if self.log and self.step is not None:
            raise ValueError("log and step do not go together (Optuna samples a log range continuously)")
        return self

    @property
    def is_int(self) -> bool:
        return self.type == "int" or (self.type is None and all(isinstance(v, int) for v in (self.low, self.high))
                                      and isinstance(self.step or 1, int))


class SweepConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")
    base: str = Field(description="The run config every trial starts from (path relative to the sweep file).")
    set: list[str] = Field(default_factory=list, description="Overrides for every trial: section.key=value.")
    space: dict[str, Range | list[Any]] = Field(min_length=1, description="Dotted config key -> a range or a list.")
    metric: str | None = Field(None, description="What to optimise (default: the base config's eval.metric).")
    direction: Literal["maximize", "minimize"] | None = None  # default: from eval.greater_is_better
    trials: int | None = Field(None, gt=0, description="Trials to finish (default: 10; grid: the grid's size).")
    sampler: Literal["tpe", "random", "grid"] = "tpe"
    seed: int = 0
    pruner: Literal["median", "hyperband", "none"] = "median"
    startup_trials: int = Field(3, ge=0, description="Trials finished before the pruner (and TPE) start deciding.")
    name: str | None = None  # default: the sweep file's name
    output: str = "runs/sweeps/{name}"

    @model_validator(mode="after")
    def _grid(self) -> "SweepConfig":
        if self.sampler == "grid":
            ranges = [k for k, v in self.space.items() if isinstance(v, Range) and v.step is None]
            if ranges:
                raise ValueError(f"sampler grid needs a list or a range with step for every key; {', '.join(ranges)} "
                                 "is a continuous range")
        for key, choices in self.space.items():
            if isinstance(choices, list) and not choices:
                raise ValueError(f"space.{key}: an empty list")
        return self


@dataclass
class SweepResult:
    folder: Path
    best_params: dict[str, Any] | None
    best_value: float | None
    best_run: str | None
    trials: list[dict] = field(default_factory=list)  # number, state, params, value, run folder


class _Pruned(Exception):
    def __init__(self, step: int):
        super().__init__(f"pruned at step {step}")
        self.step = step


def load_sweep(path: str | Path) -> tuple[SweepConfig, Path]:
    """The sweep config, validated, and its folder (relative paths resolve against it)."""
    path = Path(path)
    data = read_yaml_mapping(path, "sweep file", "a mapping (base, space, metric, ...)")
    try:
        sweep = SweepConfig.model_validate(data)
    except ValidationError as exc:
        lines = [("{}: ".format(".".join(str(p) for p in e["loc"])) if e["loc"] else "")
                 + str(e["msg"]).removeprefix("Value error, ") for e in exc.errors()]
        raise ConfigError(f"{path}: invalid sweep:\n  " + "\n  ".join(lines)) from None
    sweep.name = sweep.name or path.stem
    return sweep, path.parent


def _values(spec: Range | list) -> list[Any]:
    """Values that stand for a key's whole range when checking the base config accepts them (and a grid's points)."""
    if isinstance(spec, list):
        return spec
    if spec.step is None:
        return [int(spec.low), int(spec.high)] if spec.is_int else [spec.low, spec.high]
    n = int(math.floor((spec.high - spec.low) / spec.step + 1e-9)) + 1
    points = [spec.low + i * spec.step for i in range(n)]
    return [int(p) for p in points] if spec.is_int else [round(p, 12) for p in points]


def _override(key: str, value: Any) -> str:
    return f"{key}={json.dumps(value) if not isinstance(value, str) else value}"


def prepare(sweep: SweepConfig, folder: Path) -> tuple[dict, str, str]:
    """The base config as data, the metric and its direction; every value of the space is validated
    against the base config now, before any trial trains."""
    base_path = Path(resolve_against(sweep.base, folder))
    if not base_path.is_file():
        raise ConfigError(f"sweep base config not found: {base_path}")
    cfg = load_config(base_path, sweep.set)  # resolves the base's relative paths against its own folder
    for key, spec in sweep.space.items():
        for value in _values(spec):
            try:
                load_config(cfg.plain(), [_override(key, value)])
            except ConfigError as exc:
                raise ConfigError(f"space.{key} = {value!r} is not a valid run setting: {exc}") from None
    metric = sweep.metric or cfg.eval.metric
    if sweep.direction is not None:
        direction = sweep.direction
    elif metric == cfg.eval.metric:
        direction = "maximize" if cfg.eval.greater_is_better else "minimize"
    else:
        direction = "minimize" if ("loss" in metric or "perplexity" in metric) else "maximize"
    if not cfg.has_validation:
        raise ConfigError(f"{sweep.base}: a sweep scores trials on validation data; the base config has none "
                          "(data.split.validation_ratio or data.split.validation_file)")
    if not cfg.eval.at_end:
        raise ConfigError(f"{sweep.base}: eval.at_end is false, so a trial would end without its {metric}")
    if sweep.pruner != "none" and not cfg.eval.every:
        raise ConfigError(f"pruner {sweep.pruner} stops trials on their evaluations during training; the base "
                          "config has no eval.every (set it, or pruner: none)")
    return cfg.plain(), metric, direction


def _optuna():
    try:
        import optuna
    except ImportError:
        raise ConfigError(f"tunesmith sweep needs Optuna, which is not installed: {_EXTRA}") from None
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    return optuna


def _sampler(optuna, sweep: SweepConfig, seed: int):
    if sweep.sampler == "grid":
        return optuna.samplers.GridSampler({k: _values(v) for k, v in sweep.space.items()}, seed=seed)
    if sweep.sampler == "random":
        return optuna.samplers.RandomSampler(seed=seed)
    return optuna.samplers.TPESampler(seed=seed, n_startup_trials=max(sweep.startup_trials, 1))


def _pruner(optuna, sweep: SweepConfig):
    if sweep.pruner == "median":
        return optuna.pruners.MedianPruner(n_startup_trials=sweep.startup_trials, n_warmup_steps=0,
                                           n_min_trials=1)
    if sweep.pruner == "hyperband":
        return optuna.pruners.HyperbandPruner(min_resource=1, reduction_factor=3)
    return optuna.pruners.NopPruner()


def _suggest(trial, key: str, spec: Range | list) -> Any:
    if isinstance(spec, list):
        return trial.suggest_categorical(key, spec)
    if spec.is_int:
        return trial.suggest_int(key, int(spec.low), int(spec.high), step=int(spec.step or 1), log=spec.log)
    return trial.suggest_float(key, spec.low, spec.high, step=spec.step, log=spec.log)


def sweep(path: str | Path, *, trials: int | None = None, echo: Callable[[str], None] = print) -> SweepResult:
    """Run (or resume) the sweep a SWEEP.yaml describes; returns the best trial and every trial's outcome."""
    spec, folder = load_sweep(path)
    base, metric, direction = prepare(spec, folder)
    optuna = _optuna()
    out = Path(spec.output.format(name=spec.name))
    out.mkdir(parents=True, exist_ok=True)
    storage = f"sqlite:///{(out / STUDY_DB).resolve()}"
    # A resumed sweep seeds its sampler past the trials already drawn: with the file's seed alone it
    # would draw the first process's values again.
    study = optuna.create_study(study_name=spec.name, storage=storage, direction=direction,
                                pruner=_pruner(optuna, spec), load_if_exists=True)
    study.sampler = _sampler(optuna, spec, spec.seed + len(study.get_trials(deepcopy=False)))
    _check_same_sweep(study, spec, metric, direction)
    _requeue_interrupted(study, spec.sampler == "grid", echo)
    budget = trials or spec.trials or (math.prod(len(_values(v)) for v in spec.space.values())
                                       if spec.sampler == "grid" else 10)
    done = _finished(study)
    echo(f"sweep {spec.name}: {metric} ({direction}), {spec.sampler} sampler, {spec.pruner} pruner; "
         f"{done} of {budget} trials done; study {out / STUDY_DB}")

    def objective(trial) -> float:
        from . import api
        from .engine.loop import Interrupted

        params = {k: _suggest(trial, k, v) for k, v in spec.space.items()}
        run_dir = out / f"trial-{trial.number:03d}"
        trial.set_user_attr("run_dir", str(run_dir))
        cfg = apply_overrides(json.loads(json.dumps(base)), [*spec.set, *(_override(k, v) for k, v in params.items())])
        cfg["eval"] = {**cfg.get("eval", {}), "metric": metric, "greater_is_better": direction == "maximize"}
        cfg["output"] = {**cfg.get("output", {}), "dir": str(run_dir), "overwrite": True}
        echo(f"trial {trial.number}: " + ", ".join(f"{k}={_fmt(v)}" for k, v in params.items()))

        def report(step: int, metrics: dict) -> None:
            trial.report(float(metrics[metric]), step)
            if trial.should_prune():
                raise _Pruned(step)

        started = time.perf_counter()
        try:
            result = api.train(cfg, echo=lambda m: echo(f"  [{trial.number}] {m}"), on_eval=report)
        except _Pruned as exc:
            trial.set_user_attr("steps", exc.step)
            echo(f"trial {trial.number}: pruned at step {exc.step}")
            raise optuna.TrialPruned(str(exc)) from None
        except TrainingError as exc:  # a diverging learning rate is a result of the search, not its end
            trial.set_user_attr("error", str(exc))
            echo(f"trial {trial.number}: failed: {exc}")
            raise
        except Interrupted:  # not caught by optimize: the sweep stops here
            trial.set_user_attr("interrupted", True)  # run again first when the sweep resumes
            raise
        finally:
            trial.set_user_attr("seconds", round(time.perf_counter() - started, 1))
        trial.set_user_attr("steps", result.steps)
        value = result.metrics.get(metric)
        if value is None or not math.isfinite(value):
            raise TrainingError(f"trial {trial.number} ended without a finite {metric} "
                                f"(its metrics: {', '.join(sorted(result.metrics))})")
        echo(f"trial {trial.number}: {metric} {value:.4f}")
        return float(value)

    if done < budget:
        study.optimize(objective, n_trials=budget - done, catch=(TrainingError,), gc_after_trial=True,
                       callbacks=[lambda st, _t: write_reports(st, spec, base, metric, out)])
    result = write_reports(study, spec, base, metric, out)
    if result.best_params is not None:
        echo(f"best: trial {result.best_run} {metric} {result.best_value:.4f} with "
             + ", ".join(f"{k}={v}" for k, v in result.best_params.items()))
    echo(f"report: {out / 'report.md'}, {out / 'report.html'}; best config: {out / 'best.yaml'}")
    return result


def _requeue_interrupted(study, grid: bool, echo: Callable[[str], None]) -> None:
    """A trial the sweep was killed in (still RUNNING) or Ctrl-C'd out of fails, and its values run again
    first (a grid sampler revisits a failed point by itself: queueing it too would run it twice)."""
    from optuna.trial import TrialState

    trials = study.get_trials(deepcopy=False)
    retried = {t.user_attrs.get("retry_of") for t in trials}
    for t in trials:
        killed = t.state == TrialState.RUNNING
        if (killed or (t.state == TrialState.FAIL and t.user_attrs.get("interrupted"))) and t.number not in retried:
            if killed:
                import optuna

                optuna.trial.Trial(study, t._trial_id).set_user_attr("interrupted", True)
                study.tell(t.number, state=TrialState.FAIL)
            if grid:
                echo(f"trial {t.number} was interrupted: the grid runs its point again")
                continue
            study.enqueue_trial(t.params, user_attrs={"retry_of": t.number})
            echo(f"trial {t.number} was interrupted: queued again with the same values")


def _finished(study) -> int:
    """Trials that count against the budget: finished ones, less those interrupted (which run again)."""
    from optuna.trial import TrialState

    return sum(t.state in (TrialState.COMPLETE, TrialState.PRUNED, TrialState.FAIL) and not t.user_attrs.get("interrupted")
               for t in study.get_trials(deepcopy=False))


def _check_same_sweep(study, spec: SweepConfig, metric: str, direction: str) -> None:
    """A resumed study must be the same search: a changed space, metric or direction would mix incomparable trials."""
    signature = {"space": {k: (v if isinstance(v, list) else v.model_dump()) for k, v in spec.space.items()},
                 "metric": metric, "direction": direction, "base": spec.base, "set": spec.set}
    saved = study.user_attrs.get("sweep")
    if saved is None:
        study.set_user_attr("sweep", signature)
    elif saved != json.loads(json.dumps(signature)):
        changed = sorted(k for k in signature if json.loads(json.dumps(signature[k])) != saved.get(k))
        raise ConfigError(f"the study in this sweep's folder was run with a different {', '.join(changed)}; "
                          "give the sweep another name (or output folder) to start a new study")


def write_reports(study, spec: SweepConfig, base: dict, metric: str, out: Path) -> SweepResult:
    """report.md, report.html and best.yaml from the study as it stands."""
    from optuna.trial import TrialState

    from .files import write_text_atomic

    trials = study.get_trials(deepcopy=False)
    rows = [{"number": t.number, "state": t.state.name.lower(), "params": t.params, "value": t.value,
             "last_reported": (t.intermediate_values[max(t.intermediate_values)] if t.intermediate_values else None),
             "steps": t.user_attrs.get("steps"), "seconds": t.user_attrs.get("seconds"),
             "run_dir": t.user_attrs.get("run_dir"), "error": t.user_attrs.get("error"),
             "interrupted": bool(t.user_attrs.get("interrupted"))} for t in trials]
    complete = [t for t in trials if t.state == TrialState.COMPLETE]
    best = study.best_trial if complete else None
    importances = _importances(study) if len(complete) >= 2 else {}
    keys = list(spec.space)
    lines = [f"# Sweep {spec.name}", "",
             f"{metric}, {study.direction.name.lower()}; {spec.sampler} sampler, {spec.pruner} pruner; base "
             f"`{spec.base}`" + (f" with {', '.join(spec.set)}" if spec.set else "") + ".", "",
             "| trial | state | " + " | ".join(keys) + f" | {metric} | steps | seconds |",
             "|---|---|" + "---|" * len(keys) + "---|---|---|"]
    for r in rows:
        shown = r["value"] if r["value"] is not None else r["last_reported"]
        value = "" if shown is None else f"{shown:.4f}" + {"pruned": " (at pruning)", "fail": " (last evaluation)"}.get(
            r["state"], "")
        if r["interrupted"]:
            value = "interrupted" + (f" after {value}" if value else "")
        lines.append(f"| {r['number']} | {r['state']} | " + " | ".join(_fmt(r["params"].get(k)) for k in keys)
                     + f" | {value} | {r['steps'] or ''} | {r['seconds'] or ''} |")
    if best is not None:
        lines += ["", f"Best: trial {best.number}, {metric} {best.value:.4f}: "
                  + ", ".join(f"`{k}={_fmt(v)}`" for k, v in best.params.items())
                  + f"; run folder `{best.user_attrs.get('run_dir')}`; config `best.yaml`."]
    if importances:
        lines += ["", "Parameter importances (Optuna, fANOVA): "
                  + ", ".join(f"{k} {v:.2f}" for k, v in importances.items()) + "."]
    failed = [r for r in rows if r["state"] == "fail" and r["error"]]
    if failed:
        lines += ["", "Failed trials:"] + [f"- trial {r['number']}: {r['error']}" for r in failed]
    write_text_atomic(out / "report.md", "\n".join(lines) + "\n")
    write_text_atomic(out / "report.html", _html(study, spec, metric, "\n".join(lines), importances))
    if best is not None:
        cfg = load_config(base, [*spec.set, *(_override(k, v) for k, v in best.params.items())])
        header = f"# Best of sweep {spec.name}: trial {best.number}, {metric} {best.value:.6g}\n"
        write_text_atomic(out / "best.yaml", header + dump_config(cfg))
    return SweepResult(out, best.params if best else None, best.value if best else None,
                       str(best.number) if best else None, rows)


def _fmt(v: Any) -> str:
    return f"{v:.4g}" if isinstance(v, float) else ("" if v is None else str(v))


def _importances(study) -> dict[str, float]:
    import optuna

    try:
        return optuna.importance.get_param_importances(study)
    except (ValueError, RuntimeError):  # e.g. every trial had the same values
        return {}


def _html(study, spec: SweepConfig, metric: str, markdown: str, importances: dict) -> str:
    """The report as one HTML file: the table, and Plotly's optimisation history and importances when
    plotly is installed (its script embedded, so the file opens offline)."""
    import html

    parts = [f"<h1>Sweep {html.escape(spec.name)}</h1>", f"<pre>{html.escape(markdown)}</pre>"]
    try:
        from optuna.visualization import plot_optimization_history, plot_param_importances

        figures = [plot_optimization_history(study, target_name=metric)]
        if importances:
            figures.append(plot_param_importances(study))
        parts += [f.to_html(full_html=False, include_plotlyjs=(i == 0)) for i, f in enumerate(figures)]
    except ImportError:
        parts.append("<p>(install plotly for the optimisation-history and importance charts)</p>")
    except ValueError:  # no finished trial to draw yet
        pass
    return "<!doctype html><html><head><meta charset='utf-8'><title>tunesmith sweep</title></head><body>" \
        + "\n".join(parts) + "</body></html>\n"
