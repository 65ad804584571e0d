"""The task formats: labelled text (text_label) and tagged words (tokens) — detection, aliases,
errors that name the file, row and field, and what `data inspect` reports about them."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from conftest import write_jsonl
from tunesmith.config import DataConfig, load_config
from tunesmith.data.formats import detect_format
from tunesmith.data.inspect import inspect_data
from tunesmith.data.pipeline import load_records, split_records
from tunesmith.errors import DataError


def load(path: Path, **data) -> tuple[list[dict], str]:
    records, fmt, _, _ = load_records(DataConfig(train=str(path), **data))
    return records, fmt


def write_tsv(path: Path, header: list[str], rows: list[list]) -> Path:
    lines = ["\t".join(header)] + ["\t".join(str(c) for c in r) for r in rows]
    path.write_text("\n".join(lines) + "\n")
    return path


@pytest.mark.parametrize("columns,expected", [
    ({"text", "label"}, "text_label"),
    ({"label", "sentence"}, "text_label"),  # SST-2's train.tsv
    ({"content", "label"}, "text_label"),  # SST-2's dev.tsv
    ({"review", "labels"}, "text_label"),
    ({"text", "label", "text_pair"}, "text_label"),
    ({"tokens", "tags"}, "tokens"),
    ({"tokens", "ner_tags"}, "tokens"),
    ({"words", "labels"}, "tokens"),
    ({"text"}, "text"),
    ({"sentence"}, "text"),
    ({"prompt", "completion", "label"}, "prompt_completion"),
])
def test_detection(columns, expected):
    assert detect_format(columns) == expected


def test_sst2_shaped_tsv_reads_through_aliases_and_mapping(tmp_path):
    train = write_tsv(tmp_path / "train.tsv", ["label", "sentence"], [[0, "a bad movie"], [1, "a great movie"]])
    dev = write_tsv(tmp_path / "dev.tsv", ["label", "content"], [[1, "good people"]])
    records, fmt = load(train)
    assert fmt == "text_label"
    assert records == [{"text": "a bad movie", "label": "0"}, {"text": "a great movie", "label": "1"}]
    # Mapped to `sentence`, as the SST-2 example does: the dev file has `content` instead, and
    # the alias picks it up rather than failing on a column the file does not have.
    cfg = DataConfig(train=str(train), columns={"text": "sentence"}, split={"validation_file": str(dev)})
    train_recs, val_recs = split_records(load_records(cfg)[0], cfg, seed=0)
    assert {r["text"] for r in train_recs} == {"a bad movie", "a great movie"}
    assert val_recs == [{"text": "good people", "label": "1"}]


def test_text_label_keeps_ids_and_pairs(tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", [
        {"text": "is the sky blue", "text_pair": "the sky is blue", "label": 1},
        {"text": "is water red", "text_pair": "", "label": 0.0},  # pandas writes ids as floats
        {"body": "mapped column", "label": " yes "},
    ])
    records, fmt = load(path, columns={"text": "body"}, format="text_label")
    assert fmt == "text_label"
    assert records[0] == {"text": "is the sky blue", "text_pair": "the sky is blue", "label": 1}
    assert records[1] == {"text": "is water red", "label": 0}
    assert records[2] == {"text": "mapped column", "label": "yes"}


def test_tokens_normalize_tag_ids_to_strings(tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", [{"tokens": ["paris", "is", "blue"], "ner_tags": [1, 0, 0]}])
    records, fmt = load(path)
    assert fmt == "tokens"
    assert records == [{"tokens": ["paris", "is", "blue"], "tags": ["1", "0", "0"]}]


@pytest.mark.parametrize("row,field,expected", [
    ({"text": "ok", "label": ["a"]}, "label", "a label name"),
    ({"text": "ok", "label": ""}, "label", "a non-empty label"),
    ({"text": "ok", "label": True}, "label", "a label name"),
    ({"text": "", "label": "a"}, "text", "a non-empty string"),
])
def test_bad_text_label_rows_name_file_row_and_field(tmp_path, row, field, expected):
    path = write_jsonl(tmp_path / "d.jsonl", [{"text": "fine", "label": "a"}, row])
    with pytest.raises(DataError) as err:
        load(path, format="text_label")
    message = str(err.value)
    assert f"{path} row 2" in message and f"field '{field}'" in message and expected in message
    assert "format 'text_label'" in message


@pytest.mark.parametrize("row,field,expected", [
    ({"tokens": ["a", "b"], "tags": ["O"]}, "tags", "one tag per word (2 words in 'tokens')"),
    ({"tokens": [], "tags": []}, "tokens", "a non-empty list of words"),
    ({"tokens": "a b", "tags": ["O", "O"]}, "tokens", "a non-empty list of words"),
    ({"tokens": ["a", ""], "tags": ["O", "O"]}, "tokens[1]", "a non-empty string"),
    ({"tokens": ["a", "b"], "tags": ["O", None]}, "tags[1]", "a non-empty string"),
])
def test_bad_tokens_rows_name_file_row_and_field(tmp_path, row, field, expected):
    path = write_jsonl(tmp_path / "d.jsonl", [{"tokens": ["a"], "tags": ["O"]}, row])
    with pytest.raises(DataError) as err:
        load(path)
    message = str(err.value)
    assert f"{path} row 2" in message and f"field '{field}'" in message and expected in message


def test_bad_rows_can_be_skipped(tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", [{"tokens": ["a"], "tags": ["O"]},
                                              {"tokens": ["a", "b"], "tags": ["O"]}])
    records, _, n_read, n_skipped = load_records(DataConfig(train=str(path), skip_invalid=True))
    assert (len(records), n_read, n_skipped) == (1, 2, 1)


def test_headerless_tsv_reads_with_column_names(tmp_path):
    # AG News' train_subset_10k.tsv shape: text TAB label name, no header line.
    path = tmp_path / "news.tsv"
    path.write_text("Stocks fall on rate fears\tBusiness\nTeam wins the cup\tSports\n\n")
    records, fmt = load(path, column_names=["text", "label"])
    assert fmt == "text_label"
    assert [(r["text"], r["label"]) for r in records] == [("Stocks fall on rate fears", "Business"),
                                                            ("Team wins the cup", "Sports")]


def test_headerless_tsv_wrong_field_count_names_file_and_row(tmp_path):
    path = tmp_path / "news.tsv"
    path.write_text("Stocks fall\tBusiness\nno label here\n")
    with pytest.raises(DataError, match=r"news.tsv row 2: 1 fields, but data.column_names names 2 \(text, label\)"):
        load(path, column_names=["text", "label"])
    records, _, n_read, n_skipped = load_records(DataConfig(train=str(path), column_names=["text", "label"],
                                                            skip_invalid=True))
    assert (len(records), n_read, n_skipped) == (1, 1, 1)
    report = inspect_data(str(path), column_names=["text", "label"])
    assert (report["format"], report["rows"], report["valid"], report["invalid"]) == ("text_label", 2, 1, 1)
    assert "news.tsv row 2: 1 fields" in report["errors"][0]


def test_inspect_cli_takes_column_names(tmp_path):
    from typer.testing import CliRunner

    from tunesmith.cli import app

    path = tmp_path / "news.tsv"
    path.write_text("Stocks fall\tBusiness\nTeam wins\tSports\n")
    out = CliRunner().invoke(app, ["data", "inspect", str(path), "--column-names", "text, label"],
                             env={"COLUMNS": "200"})
    assert out.exit_code == 0, out.output
    assert "text_label" in out.output and "Business" in out.output


def test_column_names_must_be_distinct():
    with pytest.raises(Exception, match="data.column_names repeats a name"):
        load_config({"model": {"name_or_path": "x"}, "data": {"train": "d.tsv", "column_names": ["text", "text"]}})


def test_config_accepts_the_new_formats(tmp_path):
    for fmt in ("text_label", "tokens"):
        cfg = load_config({"model": {"name_or_path": "x"}, "data": {"train": "d.jsonl", "format": fmt}})
        assert cfg.data.format == fmt


def test_inspect_reports_label_distribution(tmp_path, tiny_bert_dir):
    rows = [{"text": "good", "label": "pos"}] * 3 + [{"text": "bad", "label": "neg"}, {"text": "x", "label": []}]
    report = inspect_data(str(write_jsonl(tmp_path / "d.jsonl", rows)), model=str(tiny_bert_dir))
    assert report["format"] == "text_label" and report["invalid"] == 1
    assert report["labels"] == {"pos": {"count": 3, "share": 0.75}, "neg": {"count": 1, "share": 0.25}}
    assert report["tokens"]["max"] == 3  # [CLS] word [SEP]


def test_inspect_reports_tag_distribution_and_renders(tmp_path, tiny_bert_dir):
    from rich.console import Console

    from tunesmith.data.inspect import render_report

    rows = [{"tokens": ["paris", "is", "blue"], "tags": ["B-LOC", "O", "O"]},
            {"tokens": ["france"], "tags": ["B-LOC"]}]
    report = inspect_data(str(write_jsonl(tmp_path / "d.jsonl", rows)), model=str(tiny_bert_dir))
    assert report["format"] == "tokens"
    assert report["labels"] == {"B-LOC": {"count": 2, "share": 0.5}, "O": {"count": 2, "share": 0.5}}
    assert report["words"] == {"mean": 2.0, "min": 1, "max": 3}
    console = Console(record=True, width=120)
    render_report(report, console)
    text = console.export_text()
    assert "tags (2)" in text and "B-LOC" in text and "50.0%" in text and "words per example" in text
    json.dumps(report)  # the CLI's --json output
