"""Catastrophic forgetting: reference sets measured before and after tuning.

A reference set is what the model knew before tuning: general text (scored by perplexity)
or a general task (scored by its metrics). The shipped default is a few thousand tokens of
plain general-knowledge English written for tunesmith (resources/reference/general.txt), so
forgetting is measured with no configuration at all.
"""

from __future__ import annotations

from dataclasses import dataclass
from importlib import resources
from pathlib import Path

from ..config import DataConfig, ReferenceSet
from ..data.templates import ensure_chat_template
from ..errors import ConfigError, DataError
from .evaluator import check_model, check_records, evaluate_records, loss_rows, sequence_nll
from .generate import is_encoder_decoder
from .metrics import check_metrics
from .spec import EvalSettings

DEFAULT_TEXT = "general.txt"
DEFAULT_TASK = "general_qa.jsonl"


def resource_path(name: str) -> Path:
    return Path(str(resources.files("tunesmith") / "resources" / "reference" / name))


def reference_file(rs: ReferenceSet) -> Path:
    if rs.path == "default":
        return resource_path(DEFAULT_TEXT if rs.kind == "perplexity" else DEFAULT_TASK)
    return Path(rs.path).expanduser()


def reference_name(rs: ReferenceSet) -> str:
    if rs.name:
        return rs.name
    if rs.path == "default":
        return "default" if rs.kind == "perplexity" else "default_qa"
    return Path(rs.path).stem


@dataclass
class ReferenceJob:
    """One reference set, loaded and ready to score (what the cache keys on)."""

    name: str
    kind: str
    records: list[dict]
    settings: EvalSettings
    max_samples: int | None

    def key_settings(self) -> dict:
        return {"reference": self.kind, "max_samples": self.max_samples, **self.settings.generation_key()}


def load_reference_records(rs: ReferenceSet) -> list[dict]:
    path = reference_file(rs)
    if not path.is_file():
        raise ConfigError(f"eval.reference: reference file not found: {path}")
    if path.suffix in (".txt", ".md"):
        if rs.kind == "task":
            raise ConfigError(f"eval.reference: {path} is plain text; kind 'task' needs prompt/answer rows")
        text = path.read_text(encoding="utf-8")
        if not text.strip():
            raise DataError(f"eval.reference: {path} is empty")
        return [{"text": text}]
    from ..data.pipeline import load_records

    records, _, _, _ = load_records(DataConfig(train=str(path)))
    return records


def reference_jobs(sets: list[ReferenceSet], *, batch_size: int = 8, max_length: int = 512) -> list[ReferenceJob]:
    """Load and check every set: a missing file or bad metric fails before any model work."""
    jobs, seen = [], set()
    for rs in sets:
        name = reference_name(rs)
        if name in seen:
            raise ConfigError(f"eval.reference: two sets are named '{name}'; give each a distinct 'name'")
        seen.add(name)
        records = load_reference_records(rs)
        if rs.kind == "perplexity":
            settings = EvalSettings(metrics=["perplexity"], batch_size=batch_size, max_length=max_length)
        else:
            metrics = check_metrics(rs.metrics)
            settings = EvalSettings(metrics=metrics, batch_size=batch_size, max_length=max_length,
                                    max_new_tokens=32)
            if rs.max_samples:
                records = records[: rs.max_samples]
            check_records(records, settings, f"reference set '{name}'")
        jobs.append(ReferenceJob(name, rs.kind, records, settings, rs.max_samples))
    return jobs


def run_job(model, tokenizer, job: ReferenceJob) -> dict[str, float]:
    """Scores of one job as flat `ref/<name>/<metric>` keys."""
    if job.kind == "task":
        result = evaluate_records(model, tokenizer, job.records, job.settings, where=f"reference set '{job.name}'")
        return {f"ref/{job.name}/{k}": v for k, v in result.metrics.items()
                if k in job.settings.metrics}
    import math

    if is_encoder_decoder(model):
        raise ConfigError(f"reference set '{job.name}': text perplexity needs a decoder-only (causal) LM")
    was_training = model.training
    model.eval()
    try:
        ensure_chat_template(tokenizer)  # chat records render through it, as perplexity() does
        rows = loss_rows(tokenizer, job.records, job.settings.max_length)
        if job.max_samples:
            rows = rows[: job.max_samples]  # windows, in order: the same text prefix every time
        total, count = sequence_nll(model, rows, tokenizer.pad_token_id, job.settings.batch_size)
    finally:
        model.train(was_training)
    if count == 0:
        raise DataError(f"reference set '{job.name}': no tokens to score")
    return {f"ref/{job.name}/perplexity": math.exp(min(total / count, 100.0))}


def measure_reference(model, tokenizer, sets: list[ReferenceSet], *, batch_size: int = 8,
                      max_length: int = 512) -> dict[str, float]:
    """Every reference set on `model` (plain or peft-wrapped), as `ref/<name>/<metric>` keys.

    Perplexity is the token-weighted mean NLL over the text cut into consecutive windows of
    max_length tokens, exponentiated; deterministic (no sampling, no dropout). The model's
    train/eval mode is restored.
    """
    jobs = reference_jobs(sets, batch_size=batch_size, max_length=max_length)
    if any(j.kind == "task" for j in jobs):
        check_model(model, EvalSettings(metrics=["exact_match"]))
    out: dict[str, float] = {}
    for job in jobs:
        out.update(run_job(model, tokenizer, job))
    return out


def forgetting_deltas(before: dict, after: dict) -> dict[str, float]:
    """`forgetting/<name>/<metric>_delta` (after - before) and `..._change_pct` per shared key.

    For perplexity a positive delta means the model forgot; for task metrics (exact match...)
    a negative one does.
    """
    out: dict[str, float] = {}
    for key, old in before.items():
        if not key.startswith("ref/") or key not in after:
            continue
        new = after[key]
        if not isinstance(old, (int, float)) or not isinstance(new, (int, float)):
            continue
        stem = "forgetting/" + key[len("ref/"):]
        out[f"{stem}_delta"] = float(new - old)
        if old:
            out[f"{stem}_change_pct"] = float(100.0 * (new - old) / abs(old))
    return out
