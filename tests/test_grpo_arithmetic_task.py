"""The generated arithmetic task of benchmarks/grpo_arithmetic.py: a worked solution (what SFT trains on
with --reference worked) must be right, equation by equation, and end in the problem's answer."""

from __future__ import annotations

import json
import re

import pytest


def test_worked_solutions_chain_correct_equations_to_the_answer(grpo_arithmetic, tmp_path):
    _, heldout, sft = grpo_arithmetic.write_splits(tmp_path, ops=[1, 2], train=200, heldout=5, reference="worked")
    rows = [json.loads(line) for line in sft.read_text().splitlines()]
    assert len(rows) == 200
    for row in rows:
        equations = re.findall(r"(\d+) ([-+*]) (\d+) = (\d+)\.", row["completion"])
        # The prompt names every operand after the first, so the solution has one equation per sentence
        # between the first and the question.
        assert len(equations) == len(row["prompt"].split(". ")) - 2, row
        running = int(re.search(r"has (\d+) ", row["prompt"]).group(1))
        for a, op, b, result in equations:
            assert int(a) == running
            running = {"+": running + int(b), "-": running - int(b), "*": running * int(b)}[op]
            assert int(result) == running > 0
        assert row["completion"].endswith(f"The answer is {running}.")
    assert {len(json.loads(line)) for line in heldout.read_text().splitlines()} == {3}


def test_direct_reference_is_unchanged_and_the_same_problems(grpo_arithmetic, tmp_path):
    direct = tmp_path / "direct"
    worked = tmp_path / "worked"
    direct.mkdir(), worked.mkdir()
    d = grpo_arithmetic.write_splits(direct, ops=[1], train=20, heldout=5)
    w = grpo_arithmetic.write_splits(worked, ops=[1], train=20, heldout=5, reference="worked")
    assert d[0].read_text() == w[0].read_text() and d[1].read_text() == w[1].read_text()
    answers = [json.loads(line)["answer"] for line in d[0].read_text().splitlines()]
    assert [json.loads(line)["completion"] for line in d[2].read_text().splitlines()] == \
        [f"The answer is {a}." for a in answers]


def test_unknown_reference_is_refused(grpo_arithmetic, tmp_path):
    with pytest.raises(ValueError, match="reference must be one of"):
        grpo_arithmetic.write_splits(tmp_path, ops=[1], train=2, heldout=1, reference="cot")


def test_instruction_changes_only_the_prompt_ending(grpo_arithmetic, tmp_path):
    number, steps = tmp_path / "number", tmp_path / "steps"
    number.mkdir(), steps.mkdir()
    n = grpo_arithmetic.write_splits(number, ops=[1, 2], train=20, heldout=5)
    s = grpo_arithmetic.write_splits(steps, ops=[1, 2], train=20, heldout=5, instruction="steps")
    for a, b in zip(n, s):
        rows_n = [json.loads(line) for line in a.read_text().splitlines()]
        rows_s = [json.loads(line) for line in b.read_text().splitlines()]
        assert len(rows_n) == len(rows_s)
        for rn, rs in zip(rows_n, rows_s):
            # Same problems, same answers: only the instruction after the question differs.
            assert rn["prompt"].endswith(" Answer with the number.")
            assert rs["prompt"].endswith(" " + grpo_arithmetic.INSTRUCTIONS["steps"])
            assert rn["prompt"].split("? ")[0] == rs["prompt"].split("? ")[0]
            assert {k: v for k, v in rn.items() if k != "prompt"} == {k: v for k, v in rs.items() if k != "prompt"}
    with pytest.raises(ValueError, match="instruction must be one of"):
        grpo_arithmetic.write_splits(tmp_path, ops=[1], train=2, heldout=1, instruction="think")


def test_warm_split_gives_grpo_only_problems_the_warm_start_never_saw(grpo_arithmetic, tmp_path):
    grpo_arithmetic.write_splits(tmp_path, ops=[1, 2], train=10, heldout=2, reference="worked")
    warm, rest = grpo_arithmetic.split_prompts(tmp_path, 0.5)
    warm_prompts = [json.loads(line)["prompt"] for line in warm.read_text().splitlines()]
    rest_prompts = [json.loads(line)["prompt"] for line in rest.read_text().splitlines()]
    all_prompts = [json.loads(line)["prompt"] for line in (tmp_path / "train.jsonl").read_text().splitlines()]
    assert warm_prompts == all_prompts[:5] and rest_prompts == all_prompts[5:]
    assert all("completion" in json.loads(line) for line in warm.read_text().splitlines())
    assert all("answer" in json.loads(line) for line in rest.read_text().splitlines())
    with pytest.raises(ValueError, match="leaves no problems"):
        grpo_arithmetic.split_prompts(tmp_path, 0.01)
