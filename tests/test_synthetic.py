"""`tunesmith data generate`: Self-Instruct data from a teacher, here a canned OpenAI-compatible stand-in
served over HTTP and called with the real `openai` client."""

from __future__ import annotations

import asyncio
import json
import random
import sys

import pytest

pytest.importorskip("openai")
pytest.importorskip("rouge_score")
fastapi = pytest.importorskip("fastapi")
uvicorn = pytest.importorskip("uvicorn")

from typer.testing import CliRunner  # noqa: E402

from conftest import UvicornThread, free_port  # noqa: E402
from tunesmith.cli import app as cli_app  # noqa: E402
from tunesmith.data.formats import detect_format, normalize_rows  # noqa: E402
from tunesmith.data.sources import columns_of, read_rows  # noqa: E402
from tunesmith.data.synthetic import (  # noqa: E402
    Example,
    SimilarityFilter,
    Task,
    build_prompt,
    generate_instructions,
    instruction_problem,
    parse_answer,
    sample_examples,
)
from tunesmith.errors import ConfigError, DataError, TunesmithError  # noqa: E402

runner = CliRunner()

SEEDS = [
    {"id": "seed_task_0", "name": "health_tips", "instruction": "Give three tips for staying healthy.",
     "instances": [{"input": "", "output": "Eat vegetables, sleep eight hours and walk every day."}],
     "is_classification": False},
    {"id": "seed_task_1", "name": "translate_french", "instruction": "Translate the sentence into French.",
     "instances": [{"input": "I like apples.", "output": "J'aime les pommes."}], "is_classification": False},
    {"id": "seed_task_2", "name": "review_sentiment",
     "instruction": "Classify the sentiment of the review as positive or negative.",
     "instances": [{"input": "The battery died in an hour.", "output": "negative"}], "is_classification": True},
    # Alpaca's shape is accepted too.
    {"instruction": "Summarize the paragraph in one sentence.",
     "input": "Bees visit flowers to collect nectar, and carry pollen from one flower to the next.",
     "output": "Bees pollinate flowers while gathering nectar."},
]

GOOD = "Task 4\nInstruction: Name the largest planet in the solar system.\nInput: <noinput>\nOutput: Jupiter."
NEAR_SEED = "Instruction: Give three tips for staying healthy and happy.\nInput:\nOutput: Sleep, eat well, exercise."
BLACKLISTED = "Instruction: Draw a picture of a cat using only words.\nInput: <noinput>\nOutput: A small cat."
TOO_SHORT = "Instruction: Say hi.\nOutput: Hi!"
MALFORMED = "I am sorry, I cannot think of a new task right now."
CONVERT = ("Instruction: Convert the temperature from Celsius to Fahrenheit.\nInput: 25 degrees Celsius\n"
           "Output: 77 degrees Fahrenheit.")
EMPTY_OUTPUT = "Instruction: Explain why the sky appears blue during the day.\nInput: <noinput>\nOutput:"
HAIKU = ("Here is a new task.\n\n**Instruction:** Write a haiku about autumn leaves falling.\n**Input:** <noinput>\n"
         "**Output:** Crimson leaves drift down\nwhispering to the cold ground\nthe year lets them go")
DUPLICATE = GOOD
TWO_TASKS = ("Task 5\nInstruction: List two benefits of reading books daily.\nInput: <noinput>\n"
             "Output: It builds vocabulary and lowers stress.\n\nTask 6\n"
             "Instruction: Suggest a name for a friendly household robot.\nInput: <noinput>\nOutput: Bolt.\n\nTask 7")
SCRIPT = [GOOD, NEAR_SEED, BLACKLISTED, TOO_SHORT, MALFORMED, CONVERT, EMPTY_OUTPUT, HAIKU, DUPLICATE, TWO_TASKS]
# What SCRIPT yields with num=5: requests 0, 5, 7 and both tasks of 9 are kept.
SCRIPT_DROPS = {"similar": 1, "blacklisted": 1, "too_short": 1, "malformed": 1, "empty_output": 1, "duplicate": 1}
ALL_REASONS = ("request_error", "malformed", "truncated", "too_short", "too_long", "blacklisted", "write_a_program",
               "bad_start", "empty_output", "duplicate", "similar")


def drops(**counts) -> dict:
    return {reason: counts.get(reason, 0) for reason in ALL_REASONS}


def flat(text: str) -> str:
    return " ".join(text.split())


def teacher_app(script: list, delay: float = 0.0):
    """A minimal OpenAI-compatible teacher: the n-th chat request gets script[n] (a text, a (text,
    finish_reason) pair, or an HTTP status to fail with); past the script it has no ideas left."""
    app = fastapi.FastAPI()
    app.state.requests, app.state.model_lists = [], 0
    app.state.in_flight = app.state.peak = 0

    @app.get("/v1/models")
    def models():
        app.state.model_lists += 1
        return {"object": "list", "data": [{"id": "teacher", "object": "model", "created": 0, "owned_by": "test"}]}

    @app.post("/v1/chat/completions")
    async def chat(request: fastapi.Request):
        body = await request.json()
        n = len(app.state.requests)
        app.state.requests.append(body)
        app.state.in_flight += 1
        app.state.peak = max(app.state.peak, app.state.in_flight)
        await asyncio.sleep(delay)
        app.state.in_flight -= 1
        item = script[n] if n < len(script) else MALFORMED
        if isinstance(item, int):
            # x-should-retry: the openai client would otherwise retry a 5xx twice, with back-off.
            return fastapi.responses.JSONResponse({"error": {"message": "teacher trouble", "type": "server_error"}},
                                                  status_code=item, headers={"x-should-retry": "false"})
        text, finish = item if isinstance(item, tuple) else (item, "stop")
        return {"id": f"c{n}", "object": "chat.completion", "created": 0, "model": body["model"],
                "choices": [{"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": finish}],
                "usage": {"prompt_tokens": 1, "completion_tokens": 1, "total_tokens": 2}}

    return app


class Teacher:
    """The stand-in served by uvicorn on a free local port, in a thread."""

    def __init__(self, script: list, delay: float = 0.0):
        self.app = teacher_app(script, delay)
        self.running = UvicornThread(self.app, timeout=20)
        self.base_url = self.running.url + "/v1"

    @property
    def requests(self) -> list[dict]:
        return self.app.state.requests

    def stop(self):
        self.running.stop()


@pytest.fixture
def teacher():
    started = []

    def start(script=SCRIPT, delay=0.0):
        started.append(Teacher(script, delay))
        return started[-1]

    yield start
    for t in started:
        t.stop()


@pytest.fixture
def seeds(tmp_path):
    path = tmp_path / "seeds.jsonl"
    path.write_text("".join(json.dumps(s) + "\n" for s in SEEDS))
    return path


def generate(seeds, output, teacher, **kwargs):
    settings = {"model": "teacher", "num_instructions": 5, "concurrency": 1, **kwargs}
    return generate_instructions(seeds, output, base_url=teacher.base_url, **settings)


def read_jsonl(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


# ---------------------------------------------------------------- units


def test_parse_answer_reads_the_layouts_teachers_write():
    assert parse_answer(GOOD) == [Task("Name the largest planet in the solar system.", "", "Jupiter.")]
    assert parse_answer(HAIKU) == [Task("Write a haiku about autumn leaves falling.", "",
                                        "Crimson leaves drift down\nwhispering to the cold ground\nthe year lets them go")]
    # Numbered labels, "###" separators, an input kept verbatim, a trailing "Task 7" header dropped.
    numbered = "4. Instruction: Sort  the\nnumbers.\n4. Input: 3, 1, 2\n4. Output: 1, 2, 3\n###\n5. Instruction: Add them."
    assert parse_answer(numbered) == [Task("Sort the numbers.", "3, 1, 2", "1, 2, 3"),
                                      Task("Add them.", "", None)]
    assert [t.instruction for t in parse_answer(TWO_TASKS)] == ["List two benefits of reading books daily.",
                                                                "Suggest a name for a friendly household robot."]
    assert parse_answer(TWO_TASKS)[1].output == "Bolt."
    assert parse_answer(MALFORMED) == [] and parse_answer("") == []
    assert parse_answer(EMPTY_OUTPUT) == [Task("Explain why the sky appears blue during the day.", "", "")]
    assert parse_answer("Instruction: Name a color.\nInput: None")[0] == Task("Name a color.", "", None)


def test_rouge_l_filter_matches_hand_computed_values():
    pool = SimilarityFilter(["the cat sat on the mat"], threshold=0.7)
    # LCS "the cat on the mat" = 5 of 6 tokens each way: P = R = 5/6, F = 5/6.
    score, closest = pool.most_similar("the cat lay on the mat")
    assert score == pytest.approx(5 / 6) and closest == "the cat sat on the mat"
    assert pool.too_similar(score)
    # "a b c d" vs "a c e": LCS 2; P = 2/3, R = 2/4; F = 2PR / (P + R) = 4/7 < 0.7: kept.
    pool = SimilarityFilter(["a b c d"], threshold=0.7)
    score, _ = pool.most_similar("a c e")
    assert score == pytest.approx(4 / 7) and not pool.too_similar(score)
    # The paper keeps an instruction only *below* the threshold; punctuation and case do not count.
    assert pool.too_similar(0.7) and not pool.too_similar(0.6999)
    assert SimilarityFilter(["Sort the list."]).most_similar("sort THE list")[0] == pytest.approx(1.0)
    pool.add("the cat lay on the mat")
    assert pool.most_similar("the cat sat on the mat")[0] == pytest.approx(5 / 6)
    assert SimilarityFilter([]).most_similar("anything at all") == (0.0, None)


def test_instruction_filters():
    assert instruction_problem("Name the largest planet.") is None
    assert instruction_problem("Say hi there.") == "too_short"  # the repo drops 3 words or fewer
    assert instruction_problem("Say hi there now.") is None
    assert instruction_problem(" ".join(["word"] * 151)) == "too_long"
    assert instruction_problem(" ".join(["word"] * 150)) is None
    for text in ("Describe the picture of a dog.", "Open the FILE and count its lines.", "Go to the store and buy milk.",
                 "Compose music for a short film.", "Summarize the video in two sentences."):
        assert instruction_problem(text) == "blacklisted", text
    assert instruction_problem("Explain how mapping functions work.") is None  # whole words only
    assert instruction_problem("Write a program that adds two numbers.") == "write_a_program"
    assert instruction_problem('"Quote" the sentence back to me.') == "bad_start"
    assert instruction_problem("Érivez une phrase en français svp.") == "bad_start"


def test_prompt_shows_examples_and_asks_for_the_next_task():
    prompt = build_prompt([Task("Translate the sentence into French.", "I like apples.", "J'aime les pommes."),
                           Task("Give three tips for staying healthy.", "", "Eat, sleep, walk.")])
    assert "Task 1\nInstruction: Translate the sentence into French.\nInput: I like apples.\nOutput: J'aime" in prompt
    assert "Task 2\nInstruction: Give three tips for staying healthy.\nInput: <noinput>\n" in prompt
    assert prompt.endswith("\n\nTask 3\n")
    # The prompt's own layout parses back.
    assert parse_answer(prompt)[0] == Task("Translate the sentence into French.", "I like apples.", "J'aime les pommes.")


def test_examples_mix_seeds_and_generated_tasks():
    seeds = [Example(Task(f"seed {i}", "", "x"), f"s{i}") for i in range(10)]
    made = [Example(Task(f"made {i}", "", "x"), f"generated:{i}") for i in range(5)]
    assert len(sample_examples(random.Random(0), seeds, [], 3)) == 3
    picked = sample_examples(random.Random(0), seeds, made, 8)  # Self-Instruct: 6 human + 2 machine
    assert sum(e.ref.startswith("generated") for e in picked) == 2 and len({e.ref for e in picked}) == 8
    picked = sample_examples(random.Random(0), seeds, made, 3)
    assert sum(e.ref.startswith("generated") for e in picked) == 1
    assert len(sample_examples(random.Random(0), seeds[:2], [], 3)) == 2  # fewer seeds than asked


# ---------------------------------------------------------------- runs


def test_generate_counts_each_filter_and_writes_trainable_rows(teacher, seeds, tmp_path):
    t = teacher()
    out = tmp_path / "out" / "synthetic.jsonl"
    summary = generate(seeds, out, t, num_prompt_instructions=3, seed=7)
    assert summary["kept"] == summary["new"] == 5 and summary["complete"] and summary["written"]
    assert summary["requests"] == 10 and len(t.requests) == 10
    assert summary["dropped"] == drops(**SCRIPT_DROPS)
    assert summary["candidates"] == 10 and summary["unused"] == 0
    assert json.loads((tmp_path / "out" / "synthetic.jsonl.stats.json").read_text()) == summary
    assert not (tmp_path / "out" / "synthetic.jsonl.partial").exists()

    rows = read_jsonl(out)
    assert [r["instruction"] for r in rows] == [
        "Name the largest planet in the solar system.", "Convert the temperature from Celsius to Fahrenheit.",
        "Write a haiku about autumn leaves falling.", "List two benefits of reading books daily.",
        "Suggest a name for a friendly household robot."]
    assert rows[1]["input"] == "25 degrees Celsius" and rows[0]["input"] == "" and rows[0]["output"] == "Jupiter."
    p = rows[0]["provenance"]
    assert p["teacher"] == "teacher" and p["endpoint"] == t.base_url.split("/")[2] and p["request"] == 0
    assert p["method"] == "self-instruct" and len(p["examples"]) == 3 and p["created"]
    assert set(p["examples"]) <= {"seed_task_0", "seed_task_1", "seed_task_2", "seed row 4"}
    assert p["sampling"]["temperature"] == 0.7 and p["sampling"]["top_p"] == 0.5 and p["sampling"]["max_tokens"] == 512
    assert 0 <= p["rouge_l_max"] < 0.7 and p["most_similar"]
    assert [r["provenance"]["request"] for r in rows] == [0, 5, 7, 9, 9]
    # Later prompts show one generated task among the three examples.
    assert any(ref.startswith("generated:") for ref in rows[-1]["provenance"]["examples"])

    # What the teacher was sent: the few-shot prompt and the sampling settings.
    first = t.requests[0]
    assert first["model"] == "teacher" and first["temperature"] == 0.7 and first["top_p"] == 0.5
    assert first["max_tokens"] == 512 and first["messages"][0]["content"].endswith("Task 4\n")

    # tunesmith's own pipeline reads the file as Alpaca data; provenance is an extra column.
    data, skipped = read_rows(str(out))
    assert skipped == 0 and detect_format(columns_of(data)) == "alpaca"
    records, bad = normalize_rows(data, "alpaca", {}, skip_invalid=False)
    assert bad == 0 and records[1]["messages"][0]["content"] == (
        "Convert the temperature from Celsius to Fahrenheit.\n\n25 degrees Celsius")
    # ... and so does the loader `tunesmith train` uses.
    from tunesmith.config import DataConfig
    from tunesmith.data.pipeline import load_records

    records, fmt, read, skipped = load_records(DataConfig(train=str(out)))
    assert (fmt, read, skipped, len(records)) == ("alpaca", 5, 0, 5)

    # The same seed asks the same questions again.
    again = teacher()
    generate(seeds, out, again, num_prompt_instructions=3, seed=7, overwrite=True)
    assert again.requests == t.requests
    assert [r["instruction"] for r in read_jsonl(out)] == [r["instruction"] for r in rows]


def test_concurrent_requests_give_the_same_counts(teacher, seeds, tmp_path):
    t = teacher(delay=0.05)
    summary = generate(seeds, tmp_path / "out.jsonl", t, concurrency=4)
    assert t.app.state.peak > 1
    # Rounds of 4, 4, then the 2 still wanted. Within a round the stand-in hands out its script in
    # arrival order: if the two-task answer comes first, the duplicate arrives after the target is met.
    assert summary["kept"] == 5 and summary["requests"] == 10
    assert summary["dropped"]["duplicate"] + summary["unused"] == 1
    assert {**summary["dropped"], "duplicate": 1} == drops(**SCRIPT_DROPS)


def test_truncated_answers_and_failed_requests_are_counted(teacher, seeds, tmp_path):
    cut = (TWO_TASKS.rsplit("Bolt.", 1)[0], "length")  # the second task's output was cut off
    t = teacher([cut, 503, ("Instruction: Name a", "length"), CONVERT])
    summary = generate(seeds, tmp_path / "out.jsonl", t, num_instructions=2)
    assert summary["dropped"] == drops(truncated=2, request_error=1)
    assert [r["instruction"] for r in read_jsonl(tmp_path / "out.jsonl")] == [
        "List two benefits of reading books daily.", "Convert the temperature from Celsius to Fahrenheit."]


def test_max_requests_stops_a_teacher_that_yields_nothing(teacher, seeds, tmp_path):
    t = teacher([GOOD])  # then only malformed answers
    summary = generate(seeds, tmp_path / "out.jsonl", t, num_instructions=3, max_requests=4)
    assert summary["requests"] == 4 and summary["kept"] == 1 and not summary["complete"]
    assert summary["dropped"] == drops(malformed=3) and len(read_jsonl(tmp_path / "out.jsonl")) == 1
    # The default budget is 4 requests per instruction still wanted.
    t = teacher([])
    summary = generate(seeds, tmp_path / "out.jsonl", t, num_instructions=4, resume=True)
    assert summary["max_requests"] == 12 and summary["requests"] == 12 and summary["kept"] == 1


def test_resume_continues_a_finished_file_without_duplicates(teacher, seeds, tmp_path):
    out = tmp_path / "out.jsonl"
    generate(seeds, out, teacher(), num_instructions=3)
    first = read_jsonl(out)
    assert len(first) == 3
    # The teacher starts its script again: the tasks already kept now count as duplicates.
    summary = generate(seeds, out, teacher(), num_instructions=5, resume=True, max_requests=20)
    rows = read_jsonl(out)
    assert summary["resumed"] == 3 and summary["new"] == 2 and summary["kept"] == 5
    assert summary["dropped"]["duplicate"] == 4  # GOOD, CONVERT, HAIKU and DUPLICATE again
    assert rows[:3] == first
    assert len({r["instruction"] for r in rows}) == 5
    assert [r["provenance"]["request"] for r in rows] == [0, 5, 7, 17, 17]  # request numbers go on


def test_interrupted_run_keeps_its_rows_and_resumes(teacher, seeds, tmp_path):
    out = tmp_path / "out.jsonl"
    with pytest.raises(TunesmithError, match="refused a request for model 'teacher' with 400"):
        generate(seeds, out, teacher([GOOD, 400]), num_instructions=3)
    partial = tmp_path / "out.jsonl.partial"
    assert not out.exists() and len(read_jsonl(partial)) == 1
    stats = json.loads((tmp_path / "out.jsonl.stats.json").read_text())
    assert stats["written"] is False and stats["kept"] == 1
    with pytest.raises(ConfigError, match="interrupted run"):
        generate(seeds, out, teacher(), num_instructions=3)
    with partial.open("a") as fh:
        fh.write('{"instruction": "A row cut off mid-wri')  # killed while appending
    summary = generate(seeds, out, teacher([CONVERT, HAIKU]), num_instructions=3, resume=True)
    rows = read_jsonl(out)
    assert summary["resumed"] == 1 and summary["kept"] == 3 and not partial.exists()
    assert [r["provenance"]["request"] for r in rows] == [0, 1, 2]


def test_existing_output_is_refused_before_any_request(teacher, seeds, tmp_path):
    out = tmp_path / "out.jsonl"
    out.write_text("{}\n")
    t = teacher()
    with pytest.raises(ConfigError, match=f"output {out} exists"):
        generate(seeds, out, t)
    result = runner.invoke(cli_app, ["data", "generate", str(seeds), "--output", str(out), "--base-url", t.base_url,
                                     "--model", "teacher"])
    assert result.exit_code == 2 and "--overwrite" in flat(result.output)
    assert t.requests == [] and t.app.state.model_lists == 0
    with pytest.raises(ConfigError, match="choose one"):
        generate(seeds, out, t, overwrite=True, resume=True)


def test_seed_file_problems_name_the_file_and_row(tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps(SEEDS[0]) + "\n" + json.dumps({"name": "x", "instances": []}) + "\n")
    with pytest.raises(DataError, match=rf"{bad} row 2: field 'instruction'"):
        generate_instructions(bad, tmp_path / "o.jsonl", base_url="http://127.0.0.1:9/v1", model="m",
                              num_instructions=1)
    bad.write_text(json.dumps({"instruction": "Name a color please.", "instances": [{"input": ""}]}) + "\n")
    with pytest.raises(DataError, match=r"row 1: field 'instances\[0\].output'"):
        generate_instructions(bad, tmp_path / "o.jsonl", base_url="http://127.0.0.1:9/v1", model="m",
                              num_instructions=1)
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    with pytest.raises(DataError, match="no seed tasks"):
        generate_instructions(empty, tmp_path / "o.jsonl", base_url="http://127.0.0.1:9/v1", model="m",
                              num_instructions=1)
    result = runner.invoke(cli_app, ["data", "generate", str(tmp_path / "missing.jsonl"), "--output",
                                     str(tmp_path / "o.jsonl"), "--base-url", "http://127.0.0.1:9/v1", "--model", "m"])
    assert result.exit_code == 2 and "data file not found" in flat(result.output)
    assert not (tmp_path / "o.jsonl").exists()


def test_unreachable_teacher_is_a_clear_cli_error(seeds, tmp_path):
    url = f"http://127.0.0.1:{free_port()}/v1"
    result = runner.invoke(cli_app, ["data", "generate", str(seeds), "--output", str(tmp_path / "o.jsonl"),
                                     "--base-url", url, "--model", "teacher", "--num", "2"])
    assert result.exit_code == 2, result.output
    assert f"cannot reach the teacher at {url}" in flat(result.output)
    assert "Traceback" not in result.output and isinstance(result.exception, SystemExit)
    assert not (tmp_path / "o.jsonl").exists() and not (tmp_path / "o.jsonl.partial").exists()


def test_cli_generates_and_says_what_it_kept(teacher, seeds, tmp_path):
    t = teacher()
    out = tmp_path / "out.jsonl"
    result = runner.invoke(cli_app, ["data", "generate", str(seeds), "--output", str(out), "--base-url", t.base_url,
                                     "--model", "teacher", "--num", "3", "--concurrency", "1", "--max-requests", "2",
                                     "--temperature", "0.9", "--top-p", "0.8", "--max-tokens", "64",
                                     "--similarity-threshold", "0.6", "--seed", "1"])
    assert result.exit_code == 0, result.output
    text = flat(result.output)
    assert f"kept 1 of 3 in {out}" in text and "similar 1" in text and "--resume" in text
    assert t.requests[0]["temperature"] == 0.9 and t.requests[0]["top_p"] == 0.8 and t.requests[0]["max_tokens"] == 64
    stats = json.loads((tmp_path / "out.jsonl.stats.json").read_text())
    assert stats["settings"]["similarity_threshold"] == 0.6 and stats["max_requests"] == 2


def test_missing_rouge_score_names_the_extra(seeds, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "rouge_score", None)  # import fails as if not installed
    with pytest.raises(ConfigError, match=r"pip install 'tunesmith\[data\]'"):
        generate_instructions(seeds, tmp_path / "o.jsonl", base_url="http://127.0.0.1:9/v1", model="m",
                              num_instructions=1)


def test_public_api_exposes_generate_data():
    import tunesmith

    assert tunesmith.generate_data.__doc__ and "generate_instructions" in tunesmith.generate_data.__doc__
