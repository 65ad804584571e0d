"""Reading files, detecting formats, remapping columns, and errors that point at the bad row."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest

from tunesmith.config import DataConfig
from tunesmith.data.formats import detect_format
from tunesmith.data.pipeline import build_data, load_records
from tunesmith.errors import DataError

USER, ASSISTANT = "what color is the sky", "blue"
CONVERSATION = [{"role": "user", "content": USER}, {"role": "assistant", "content": ASSISTANT}]

# One row per format, each meaning the same single exchange (or, for text, one passage).
SAMPLES = {
    "alpaca": {"instruction": USER, "input": "", "output": ASSISTANT},
    "chat": {"messages": CONVERSATION},
    "sharegpt": {"conversations": [{"from": "human", "value": USER}, {"from": "gpt", "value": ASSISTANT}]},
    "prompt_completion": {"prompt": USER, "completion": ASSISTANT},
    "text": {"text": "the sky is blue"},
}


def write_jsonl(path: Path, rows: list) -> Path:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


def load(path: Path, **data) -> tuple[list[dict], str, int, int]:
    return load_records(DataConfig(train=str(path), **data))


@pytest.fixture
def tok(tiny_model_dir):
    from transformers import AutoTokenizer

    # A fresh copy per test: build_data sets a chat template on the tokenizer it is given.
    return AutoTokenizer.from_pretrained(tiny_model_dir)


# --- detection -------------------------------------------------------------------------------


@pytest.mark.parametrize("fmt", list(SAMPLES))
def test_detects_each_format_and_normalizes_it(tmp_path, fmt):
    assert detect_format(set(SAMPLES[fmt])) == fmt
    records, detected, n_read, n_skipped = load(write_jsonl(tmp_path / "d.jsonl", [SAMPLES[fmt]] * 2))
    assert (detected, n_read, n_skipped) == (fmt, 2, 0)
    expected = {"text": "the sky is blue"} if fmt == "text" else {"messages": CONVERSATION}
    assert records == [expected, expected]


def test_chat_accepts_conversation_column_and_role_aliases(tmp_path):
    row = {"conversation": [{"role": "system", "content": "be brief"},
                            {"role": "Human", "content": USER}, {"role": "bot", "content": ASSISTANT}]}
    records, fmt, _, _ = load(write_jsonl(tmp_path / "d.jsonl", [row]))
    assert fmt == "chat"
    assert records == [{"messages": [{"role": "system", "content": "be brief"}, *CONVERSATION]}]


def test_sharegpt_system_column_and_openai_style_turns(tmp_path):
    # Many datasets call their OpenAI-style {role, content} list "conversations".
    rows = [{"conversations": CONVERSATION, "system": "be brief"},
            {"conversations": [{"from": "human", "value": USER}, {"from": "gpt", "value": ASSISTANT}]}]
    records, fmt, _, _ = load(write_jsonl(tmp_path / "d.jsonl", rows))
    assert fmt == "sharegpt"
    assert records == [{"messages": [{"role": "system", "content": "be brief"}, *CONVERSATION]},
                       {"messages": CONVERSATION}]


def test_alpaca_joins_input_and_adds_system(tmp_path):
    row = {"instruction": "translate", "input": "the sky", "output": "le ciel", "system": "be brief"}
    records, _, _, _ = load(write_jsonl(tmp_path / "d.jsonl", [row]))
    assert records == [{"messages": [
        {"role": "system", "content": "be brief"},
        {"role": "user", "content": "translate\n\nthe sky"},
        {"role": "assistant", "content": "le ciel"},
    ]}]


def test_detection_prefers_the_most_specific_format():
    # A text column next to alpaca columns is extra metadata, not the training text.
    assert detect_format({"instruction", "output", "text"}) == "alpaca"
    assert detect_format({"messages", "text"}) == "chat"
    # ... also with an objective's preferences: SFT reads instruction data as such (prompts masked);
    # continued pretraining learns the text column.
    from tunesmith.objectives import OBJECTIVES

    assert detect_format({"instruction", "input", "output", "text"}, {}, OBJECTIVES["sft"].formats) == "alpaca"
    assert detect_format({"messages", "text"}, {}, OBJECTIVES["sft"].formats) == "chat"
    assert detect_format({"text"}, {}, OBJECTIVES["sft"].formats) == "text"
    assert detect_format({"instruction", "input", "output", "text"}, {}, OBJECTIVES["causal_lm"].formats) == "text"


@pytest.mark.parametrize("name, body", [
    ("excel.csv", "instruction,input,output\nname a color,,blue\n"),
    ("notepad.jsonl", '{"instruction": "name a color", "input": "", "output": "blue"}\n'),
    ("notepad.json", '[{"instruction": "name a color", "input": "", "output": "blue"}]'),
])
def test_a_byte_order_mark_is_not_part_of_the_first_column(tmp_path, name, body):
    path = tmp_path / name
    path.write_bytes(b"\xef\xbb\xbf" + body.encode())
    records, fmt, _, _ = load(path)
    assert fmt == "alpaca" and records[0]["messages"][0]["content"] == "name a color"


def test_explicit_format_overrides_detection(tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", [{"prompt": "p", "completion": "c", "text": "t"}])
    assert load(path)[1] == "prompt_completion"
    records, fmt, _, _ = load(path, format="text")
    assert (fmt, records) == ("text", [{"text": "t"}])


def test_column_remapping(tmp_path):
    rows = [{"question": USER, "answer": ASSISTANT, "id": 1}]
    path = write_jsonl(tmp_path / "d.jsonl", rows)
    with pytest.raises(DataError, match="cannot detect"):
        load(path)
    records, fmt, _, _ = load(path, columns={"prompt": "question", "completion": "answer"})
    assert (fmt, records) == ("prompt_completion", [{"messages": CONVERSATION}])
    # The same mapping works for other formats and for a forced format.
    records, fmt, _, _ = load(path, format="alpaca", columns={"instruction": "question", "output": "answer"})
    assert (fmt, records) == ("alpaca", [{"messages": CONVERSATION}])
    body = write_jsonl(tmp_path / "b.jsonl", [{"body": "the sky is blue"}])
    assert load(body, columns={"text": "body"})[:2] == ([{"text": "the sky is blue"}], "text")


def test_system_prompt_is_added_where_missing(tmp_path):
    rows = [SAMPLES["alpaca"], {**SAMPLES["alpaca"], "system": "own"}]
    records, _, _, _ = load(write_jsonl(tmp_path / "d.jsonl", rows), system_prompt="default")
    assert [r["messages"][0] for r in records] == [{"role": "system", "content": "default"},
                                                   {"role": "system", "content": "own"}]


# --- file types ------------------------------------------------------------------------------

ROWS = [
    {"instruction": "say a, b", "input": "", "output": "a, b"},  # a comma inside a CSV field
    {"instruction": "what color is the sky", "input": "look up", "output": "blue"},
]
EXPECTED = [
    {"messages": [{"role": "user", "content": "say a, b"}, {"role": "assistant", "content": "a, b"}]},
    {"messages": [{"role": "user", "content": "what color is the sky\n\nlook up"},
                  {"role": "assistant", "content": "blue"}]},
]


def _write(path: Path) -> Path:
    kind = path.name.split(".", 1)[1]
    if kind == "jsonl":
        write_jsonl(path, ROWS)
    elif kind == "json":
        path.write_text(json.dumps(ROWS, indent=2))
    elif kind == "wrapped.json":
        path.write_text(json.dumps({"data": ROWS, "version": 1}))
    elif kind == "lines.json":  # JSON Lines under a .json name
        write_jsonl(path, ROWS)
    elif kind in ("csv", "tsv"):
        with path.open("w", newline="") as fh:
            w = csv.DictWriter(fh, fieldnames=list(ROWS[0]), delimiter="\t" if kind == "tsv" else ",")
            w.writeheader()
            w.writerows(ROWS)
    elif kind == "parquet":
        import pyarrow as pa
        import pyarrow.parquet as pq

        pq.write_table(pa.Table.from_pylist(ROWS), path)
    return path


@pytest.mark.parametrize("name", ["d.jsonl", "d.json", "d.wrapped.json", "d.lines.json",
                                  "d.csv", "d.tsv", "d.parquet"])
def test_every_file_type_loads_the_same_records(tmp_path, name):
    path = _write(tmp_path / name)
    records, fmt, n_read, _ = load(path)
    assert (fmt, n_read) == ("alpaca", 2)
    assert records == EXPECTED


def test_parquet_with_nested_messages_and_missing_values(tmp_path):
    import pandas as pd

    # pandas writes a missing cell as NaN/None; optional fields must treat it as empty.
    df = pd.DataFrame({"instruction": ["a", "b"], "input": [None, "x"], "output": ["c", "d"]})
    df.to_parquet(tmp_path / "a.parquet")
    records, _, _, _ = load(tmp_path / "a.parquet")
    assert [r["messages"][0]["content"] for r in records] == ["a", "b\n\nx"]

    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.Table.from_pylist([SAMPLES["chat"]]), tmp_path / "c.parquet")
    assert load(tmp_path / "c.parquet")[:2] == ([{"messages": CONVERSATION}], "chat")


def test_multiple_train_files_are_concatenated(tmp_path):
    a = write_jsonl(tmp_path / "a.jsonl", [SAMPLES["alpaca"]])
    b = _write(tmp_path / "b.csv")
    records, fmt, n_read, _ = load_records(DataConfig(train=[str(a), str(b)]))
    assert (fmt, n_read, len(records)) == ("alpaca", 3, 3)


def test_missing_file_and_unknown_source(tmp_path):
    with pytest.raises(DataError, match="data file not found"):
        load(tmp_path / "nope.jsonl")
    with pytest.raises(DataError, match="neither an existing file"):
        load_records(DataConfig(train="no-such-thing"))
    (tmp_path / "d.txt").write_text("hello")
    with pytest.raises(DataError, match="unsupported file type '.txt'"):
        load(tmp_path / "d.txt")


# --- bad rows --------------------------------------------------------------------------------

GOOD = {"instruction": "what is the capital of france", "input": "", "output": "paris"}


def test_malformed_json_line_names_file_and_line(tmp_path, tok):
    path = write_jsonl(tmp_path / "bad.jsonl", [GOOD, '{"instruction": "x", "output": ', GOOD])
    with pytest.raises(DataError) as err:
        build_data(DataConfig(train=str(path)), tok, seed=0, packing=False)
    assert f"{path} line 2: not a valid JSON object" in str(err.value)
    # A JSON value that is not an object is as unreadable as a syntax error.
    path = write_jsonl(tmp_path / "list.jsonl", [GOOD, "[1, 2]"])
    with pytest.raises(DataError, match=r"line 2: .*expected a JSON object, got list"):
        build_data(DataConfig(train=str(path)), tok, seed=0, packing=False)


def test_missing_field_names_file_row_field_and_expectation(tmp_path, tok):
    path = write_jsonl(tmp_path / "d.jsonl", [GOOD, GOOD, {"instruction": "no answer", "input": ""}])
    with pytest.raises(DataError) as err:
        build_data(DataConfig(train=str(path)), tok, seed=0, packing=False)
    msg = str(err.value)
    assert msg.startswith(f"{path} row 3: field 'output': expected a non-empty string")
    assert "format 'alpaca'" in msg and "skip_invalid" in msg


def test_wrong_value_types_name_the_nested_field(tmp_path):
    row = {"messages": [{"role": "user", "content": "hi"}, {"role": "robot", "content": "x"}]}
    expected = r"row 1: field 'messages\[1\]\.role': expected one of system/user/assistant, got 'robot'"
    with pytest.raises(DataError, match=expected):
        load(write_jsonl(tmp_path / "c.jsonl", [row]))
    row = {"messages": [{"role": "user", "content": "hi"}]}
    with pytest.raises(DataError, match="at least one assistant message"):
        load(write_jsonl(tmp_path / "c.jsonl", [row]))
    with pytest.raises(DataError, match=r"field 'output': expected a string, got \['a'\]"):
        load(write_jsonl(tmp_path / "a.jsonl", [{"instruction": "q", "output": ["a"]}]))
    # A remapped column is reported under the user's own name for it.
    with pytest.raises(DataError, match="field 'answer': expected a non-empty string, got '  '"):
        load(write_jsonl(tmp_path / "p.jsonl", [{"q": "x", "answer": "  "}]),
             columns={"prompt": "q", "completion": "answer"})


def test_csv_rows_are_numbered_from_the_first_data_row(tmp_path):
    path = tmp_path / "d.csv"
    path.write_text("instruction,output\na,b\nc,\n")
    with pytest.raises(DataError, match=r"d\.csv row 2: field 'output'"):
        load(path)


def test_skip_invalid_skips_and_counts(tmp_path, tok):
    rows = [GOOD, "{not json", {"instruction": "no answer"}, GOOD, {"instruction": "", "output": "x"}]
    path = write_jsonl(tmp_path / "d.jsonl", rows)
    bundle = build_data(DataConfig(train=str(path), skip_invalid=True, shuffle=False), tok,
                        seed=0, packing=False)
    assert bundle.stats.rows_skipped == 3
    assert bundle.stats.rows_read == 4  # readable rows; the broken line never becomes one
    assert bundle.stats.train_examples == 2
    assert bundle.stats.format == "alpaca"


def test_format_is_detected_even_when_the_first_row_is_invalid(tmp_path, tok):
    path = write_jsonl(tmp_path / "d.jsonl", [{"instruction": "no answer"}, GOOD])
    with pytest.raises(DataError, match="row 1: field 'output'"):
        build_data(DataConfig(train=str(path)), tok, seed=0, packing=False)
    bundle = build_data(DataConfig(train=str(path), skip_invalid=True), tok, seed=0, packing=False)
    assert (bundle.stats.format, bundle.stats.rows_skipped, bundle.stats.train_examples) == ("alpaca", 1, 1)


def test_nothing_left_after_skipping_is_an_error(tmp_path, tok):
    path = write_jsonl(tmp_path / "d.jsonl", [{"instruction": "a"}, {"instruction": "b", "output": ""}])
    with pytest.raises(DataError, match="no usable rows left .* after skipping 2 invalid rows"):
        build_data(DataConfig(train=str(path), skip_invalid=True), tok, seed=0, packing=False)
    path = write_jsonl(tmp_path / "e.jsonl", ["{oops", "[]"])
    with pytest.raises(DataError, match=r"no rows found in .*e\.jsonl \(2 unreadable rows skipped\)"):
        build_data(DataConfig(train=str(path), skip_invalid=True), tok, seed=0, packing=False)
    (tmp_path / "empty.jsonl").write_text("\n\n")
    with pytest.raises(DataError, match="no rows found"):
        build_data(DataConfig(train=str(tmp_path / "empty.jsonl")), tok, seed=0, packing=False)


def test_unrecognizable_columns_list_what_was_found_and_expected(tmp_path, tok):
    path = write_jsonl(tmp_path / "d.jsonl", [{"question": "q", "reply": "r"}])
    with pytest.raises(DataError) as err:
        build_data(DataConfig(train=str(path)), tok, seed=0, packing=False)
    msg = str(err.value)
    assert "columns ['question', 'reply']" in msg
    assert "alpaca: instruction, output" in msg and "text: text" in msg
    assert "data.columns" in msg


def test_all_examples_too_long_to_keep(tmp_path, tok):
    path = write_jsonl(tmp_path / "d.jsonl", [GOOD] * 3)
    cfg = DataConfig(train=str(path), max_length=10, truncation="drop")
    with pytest.raises(DataError, match=r"no training examples left: 3 dropped .*max_length=10"):
        build_data(cfg, tok, seed=0, packing=False)


def test_build_data_end_to_end(tmp_path, tok):
    path = write_jsonl(tmp_path / "d.jsonl", [GOOD, SAMPLES["alpaca"]] * 5)
    cfg = DataConfig(train=str(path), max_length=64, split={"validation_ratio": 0.2})
    bundle = build_data(cfg, tok, seed=0, packing=True)
    s = bundle.stats
    assert (s.rows_read, s.train_examples, s.val_examples, s.truncated, s.dropped) == (10, 8, 2, 0, 0)
    assert s.used_fallback_template
    assert s.train_rows == len(bundle.train) < s.train_examples  # packing merged examples
    assert all(len(r["input_ids"]) <= 64 for r in bundle.train + bundle.val)
    # Packing hides each example's first label, which was never predicted anyway.
    assert s.train_loss_tokens >= sum(1 for r in bundle.train for x in r["labels"] if x != -100)


def test_sharegpt_turn_errors_name_the_turn(tmp_path):
    row = {"conversations": [{"from": "human", "value": "hi"}, {"speaker": "gpt", "text": "x"}]}
    with pytest.raises(DataError, match=r"field 'conversations\[1\]': expected an object with 'from' and 'value'"):
        load(write_jsonl(tmp_path / "s.jsonl", [row]))
    row = {"conversations": [{"from": "human", "value": "hi"}, {"from": "gpt", "value": 3}]}
    with pytest.raises(DataError, match=r"field 'conversations\[1\]\.value': expected a string, got 3"):
        load(write_jsonl(tmp_path / "s.jsonl", [row]))
