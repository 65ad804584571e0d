"""Read rows from local files (JSON, JSONL, CSV, TSV, Parquet) or a hub dataset id.

Each row keeps where it came from (file and 1-based row/line number) so a later
validation error can point at it.
"""

from __future__ import annotations

import csv
import json
from dataclasses import dataclass
from pathlib import Path
from collections.abc import Iterator
from typing import Any

from ..errors import DataError

LOCAL_SUFFIXES = {".json", ".jsonl", ".csv", ".tsv", ".parquet"}


@dataclass
class Row:
    data: dict[str, Any]
    source: str
    index: int  # 1-based row (line for JSONL/CSV data rows)

    @property
    def where(self) -> str:
        return f"{self.source} row {self.index}"


def columns_of(rows: list[Row]) -> set[str]:
    """Every column any row has: a first row that lacks a field must not hide the format."""
    return set().union(*(r.data for r in rows))


def read_rows(
    source: str, *, hub_split: str = "train", hub_config: str | None = None, skip_invalid: bool = False,
    errors: list[str] | None = None, column_names: list[str] | None = None,
) -> tuple[list[Row], int]:
    """Return (rows, number of unreadable rows skipped).

    With skip_invalid, the message of every skipped row is appended to `errors` when given.
    `column_names` is the header of CSV/TSV files that have none (every line is then a row).
    """
    return _counted(iter_rows(source, hub_split=hub_split, hub_config=hub_config, skip_invalid=skip_invalid,
                              errors=errors, column_names=column_names))


def _counted(rows: Iterator[Row | None]) -> tuple[list[Row], int]:
    """(the readable rows, how many were skipped as unreadable)."""
    read = list(rows)
    kept = [r for r in read if r is not None]
    return kept, len(read) - len(kept)


def iter_rows(
    source: str, *, hub_split: str = "train", hub_config: str | None = None, skip_invalid: bool = False,
    errors: list[str] | None = None, column_names: list[str] | None = None, streaming: bool = False,
) -> Iterator[Row | None]:
    """The source's rows one by one, None for each unreadable row skipped (skip_invalid). JSONL, CSV/TSV and
    Parquet are read incrementally; a hub dataset is streamed with `streaming`, else downloaded first."""
    path = Path(source)
    if path.suffix.lower() in LOCAL_SUFFIXES or path.exists():
        if path.is_dir():
            raise DataError(f"{path} is a folder; name a data file in it "
                            f"({', '.join(sorted(LOCAL_SUFFIXES))})")
        if not path.is_file():
            raise DataError(f"data file not found: {path}")
        try:
            yield from _iter_local(path, skip_invalid, errors, column_names)
        except UnicodeDecodeError as exc:
            raise DataError(f"{path}: not UTF-8 text (byte {exc.object[exc.start:exc.start + 1]!r} at offset "
                            f"{exc.start}); save the file as UTF-8") from None
        return
    if "/" in source and not source.startswith((".", "/")):
        yield from _iter_hub(source, hub_split, hub_config, streaming)
        return
    raise DataError(
        f"data source '{source}' is neither an existing file ({', '.join(sorted(LOCAL_SUFFIXES))}) "
        "nor a hub dataset id (owner/name)"
    )


def _iter_local(path: Path, skip_invalid: bool, errors: list[str] | None,
                column_names: list[str] | None = None) -> Iterator[Row | None]:
    suffix = path.suffix.lower()
    if suffix == ".jsonl":
        yield from _iter_jsonl(path, skip_invalid, errors)
    elif suffix == ".json":
        rows, skipped = _read_json(path, skip_invalid, errors)  # one document: read whole
        yield from rows
        yield from [None] * skipped
    elif suffix in {".csv", ".tsv"}:
        yield from _iter_csv(path, "\t" if suffix == ".tsv" else ",", column_names, skip_invalid, errors)
    elif suffix == ".parquet":
        import pyarrow.parquet as pq

        index = 0
        for batch in pq.ParquetFile(path).iter_batches(batch_size=4096):
            for record in batch.to_pylist():
                index += 1
                yield Row(record, str(path), index)
    else:
        raise DataError(f"{path}: unsupported file type '{suffix}' (use {', '.join(sorted(LOCAL_SUFFIXES))})")


def _invalid(message: str, skip_invalid: bool, errors: list[str] | None) -> None:
    """A row that cannot be read: an error, or (skip_invalid) a note in `errors` for the caller to skip it."""
    if not skip_invalid:
        raise DataError(message) from None
    if errors is not None:
        errors.append(message)


def _iter_jsonl(path: Path, skip_invalid: bool, errors: list[str] | None = None) -> Iterator[Row | None]:
    # utf-8-sig: a byte-order mark (Excel and Notepad write one) is not part of the first key or column.
    with path.open(encoding="utf-8-sig") as fh:
        for lineno, line in enumerate(fh, 1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
                if not isinstance(obj, dict):
                    raise ValueError(f"expected a JSON object, got {type(obj).__name__}")
            except ValueError as exc:
                _invalid(f"{path} line {lineno}: not a valid JSON object: {exc}", skip_invalid, errors)
                yield None
                continue
            yield Row(obj, str(path), lineno)


def _read_json(path: Path, skip_invalid: bool, errors: list[str] | None = None) -> tuple[list[Row], int]:
    try:
        obj = json.loads(path.read_text(encoding="utf-8-sig"))
    except ValueError as exc:
        # Many "JSON" files are really JSON Lines.
        try:
            return _counted(_iter_jsonl(path, skip_invalid, errors))
        except DataError:
            raise DataError(f"{path}: not valid JSON: {exc}") from None
    if isinstance(obj, dict):
        lists = [v for v in obj.values() if isinstance(v, list)]
        if len(lists) != 1:
            raise DataError(f"{path}: expected a JSON array of objects (or one object holding one array)")
        obj = lists[0]
    if not isinstance(obj, list):
        raise DataError(f"{path}: expected a JSON array of objects, got {type(obj).__name__}")
    rows, skipped = [], 0
    for i, item in enumerate(obj, 1):
        if not isinstance(item, dict):
            _invalid(f"{path} row {i}: expected a JSON object, got {type(item).__name__}", skip_invalid, errors)
            skipped += 1
            continue
        rows.append(Row(item, str(path), i))
    return rows, skipped


def _iter_csv(path: Path, delimiter: str, column_names: list[str] | None = None, skip_invalid: bool = False,
              errors: list[str] | None = None) -> Iterator[Row | None]:
    with path.open(encoding="utf-8-sig", newline="") as fh:
        if not column_names:
            reader = csv.DictReader(fh, delimiter=delimiter)
            if not reader.fieldnames:
                raise DataError(f"{path}: empty file or no header row")
            # Data rows are numbered from 1; the header is not a row. A row with more fields than
            # the header (csv puts the extras under None) would lose them silently.
            for i, r in enumerate(reader, 1):
                if None in r:
                    _invalid(f"{path} row {i}: {len(reader.fieldnames) + len(r[None])} fields, but the header has "
                             f"{len(reader.fieldnames)} ({', '.join(reader.fieldnames)}); quote fields that "
                             "contain the delimiter", skip_invalid, errors)
                    yield None
                    continue
                yield Row(dict(r), str(path), i)
            return
        # Without a header a short or long line would silently shift values between
        # columns, so every line must have exactly one field per name.
        for i, fields in enumerate(csv.reader(fh, delimiter=delimiter), 1):
            if not fields:
                continue
            if len(fields) != len(column_names):
                _invalid(f"{path} row {i}: {len(fields)} fields, but data.column_names names "
                         f"{len(column_names)} ({', '.join(column_names)})", skip_invalid, errors)
                yield None
                continue
            yield Row(dict(zip(column_names, fields)), str(path), i)


def _iter_hub(dataset_id: str, split: str, config: str | None, streaming: bool) -> Iterator[Row]:
    import datasets

    try:
        ds = datasets.load_dataset(dataset_id, config, split=split, streaming=streaming)
    except Exception as exc:  # the hub raises many kinds; the message is what matters
        raise DataError(f"could not load hub dataset '{dataset_id}' (split {split}"
                        f"{', streaming' if streaming else ''}): {exc}") from exc
    for i, r in enumerate(ds):
        yield Row(dict(r), f"{dataset_id}[{split}]", i + 1)
