"""Reward functions for online RL: the built-in registry and user functions by import path.

A reward function is called once per rollout batch, TRL's way, so functions written for TRL's
GRPOTrainer work unchanged:

    fn(prompts=[...], completions=[...], completion_ids=[[...], ...], **columns) -> list[float | None]

`completions` are strings, or for chat prompts one-message lists
`[{"role": "assistant", "content": text}]`; `columns` holds every other column of the prompt
rows (`answer`, ...), one value per completion. `None` means "does not apply to this
completion"; a completion no function scores gets advantage 0.

In a config (objective.rewards), each entry names a built-in or `module:function`, a weight,
and the built-in's arguments, which are validated with the config (no torch is imported here):

    rewards:
      - {function: correctness, weight: 1.0, args: {extract: gsm8k}}
      - {function: my_rewards:score, weight: 0.5}

Built-ins (`tunesmith rewards` lists them with their arguments):
- correctness: exact match of the extracted answer with the row's reference column, through the
  evaluation package's extraction and normalization (`####`, last number, `\\boxed{}`, regex).
- format: a regular expression the completion must match.
- overlong: DAPO's soft overlong punishment (0 up to max_length − buffer, then down to −1 at max_length).
- xml_count: the willccbb GSM8K gist's partial credit for each reasoning/answer tag in its place
  (its arithmetic exactly).
"""

from __future__ import annotations

import importlib
import inspect
import re
from typing import Any, Callable, ClassVar, Literal, get_args, get_origin

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from .errors import ConfigError
from .evaluation.extract import DEFAULT_NORMALIZE, EXTRACTORS, check_extraction, check_normalization, prepare

RewardFn = Callable[..., list]


def completion_text(completion: Any) -> str:
    """A completion as text: a string, or the content of a chat completion's messages."""
    if isinstance(completion, str):
        return completion
    if isinstance(completion, list):
        return "".join(str(m.get("content", "")) for m in completion if isinstance(m, dict))
    if isinstance(completion, dict):
        return str(completion.get("content", ""))
    return str(completion)


class _Args(BaseModel):
    model_config = ConfigDict(extra="forbid")


class BuiltinReward:
    """A built-in reward function: its arguments are a pydantic model, checked with the config."""

    name: ClassVar[str]
    Args: ClassVar[type[_Args]] = _Args

    def __init__(self, **args: Any):
        self.args = self.Args(**args)

    def score(self, text: str, ids: list[int], row: dict) -> float | None:
        raise NotImplementedError

    def columns(self) -> list[str]:
        """The prompt rows' columns this function reads (checked before training)."""
        return []

    def __call__(self, prompts: list, completions: list, completion_ids: list, **columns: Any) -> list[float | None]:
        out = []
        for i, completion in enumerate(completions):
            row = {k: v[i] for k, v in columns.items()}
            out.append(self.score(completion_text(completion), list(completion_ids[i]), row))
        return out


class Correctness(BuiltinReward):
    """`reward` when the completion's extracted answer equals the reference column's, else 0."""

    name = "correctness"

    class Args(_Args):
        column: str = Field("answer", description="The prompt rows' column holding the reference answer.")
        extract: Literal[EXTRACTORS] = Field("gsm8k", description="How the answer is taken from the completion.")
        pattern: str | None = Field(None, description="With extract regex: the pattern (group 1 or the match).")
        reference_extract: Literal[EXTRACTORS] | None = Field(
            None, description="How the answer is taken from the reference (default: as from the completion).")
        normalize: list[str] = Field(list(DEFAULT_NORMALIZE), description="Normalizations before comparing.")
        reward: float = Field(1.0, description="The reward of a correct answer.")

        @field_validator("normalize")
        @classmethod
        def _known(cls, value: list[str]) -> list[str]:
            check_normalization(value)
            return value

        def model_post_init(self, _context: Any) -> None:
            check_extraction(self.extract, self.pattern)

    def columns(self) -> list[str]:
        return [self.args.column]

    def score(self, text: str, ids: list[int], row: dict) -> float | None:
        a = self.args
        if a.column not in row:
            raise KeyError(f"the prompt rows have no column '{a.column}' (they have: {', '.join(row) or 'none'})")
        if row[a.column] is None:
            return None
        predicted = prepare(text, a.extract, a.pattern, a.normalize)
        expected = prepare(str(row[a.column]), a.reference_extract or a.extract, a.pattern, a.normalize)
        return a.reward if predicted and predicted == expected else 0.0


class Format(BuiltinReward):
    """`reward` when the completion matches `pattern` (re.DOTALL), else 0."""

    name = "format"

    class Args(_Args):
        pattern: str = Field(description="A Python regular expression, e.g. '^<reasoning>.*</reasoning>\\s*<answer>.*</answer>$'.")
        match: Literal["search", "fullmatch"] = Field("search", description="Anywhere, or the whole completion.")
        reward: float = 1.0

        @field_validator("pattern")
        @classmethod
        def _compiles(cls, value: str) -> str:
            try:
                re.compile(value)
            except re.error as exc:
                raise ValueError(f"{value!r} is not a valid regular expression: {exc}") from None
            return value

    def __init__(self, **args: Any):
        super().__init__(**args)
        self.regex = re.compile(self.args.pattern, re.DOTALL)

    def score(self, text: str, ids: list[int], row: dict) -> float | None:
        found = self.regex.fullmatch(text.strip()) if self.args.match == "fullmatch" else self.regex.search(text)
        return self.args.reward if found else 0.0


class Overlong(BuiltinReward):
    """DAPO's soft overlong punishment on the completion's token count n (Yu et al. 2025, eq. 13):
    0 while n <= max_length - buffer, then falling linearly to -1 at max_length, -1 beyond."""

    name = "overlong"

    class Args(_Args):
        max_length: int = Field(gt=0, description="The length that earns -1 (usually max_completion_length).")
        buffer: int = Field(gt=0, description="The tokens before max_length over which the penalty grows.")

        def model_post_init(self, _context: Any) -> None:
            if self.buffer > self.max_length:
                raise ValueError(f"buffer ({self.buffer}) must not exceed max_length ({self.max_length})")

    def score(self, text: str, ids: list[int], row: dict) -> float | None:
        start = self.args.max_length - self.args.buffer
        n = len(ids)
        if n <= start:
            return 0.0
        return max(-1.0, (start - n) / self.args.buffer)


class XmlCount(BuiltinReward):
    """The willccbb GSM8K gist's partial credit for the layout '<reasoning>\\n...\\n</reasoning>\\n<answer>\\n...\\n</answer>\\n'.

    Exactly as the gist scores it: `per_tag` for each of '<reasoning>\\n', '\\n</reasoning>\\n',
    '\\n<answer>\\n' and '\\n</answer>' found exactly once; with the answer's opening tag, less
    `per_trailing_char` per character after '\\n</answer>\\n'; with its closing tag, less
    `per_trailing_char` per character after '\\n</answer>' beyond the one newline it expects. (So
    trailing text is charged twice, and a completion ending right at '</answer>' earns 0.001 more
    than one ending in a newline: the gist's arithmetic, kept so its numbers reproduce.)"""

    name = "xml_count"

    class Args(_Args):
        reasoning_tag: str = "reasoning"
        answer_tag: str = "answer"
        per_tag: float = 0.125
        per_trailing_char: float = 0.001

    def score(self, text: str, ids: list[int], row: dict) -> float | None:
        a = self.args
        r, ans = a.reasoning_tag, a.answer_tag
        total = 0.0
        if text.count(f"<{r}>\n") == 1:
            total += a.per_tag
        if text.count(f"\n</{r}>\n") == 1:
            total += a.per_tag
        if text.count(f"\n<{ans}>\n") == 1:
            total += a.per_tag - a.per_trailing_char * len(text.split(f"\n</{ans}>\n")[-1])
        if text.count(f"\n</{ans}>") == 1:
            total += a.per_tag - a.per_trailing_char * (len(text.split(f"\n</{ans}>")[-1]) - 1)
        return total


BUILTIN_REWARDS: dict[str, type[BuiltinReward]] = {c.name: c for c in (Correctness, Format, Overlong, XmlCount)}


class RewardSpec(BaseModel):
    """One entry of objective.rewards."""

    model_config = ConfigDict(extra="forbid")
    function: str = Field(description="A built-in's name, or 'module:function' importable from the run's directory.")
    weight: float = 1.0
    args: dict[str, Any] = Field(default_factory=dict, description="The built-in's arguments.")

    @field_validator("function")
    @classmethod
    def _known(cls, value: str) -> str:
        if value not in BUILTIN_REWARDS and not re.fullmatch(r"[\w.]+:[\w.]+", value):
            raise ValueError(f"'{value}' is neither a built-in reward function ({', '.join(BUILTIN_REWARDS)}) "
                             "nor an import path 'module:function'")
        return value

    def model_post_init(self, _context: Any) -> None:
        if self.function in BUILTIN_REWARDS:
            try:
                BUILTIN_REWARDS[self.function].Args(**self.args)
            except ValidationError as exc:
                problems = "; ".join(f"{'.'.join(map(str, e['loc'])) or 'args'}: {e['msg']}" for e in exc.errors())
                raise ValueError(f"reward function '{self.function}': {problems}") from None
        elif self.args:
            raise ValueError(f"'{self.function}' is a user function: it is called with the rollout, not with args "
                             f"(got {sorted(self.args)}); bind them in your module")

    @property
    def log_name(self) -> str:
        return self.function.rsplit(":", 1)[-1].rsplit(".", 1)[-1]


def load_reward(spec: RewardSpec) -> RewardFn:
    """The callable a spec names: a configured built-in, or the user's function imported by path."""
    if spec.function in BUILTIN_REWARDS:
        return BUILTIN_REWARDS[spec.function](**spec.args)
    module_name, attr = spec.function.split(":", 1)
    try:
        module = importlib.import_module(module_name)
    except Exception as exc:  # the user's module may fail in any way; say which and why
        raise ConfigError(f"reward function '{spec.function}': cannot import module '{module_name}': "
                          f"{type(exc).__name__}: {exc}") from None
    fn: Any = module
    for part in attr.split("."):
        fn = getattr(fn, part, None)
        if fn is None:
            raise ConfigError(f"reward function '{spec.function}': module '{module_name}' has no '{attr}'")
    if not callable(fn):
        raise ConfigError(f"reward function '{spec.function}' is not callable")
    return fn


def call_rewards(functions: list[tuple[RewardSpec, RewardFn]], prompts: list, completions: list,
                 completion_ids: list, columns: dict[str, list]) -> list[list[float | None]]:
    """Every function's rewards, one list per function; a function that fails or answers with the wrong
    shape is named, with the completion (row) it failed on when known."""
    out = []
    for spec, fn in functions:
        try:
            got = fn(prompts=prompts, completions=completions, completion_ids=completion_ids, **columns)
        except Exception as exc:
            raise ConfigError(_failure(spec, fn, prompts, completions, completion_ids, columns, exc)) from None
        if not isinstance(got, (list, tuple)) or len(got) != len(completions):
            size = len(got) if isinstance(got, (list, tuple)) else type(got).__name__
            raise ConfigError(f"reward function '{spec.function}' returned {size} values for {len(completions)} "
                              "completions; it must return one float (or None) per completion")
        values = []
        for i, value in enumerate(got):
            number = _real(value)
            if value is not None and number is None:
                raise ConfigError(f"reward function '{spec.function}' returned {value!r} for completion {i}; "
                                  "rewards are floats or None")
            values.append(number)
        out.append(values)
    return out


COLUMN_CHECK_ROWS = 1000  # rows whose columns are looked at before training (all of them in most prompt sets)


def check_reward_columns(functions: list[tuple[RewardSpec, RewardFn]], rows: list[dict]) -> None:
    """Refuse, before any rollout, a built-in reward whose column no prompt row has."""
    present = set().union(*rows) if rows else set()
    for spec, fn in functions:
        for column in getattr(fn, "columns", lambda: [])():
            if column not in present:
                raise ConfigError(f"reward function '{spec.function}' reads column '{column}', which the prompt rows "
                                  f"do not have (they have: {', '.join(sorted(present)) or 'none'}); set its "
                                  "args.column, or map the column with data.columns")


def _real(value) -> float | None:
    """A reward as a float: Python, numpy and 0-d tensor numbers (what TRL reward functions return), not bools."""
    if getattr(value, "ndim", None) == 0 and hasattr(value, "item"):  # numpy scalars, 0-d arrays and tensors
        value = value.item()
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    return None


def _failure(spec: RewardSpec, fn: RewardFn, prompts: list, completions: list, completion_ids: list,
             columns: dict[str, list], exc: Exception) -> str:
    """Find the completion a batch call failed on by calling the function on each completion alone."""
    where = ""
    for i in range(len(completions)):
        try:
            fn(prompts=prompts[i:i + 1], completions=completions[i:i + 1], completion_ids=completion_ids[i:i + 1],
               **{k: v[i:i + 1] for k, v in columns.items()})
        except Exception as single:
            exc, where = single, f" on completion {i} (prompt {_short(completion_text(prompts[i]))!r})"
            break
    return f"reward function '{spec.function}' failed{where}: {type(exc).__name__}: {exc}"


def _short(text: str, limit: int = 60) -> str:
    text = " ".join(str(text).split())
    return text if len(text) <= limit else text[: limit - 1] + "…"


def _type_name(annotation: Any) -> str:
    """'gsm8k | last_number | ...' for a Literal, 'str or none' for an Optional, else the type's name."""
    origin, args = get_origin(annotation), get_args(annotation)
    if origin is Literal:
        return " | ".join(map(str, args))
    if args and type(None) in args:
        rest = [a for a in args if a is not type(None)]
        return f"{' or '.join(_type_name(a) for a in rest)} or none"
    if origin is list:
        return f"list of {_type_name(args[0])}" if args else "list"
    return getattr(annotation, "__name__", str(annotation))


def describe_builtins() -> list[dict]:
    """Each built-in with its summary and arguments (name, type, default, description): `tunesmith rewards`."""
    out = []
    for name, cls in BUILTIN_REWARDS.items():
        args = []
        for field_name, info in cls.Args.model_fields.items():
            default = "required" if info.is_required() else repr(info.get_default(call_default_factory=True))
            annotation = _type_name(info.annotation)
            args.append({"name": field_name, "type": annotation, "default": default,
                         "description": info.description or ""})
        out.append({"name": name, "summary": inspect.cleandoc(cls.__doc__ or "").split("\n\n")[0], "args": args})
    return out
