"""Reward functions: the built-ins by hand, user functions by import path, and failures named."""

from __future__ import annotations

import sys
import textwrap

import pytest

from tunesmith.errors import ConfigError
from tunesmith.reward_functions import (
    BUILTIN_REWARDS,
    RewardSpec,
    call_rewards,
    describe_builtins,
    load_reward,
)


def run(spec: dict, completions: list, ids: list | None = None, **columns) -> list:
    s = RewardSpec(**spec)
    ids = ids if ids is not None else [[0] * len(str(c)) for c in completions]
    (got,) = call_rewards([(s, load_reward(s))], ["p"] * len(completions), completions, ids, columns)
    return got


def test_correctness_compares_extracted_and_normalised_answers():
    got = run({"function": "correctness"},
              ["so she sold 72 clips.", "#### 1,000", "I think 71", "no number"],
              answer=["Natalia sold 48/2 = 24 ... #### 72", "1000", "72", "72"])
    assert got == [1.0, 1.0, 0.0, 0.0]
    boxed = run({"function": "correctness", "args": {"extract": "boxed", "reward": 2.0}},
                [r"thus \boxed{\frac{1}{2}}", "1/2"], answer=[r"\boxed{\frac{1}{2}}", r"\boxed{\frac{1}{2}}"])
    assert boxed == [2.0, 0.0]
    tagged = run({"function": "correctness", "args": {"extract": "regex", "pattern": r"<answer>\s*(.*?)\s*</answer>",
                                                        "reference_extract": "none", "column": "gold"}},
                 ["<reasoning>x</reasoning>\n<answer>\nParis\n</answer>", "<answer>Rome</answer>"],
                 gold=["paris", "paris"])
    assert tagged == [1.0, 0.0]


def test_correctness_reads_chat_completions_and_skips_rows_without_a_reference():
    got = run({"function": "correctness"}, [[{"role": "assistant", "content": "It is 5."}]] * 2, answer=["5", None])
    assert got == [1.0, None]


def test_format_search_and_fullmatch():
    pattern = r"^<reasoning>.*</reasoning>\s*<answer>.*</answer>$"
    good = "<reasoning>\nadd\n</reasoning>\n<answer>\n4\n</answer>"
    assert run({"function": "format", "args": {"pattern": pattern}}, [good, "4"]) == [1.0, 0.0]
    assert run({"function": "format", "args": {"pattern": "answer", "match": "fullmatch"}}, ["answer", "the answer"]) \
        == [1.0, 0.0]


def test_overlong_is_dapos_soft_punishment():
    spec = {"function": "overlong", "args": {"max_length": 10, "buffer": 4}}
    got = run(spec, ["a"] * 4, ids=[[0] * 6, [0] * 8, [0] * 10, [0] * 12])
    assert got == [0.0, -0.5, -1.0, -1.0]


def test_xml_count_gives_each_placed_tag_its_credit():
    whole = "<reasoning>\nadd\n</reasoning>\n<answer>\n4\n</answer>\n"
    assert run({"function": "xml_count"}, [whole])[0] == pytest.approx(0.5)
    assert run({"function": "xml_count"}, [whole + "extra"])[0] == pytest.approx(0.5 - 0.005 * 2)
    # No newline before <answer>: only the closing tag counts, plus the gist's 0.001 for the newline it expects.
    assert run({"function": "xml_count"}, ["<answer>\n4\n</answer>"])[0] == pytest.approx(0.126)
    assert run({"function": "xml_count"}, ["4"])[0] == 0.0


def test_bad_specs_are_refused_with_the_reason():
    with pytest.raises(ValueError, match="neither a built-in reward function"):
        RewardSpec(function="corectness")
    with pytest.raises(ValueError, match="reward function 'format': pattern: .*not a valid regular expression"):
        RewardSpec(function="format", args={"pattern": "(unclosed"})
    with pytest.raises(ValueError, match="reward function 'correctness': extract"):
        RewardSpec(function="correctness", args={"extract": "sometimes"})
    with pytest.raises(ValueError, match="reward function 'overlong': .*buffer \\(20\\) must not exceed"):
        RewardSpec(function="overlong", args={"max_length": 10, "buffer": 20})
    with pytest.raises(ValueError, match="user function: it is called with the rollout"):
        RewardSpec(function="mine:score", args={"x": 1})


@pytest.fixture
def user_module(tmp_path, monkeypatch):
    (tmp_path / "my_rewards.py").write_text(textwrap.dedent("""
        def score(prompts, completions, completion_ids, answer, **kwargs):
            return [float(len(c)) if a != "boom" else 1 / 0 for c, a in zip(completions, answer)]

        def wrong_length(prompts, completions, **kwargs):
            return [1.0]

        def numpy_and_torch(prompts, completions, **kwargs):
            import numpy as np
            import torch
            return [np.float32(0.5), np.int64(2), torch.tensor(1.5), None]

        def a_bool(prompts, completions, **kwargs):
            import numpy as np
            return [np.bool_(True)] * len(completions)

        NOT_CALLABLE = 3
    """))
    monkeypatch.syspath_prepend(str(tmp_path))
    yield
    sys.modules.pop("my_rewards", None)


def test_user_functions_get_every_column(user_module):
    assert run({"function": "my_rewards:score"}, ["ab", "abcd"], answer=["x", "y"]) == [2.0, 4.0]
    assert RewardSpec(function="my_rewards:score").log_name == "score"


def test_user_function_failures_name_the_function_and_the_completion(user_module):
    with pytest.raises(ConfigError, match=r"'my_rewards:score' failed on completion 1 \(prompt 'p'\): "
                                          r"ZeroDivisionError"):
        run({"function": "my_rewards:score"}, ["a", "b", "c"], answer=["x", "boom", "y"])
    with pytest.raises(ConfigError, match="returned 1 values for 2 completions"):
        run({"function": "my_rewards:wrong_length"}, ["a", "b"])
    with pytest.raises(ConfigError, match="has no 'missing'"):
        load_reward(RewardSpec(function="my_rewards:missing"))
    with pytest.raises(ConfigError, match="is not callable"):
        load_reward(RewardSpec(function="my_rewards:NOT_CALLABLE"))
    with pytest.raises(ConfigError, match="cannot import module 'nowhere_to_be_found'"):
        load_reward(RewardSpec(function="nowhere_to_be_found:f"))


def test_numpy_and_tensor_numbers_are_rewards_and_bools_are_not(user_module):
    # TRL reward functions often return numpy or torch scalars.
    got = run({"function": "my_rewards:numpy_and_torch"}, ["a", "b", "c", "d"])
    assert got == [0.5, 2.0, 1.5, None] and all(type(v) is float for v in got[:3])
    with pytest.raises(ConfigError, match="returned np.True_ for completion 0; rewards are floats or None"):
        run({"function": "my_rewards:a_bool"}, ["a"])


def test_a_missing_reference_column_is_named():
    with pytest.raises(ConfigError, match="'correctness' failed on completion 0.*no column 'answer' \\(they have: "
                                          "solution\\)"):
        run({"function": "correctness"}, ["4"], solution=["4"])


def test_every_builtin_is_described_with_its_arguments():
    described = {d["name"]: d for d in describe_builtins()}
    assert set(described) == set(BUILTIN_REWARDS)
    overlong = {a["name"]: a for a in described["overlong"]["args"]}
    assert overlong["max_length"]["default"] == "required"
    assert described["correctness"]["summary"].startswith("`reward` when the completion's extracted answer")


def test_rewards_command_lists_every_builtin_and_its_arguments():
    from typer.testing import CliRunner

    from tunesmith.cli import app

    out = CliRunner().invoke(app, ["rewards"], env={"COLUMNS": "200"})
    assert out.exit_code == 0
    for fn in describe_builtins():
        assert f"{fn['name']}:" in out.output
        for arg in fn["args"]:
            assert arg["name"] in out.output
    assert "my_module:my_function" in out.output
