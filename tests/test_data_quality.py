"""`tunesmith data inspect` quality checks: every flag counted exactly on files built to hold each
problem a known number of times, the cleaned copy and its card, the HTML report, leakage."""

import json

import pytest
import yaml

from tunesmith.data.inspect import inspect_data
from tunesmith.data.quality import _length_outliers, normalized

pytest.importorskip("datasketch")
pytest.importorskip("py3langid")

from conftest import write_jsonl  # noqa: E402

TOPICS = ["rivers", "bread", "chess", "owls", "trains", "glass", "maps", "salt", "kites", "coral", "tea", "snow"]


def _answer(topic: str, k: int) -> str:
    return (f"{topic} are a common subject of study and people write about {topic} for many reasons "
            f"including history culture science and simple curiosity number {k}")


def _chat(user: str, *answers: str, last_user: str | None = None) -> dict:
    msgs = [{"role": "user", "content": user}] + [{"role": "assistant", "content": a} for a in answers]
    if last_user:
        msgs.append({"role": "user", "content": last_user})
    return {"messages": msgs}


@pytest.fixture
def messy(tmp_path):
    rows = [_chat(f"tell me about {t}", _answer(t, i)) for i, t in enumerate(TOPICS)]  # rows 1-12 clean
    rows.append(_chat("Tell me about RIVERS!", _answer("rivers", 0)))  # 13: exact repeat of 1 after normalizing
    near = _answer("bread", 1).replace("history", "heritage")  # one word of 22 changed
    rows.append(_chat("tell me about bread", near))  # 14: near repeat of 2
    rows.append(_chat("please repeat this sentence back to me", "please repeat this sentence back to me"))  # 15
    rows.append(_chat("two answers in a row", "first answer here", "second answer here"))  # 16: structure
    rows.append(_chat("no final answer", "an answer", last_user="and then the user spoke last"))  # 17
    rows.append(_chat("tell me about whales " * 200, "whales are large " * 300))  # 18: very long
    rows.append(_chat("parle-moi des rivières", "les rivières sont des cours d'eau naturels qui coulent vers la mer"))
    rows.append({"messages": "not a list"})  # 20: invalid
    return write_jsonl(tmp_path / "messy.jsonl", rows)


def test_every_quality_flag_counts_exactly_what_the_file_holds(messy, tmp_path):
    val = write_jsonl(tmp_path / "val.jsonl", [
        _chat("tell me about chess", _answer("chess", 2)),  # exact leak of row 3
        _chat("tell me about owls", _answer("owls", 3).replace("curiosity", "wonder")),  # near leak of row 4
        _chat("something new entirely", "an answer no training row has anywhere at all"),
    ])
    report = inspect_data(str(messy), against=str(val))
    flags = {name if name.startswith("length") else name.split(" (")[0].split(" in ")[0]: f
             for name, f in report["quality"]["flags"].items()}
    assert report["valid"] == 19 and report["invalid"] == 1
    assert flags["exact duplicate"]["count"] == 1 and flags["exact duplicate"]["examples"] == [f"{messy} row 13"]
    assert flags["near duplicate"]["count"] == 1 and f"{messy} row 14 ~ {messy} row 2" in flags["near duplicate"]["note"]
    assert flags["answer repeats the prompt"]["count"] == 1
    assert flags["chat structure"]["count"] == 2
    assert flags["length outlier (long)"]["examples"] == [f"{messy} row 18"]
    # the short ones: rows 15-17 (a few words each) sit far below the 170-character rows on a log scale
    assert [e.rsplit(" ", 1)[1] for e in flags["length outlier (short)"]["examples"]] == ["15", "16", "17"]
    assert flags["leak: exact"]["count"] == 1 and flags["leak: near"]["count"] == 1
    assert "1 of 3 rows" in flags["leak: exact"]["note"]
    langs = report["quality"]["languages"]["shares"]
    assert set(langs) == {"en", "fr"} and langs["fr"] == pytest.approx(1 / 19)  # every valid row has words enough to tell


def test_write_clean_drops_what_it_says_and_writes_a_card(messy, tmp_path):
    out = tmp_path / "clean"
    report = inspect_data(str(messy), write_clean=out)
    c = report["clean"]
    # invalid 1, exact 1, near 1, echo 1, structure 2: 20 - 6 = 14 kept (the long and the French rows stay)
    assert c["kept"] == 14 and c["invalid"] == 1
    kept = [json.loads(line) for line in (out / "data.jsonl").read_text().splitlines()]
    assert len(kept) == 14 and kept[0] == json.loads(messy.read_text().splitlines()[0])
    card = (out / "README.md").read_text()
    front = yaml.safe_load(card.split("---")[1])
    assert front["size_categories"] == ["n<1K"] and "en" in front["language"]
    assert front["configs"][0]["data_files"] == "data.jsonl"
    assert "| chat structure | 2 |" in card and "length outlier (long): 1 rows" in card
    again = inspect_data(str(out / "data.jsonl"))
    assert all(f["count"] == 0 for n, f in again["quality"]["flags"].items() if not n.startswith("length"))
    with pytest.raises(Exception, match="--write-clean: .* already exists"):
        inspect_data(str(messy), write_clean=out)


def test_labels_single_class_and_html_report(tmp_path):
    pytest.importorskip("plotly")
    rows = [{"text": f"review number {i} of a film", "label": "pos" if i % 4 else "neg"} for i in range(40)]
    report = inspect_data(str(write_jsonl(tmp_path / "l.jsonl", rows)), html=tmp_path / "r.html")
    assert report["quality"]["label_balance"] == {"classes": 2, "largest_over_smallest": 3.0}
    page = (tmp_path / "r.html").read_text()
    assert "characters per example" in page and "labels: rows per class" in page and "plotly" in page.lower()
    one = inspect_data(str(write_jsonl(tmp_path / "one.jsonl", [{"text": f"t {i}", "label": "a"} for i in range(5)])))
    assert one["quality"]["flags"]["single class"]["count"] == 5


def test_length_fences_and_normalizing_by_hand():
    lengths = [100] * 20 + [10_000]
    long, short, fence = _length_outliers(lengths)
    assert long == [20] and short == [] and fence == (100, 100)  # IQR 0: anything else is far out
    assert normalized("Hello,  WORLD! it's") == "hello world it s"


def test_cli_inspect_quality_options_and_refusals(messy, tmp_path):
    from typer.testing import CliRunner

    from tunesmith.cli import app

    runner = CliRunner()
    tsv = tmp_path / "t.tsv"
    tsv.write_text("label\tsentence\n" + "".join(f"{i % 2}\tsentence number {i} here\n" for i in range(12)))
    result = runner.invoke(app, ["data", "inspect", str(tsv), "--column", "text=sentence", "--write-clean",
                                 str(tmp_path / "c"), "--html", str(tmp_path / "r.html")])
    assert result.exit_code == 0, result.output
    assert "quality" in result.output and "cleaned copy: 12 rows kept" in result.output
    assert (tmp_path / "c" / "README.md").is_file() and (tmp_path / "r.html").is_file()
    for args, words in ((["--column", "text"], "--column: 'text' is not FIELD=COLUMN"),
                        (["--html", str(tmp_path / "r.html")], "--html: ")):
        bad = runner.invoke(app, ["data", "inspect", str(messy), *args])
        assert bad.exit_code == 2 and words in bad.output and "Traceback" not in bad.output, bad.output
