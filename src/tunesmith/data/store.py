"""`data.store: arrow`: tokenized rows in a memory-mapped Arrow file, built by streaming, reused by key.

The in-memory path reads every record into Python, shuffles, tokenizes and packs them as lists:
fine for thousands of rows, not for millions. This path streams the sources (local files chunk by
chunk, hub datasets with `streaming=True`: nothing is downloaded whole), encodes and packs each
chunk, and appends the rows to an Arrow IPC file. Training memory-maps that file: a row is read
when a batch needs it, so the process holds the pages it touches, not the corpus, and every
process of a multi-process run maps the same file and reads only its own batches.

The file is keyed by everything that decides its content (the data section, each source's content
or size and modification time, a hub dataset's id, config and split, the tokenizer, the objective and its settings, packing,
the seed, this format's version): a second run with the same key opens it without tokenizing.
A build writes into a temporary folder and renames it when complete, so a killed build leaves no
half-written store behind, and a resumed run reads exactly the rows the first session trained on.

What differs from the in-memory path, so that no pass needs the whole corpus: `max_samples` keeps
the first N rows of the stream; `split.validation_ratio` sends each row to validation by a seeded
hash of its position (so about that share, not exactly); examples are packed first-fit-decreasing
within chunks of `PACK_CHUNK` examples; rows are stored in stream order (each epoch is shuffled by
the loop as always). A validation file is read in memory (it is small).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from collections.abc import Iterator, Sequence
from dataclasses import asdict
from pathlib import Path
from typing import TYPE_CHECKING

from ..config import STREAMABLE_OBJECTIVES, DataConfig
from ..errors import DataError
from .formats import detect_format, normalize_rows
from .packing import pack, unpacked_rows
from .sources import Row, columns_of, iter_rows

if TYPE_CHECKING:
    from ..objectives.base import Objective

STORE_VERSION = 1
CHUNK = 2048  # source rows normalized and encoded together
PACK_CHUNK = 2048  # examples packed together (first-fit-decreasing within each chunk)


class ArrowRows(Sequence):
    """A memory-mapped Arrow file of rows: `rows[i]` is one row as a dict of lists, `len(rows)` their number.

    Slices and iteration give lists of such dicts, like the in-memory rows, so the loop, evaluation and
    collators take either."""

    def __init__(self, path: Path):
        import pyarrow as pa

        self.path = Path(path)
        with pa.memory_map(str(self.path)) as source:
            self._table = pa.ipc.open_stream(source).read_all()
        self._columns = {name: self._table.column(name) for name in self._table.column_names}

    def __len__(self) -> int:
        return self._table.num_rows

    def __getitem__(self, index):
        if isinstance(index, slice):
            return [self[i] for i in range(*index.indices(len(self)))]
        if index < 0:
            index += len(self)
        if not 0 <= index < len(self):
            raise IndexError(index)
        return {name: column[index].as_py() for name, column in self._columns.items()}

    def lengths(self, column: str = "input_ids") -> list[int]:
        """Tokens of every row, from the Arrow list offsets (no row is converted)."""
        import pyarrow.compute as pc

        return pc.list_value_length(self._table.column(column)).to_pylist()


# -- the key ------------------------------------------------------------------------------------------------

def _source_fingerprint(source: str, cfg: DataConfig) -> str:
    from ..evaluation.cache import file_fingerprint  # the evaluation cache's: content, or path/size/mtime

    path = Path(source)
    if path.is_file():
        return "file:" + file_fingerprint(path)
    return f"hub:{source}:{cfg.hub_config}:{cfg.hub_split}"


def _tokenizer_fingerprint(tokenizer) -> str:
    backend = getattr(tokenizer, "backend_tokenizer", None)
    text = backend.to_str() if backend is not None else json.dumps(sorted(tokenizer.get_vocab().items()))
    text += json.dumps([getattr(tokenizer, "chat_template", None), tokenizer.all_special_tokens,
                        getattr(tokenizer, "padding_side", None)], default=str)
    return hashlib.sha256(text.encode()).hexdigest()


def store_key(cfg: DataConfig, tokenizer, objective: "Objective", packing: bool, seed: int) -> str:
    sources = cfg.train if isinstance(cfg.train, list) else [cfg.train]
    parts = {
        "version": STORE_VERSION,
        "data": cfg.model_dump(mode="json"),
        "sources": [_source_fingerprint(s, cfg) for s in sources],
        "validation": _source_fingerprint(cfg.split.validation_file, cfg) if cfg.split.validation_file else None,
        "tokenizer": _tokenizer_fingerprint(tokenizer),
        "objective": [objective.name, objective.cfg.model_dump(mode="json")],
        "packing": packing,
        "seed": seed,
    }
    return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()[:24]


def store_root() -> Path:
    from ..models import cache_dir

    return cache_dir() / "rows"


# -- streaming the sources ----------------------------------------------------------------------------------

def _chunks(rows: Iterator[Row | None], size: int, skipped: list[int]) -> Iterator[list[Row]]:
    """Readable rows in lists of `size`; rows skipped as unreadable (skip_invalid) are counted in skipped[0]."""
    chunk: list[Row] = []
    for row in rows:
        if row is None:
            skipped[0] += 1
            continue
        chunk.append(row)
        if len(chunk) == size:
            yield chunk
            chunk = []
    if chunk:
        yield chunk


def _to_validation(seed: int, position: int, ratio: float) -> bool:
    digest = hashlib.blake2b(f"{seed}:{position}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big") / 2**64 < ratio


# -- writing -------------------------------------------------------------------------------------------------

class _Writer:
    """Appends rows to an Arrow IPC stream file; every row must have the first row's columns."""

    def __init__(self, path: Path):
        self.path, self._writer, self._schema, self.rows = path, None, None, 0

    def write(self, rows: list[dict]) -> None:
        import pyarrow as pa

        if not rows:
            return
        if self._writer is None:
            columns = list(rows[0])
            self._schema = pa.schema([(c, pa.list_(pa.int32())) for c in columns])
            self._writer = pa.ipc.new_stream(str(self.path), self._schema)
        batch = pa.RecordBatch.from_pylist([{c: r[c] for c in self._schema.names} for r in rows], schema=self._schema)
        self._writer.write_batch(batch)
        self.rows += len(rows)

    def close(self) -> None:
        import pyarrow as pa

        if self._writer is None:  # no row: an empty file with a bare schema
            self._writer = pa.ipc.new_stream(str(self.path), pa.schema([("input_ids", pa.list_(pa.int32()))]))
        self._writer.close()


def build_store(cfg: DataConfig, tokenizer, *, seed: int, packing: bool, objective: "Objective",
                echo=lambda _m: None):
    """The run's rows as a DataBundle of ArrowRows (training) and a list (validation), built once per key."""
    from .pipeline import DataBundle, DataStats, add_system_prompt, check_format, encode_all, load_records
    from .templates import ensure_chat_template

    if objective.name not in STREAMABLE_OBJECTIVES:
        raise DataError(f"data.store: arrow streams rows for objectives {', '.join(STREAMABLE_OBJECTIVES)}; "
                        f"'{objective.name}' needs the whole data set first (labels, pairs): use data.store: memory")
    fallback_template = ensure_chat_template(tokenizer)
    key = store_key(cfg, tokenizer, objective, packing, seed)
    folder = store_root() / key
    task = objective.prepare([], objective.cfg)
    if (folder / "meta.json").is_file():
        meta = json.loads((folder / "meta.json").read_text())
        echo(f"data: reusing the tokenized rows in {folder} (key {key})")
        return DataBundle(ArrowRows(folder / "train.arrow"), ArrowRows(folder / "val.arrow")[:],
                          DataStats(**meta["stats"]), task=task)
    tmp = folder.with_name(f"{key}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    stats = DataStats(used_fallback_template=fallback_template)
    sources = cfg.train if isinstance(cfg.train, list) else [cfg.train]
    train_out, val_out = _Writer(tmp / "train.arrow"), _Writer(tmp / "val.arrow")
    pending: list[dict] = []
    fmt = None if cfg.format == "auto" else cfg.format
    ratio = cfg.split.validation_ratio if not cfg.split.validation_file else 0.0
    position, unreadable = 0, [0]
    try:
        for source in sources:
            rows = iter_rows(source, hub_split=cfg.hub_split, hub_config=cfg.hub_config, skip_invalid=cfg.skip_invalid,
                             column_names=cfg.column_names, streaming=cfg.streaming)
            for chunk in _chunks(rows, CHUNK, unreadable):
                if cfg.max_samples and position >= cfg.max_samples:
                    break
                if cfg.max_samples:
                    chunk = chunk[: cfg.max_samples - position]
                stats.rows_read += len(chunk)
                if fmt is None:
                    fmt = detect_format(columns_of(chunk), cfg.columns, objective.formats)
                    check_format(fmt, objective, cfg.train)
                    stats.format = fmt
                records, bad = normalize_rows(chunk, fmt, cfg.columns, skip_invalid=cfg.skip_invalid)
                add_system_prompt(records, cfg.system_prompt)
                stats.rows_skipped += bad
                train_recs, val_recs = [], []
                for offset, record in enumerate(records):
                    (val_recs if ratio and _to_validation(seed, position + offset, ratio) else train_recs).append(record)
                position += len(chunk)
                train = encode_all(train_recs, tokenizer, cfg, stats, objective, task)
                val = encode_all(val_recs, tokenizer, cfg, stats, objective, task)
                stats.train_examples += len(train)
                stats.val_examples += len(val)
                stats.train_loss_tokens += sum(sum(1 for x in r["labels"] if x != -100)
                                               if isinstance(r.get("labels"), list) else 1 for r in train)
                val_out.write(pack(val, cfg.max_length) if packing else unpacked_rows(val))
                pending += train
                if len(pending) >= PACK_CHUNK:
                    train_out.write(pack(pending, cfg.max_length) if packing else unpacked_rows(pending))
                    pending = []
                echo(f"data: {stats.rows_read:,} rows read, {train_out.rows:,} training rows written")
        train_out.write(pack(pending, cfg.max_length) if packing else unpacked_rows(pending))
        stats.rows_skipped += unreadable[0]
        if cfg.split.validation_file:
            # In the training data's format, however that was found (as the in-memory path reads it).
            val_records, _, _, skipped = load_records(cfg.model_copy(update={"format": stats.format}),
                                                      cfg.split.validation_file)
            stats.rows_skipped += skipped
            val = encode_all(val_records, tokenizer, cfg, stats, objective, task)
            stats.val_examples += len(val)
            val_out.write(pack(val, cfg.max_length) if packing else unpacked_rows(val))
        train_out.close()
        val_out.close()
        if not train_out.rows:
            raise DataError(f"no training examples left in {', '.join(sources)}: {stats.dropped} dropped (too long "
                            f"for data.max_length={cfg.max_length} with truncation '{cfg.truncation}', or empty)")
        stats.train_rows = train_out.rows
        (tmp / "meta.json").write_text(json.dumps({"key": key, "stats": asdict(stats)}, indent=1))
        if folder.exists():  # another process finished the same build first
            shutil.rmtree(tmp, ignore_errors=True)
        else:
            tmp.rename(folder)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return DataBundle(ArrowRows(folder / "train.arrow"), ArrowRows(folder / "val.arrow")[:], stats, task=task)
