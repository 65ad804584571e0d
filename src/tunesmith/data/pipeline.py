"""From config to training rows: read → detect → normalize → split → encode → pack."""

from __future__ import annotations

import random
from dataclasses import dataclass, field

from ..config import DataConfig
from ..errors import DataError
from .formats import detect_format, normalize_rows
from .packing import pack, unpacked_rows
from .sources import Row, columns_of, read_rows
from .templates import Encoded, encode_record, ensure_chat_template, truncate


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
    train_loss_tokens: int = 0
    used_fallback_template: bool = False


@dataclass
class DataBundle:
    train: list[dict]
    val: list[dict]
    stats: DataStats = field(default_factory=DataStats)
    val_records: list[dict] = field(default_factory=list)


def load_records(cfg: DataConfig, sources: str | list[str] | None = None) -> tuple[list[dict], str, int, int]:
    """Read and normalize every source: (records, format, rows read, rows skipped)."""
    sources = sources if sources is not None else cfg.train
    sources = [sources] if isinstance(sources, str) else list(sources)
    rows: list[Row] = []
    skipped = 0
    for src in sources:
        got, bad = read_rows(src, hub_split=cfg.hub_split, hub_config=cfg.hub_config,
                             skip_invalid=cfg.skip_invalid)
        rows += got
        skipped += bad
    if not rows:
        unreadable = f" ({skipped} unreadable rows skipped)" if skipped else ""
        raise DataError(f"no rows found in {', '.join(sources)}{unreadable}")
    fmt = cfg.format
    if fmt == "auto":
        fmt = detect_format(columns_of(rows), cfg.columns)
    records, bad = normalize_rows(rows, fmt, cfg.columns, skip_invalid=cfg.skip_invalid)
    skipped += bad
    if cfg.system_prompt:
        for r in records:
            if "messages" in r and r["messages"][0]["role"] != "system":
                r["messages"].insert(0, {"role": "system", "content": cfg.system_prompt})
    if not records:
        raise DataError(f"no usable rows left in {', '.join(sources)} after skipping {skipped} invalid rows")
    return records, fmt, len(rows), skipped


def split_records(records: list[dict], cfg: DataConfig, seed: int) -> tuple[list[dict], list[dict]]:
    records = list(records)
    if cfg.shuffle:
        random.Random(seed).shuffle(records)
    if cfg.max_samples:
        records = records[: cfg.max_samples]
    if cfg.split.validation_file:
        val, _, _, _ = load_records(cfg, cfg.split.validation_file)
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


def encode_all(records: list[dict], tokenizer, cfg: DataConfig, stats: DataStats) -> list[Encoded]:
    out = []
    for rec in records:
        enc = encode_record(tokenizer, rec, train_on_prompt=cfg.train_on_prompt)
        cut = truncate(enc, cfg.max_length, cfg.truncation)
        if cut is None or cut.n_loss_tokens == 0:
            stats.dropped += 1
            continue
        stats.truncated += cut is not enc
        out.append(cut)
    return out


def build_data(cfg: DataConfig, tokenizer, *, seed: int, packing: bool) -> DataBundle:
    stats = DataStats()
    records, stats.format, stats.rows_read, stats.rows_skipped = load_records(cfg)
    stats.used_fallback_template = ensure_chat_template(tokenizer)
    train_recs, val_recs = split_records(records, cfg, seed)
    train = encode_all(train_recs, tokenizer, cfg, stats)
    val = encode_all(val_recs, tokenizer, cfg, stats)
    if not train:
        raise DataError(
            f"no training examples left: {stats.dropped} dropped (too long for data.max_length="
            f"{cfg.max_length} with truncation '{cfg.truncation}', or no tokens to learn from)"
        )
    stats.train_examples, stats.val_examples = len(train), len(val)
    stats.train_loss_tokens = sum(e.n_loss_tokens for e in train)
    train_rows = pack(train, cfg.max_length) if packing else unpacked_rows(train)
    val_rows = pack(val, cfg.max_length) if packing else unpacked_rows(val)
    stats.train_rows = len(train_rows)
    return DataBundle(train_rows, val_rows, stats, val_records=val_recs)
