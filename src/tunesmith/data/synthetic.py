"""`tunesmith data generate`: Self-Instruct style synthetic instruction data.

After Wang et al. 2022, "Self-Instruct: Aligning Language Models with Self-Generated Instructions",
in the single-step form Stanford Alpaca used: each request shows a teacher model a few example
tasks (instruction, input, output) drawn from human-written seeds and from tasks it already wrote,
and asks for a new one. A new task is kept only if it passes the paper's filters, above all a
ROUGE-L F below 0.7 against every instruction kept so far (seeds included), which is what keeps
the pool diverse.

The teacher is any OpenAI-compatible endpoint (OpenAI, vLLM, llama.cpp, Ollama, `tunesmith serve`).
Kept rows are appended to `<output>.partial` as they come, so a killed run keeps its work and
`resume` continues it; the finished file replaces `<output>` in one rename.
"""

from __future__ import annotations

import json
import os
import random
import re
import string
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from ..errors import ConfigError, DataError, TunesmithError
from .sources import read_rows

# The paper's filters (and its repo's post-processing). Alpaca added the last five keywords.
MIN_WORDS = 4  # the repo drops instructions of 3 words or fewer
MAX_WORDS = 150
BLACKLIST = ("image", "images", "graph", "graphs", "picture", "pictures", "file", "files", "map", "maps",
             "draw", "plot", "go to", "video", "audio", "music", "flowchart", "diagram")
_BLACKLIST_RE = re.compile(r"\b(" + "|".join(re.escape(w) for w in BLACKLIST) + r")\b", re.IGNORECASE)

# Every reason a candidate can be dropped, in the order they are checked; all appear in the summary.
REASONS = ("request_error", "malformed", "truncated", "too_short", "too_long", "blacklisted", "write_a_program",
           "bad_start", "empty_output", "duplicate", "similar")

NO_INPUT = "<noinput>"
_EMPTY_INPUTS = {"", NO_INPUT, "<no input>", "none", "n/a", "-", "(none)", "no input"}

# A label at the start of a line, tolerating what chat models wrap it in: "1. Instruction:",
# "**Instruction:**", "### Input:", "Output 4:", "Instructions:".
_LABEL_RE = re.compile(r"^[ \t>#*_\d.)-]*(instruction|input|output)s?[ \t]*(?:\d+[ \t]*)?[*_]*[ \t]*:[*_]*[ \t]*",
                       re.IGNORECASE | re.MULTILINE)
# Lines that separate tasks rather than belong to one: "Task 5", "**Task 5:**", "###", "---".
_SEPARATOR_RE = re.compile(r"^[ \t#*_=-]*(?:(?:task|example)[ \t]*\d*[ \t]*[:.)]?)?[ \t#*_=-]*$", re.IGNORECASE)

PROMPT_HEAD = (
    "You are helping to build a varied collection of tasks for training an AI assistant. Below are "
    "example tasks. Each has an instruction, an input (<noinput> when the instruction needs none) and the "
    "output a good assistant would give.\n\n"
    "Write one new task that differs from the examples in topic and in kind (open questions, rewriting, "
    "classification, brainstorming, extraction, reasoning, ...). The instruction is one or two sentences of "
    "English that a language model can carry out with text alone: nothing that needs images, audio, files, "
    "the internet or acting in the world. Give an input only when the instruction needs one, and keep the "
    "output under 100 words. Use exactly the layout of the examples.\n"
)


@dataclass
class Task:
    instruction: str
    input: str
    output: str | None  # None: the answer had no "Output:" label at all


@dataclass
class Example:
    """A task that can be shown in prompts, with a reference for provenance."""
    task: Task
    ref: str


@dataclass
class Answer:
    text: str = ""
    finish_reason: str | None = None
    error: str | None = None  # a failed request that is worth going on after (timeout, 5xx, 429)


# ---------------------------------------------------------------- seeds and prompts


def load_seeds(seed_file: str | Path) -> list[Example]:
    """Seed tasks in Self-Instruct's shape (instruction + instances) or Alpaca's (instruction/input/output)."""
    rows, _ = read_rows(str(seed_file))
    if not rows:
        raise DataError(f"{seed_file}: no seed tasks (the file is empty)")
    return [Example(_seed_task(row.data, row.where), str(row.data.get("id") or f"seed row {row.index}"))
            for row in rows]


def _seed_task(data: dict, where: str) -> Task:
    instruction = data.get("instruction")
    if not isinstance(instruction, str) or not instruction.strip():
        raise DataError(f"{where}: field 'instruction': expected a non-empty string (every seed task needs one)")
    instances = data.get("instances")
    if instances is not None:
        if not isinstance(instances, list) or not instances or not isinstance(instances[0], dict):
            raise DataError(f"{where}: field 'instances': expected a non-empty list of {{input, output}} objects")
        example = instances[0]  # as Alpaca did: the first instance stands for the task
    else:
        example = data
    output = example.get("output")
    if not isinstance(output, str) or not output.strip():
        where_output = "instances[0].output" if instances is not None else "output"
        # A worked example without an output would teach the teacher to leave outputs empty.
        raise DataError(f"{where}: field '{where_output}': expected a non-empty string")
    given = example.get("input")
    return Task(_one_line(instruction), given.strip() if isinstance(given, str) else "", output.strip())


def _one_line(text: str) -> str:
    return re.sub(r"\s+", " ", text).strip()


def build_prompt(examples: list[Task]) -> str:
    """The few-shot prompt: numbered example tasks, then the header of the next one for the teacher to fill."""
    blocks = [f"Task {i}\nInstruction: {t.instruction}\nInput: {t.input or NO_INPUT}\nOutput: {t.output}"
              for i, t in enumerate(examples, 1)]
    return PROMPT_HEAD + "\n" + "\n\n".join(blocks) + f"\n\nTask {len(examples) + 1}\n"


def sample_examples(rng: random.Random, seeds: list[Example], generated: list[Example], k: int) -> list[Example]:
    """k examples; a quarter of them (Self-Instruct: 2 of 8) from generated tasks once there are some,
    so the teacher sees its own kind of task without drifting from the human-written ones."""
    machine = rng.sample(generated, min(len(generated), round(k / 4)))
    picked = machine + rng.sample(seeds, min(len(seeds), k - len(machine)))
    rng.shuffle(picked)
    return picked


# ---------------------------------------------------------------- parsing and filters


def parse_answer(text: str) -> list[Task]:
    """Every task in a teacher's answer, in order; [] when there is no "Instruction:" label.

    Text before the first label (a preamble, "Task 4") is ignored; so are separator lines between tasks.
    """
    blocks: list[dict[str, str]] = []
    labels = list(_LABEL_RE.finditer(text))
    for i, match in enumerate(labels):
        end = labels[i + 1].start() if i + 1 < len(labels) else len(text)
        field, value = match.group(1).lower(), _strip_separators(text[match.end():end])
        if field == "instruction":
            blocks.append({"instruction": value})
        elif blocks and field not in blocks[-1]:
            blocks[-1][field] = value
    return [Task(_one_line(b["instruction"]), _clean_input(b.get("input", "")), b.get("output")) for b in blocks]


def _strip_separators(value: str) -> str:
    lines = value.strip().splitlines()
    while lines and _SEPARATOR_RE.match(lines[-1]):
        lines.pop()
    return "\n".join(lines).strip()


def _clean_input(value: str) -> str:
    return "" if value.strip().lower() in _EMPTY_INPUTS else value


def instruction_problem(instruction: str) -> str | None:
    """Why an instruction fails the paper's text filters, or None when it passes."""
    words = len(instruction.split())
    if words < MIN_WORDS:
        return "too_short"
    if words > MAX_WORDS:
        return "too_long"
    if _BLACKLIST_RE.search(instruction):
        return "blacklisted"
    # The repo's note: teachers turn many tasks into "write a program" variants, ambiguous about
    # whether the program or its result is wanted.
    if instruction.lower().startswith("write a program"):
        return "write_a_program"
    if instruction[0] in string.punctuation or not instruction[0].isascii():
        return "bad_start"
    return None


def _rouge_scorer():
    try:
        from rouge_score import rouge_scorer
    except ImportError:
        raise ConfigError("tunesmith data generate needs rouge-score: pip install 'tunesmith[data]'") from None
    return rouge_scorer.RougeScorer(["rougeL"], use_stemmer=False)


class SimilarityFilter:
    """ROUGE-L F of a new instruction against every instruction in the pool (seeds + kept)."""

    def __init__(self, instructions: list[str], threshold: float = 0.7):
        self.scorer = _rouge_scorer()
        self.pool = list(instructions)
        self.threshold = threshold

    def most_similar(self, instruction: str) -> tuple[float, str | None]:
        best, closest = 0.0, None
        for other in self.pool:
            score = self.scorer.score(other, instruction)["rougeL"].fmeasure
            if score > best:
                best, closest = score, other
        return best, closest

    def too_similar(self, score: float) -> bool:
        return score >= self.threshold  # the paper keeps an instruction only below the threshold

    def add(self, instruction: str) -> None:
        self.pool.append(instruction)


def _dedup_key(instruction: str) -> str:
    return " ".join(instruction.lower().split())


# ---------------------------------------------------------------- the teacher


def _openai():
    try:
        import openai
    except ImportError:
        raise ConfigError("tunesmith data generate needs the openai client: pip install 'tunesmith[data]'") from None
    return openai


def _api_key(api_key: str | None) -> str:
    # TUNESMITH_API_KEY first: it is what `tunesmith serve` checks, and a global OPENAI_API_KEY
    # should not be sent to a local server by accident. Local servers accept any placeholder.
    return api_key or os.environ.get("TUNESMITH_API_KEY") or os.environ.get("OPENAI_API_KEY") or "not-needed"


def connect(base_url: str, api_key: str | None = None):
    """An OpenAI client for base_url, after one cheap request (GET /models) shows the endpoint answers."""
    openai = _openai()
    client = openai.OpenAI(base_url=base_url, api_key=_api_key(api_key))
    try:
        client.with_options(max_retries=0, timeout=15).models.list()
    except openai.APIConnectionError as exc:
        raise TunesmithError(f"cannot reach the teacher at {base_url} ({exc}): is the server running, and is "
                             "--base-url right (it usually ends in /v1)?") from None
    except openai.APIStatusError as exc:
        hint = {401: "check --api-key (or TUNESMITH_API_KEY / OPENAI_API_KEY)", 403: "check --api-key",
                404: "no OpenAI-compatible API there; the base URL usually ends in /v1"}.get(exc.status_code, "")
        raise TunesmithError(f"the teacher at {base_url} answered GET /models with {exc.status_code}: "
                             f"{exc.message}" + (f"; {hint}" if hint else "")) from None
    return client


def _ask(client, base_url: str, model: str, prompt: str, sampling: dict[str, Any]) -> Answer:
    openai = _openai()
    try:
        response = client.chat.completions.create(model=model, messages=[{"role": "user", "content": prompt}],
                                                  **sampling)
    except openai.APITimeoutError:
        return Answer(error="timed out")
    except openai.APIConnectionError as exc:
        raise TunesmithError(f"lost the teacher at {base_url} ({exc})") from None
    except openai.APIStatusError as exc:
        if exc.status_code == 429 or exc.status_code >= 500:  # the client already retried these
            return Answer(error=f"{exc.status_code}: {exc.message}")
        # Anything else (unknown model, max_tokens over the server's limit) would fail every request.
        raise TunesmithError(f"the teacher at {base_url} refused a request for model '{model}' with "
                             f"{exc.status_code}: {exc.message}") from None
    if not response.choices:
        return Answer()
    choice = response.choices[0]
    return Answer(text=choice.message.content or "", finish_reason=choice.finish_reason)


def _endpoint(base_url: str) -> str:
    """host[:port] only: a URL can carry credentials, which must not end up in a dataset."""
    parts = urlsplit(base_url)
    return f"{parts.hostname}:{parts.port}" if parts.port else str(parts.hostname or base_url)


# ---------------------------------------------------------------- files


def _paths(output: Path) -> tuple[Path, Path]:
    return Path(f"{output}.partial"), Path(f"{output}.stats.json")


def _check_output(output: Path, partial: Path, overwrite: bool, resume: bool) -> None:
    if overwrite and resume:
        raise ConfigError("choose one of overwrite (start again) and resume (continue)")
    if output.is_dir():
        raise ConfigError(f"output {output} is a folder; name a .jsonl file")
    if overwrite or resume:
        return
    if output.exists():
        raise ConfigError(f"output {output} exists; pass --overwrite to replace it or --resume to add to it")
    if partial.exists():
        raise ConfigError(f"{partial} holds an interrupted run; pass --resume to continue it or --overwrite "
                          "to start again")


def _read_previous(path: Path) -> list[dict]:
    """Rows of an earlier run. A torn last line (the run was killed mid-write) is dropped."""
    lines = path.read_text(encoding="utf-8").splitlines()
    rows = []
    for lineno, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except ValueError:
            if lineno == len(lines):
                break
            raise DataError(f"{path} line {lineno}: not a valid JSON object; cannot resume from it") from None
        if not isinstance(row, dict) or not isinstance(row.get("instruction"), str):
            raise DataError(f"{path} line {lineno}: field 'instruction': expected a string; cannot resume from it")
        rows.append(row)
    return rows


def _start_partial(partial: Path, rows: list[dict]):
    """The partial file holding `rows`, open for appending. Rewritten atomically so a crash here cannot
    lose the rows being carried over."""
    from ..files import write_text_atomic

    write_text_atomic(partial, "".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows))
    return partial.open("a", encoding="utf-8")


# ---------------------------------------------------------------- the run


def _check_settings(num_instructions: int, num_prompt_instructions: int, concurrency: int, temperature: float,
                    top_p: float, max_tokens: int, similarity_threshold: float, max_requests: int | None) -> None:
    checks = [("num_instructions", num_instructions >= 1, "at least 1"),
              ("num_prompt_instructions", num_prompt_instructions >= 1, "at least 1"),
              ("concurrency", concurrency >= 1, "at least 1"),
              ("temperature", temperature >= 0, "0 or more"),
              ("top_p", 0 < top_p <= 1, "in (0, 1]"),
              ("max_tokens", max_tokens >= 1, "at least 1"),
              ("similarity_threshold", 0 < similarity_threshold <= 1, "in (0, 1]"),
              ("max_requests", max_requests is None or max_requests >= 1, "at least 1")]
    for name, ok, expected in checks:
        if not ok:
            raise ConfigError(f"{name}: expected {expected}")


class _Run:
    """One run's state: the tasks kept so far (resumed ones included), the filters and the counts."""

    def __init__(self, seeds: list[Example], previous: list[dict], similarity: SimilarityFilter, target: int):
        self.generated = [Example(Task(r["instruction"], str(r.get("input") or ""), str(r.get("output") or "")),
                                  f"generated:{i}") for i, r in enumerate(previous)]
        self.seen = {_dedup_key(e.task.instruction) for e in seeds + self.generated}
        self.similarity = similarity
        self.target = target
        self.dropped = dict.fromkeys(REASONS, 0)
        self.candidates = self.unused = 0
        self.new = 0

    @property
    def kept(self) -> int:
        return len(self.generated)

    def judge(self, task: Task) -> tuple[str | None, float, str | None]:
        """(reason to drop or None, max ROUGE-L F, the most similar instruction)."""
        if not task.instruction or task.output is None:
            return "malformed", 0.0, None
        reason = instruction_problem(task.instruction)
        if reason is None and not task.output.strip():
            reason = "empty_output"
        if reason is None and _dedup_key(task.instruction) in self.seen:
            reason = "duplicate"
        if reason:
            return reason, 0.0, None
        score, closest = self.similarity.most_similar(task.instruction)
        return ("similar" if self.similarity.too_similar(score) else None), score, closest

    def take(self, answer: Answer, meta: dict[str, Any], out) -> None:
        """Count and filter one answer's tasks; append the kept ones to the partial file."""
        if answer.error is not None:
            self.dropped["request_error"] += 1
            return
        tasks = parse_answer(answer.text)
        if not tasks:
            self.dropped["truncated" if answer.finish_reason == "length" else "malformed"] += 1
            return
        for i, task in enumerate(tasks):
            self.candidates += 1
            if self.kept >= self.target:
                self.unused += 1
                continue
            if answer.finish_reason == "length" and i == len(tasks) - 1:
                self.dropped["truncated"] += 1  # its output was cut off mid-way
                continue
            reason, score, closest = self.judge(task)
            if reason:
                self.dropped[reason] += 1
                continue
            self.keep(task, score, closest, meta, out)

    def keep(self, task: Task, score: float, closest: str | None, meta: dict[str, Any], out) -> None:
        row = {"instruction": task.instruction, "input": task.input, "output": task.output.strip(),
               "provenance": {**meta, "rouge_l_max": round(score, 4), "most_similar": closest,
                              "created": datetime.now(timezone.utc).isoformat(timespec="seconds")}}
        out.write(json.dumps(row, ensure_ascii=False) + "\n")
        out.flush()  # each kept row reaches the file at once: a killed run keeps it
        self.generated.append(Example(task, f"generated:{self.kept}"))
        self.seen.add(_dedup_key(task.instruction))
        self.similarity.add(task.instruction)
        self.new += 1


def generate_instructions(
    seed_file: str | Path,
    output: str | Path,
    *,
    base_url: str,
    api_key: str | None = None,
    model: str,
    num_instructions: int,
    num_prompt_instructions: int = 3,
    concurrency: int = 4,
    temperature: float = 0.7,
    top_p: float = 0.5,
    max_tokens: int = 512,
    similarity_threshold: float = 0.7,
    seed: int = 0,
    max_requests: int | None = None,
    overwrite: bool = False,
    resume: bool = False,
    echo: Callable[[str], None] | None = None,
) -> dict[str, Any]:
    """Ask a teacher for new tasks until `num_instructions` are kept (counting resumed rows) or
    `max_requests` requests are spent (default 4 per instruction still wanted); return the counts.

    Writes `output` (JSONL: instruction, input, output, provenance) and `<output>.stats.json`.
    Sampling defaults are the Self-Instruct repo's (temperature 0.7, top_p 0.5).
    """
    say = echo or (lambda _m: None)
    output = Path(output)
    partial, stats_path = _paths(output)
    _check_settings(num_instructions, num_prompt_instructions, concurrency, temperature, top_p, max_tokens,
                    similarity_threshold, max_requests)
    _check_output(output, partial, overwrite, resume)
    seeds = load_seeds(seed_file)
    previous_file = partial if partial.exists() else output
    previous = _read_previous(previous_file) if resume and previous_file.exists() else []
    if previous:
        say(f"resuming from {previous_file}: {len(previous)} rows")
    similarity = SimilarityFilter([e.task.instruction for e in seeds] + [r["instruction"] for r in previous],
                                  similarity_threshold)
    client = connect(base_url, api_key)

    run = _Run(seeds, previous, similarity, num_instructions)
    first_request = 1 + max((_request_index(r) for r in previous), default=-1)
    budget = max_requests or 4 * max(num_instructions - run.kept, 1)
    endpoint = _endpoint(base_url)
    sampling = {"temperature": temperature, "top_p": top_p, "max_tokens": max_tokens}
    sent, written = 0, False
    output.parent.mkdir(parents=True, exist_ok=True)
    out = _start_partial(partial, previous)
    try:
        with ThreadPoolExecutor(max_workers=concurrency) as pool:
            while run.kept < num_instructions and sent < budget:
                # Rounds of requests built from the same pool and taken in request order, so a run is
                # reproducible whatever order the answers arrive in.
                size = min(concurrency, num_instructions - run.kept, budget - sent)
                requests = []
                for index in range(first_request + sent, first_request + sent + size):
                    # Each request's own generator: a resumed run does not replay the first run's prompts.
                    rng = random.Random(seed * 1_000_003 + index)
                    examples = sample_examples(rng, seeds, run.generated, num_prompt_instructions)
                    params = {**sampling, "seed": rng.randrange(2**31)}
                    meta = {"method": "self-instruct", "teacher": model, "endpoint": endpoint, "request": index,
                            "examples": [e.ref for e in examples], "sampling": params}
                    requests.append((build_prompt([e.task for e in examples]), params, meta))
                answers = pool.map(lambda r: _ask(client, base_url, model, r[0], r[1]), requests)
                for (_prompt, _params, meta), answer in zip(requests, answers):
                    run.take(answer, meta, out)
                sent += size
                say(f"requests {sent}/{budget}: kept {run.kept}/{num_instructions}, "
                    f"dropped {sum(run.dropped.values())}")
        out.close()
        os.replace(partial, output)
        written = True
    finally:
        out.close()
        summary = _summary(run, output, stats_path, written, sent, budget, len(previous), model, endpoint,
                           {**sampling, "seed": seed, "num_prompt_instructions": num_prompt_instructions,
                            "similarity_threshold": similarity_threshold, "concurrency": concurrency})
        stats_path.write_text(json.dumps(summary, indent=1) + "\n", encoding="utf-8")
    return summary


def _request_index(row: dict) -> int:
    provenance = row.get("provenance")
    return provenance.get("request", -1) if isinstance(provenance, dict) else -1


def _summary(run: _Run, output: Path, stats_path: Path, written: bool, sent: int, budget: int, resumed: int,
             model: str, endpoint: str, settings: dict[str, Any]) -> dict[str, Any]:
    # written: the output file holds the rows (False: they are in <output>.partial, for resume).
    return {"output": str(output), "stats": str(stats_path), "written": written, "kept": run.kept,
            "target": run.target, "complete": written and run.kept >= run.target, "new": run.new,
            "resumed": resumed, "requests": sent, "max_requests": budget, "candidates": run.candidates, "dropped": dict(run.dropped),
            "unused": run.unused, "teacher": model, "endpoint": endpoint, "settings": settings}
