"""`data inspect`: the numbers it reports, checked against ones computed here by hand."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tunesmith.data.inspect import inspect_data, render_report
from tunesmith.errors import DataError

END = "<|im_end|>\n"  # the ChatML fallback's turn closing, learned with each answer

ROWS = [
    {"instruction": "what is the capital of france", "input": "", "output": "paris"},
    {"instruction": "what is the capital of france", "input": "", "output": "paris"},  # duplicate
    {"instruction": "what color is the sky", "input": "look up", "output": "blue"},
    {"instruction": "is this movie good", "input": "", "output": "positive review"},
    {"instruction": "is this movie good", "input": "", "output": "positive review"},  # duplicate
    {"instruction": "is this movie bad", "input": "", "output": ""},  # invalid: empty output
    {"instruction": "what is one and one", "output": "two"},  # no input column at all
]


@pytest.fixture
def data_file(tmp_path) -> Path:
    lines = [json.dumps(r) for r in ROWS]
    lines.insert(3, '{"instruction": "broken')  # line 4 is unreadable
    path = tmp_path / "d.jsonl"
    path.write_text("\n".join(lines) + "\n")
    return path


def percentile(values: list[int], q: float) -> float:
    """Linear interpolation between closest ranks (numpy's default), written out."""
    s = sorted(values)
    k = (len(s) - 1) * q / 100
    lo = int(k)
    hi = min(lo + 1, len(s) - 1)
    return s[lo] + (s[hi] - s[lo]) * (k - lo)


def test_counts_duplicates_and_invalid_rows(data_file):
    r = inspect_data(str(data_file))
    assert (r["source"], r["format"], r["detected"]) == (str(data_file), "alpaca", True)
    assert r["rows"] == 8  # 7 readable + 1 broken line
    assert (r["valid"], r["invalid"]) == (6, 2)
    assert r["duplicates"] == 2
    assert r["errors"][0].startswith(f"{data_file} line 4: not a valid JSON object: ")
    assert r["errors"][1].startswith(f"{data_file} row 7: field 'output': expected a non-empty string")
    assert r["turns"] is None and r["tokens"] is None


def test_field_stats(data_file):
    fields = inspect_data(str(data_file))["fields"]
    assert list(fields) == ["instruction", "input", "output"]
    instr = [len(r["instruction"]) for r in ROWS]
    assert fields["instruction"] == {"non_empty": 7, "empty": 0, "mean_chars": sum(instr) / 7,
                                     "max_chars": max(instr)}
    # Empty strings and a missing column both count as empty.
    assert fields["input"] == {"non_empty": 1, "empty": 6, "mean_chars": 7.0, "max_chars": 7}
    outs = [len(r["output"]) for r in ROWS if r["output"]]
    assert fields["output"] == {"non_empty": 6, "empty": 1, "mean_chars": sum(outs) / 6,
                                "max_chars": len("positive review")}


def test_token_stats_match_an_independent_count(data_file, tiny_model_dir):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    valid = [r for r in ROWS if r["output"]]

    def render(r: dict) -> str:
        user = r["instruction"] + (f"\n\n{r['input']}" if r.get("input") else "")
        return f"<|im_start|>user\n{user}{END}<|im_start|>assistant\n{r['output']}{END}"

    def n_tokens(text: str) -> int:
        return len(tok(text, add_special_tokens=False)["input_ids"])

    lengths = [n_tokens(render(r)) for r in valid]
    loss = [n_tokens(r["output"] + END) for r in valid]
    limit = sorted(lengths)[2]
    over = sum(n > limit for n in lengths)
    assert 0 < over < len(lengths)  # the share is neither trivially 0 nor 1

    t = inspect_data(str(data_file), model=str(tiny_model_dir), max_length=limit)["tokens"]
    assert t["p50"] == pytest.approx(percentile(lengths, 50))
    assert t["p95"] == pytest.approx(percentile(lengths, 95))
    assert t["max"] == max(lengths)
    assert t["loss_p50"] == pytest.approx(percentile(loss, 50))
    assert t["max_length"] == limit
    assert t["over_max_length"] == over
    assert t["over_max_length_share"] == pytest.approx(over / 6)
    assert t["no_loss_tokens"] == 0
    assert t["fallback_template"] is True


def test_chat_turns_and_column_mapping(tmp_path):
    def conv(n_exchanges: int, system: bool = False) -> dict:
        msgs = [{"role": "system", "content": "be brief"}] if system else []
        for i in range(n_exchanges):
            msgs += [{"role": "user", "content": f"q{i}"}, {"role": "assistant", "content": f"a{i}"}]
        return {"dialog": msgs}

    path = tmp_path / "c.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in [conv(1), conv(2, system=True), conv(3)]))
    with pytest.raises(DataError, match="cannot detect"):
        inspect_data(str(path))
    r = inspect_data(str(path), columns={"messages": "dialog"})
    assert (r["format"], r["valid"], r["invalid"], r["duplicates"]) == ("chat", 3, 0, 0)
    assert r["turns"] == {"mean": 4.0, "min": 2, "max": 6}  # the system turn does not count
    assert r["fields"]["dialog"]["non_empty"] == 3


def test_forced_format_that_does_not_fit_reports_instead_of_failing(data_file):
    r = inspect_data(str(data_file), format="text")
    assert (r["format"], r["detected"], r["valid"], r["invalid"]) == ("text", False, 0, 8)
    assert len(r["errors"]) == 5  # only the first few are kept
    with pytest.raises(DataError, match="unknown data format 'yaml'"):
        inspect_data(str(data_file), format="yaml")


def test_empty_values_in_csv(tmp_path):
    path = tmp_path / "d.csv"
    path.write_text("prompt,completion,note\nhello,world,\n  ,x,n\n")
    r = inspect_data(str(path))
    assert (r["format"], r["rows"], r["valid"], r["invalid"]) == ("prompt_completion", 2, 1, 1)
    assert r["fields"]["prompt"]["empty"] == 1  # whitespace only is empty
    assert r["fields"]["note"] == {"non_empty": 1, "empty": 1, "mean_chars": 1.0, "max_chars": 1}


def test_empty_or_missing_file(tmp_path):
    (tmp_path / "e.jsonl").write_text("")
    with pytest.raises(DataError, match="no rows found"):
        inspect_data(str(tmp_path / "e.jsonl"))
    with pytest.raises(DataError, match="data file not found"):
        inspect_data(str(tmp_path / "missing.jsonl"))


@pytest.mark.parametrize("rows, fmt", [
    ([{"prompt": "what is the capital of france", "chosen": "paris", "rejected": "rome is the capital"}],
     "preference"),
    ([{"prompt": "what is the capital of france", "completion": "paris", "label": True}], "unpaired_preference"),
    ([{"prompt": "what is the capital of france"}], "prompt"),
])
def test_token_stats_of_preference_and_prompt_data(tmp_path, tiny_model_dir, rows, fmt):
    """Preference rows count the prompt with the longer answer, unpaired ones prompt + completion, online-RL
    prompts alone (the inspect report crashed on all three with --model)."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    path = tmp_path / "rows.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    answer = {"preference": "rome is the capital", "unpaired_preference": "paris", "prompt": None}[fmt]
    text = f"<|im_start|>user\nwhat is the capital of france{END}" + (
        f"<|im_start|>assistant\n{answer}{END}" if answer else "")
    report = inspect_data(str(path), model=str(tiny_model_dir), max_length=512, format=fmt)
    assert report["tokens"]["max"] == len(tok(text, add_special_tokens=False)["input_ids"])


def test_render_report_prints_every_section(data_file, tiny_model_dir):
    from rich.console import Console

    console = Console(record=True, width=200)
    render_report(inspect_data(str(data_file), model=str(tiny_model_dir), max_length=20), console)
    text = console.export_text()
    for expected in ("alpaca (detected)", "exact duplicates", "first 2 of 2 invalid rows",
                     "line 4", "instruction", "p50 / p95 / max", "longer than 20"):
        assert expected in text


def test_cli_data_inspect(data_file, tiny_model_dir):
    from typer.testing import CliRunner

    from tunesmith.cli import app

    runner = CliRunner()
    result = runner.invoke(app, ["data", "inspect", str(data_file), "--model", str(tiny_model_dir)])
    assert result.exit_code == 0, result.output
    assert "alpaca" in result.output
    assert "p50 / p95 / max" in result.output
    result = runner.invoke(app, ["data", "inspect", str(data_file.with_name("nope.jsonl"))])
    assert result.exit_code == 2
    assert "data file not found" in result.output
