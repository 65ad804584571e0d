"""Read rows from local files (JSON, JSONL, CSV, TSV, Parquet) or a hub dataset id.

Each row keeps where it came from (file and 1-based row/line number) so a later
validation error can point at it.
"""

from __future__ import annotations

import csv
import json
from dataclasses import dataclass
from pathlib import Path
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
    path = Path(source)
    if path.suffix.lower() in LOCAL_SUFFIXES or path.exists():
        if path.is_dir():
            raise DataError(f"{path} is a folder; name a data file in it "
                            f"({', '.join(sorted(LOCAL_SUFFIXES))})")
        if not path.is_file():
            raise DataError(f"data file not found: {path}")
        try:
            return _read_local(path, skip_invalid, errors, column_names)
        except UnicodeDecodeError as exc:
            raise DataError(f"{path}: not UTF-8 text (byte {exc.object[exc.start:exc.start + 1]!r} at offset "
                            f"{exc.start}); save the file as UTF-8") from None
    if "/" in source and not source.startswith((".", "/")):
        return _read_hub(source, hub_split, hub_config), 0
    raise DataError(
        f"data source '{source}' is neither an existing file ({', '.join(sorted(LOCAL_SUFFIXES))}) "
        "nor a hub dataset id (owner/name)"
    )


def _read_local(path: Path, skip_invalid: bool, errors: list[str] | None,
                column_names: list[str] | None = None) -> tuple[list[Row], int]:
    suffix = path.suffix.lower()
    if suffix == ".jsonl":
        return _read_jsonl(path, skip_invalid, errors)
    if suffix == ".json":
        return _read_json(path, skip_invalid, errors)
    if suffix in {".csv", ".tsv"}:
        return _read_csv(path, "\t" if suffix == ".tsv" else ",", column_names, skip_invalid, errors)
    if suffix == ".parquet":
        import pyarrow.parquet as pq

        table = pq.read_table(path)
        return [Row(r, str(path), i + 1) for i, r in enumerate(table.to_pylist())], 0
    raise DataError(f"{path}: unsupported file type '{suffix}' (use {', '.join(sorted(LOCAL_SUFFIXES))})")


def _invalid(message: str, skip_invalid: bool, errors: list[str] | None) -> None:
    """A row that cannot be read: an error, or (skip_invalid) a note in `errors` for the caller to skip it."""
    if not skip_invalid:
        raise DataError(message) from None
    if errors is not None:
        errors.append(message)


def _read_jsonl(path: Path, skip_invalid: bool, errors: list[str] | None = None) -> tuple[list[Row], int]:
    rows, skipped = [], 0
    with path.open(encoding="utf-8") as fh:
        for lineno, line in enumerate(fh, 1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
                if not isinstance(obj, dict):
                    raise ValueError(f"expected a JSON object, got {type(obj).__name__}")
            except ValueError as exc:
                _invalid(f"{path} line {lineno}: not a valid JSON object: {exc}", skip_invalid, errors)
                skipped += 1
                continue
            rows.append(Row(obj, str(path), lineno))
    return rows, skipped


def _read_json(path: Path, skip_invalid: bool, errors: list[str] | None = None) -> tuple[list[Row], int]:
    try:
        obj = json.loads(path.read_text(encoding="utf-8"))
    except ValueError as exc:
        # Many "JSON" files are really JSON Lines.
        try:
            return _read_jsonl(path, skip_invalid, errors)
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


def _read_csv(path: Path, delimiter: str, column_names: list[str] | None = None, skip_invalid: bool = False,
              errors: list[str] | None = None) -> tuple[list[Row], int]:
    with path.open(encoding="utf-8", newline="") as fh:
        if not column_names:
            reader = csv.DictReader(fh, delimiter=delimiter)
            if not reader.fieldnames:
                raise DataError(f"{path}: empty file or no header row")
            # Data rows are numbered from 1; the header is not a row. A row with more fields than
            # the header (csv puts the extras under None) would lose them silently.
            rows, skipped = [], 0
            for i, r in enumerate(reader, 1):
                if None in r:
                    _invalid(f"{path} row {i}: {len(reader.fieldnames) + len(r[None])} fields, but the header has "
                             f"{len(reader.fieldnames)} ({', '.join(reader.fieldnames)}); quote fields that "
                             "contain the delimiter", skip_invalid, errors)
                    skipped += 1
                    continue
                rows.append(Row(dict(r), str(path), i))
            return rows, skipped
        # Without a header a short or long line would silently shift values between
        # columns, so every line must have exactly one field per name.
        rows, skipped = [], 0
        for i, fields in enumerate(csv.reader(fh, delimiter=delimiter), 1):
            if not fields:
                continue
            if len(fields) != len(column_names):
                _invalid(f"{path} row {i}: {len(fields)} fields, but data.column_names names "
                         f"{len(column_names)} ({', '.join(column_names)})", skip_invalid, errors)
                skipped += 1
                continue
            rows.append(Row(dict(zip(column_names, fields)), str(path), i))
        return rows, skipped


def _read_hub(dataset_id: str, split: str, config: str | None) -> list[Row]:
    import datasets

    try:
        ds = datasets.load_dataset(dataset_id, config, split=split)
    except Exception as exc:  # the hub raises many kinds; the message is what matters
        raise DataError(f"could not load hub dataset '{dataset_id}' (split {split}): {exc}") from exc
    return [Row(dict(r), f"{dataset_id}[{split}]", i + 1) for i, r in enumerate(ds)]
