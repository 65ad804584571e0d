"""From config to training rows: read → detect → normalize → split → encode → pack."""

from __future__ import annotations

import random
from typing import TYPE_CHECKING
from dataclasses import dataclass, field

from ..config import DataConfig
from ..errors import DataError
from .formats import detect_format, normalize_rows
from .packing import pack, unpacked_rows
from .sources import Row, columns_of, read_rows
from .templates import ensure_chat_template

if TYPE_CHECKING:
    from ..objective_config import ObjectiveSection
    from ..objectives.base import Objective, TaskInfo


@dataclass
class DataStats:
    format: str = ""
    rows_read: int = 0
    rows_skipped: int = 0
    train_examples: int = 0
    val_examples: int = 0
    truncated: int = 0
    dropped: int = 0
    train_rows: int = 0
    unlabeled_examples: int = 0  # of train_examples: the objective's own additions (objective.unlabeled)
    train_loss_tokens: int = 0
    used_fallback_template: bool = False


@dataclass
class DataBundle:
    train: list[dict]
    val: list[dict]
    stats: DataStats = field(default_factory=DataStats)
    val_records: list[dict] = field(default_factory=list)
    task: "TaskInfo | None" = None


def load_records(cfg: DataConfig, sources: str | list[str] | None = None,
                 prefer: tuple[str, ...] = ()) -> tuple[list[dict], str, int, int]:
    """Read and normalize every source: (records, format, rows read, rows skipped)."""
    sources = sources if sources is not None else cfg.train
    sources = [sources] if isinstance(sources, str) else list(sources)
    rows: list[Row] = []
    skipped = 0
    for src in sources:
        got, bad = read_rows(src, hub_split=cfg.hub_split, hub_config=cfg.hub_config,
                             skip_invalid=cfg.skip_invalid, column_names=cfg.column_names)
        rows += got
        skipped += bad
    if not rows:
        unreadable = f" ({skipped} unreadable rows skipped)" if skipped else ""
        raise DataError(f"no rows found in {', '.join(sources)}{unreadable}")
    fmt = cfg.format
    if fmt == "auto":
        fmt = detect_format(columns_of(rows), cfg.columns, prefer)
    records, bad = normalize_rows(rows, fmt, cfg.columns, skip_invalid=cfg.skip_invalid)
    skipped += bad
    add_system_prompt(records, cfg.system_prompt)
    if not records:
        raise DataError(f"no usable rows left in {', '.join(sources)} after skipping {skipped} invalid rows")
    return records, fmt, len(rows), skipped


def add_system_prompt(records: list[dict], prompt: str | None) -> None:
    """data.system_prompt as the first turn of every conversation (and of preference and prompt-only
    records' prompt turns) that has no system turn of its own."""
    if not prompt:
        return
    for r in records:
        turns = r.get("messages") if "messages" in r else r.get("prompt")
        if isinstance(turns, list) and turns and turns[0]["role"] != "system":
            turns.insert(0, {"role": "system", "content": prompt})


def split_records(records: list[dict], cfg: DataConfig, seed: int,
                  stats: DataStats | None = None) -> tuple[list[dict], list[dict]]:
    """(train, validation): the validation file's records, or a seeded share of `records`; rows the
    validation file skips (skip_invalid) count in `stats`."""
    records = list(records)
    if cfg.shuffle:
        random.Random(seed).shuffle(records)
    if cfg.max_samples:
        records = records[: cfg.max_samples]
    if cfg.split.validation_file:
        val, _, _, skipped = load_records(cfg, cfg.split.validation_file)
        if stats is not None:
            stats.rows_skipped += skipped
        return records, val
    n_val = int(round(len(records) * cfg.split.validation_ratio))
    if cfg.split.validation_ratio > 0 and n_val == 0:
        n_val = 1
    if n_val >= len(records):
        raise DataError(
            f"data.split.validation_ratio={cfg.split.validation_ratio} leaves no training rows "
            f"out of {len(records)}"
        )
    return records[n_val:], records[:n_val]


def encode_all(records: list[dict], tokenizer, cfg: DataConfig, stats: DataStats, objective: "Objective",
               task: "TaskInfo") -> list[dict]:
    out = []
    for rec in records:
        row, truncated = objective.encode(tokenizer, rec, cfg, task)
        if row is None:
            stats.dropped += 1
            continue
        stats.truncated += truncated
        out.append(row)
    return out


def _check_validation_labels(train_recs: list[dict], val_recs: list[dict], task) -> None:
    """Name every validation label the model cannot predict, with counts, before anything is tokenized."""
    from collections import Counter

    if not task.labels or not val_recs or not all(isinstance(r.get("label"), (str, int)) for r in val_recs):
        return
    unseen = Counter(str(r["label"]) for r in val_recs if str(r["label"]) not in task.labels)
    if unseen:
        seen = Counter(str(r["label"]) for r in train_recs if "label" in r)
        raise DataError("validation labels the training data never has: "
                        + ", ".join(f"'{k}' ({v} row{'s' if v > 1 else ''})" for k, v in unseen.most_common())
                        + "; training labels: " + ", ".join(f"'{k}' ({v})" for k, v in seen.most_common())
                        + ". Add examples of them to the training data, or drop them from validation")


def check_format(fmt: str, objective: "Objective", sources) -> None:
    """Refuse data the objective cannot learn from, before anything is tokenized."""
    if objective.formats and fmt not in objective.formats:
        from .formats import FORMATS

        wanted = "; ".join(f"{n} (columns {', '.join(FORMATS[n].required)})" if n in FORMATS else n
                           for n in objective.formats)
        raise DataError(
            f"objective '{objective.name}' needs data in one of the formats {wanted}; "
            f"{sources} reads as '{fmt}'. Set data.format, or map columns with data.columns."
        )


def build_data(cfg: DataConfig, tokenizer, *, seed: int, packing: bool, objective: "Objective | None" = None,
               objective_cfg: "ObjectiveSection | None" = None) -> DataBundle:
    from ..objectives import OBJECTIVES

    objective = objective or OBJECTIVES["sft"]()
    objective_cfg = objective_cfg or objective.cfg
    if cfg.store == "arrow":
        from .store import build_store

        return build_store(cfg, tokenizer, seed=seed, packing=packing, objective=objective)
    stats = DataStats()
    records, stats.format, stats.rows_read, stats.rows_skipped = load_records(cfg, prefer=objective.formats)
    check_format(stats.format, objective, cfg.train)
    stats.used_fallback_template = ensure_chat_template(tokenizer)
    # A validation file reads in the training data's format, however that was found.
    train_recs, val_recs = split_records(records, cfg.model_copy(update={"format": stats.format}), seed, stats)
    # Labels come from the training split only: a label seen only in validation is a data error.
    task = objective.prepare(train_recs, objective_cfg)
    _check_validation_labels(train_recs, val_recs, task)
    train = encode_all(train_recs, tokenizer, cfg, stats, objective, task)
    val = encode_all(val_recs, tokenizer, cfg, stats, objective, task)
    unlabeled = encode_all(objective.unlabeled_records(cfg), tokenizer, cfg, stats, objective, task)
    stats.unlabeled_examples = len(unlabeled)
    train += unlabeled
    if not train:
        raise DataError(
            f"no training examples left: {stats.dropped} dropped (too long for data.max_length="
            f"{cfg.max_length} with truncation '{cfg.truncation}', or no tokens to learn from)"
        )
    stats.train_examples, stats.val_examples = len(train), len(val)
    stats.train_loss_tokens = sum(sum(1 for x in r.get("labels", []) if x != -100) if isinstance(r.get("labels"), list)
                                  else 1 for r in train)
    train_rows = pack(train, cfg.max_length) if packing else unpacked_rows(train)
    val_rows = pack(val, cfg.max_length) if packing else unpacked_rows(val)
    stats.train_rows = len(train_rows)
    return DataBundle(train_rows, val_rows, stats, val_records=val_recs, task=task)
