"""merge → evaluate → select: build each candidate, score it with the compare machinery, keep the best.

Order of work, so that bad input costs nothing: the recipe is validated (spec.py), the output
folder checked, evaluation data loaded and checked, inputs resolved from their headers, and
every parameter resolved for every tensor — all before the first tensor is read. Candidates
are built one at a time in a staging folder beside the output and scored; their scores are
cached by what decides them (recipe, inputs' fingerprints, data, settings), so a rerun with
more candidates evaluates only the new ones. The output folder appears only at the end, whole.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from ..errors import ConfigError
from ..files import refuse_output_over_inputs
from .card import render_merge_card, write_search_report
from .registry import MERGE_METHODS
from .sources import resolve, tokenizer_files
from .spec import Candidate, MergeSpec, candidate_name
from .streaming import Plan, make_plan, merge_tensors, tensor_arguments

CACHE_VERSION = 1


@dataclass
class CandidateResult:
    name: str
    candidate: Candidate
    scores: dict[str, dict[str, float]] = field(default_factory=dict)  # task -> metric -> value
    criterion: float | None = None
    cached: bool = False
    seconds: float = 0.0  # building and scoring

    def to_json(self) -> dict:
        return {"name": self.name, "method": self.candidate.method,
                "parameters": self.candidate.model_dump(mode="json")["parameters"],
                "models": self.candidate.model_dump(mode="json")["models"], "scores": self.scores,
                "criterion": self.criterion, "cached": self.cached, "seconds": round(self.seconds, 2)}


@dataclass
class MergeResult:
    output: Path
    best: str
    candidates: list[CandidateResult]
    inputs: dict[str, dict[str, dict[str, float]]]  # input/base label -> task -> metric -> value
    tasks: list[dict]  # name, primary metric, higher_is_better
    select: str
    seconds: float
    reports: dict[str, Path] = field(default_factory=dict)


def _manifest(spec: MergeSpec, plan: Plan, candidate: Candidate) -> dict:
    """A model artifact's manifest (load_trained reads it) that also records the recipe."""
    trained = next((s.manifest for s in plan.inputs if s.manifest), None)
    if trained is not None:
        objective = {k: trained[k] for k in ("objective", "objective_config", "auto_class", "generative", "labels")}
    else:
        arch = (plan.reference.config.get("architectures") or ["ForCausalLM"])[0]
        auto, obj = next(((a, o) for suffix, a, o in (
            ("ForSequenceClassification", "AutoModelForSequenceClassification", "classification"),
            ("ForTokenClassification", "AutoModelForTokenClassification", "token_classification"),
            ("ForMaskedLM", "AutoModelForMaskedLM", "masked_lm"),
            ("ForConditionalGeneration", "AutoModelForSeq2SeqLM", "seq2seq")) if arch.endswith(suffix)),
            ("AutoModelForCausalLM", "causal_lm"))
        objective = {"objective": obj, "objective_config": {"type": obj}, "auto_class": auto,
                     "generative": obj in ("causal_lm", "seq2seq"), "labels": []}
    base = spec.base_model or plan.reference.origin
    inputs = {m.label: m.model_dump(mode="json")["parameters"] for m in spec.inputs}
    per_model = candidate.model_dump(mode="json")["models"]
    return {"method": "merge", "artifact": "model", **objective, "base_model": base, "base_gguf_file": None,
            "base_source": str(plan.reference.folder), "init_seed": 0, "method_config": {"type": "merge"},
            "merge": {"method": candidate.method, "parameters": candidate.model_dump(mode="json")["parameters"],
                      "models": [{"name": s.label, "model": s.origin,
                                  "parameters": {**inputs[s.label], **per_model.get(s.label, {})}}
                                 for s in plan.inputs],
                      "base_model": spec.base_model, "dtype": plan.out_dtype, "seed": spec.seed,
                      "tokenizer_source": plan.tokenizer.label},
            "evaluation": {}}


def build(plan: Plan | None, candidate: Candidate, spec: MergeSpec, folder: Path, echo: Callable[[str], None]
          ) -> Path:
    """The candidate as a complete model folder (weights, config, tokenizer, manifest, card); a
    `lora_combine` candidate as an adapter folder."""
    if MERGE_METHODS[candidate.method].low_rank:
        from .low_rank import build_lora

        return build_lora(spec, candidate, folder, echo)

    tmp = folder.with_name(folder.name + f".tmp{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    t0 = time.perf_counter()
    nbytes = merge_tensors(plan, candidate, spec, tmp, echo)
    config = dict(plan.reference.config)
    dtype_name = {"F32": "float32", "BF16": "bfloat16", "F16": "float16"}.get(plan.out_dtype, "float32")
    config["torch_dtype" if "torch_dtype" in config and "dtype" not in config else "dtype"] = dtype_name
    (tmp / "config.json").write_text(json.dumps(config, indent=2))
    if (plan.reference.folder / "generation_config.json").is_file():
        shutil.copy2(plan.reference.folder / "generation_config.json", tmp)
    for f in tokenizer_files(plan.tokenizer.folder):
        shutil.copy2(f, tmp)
    manifest = _manifest(spec, plan, candidate)
    (tmp / "tunesmith.json").write_text(json.dumps(manifest, indent=1))
    (tmp / "README.md").write_text(render_merge_card(manifest))
    shutil.rmtree(folder, ignore_errors=True)
    os.replace(tmp, folder)
    echo(f"{candidate_name(candidate)}: {nbytes / 2**20:.1f} MB of {plan.out_dtype} weights in "
         f"{time.perf_counter() - t0:.1f} s")
    return folder


def _signed(value: float | None, metric: str) -> float | None:
    from ..evaluation.metrics import METRICS

    if value is None:
        return None
    return value if METRICS[metric].higher_is_better else -value


def criterion(scores: dict[str, dict[str, float]], tasks: list[dict], select: str) -> float | None:
    """The number candidates are ranked by (higher is better): mean or min over the tasks' primary
    metrics, or one task's; a lower-is-better metric (perplexity) counts negated."""
    values = {t["name"]: _signed(scores.get(t["name"], {}).get(t["metric"]), t["metric"]) for t in tasks}
    if select in values:
        return values[select]
    if any(v is None for v in values.values()):
        return None
    return min(values.values()) if select == "min" else sum(values.values()) / len(values)


def _check_device(device: str) -> None:
    import torch

    try:
        kind = torch.device(device).type
    except RuntimeError as exc:
        raise ConfigError(f"device: {exc}") from None
    if kind == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"device: {device} asked for, but torch sees no CUDA GPU here")


def _rank(r: CandidateResult) -> tuple:
    return (r.criterion is None, -(r.criterion or 0.0))


def _candidate_key(spec: MergeSpec, c: Candidate, fingerprints: dict, task_keys: list) -> str:
    payload = {"v": CACHE_VERSION, "candidate": c.model_dump(mode="json", exclude={"name"}),
               "inputs": [(m.model_dump(mode="json"), fingerprints[m.label]) for m in spec.inputs],
               "base": fingerprints.get("base"), "dtype": spec.dtype, "seed": spec.seed,
               "tokenizer_source": spec.tokenizer_source, "eval_dtype": spec.eval_dtype, "tasks": task_keys}
    return hashlib.sha256(json.dumps(payload, sort_keys=True, default=str).encode()).hexdigest()


def run_merge(spec: MergeSpec, *, echo: Callable[[str], None] = print, use_cache: bool = True) -> MergeResult:
    """Build the recipe's model (or every search candidate, keeping the best) into spec.output."""
    from ..evaluation.compare import CompareResult, prepare_task, write_outputs
    from ..evaluation.metrics import METRICS

    start = time.perf_counter()
    out = Path(spec.output).expanduser().resolve()
    refuse_output_over_inputs(out, [m.model for m in spec.models]
                              + ([] if spec.base_model is None else [spec.base_model]))
    _check_device(spec.device)
    if out.exists() and not out.is_dir():
        raise ConfigError(f"output: {out} is a file, not a folder")
    if out.is_dir() and any(out.iterdir()) and not spec.overwrite:
        raise ConfigError(f"output: {out} already exists and is not empty; choose another folder or set "
                          "overwrite: true (nothing was written)")
    tasks = [prepare_task(t) for t in spec.evaluate]  # bad evaluation data fails before any merging
    task_info = [{"name": t.label, "metric": t.settings.metrics[0],
                  "higher_is_better": METRICS[t.settings.metrics[0]].higher_is_better} for t in tasks]
    candidates = spec.candidates()
    names = [candidate_name(c) for c in candidates]
    dup = sorted({n for n in names if names.count(n) > 1})
    if dup:
        raise ConfigError(f"search: candidates {dup} appear twice; give them distinct names")
    tensor_candidates = [c for c in candidates if not MERGE_METHODS[c.method].low_rank]
    if len(tensor_candidates) < len(candidates):
        from .low_rank import lora_inputs

        lora_inputs(spec)  # every input a LoRA adapter of one base, or refused now
    plan = None
    if tensor_candidates:
        inputs = [resolve(m.label, m.model, echo) for m in spec.inputs]
        base = resolve("base", spec.base_model, echo) if spec.base_model else None
        plan = make_plan(spec, inputs, base)
        for c in tensor_candidates:
            tensor_arguments(plan, c, spec)  # a parameter with no value for some tensor refuses now

    staging = out.with_name(f".{out.name}.staging")
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    try:
        results, input_scores, compare_parts = _build_and_score(
            spec, plan, candidates, names, tasks, task_info, staging, echo, use_cache)
        ranked = sorted(results, key=_rank)
        best = ranked[0]
        best_folder = staging / "candidates" / best.name
        if not (best_folder / "tunesmith.json").is_file():  # scored from the cache, or deleted after scoring
            echo(f"{best.name}: rebuilding the best candidate")
            build(plan, best.candidate, spec, best_folder, echo)
        manifest = json.loads((best_folder / "tunesmith.json").read_text())
        manifest["evaluation"] = best.scores
        (best_folder / "tunesmith.json").write_text(json.dumps(manifest, indent=1))
        (best_folder / "README.md").write_text(render_merge_card(manifest, ranked=ranked, inputs=input_scores,
                                                                 tasks=task_info))
        if out.exists():
            shutil.rmtree(out)
        os.replace(best_folder, out)
        result = MergeResult(out, best.name, ranked, input_scores, task_info,
                             spec.search.select if spec.search else "mean", 0.0)
        if tasks:
            report_dir = out / ("search" if spec.search else "evaluation")
            report_dir.mkdir()
            if spec.search and spec.search.keep and (staging / "candidates").is_dir():
                os.replace(staging / "candidates", report_dir / "candidates")
            models, per_model = compare_parts
            combined = CompareResult(models, tasks, models[0].label, results=per_model, reference_only=[])
            result.reports = {f"compare_{k}": v for k, v in write_outputs(combined, report_dir / "compare").items()}
            result.reports.update(write_search_report(result, report_dir))
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    result.seconds = time.perf_counter() - start
    echo(f"merged model: {out}" + (f" (best of {len(ranked)}: {best.name})" if len(ranked) > 1 else ""))
    return result


def _build_and_score(spec, plan, candidates, names, tasks, task_info, staging, echo, use_cache):
    from ..evaluation.cache import EvalCache, model_fingerprint, records_fingerprint
    from ..evaluation.compare import run_compare
    from ..evaluation.evaluator import EvalResult
    from ..evaluation.spec import ModelSpec, validate_spec
    from ..models import cache_dir

    results: list[CandidateResult] = []
    best: CandidateResult | None = None
    prune = not (spec.search and spec.search.keep) and len(candidates) > 1
    input_scores: dict[str, dict[str, dict[str, float]]] = {}
    models: list[ModelSpec] = []
    per_model: dict = {}
    eval_cache = EvalCache(enabled=use_cache)

    def score(specs: list[ModelSpec]):
        cs = validate_spec({"models": [m.model_dump() for m in specs], "forgetting": False,
                            "dtype": spec.eval_dtype, "cache": use_cache}, where="merge evaluate")
        return run_compare(cs, tasks=tasks, cache=eval_cache, echo=echo)

    if tasks:
        refs = [ModelSpec(name=m.label, model=m.model) for m in spec.inputs]
        if spec.base_model:
            refs.insert(0, ModelSpec(name="base", model=spec.base_model))
        compared = score(refs)
        models += refs
        per_model.update(compared.results)
        input_scores = {label: {t: r.metrics for t, r in per.items()} for label, per in compared.results.items()}
    fingerprints = {m.label: model_fingerprint(m.model) for m in spec.inputs}
    if spec.base_model:
        fingerprints["base"] = model_fingerprint(spec.base_model)
    task_keys = [(t.label, records_fingerprint(t.records), t.settings.generation_key()) for t in tasks]
    store = cache_dir() / "merge-search"
    for c, name in zip(candidates, names):
        t0 = time.perf_counter()
        r = CandidateResult(name, c)
        folder = staging / "candidates" / name
        key = _candidate_key(spec, c, fingerprints, task_keys)
        hit = store / f"{key}.json"
        if tasks and use_cache and hit.is_file():
            per_model[name] = {t: EvalResult.from_json(v, cached=True)
                               for t, v in json.loads(hit.read_text())["results"].items()}
            r.scores = {t: res.metrics for t, res in per_model[name].items()}
            r.cached = True
            echo(f"{name}: scores from the cache")
        else:
            build(plan, c, spec, folder, echo)
            if tasks:
                compared = score([ModelSpec(name=name, model=str(folder))])
                per_model[name] = compared.results[name]
                r.scores = {t: res.metrics for t, res in compared.results[name].items()}
                store.mkdir(parents=True, exist_ok=True)
                hit.write_text(json.dumps({"name": name, "results": {t: res.to_json()
                                                                      for t, res in compared.results[name].items()}}))
        models.append(ModelSpec(name=name, model=str(folder)))
        r.criterion = criterion(r.scores, task_info, spec.search.select if spec.search else "mean") if tasks else None
        r.seconds = time.perf_counter() - t0
        results.append(r)
        if best is None or _rank(r) < _rank(best):
            loser, best = best, r
        else:
            loser = r
        if prune and loser is not None:
            # Disk holds the best so far and the one being scored, never every candidate.
            shutil.rmtree(staging / "candidates" / loser.name, ignore_errors=True)
    return results, input_scores, (models, per_model)
