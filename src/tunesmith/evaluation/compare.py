"""Evaluate several models on the same tasks with the same settings, reusing cached results.

Everything that can fail on bad input (files, formats, metric names, model paths) is checked
for every model and task before the first model is loaded; a model whose every result is in
the cache is not loaded at all.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from ..config import DataConfig
from ..errors import ConfigError
from .cache import EvalCache, model_fingerprint, records_fingerprint
from .evaluator import EvalResult, check_model, check_records, evaluate_records
from .forgetting import ReferenceJob, forgetting_deltas, reference_jobs, run_job
from .loading import check_source, load_model
from .pairs import pair_settings
from .spec import CompareSpec, ModelSpec, TaskSpec


@dataclass
class PreparedTask:
    label: str
    spec: TaskSpec | None
    records: list[dict]
    source: str  # where the records came from, for the report

    @property
    def settings(self):
        return self.spec.settings


@dataclass
class CompareResult:
    models: list[ModelSpec]
    tasks: list[PreparedTask]
    baseline: str
    results: dict[str, dict[str, EvalResult]] = field(default_factory=dict)
    reference: dict[str, dict[str, float]] = field(default_factory=dict)
    forgetting: dict[str, dict[str, float]] = field(default_factory=dict)
    fingerprints: dict[str, str] = field(default_factory=dict)
    reference_only: list[str] = field(default_factory=list)
    evaluated: int = 0  # (model, task or reference set) pairs computed in this call
    cache_hits: int = 0
    seconds: float = 0.0
    output: Path | None = None

    def metric(self, model: str, task: str, name: str) -> float | None:
        r = self.results.get(model, {}).get(task)
        return None if r is None else r.metrics.get(name)

    def to_json(self) -> dict:
        return {
            "baseline": self.baseline,
            "models": [{"name": m.label, "model": m.model, "adapter": m.adapter,
                        "fingerprint": self.fingerprints.get(m.label),
                        "reference_only": m.label in self.reference_only} for m in self.models],
            "tasks": [{"name": t.label, "data": t.source, "n": len(t.records),
                       "settings": t.settings.model_dump(mode="json")} for t in self.tasks],
            "results": {m: {t: {**r.to_json(), "cached": r.cached} for t, r in per.items()}
                        for m, per in self.results.items()},
            "reference": self.reference,
            "forgetting": self.forgetting,
            "evaluated": self.evaluated,
            "cache_hits": self.cache_hits,
            "seconds": self.seconds,
        }


def prepare_task(task: TaskSpec) -> PreparedTask:
    from ..data.pipeline import load_records

    check_file(task.data, "tasks.data")
    cfg = DataConfig(train=task.data, format=task.format, columns=task.columns,
                     system_prompt=task.system_prompt, shuffle=False)
    records, _, _, _ = load_records(cfg)
    if task.max_samples:
        records = records[: task.max_samples]
    task = task.model_copy(update={"settings": pair_settings(task.settings, records)})
    check_records(records, task.settings, f"{task.data}")
    return PreparedTask(task.label, task, records, task.data)


def check_file(path: str, key: str) -> None:
    from ..errors import ConfigError

    p = Path(path).expanduser()
    looks_local = path.startswith(("/", ".", "~")) or p.suffix in (".json", ".jsonl", ".csv", ".parquet", ".txt")
    if looks_local and not p.exists():
        raise ConfigError(f"{key}: data file not found: {path}")


def run_compare(
    spec: CompareSpec,
    *,
    tasks: list[PreparedTask] | None = None,
    reference_only: list[str] | None = None,
    cache: EvalCache | None = None,
    echo: Callable[[str], None] = print,
) -> CompareResult:
    """Every model on every task (and reference set); deltas against the baseline model.

    `tasks` overrides `spec.tasks` with records already loaded (a run's validation split);
    models named in `reference_only` are measured on the reference sets only.
    """
    start = time.perf_counter()
    reference_only = list(reference_only or [])
    prepared = tasks if tasks is not None else [prepare_task(t) for t in spec.tasks]
    if not prepared and not (spec.forgetting and spec.reference):
        raise ConfigError("nothing to evaluate: give tasks (data), or reference sets with forgetting on")
    jobs: list[ReferenceJob] = (
        reference_jobs(spec.reference, batch_size=spec.reference_batch_size, max_length=spec.reference_max_length)
        if spec.forgetting else [])
    for m in spec.models:
        check_source(m.model, m.adapter)
    cache = cache or EvalCache(enabled=spec.cache)
    result = CompareResult(list(spec.models), prepared, spec.baseline_label, reference_only=reference_only)

    data_fps = {t.label: records_fingerprint(t.records) for t in prepared}
    job_fps = {j.name: records_fingerprint(j.records) for j in jobs}
    for m in spec.models:
        label = m.label
        fp = model_fingerprint(m.model, m.adapter, m.task, spec.dtype)
        result.fingerprints[label] = fp
        todo: list[tuple[str, object, str]] = []  # (kind, task or job, cache key)
        per_task: dict[str, EvalResult] = {}
        ref: dict[str, float] = {}
        for t in ([] if label in reference_only else prepared):
            key = cache.key(fp, data_fps[t.label], t.settings.generation_key())
            hit = cache.get(key)
            if hit is not None:
                per_task[t.label] = EvalResult.from_json(hit, cached=True)
                result.cache_hits += 1
            else:
                todo.append(("task", t, key))
        for j in jobs:
            key = cache.key(fp, job_fps[j.name], j.key_settings())
            hit = cache.get(key)
            if hit is not None:
                ref.update(hit["metrics"])
                result.cache_hits += 1
            else:
                todo.append(("ref", j, key))
        if todo:
            echo(f"{label}: loading {m.model}" + (f" + adapter {m.adapter}" if m.adapter else ""))
            loaded = load_model(m.model, m.adapter, spec.dtype, m.task)
            for kind, item, key in todo:
                t0 = time.perf_counter()
                if kind == "task":
                    check_model(loaded.model, item.settings)
                    echo(f"{label}: {item.label} ({len(item.records)} examples, "
                         f"{', '.join(item.settings.metrics)})")
                    r = evaluate_records(loaded.model, loaded.tokenizer, item.records, item.settings,
                                         where=item.source)
                    cache.put(key, r.to_json())
                    per_task[item.label] = r
                else:
                    echo(f"{label}: reference set '{item.name}'")
                    scores = run_job(loaded.model, loaded.tokenizer, item)
                    cache.put(key, {"metrics": scores, "seconds": time.perf_counter() - t0})
                    ref.update(scores)
                result.evaluated += 1
            del loaded  # free this model's memory before the next one loads
        else:
            echo(f"{label}: all results from the cache")
        result.results[label] = {t.label: per_task[t.label] for t in prepared if t.label in per_task}
        if ref:
            result.reference[label] = ref
    base_ref = result.reference.get(result.baseline, {})
    for label, ref in result.reference.items():
        if label != result.baseline and base_ref:
            result.forgetting[label] = forgetting_deltas(base_ref, ref)
    result.seconds = time.perf_counter() - start
    return result


def write_outputs(result: CompareResult, output: Path, *, show_examples: int = 10) -> dict[str, Path]:
    from .report import render_html, render_markdown

    output.mkdir(parents=True, exist_ok=True)
    result.output = output
    paths = {"results": output / "results.json", "markdown": output / "report.md", "html": output / "report.html"}
    paths["results"].write_text(json.dumps(result.to_json(), indent=1, ensure_ascii=False))
    paths["markdown"].write_text(render_markdown(result, show_examples=show_examples))
    paths["html"].write_text(render_html(result, show_examples=show_examples))
    return paths
